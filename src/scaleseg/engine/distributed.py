"""Several processes (torchrun): process group, rank-aware helpers and a BatchNorm synchronised across them.

`torchrun --nproc_per_node=N -m scaleseg train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; `init_distributed` turns that into a
process group (NCCL on CUDA, Gloo on CPU) and a `DistContext`. Run without torchrun (or with one
process) everything here is a no-op and the run is an ordinary single-process run.

torch's own `nn.SyncBatchNorm` runs on accelerators only; `CPUSyncBatchNorm` does the same on CPU
(Gloo), so that multi-process training and its equivalence with one process can be tested on a
machine without a GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scaleseg.errors import ConfigError
from scaleseg.search import in_work_dtype


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_context() -> DistContext:
    """The ranks torchrun put in the environment (a single process when there are none)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); start with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: the rank must be in 0..WORLD_SIZE-1")
    return DistContext(rank, world, local)


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (if any) and pick this process's device.

    device_name is train.device: with several processes "auto"/"cuda" mean cuda:LOCAL_RANK (one GPU
    per process), "cpu" uses Gloo on CPU."""
    from scaleseg.engine.runtime import select_device

    ctx = env_context()
    if not ctx.enabled:
        return ctx, select_device(device_name)
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda:"):
        raise ConfigError(
            f"train.device = {device_name!r} under torchrun: each process takes the GPU of its LOCAL_RANK; "
            "use train.device=cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if use_cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {ctx.local_rank} but this machine shows {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    else:
        device = select_device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return ctx, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # DDP reducers left in reference cycles hold the process group: collect them while the group and the
        # interpreter are alive rather than in interpreter finalisation (the suspected cause of a rare SIGABRT,
        # "terminate called without an active exception", seen at a Gloo worker's exit in CI; not reproduced)
        gc.collect()
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (in place; returned). A no-op in a single process."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_enabled():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_enabled():
        dist.barrier()


@contextlib.contextmanager
def main_process_first(ctx: DistContext):
    """Rank 0 runs the block first (e.g. to build a cache), then the others (which then read it)."""
    if ctx.enabled and not ctx.is_main:
        barrier()
    yield
    if ctx.enabled and ctx.is_main:
        barrier()


# ------------------------------------------------------------------------------------------------
# BatchNorm over the batch of all processes
# ------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x; the gradient of x is the sum over processes of the gradients of y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the batch of every process; for CPU process groups.

    Same parameters and buffers (same state_dict keys) as nn.BatchNorm1d/2d. In training with
    several processes the mean is the all-reduced sum over the all-reduced count, and the variance
    a second all-reduced sum of squared deviations from it (two passes, as accurate as one process's
    BatchNorm over the whole batch); both all-reduces carry gradients, so the backward pass is
    synchronised too. Otherwise (eval, or one process) it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_enabled()):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(input)
        C = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, C] + [1] * (input.dim() - 2)
        x = in_work_dtype(input)  # fp16/bf16 in float32; float64 kept
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // C])])
        total = all_reduce(local)  # differentiable sum over processes
        count = total[C]
        mean = total[:C] / count
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # biased, used to normalise
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in `module` made to synchronise across processes: torch's nn.SyncBatchNorm on
    CUDA, CPUSyncBatchNorm on CPU. Weights and running statistics are kept; state_dict keys unchanged."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class TrainStep(nn.Module):
    """model -> loss terms in one forward, the unit DistributedDataParallel wraps: every parameter,
    the class-embedding table included (used by the loss, not by the network's forward), gets its
    gradient all-reduced by DDP, so all processes hold one and the same table."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(self.model(images), labels)
