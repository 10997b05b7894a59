"""Run by tests/engine/test_distributed.py under `torchrun --nproc_per_node=2`: a training run in which
process 1 alone gets a NaN pixel in the batches numbered in argv[2] (1-based, per process)."""

import sys

from scaleseg.config import load_config
from scaleseg.engine import trainer as trainer_module

work_dir, poisoned = sys.argv[1], {int(x) for x in sys.argv[2].split(",")}
build = trainer_module.build_train_loader


def build_poisoned(*args, **kwargs):
    loader = build(*args, **kwargs)

    class Poisoned:
        def __iter__(self):
            for i, batch in enumerate(loader, start=1):
                if i in poisoned and kwargs["rank"] == 1:
                    batch["image"][0, 0, 3, 3] = float("nan")
                yield batch

    return Poisoned()


trainer_module.build_train_loader = build_poisoned
overrides = [
    "data.num_classes=40", "data.batch_size=2", "data.num_workers=0", "data.synthetic.train_length=64",
    "data.synthetic.val_length=4", "data.synthetic.image_size=64", "data.train_pipeline.crop_size=48",
    "model.decoder.channels=16", "model.decoder.low_level_channels=8", "train.iters=6", "train.log_interval=1",
    "train.eval_interval=0", "train.checkpoint_interval=3", "train.progress=false", "train.grad_accum=2",
]
trainer_module.Trainer(load_config(None, overrides), work_dir=work_dir).run()
