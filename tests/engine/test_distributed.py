"""Several processes on CPU (Gloo): torchrun training equals one process with the whole batch."""

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch import nn

from scaleseg.data.samplers import RankShard, RepeatFactorSampler, ResumableSampler
from scaleseg.engine import distributed
from scaleseg.engine.checkpoint import load_checkpoint
from scaleseg.errors import ConfigError

HERE = Path(__file__).parent


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_together_are_the_single_process_stream(world):
    """Process r's items, interleaved batch by batch, rebuild the one-process stream exactly."""
    batch = 2

    def stream():
        return RepeatFactorSampler([1.0, 2.5, 1.2, 3.0, 1.0], seed=3, start=7)

    single = list(islice(iter(stream()), 4 * batch * world))
    shards = [list(islice(iter(RankShard(stream(), batch, r, world)), 4 * batch)) for r in range(world)]
    rebuilt = []
    for step in range(4):
        for r in range(world):
            rebuilt += shards[r][step * batch : (step + 1) * batch]
    assert rebuilt == single
    # the positions (which seed augmentation) travel with the items
    assert [p for _, p in rebuilt] == list(range(7, 7 + 4 * batch * world))


def test_rank_shard_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank 2"):
        RankShard(ResumableSampler(4), 2, rank=2, world_size=2)


def test_one_process_uses_plain_batchnorm_silently():
    """Without a process group CPUSyncBatchNorm is exactly nn.BatchNorm2d (training and eval)."""
    assert not distributed.is_enabled()
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=0.2)
    sync = distributed.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=0.2)), torch.device("cpu"))[0]
    assert isinstance(sync, distributed.CPUSyncBatchNorm)
    assert sync.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(sync(x), ref(x))
    assert torch.equal(sync.running_var, ref.running_var)
    sync.eval(), ref.eval()
    assert torch.equal(sync(x), ref(x))


def test_env_context_and_device_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.env_context() == distributed.DistContext(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 WORLD_SIZE=2"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="integers"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="each process takes the GPU of its LOCAL_RANK"):
        distributed.init_distributed("cuda:1")


def test_sync_batchnorm_and_ddp_steps_match_one_process(tmp_path):
    """2 Gloo processes, each half of every batch == one process on the whole batch (dist_worker.py)."""
    out = tmp_path / "result.json"
    done = torchrun([str(HERE / "dist_worker.py"), str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("bn_out", "bn_input_grad", "bn_running_mean", "bn_running_var"):
        assert r[key] < 1e-5, (key, r[key])
    assert r["bn_weight_grad"] < 1e-4
    for scorer in ("linear", "embedding"):
        assert r[f"{scorer}_moved"] > 0.01  # training changed the weights ...
        # ... the same way as one process with the whole batch (float64: rounding, not the thread count)
        assert r[f"{scorer}_weights"] < 1e-10, r
        assert r[f"{scorer}_identical_across_ranks"] is True
    assert r["table_params"] == 1  # one class table, shared (not one copy per process)
    assert r["pyramid_identical_across_ranks"] is True


DDP_RUN = [
    "data.num_classes=40",
    "data.num_workers=0",
    "data.synthetic.train_length=64",
    "data.synthetic.val_length=5",
    "data.synthetic.image_size=64",
    "data.synthetic.boundary_ignore=0",  # no ignored pixels: both halves of a batch weigh the same
    "data.train_pipeline.crop_size=48",
    "data.train_pipeline.scale_range=[1.0,1.0]",  # crops inside the image: no padding either
    "model.decoder.channels=16",
    "model.decoder.low_level_channels=8",
    "model.decoder.dropout=0",
    "optim.lr=0.05",
    "train.iters=3",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.checkpoint_interval=3",
    "train.progress=false",
    "train.deterministic=true",
]


def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """`torchrun --nproc_per_node=2 -m scaleseg train data.batch_size=2` == `scaleseg train data.batch_size=4`:
    the same weights up to float order, the same evaluation (each process evaluates 2 or 3 of the 5
    images and the counts are summed), logs and checkpoints written once."""
    from scaleseg.cli import main

    assert main(["train", *DDP_RUN, "data.batch_size=4", "--work-dir", str(tmp_path / "one")]) == 0
    done = torchrun(["-m", "scaleseg", "train", *DDP_RUN, "data.batch_size=2", "--work-dir", str(tmp_path / "two")],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "iter_000003.pth")
    two = load_checkpoint(tmp_path / "two" / "iter_000003.pth")
    assert one["model"].keys() == two["model"].keys()
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert one["samples_seen"] == two["samples_seen"] == 12
    assert two["world_size"] == 2 and len(two["rng"]["ranks"]) == 2
    metrics = [json.loads((tmp_path / run / "eval" / "iter_000003" / "metrics.json").read_text()) for run in ("one", "two")]
    assert metrics[0] == metrics[1]
    per_class = [(tmp_path / run / "eval" / "iter_000003" / "per_class.csv").read_text() for run in ("one", "two")]
    assert per_class[0] == per_class[1]
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("iter 3/3 ") == 1 and log.count("final evaluation") == 1
    assert "2 processes (SyncBatchNorm), batch 2 each" in log
    assert "iterations of batch 4 x 1" in log
    rows = (tmp_path / "two" / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(r)["iter"] for r in rows] == [1, 2, 3, 3]  # 3 train records and one eval, once each


def test_a_nan_in_one_process_skips_the_step_in_every_process(tmp_path):
    """Process 1's batches 3 and 8 hold a NaN (iteration 2, first of its 2 accumulated batches; iteration
    4, the last): every process skips those steps together (no hang, no divergence) and the run finishes."""
    done = torchrun([str(HERE / "ddp_nan_worker.py"), str(tmp_path / "run"), "3,8"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "iter 2: non-finite loss at batch 1 of 2" in log and "iter 4: non-finite loss at batch 2 of 2" in log
    assert log.count("; step skipped, weights unchanged") == 2 and "final evaluation" in log
    final = load_checkpoint(tmp_path / "run" / "iter_000006.pth")["model"]
    assert all(torch.isfinite(v.float()).all() for v in final.values())
