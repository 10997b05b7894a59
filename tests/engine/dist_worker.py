"""Run by tests/engine/test_distributed.py under `torchrun --nproc_per_node=2` (Gloo, CPU).

Each process checks, against a single-process reference it computes itself on the whole batch:
  1. CPUSyncBatchNorm on its half of a batch == nn.BatchNorm2d on the whole batch (outputs, input
     gradients, summed weight gradients, running statistics);
  2. DDP training steps of a model (linear or embedding scorer, SyncBatchNorm), each process on its half
     of every batch == the same steps of the unconverted model on the whole batch, and the
     class-embedding table is the same tensor in every process afterwards;
  3. the pyramid head trains under DDP (every parameter gets a gradient) and stays identical across processes.
Rank 0 writes the measured differences to the JSON file named by argv[1].
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from scaleseg.config import load_config
from scaleseg.engine import distributed
from scaleseg.engine.distributed import CPUSyncBatchNorm, TrainStep, convert_sync_batchnorm
from scaleseg.models import build_model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def check_batchnorm(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(8, 6, 5, 7) * 3 + 1
    out_weights = torch.randn(8, 6, 5, 7)
    ref = nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    sync = convert_sync_batchnorm(copy.deepcopy(ref), torch.device("cpu"))
    assert isinstance(sync, CPUSyncBatchNorm)
    xr = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    y = sync(xr)
    (y * out_weights[rank * 4 : (rank + 1) * 4]).sum().backward()
    x_all = x.clone().requires_grad_(True)
    y_ref = ref(x_all)
    (y_ref * out_weights).sum().backward()
    weight_grad = sync.weight.grad.clone()
    dist.all_reduce(weight_grad)
    return {
        "bn_out": max_diff(y, y_ref[rank * 4 : (rank + 1) * 4]),
        "bn_input_grad": max_diff(xr.grad, x_all.grad[rank * 4 : (rank + 1) * 4]),
        "bn_weight_grad": max_diff(weight_grad, ref.weight.grad),
        "bn_running_mean": max_diff(sync.running_mean, ref.running_mean),
        "bn_running_var": max_diff(sync.running_var, ref.running_var),
    }


def train_pair(overrides: list[str], rank: int, world: int, steps: int = 2):
    """-> (DDP-trained model, reference model trained on whole batches, the weights both started from)."""
    cfg = load_config(None, ["model.decoder.channels=16", "model.decoder.low_level_channels=8",
                             "model.decoder.dropout=0", *overrides])
    torch.manual_seed(0)
    # float64: the embedding scorer's logits are -||x - mu||^2 / 0.05, which turn float32 rounding (that
    # differs with the thread count and with the batch split) into weight differences of 1e-3 in two steps
    model = build_model(cfg.model, 30, 255).double()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    model = convert_sync_batchnorm(model, torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(TrainStep(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 64, 64, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 30, (4, 64, 64), generator=generator)  # no ignore: equal pixel counts
        half = slice(rank * 2, (rank + 1) * 2)
        loss = ddp(images[half], labels[half])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = reference.loss(reference(images), labels)["loss"]
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    return model, reference, initial


def identical_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and distributed.is_enabled()
    results = check_batchnorm(rank, world)
    for scorer in ("linear", "embedding"):
        model, reference, initial = train_pair([f"model.head.scorer={scorer}"], rank, world)
        own, ref = model.state_dict(), reference.state_dict()
        assert own.keys() == ref.keys()  # SyncBatchNorm keeps BatchNorm's state_dict keys
        results[f"{scorer}_weights"] = max(max_diff(own[k], ref[k]) for k in own if own[k].is_floating_point())
        results[f"{scorer}_moved"] = max(max_diff(ref[k], v) for k, v in initial.items() if v.is_floating_point())
        results[f"{scorer}_identical_across_ranks"] = all(identical_across_ranks(p.detach()) for p in model.parameters())
        if scorer == "embedding":
            table = model.head.scorer.class_embeddings
            results["table_params"] = sum(1 for p in model.parameters() if p is table)
    model, _, _ = train_pair(["model.head.structure=pyramid", "model.head.scorer=embedding",
                           "model.head.pyramid.semantic_channels=16", "model.head.pyramid.unity_channels=8"], rank, world)
    results["pyramid_identical_across_ranks"] = all(identical_across_ranks(p.detach()) for p in model.parameters())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    del model
    distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are written: no interpreter teardown with Gloo's threads (a rare SIGABRT in CI)


if __name__ == "__main__":
    main()
