import pytest

# A run small enough for CPU tests: 40 classes, 64x64 images, 48x48 crops, a narrow decoder.
TINY = [
    "data.num_classes=40",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.synthetic.train_length=64",
    "data.synthetic.val_length=4",
    "data.synthetic.image_size=64",
    "data.train_pipeline.crop_size=48",
    "model.decoder.channels=16",
    "model.decoder.low_level_channels=8",
    "optim.lr=0.05",
    "train.iters=6",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.checkpoint_interval=3",
    "train.keep_checkpoints=0",
    "train.progress=false",
    "train.deterministic=true",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
