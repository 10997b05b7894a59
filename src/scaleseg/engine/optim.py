"""SGD over the parameter groups the model's parts declare, and the poly LR schedule (ESS supp. A).

    lr_g(t) = base_lr * lr_mult_g * (1 - t / T) ** power_g      stepped every iteration

The model names its groups (`Segmentor.param_groups()`: backbone, decoder, head, class_embeddings);
what each group gets (LR multiplier, momentum, weight decay, poly power) is the optimizer config's
`optim.groups.<name>`, in the manner of mmengine's `paramwise_cfg.custom_keys`. Defaults: backbone
LR x0.1, the class-embedding table momentum 0.95 and power 0.95. An optional linear warm-up
multiplies by 0.1 + 0.9 t / warmup.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from scaleseg.config import OptimConfig


def group_settings(cfg: OptimConfig, name: str) -> dict:
    """{"lr", "momentum", "weight_decay", "poly_power"} of the group `name` under `cfg`."""
    known = [f.name for f in dataclasses.fields(cfg.groups)]
    if name not in known:  # a part declared a group the config cannot set: a bug, not user input
        raise RuntimeError(f"parameter group {name!r} has no optim.groups entry (known: {', '.join(known)})")
    group = getattr(cfg.groups, name)
    return {
        "lr": cfg.lr * group.lr_mult,
        "momentum": cfg.momentum if group.momentum is None else group.momentum,
        "weight_decay": cfg.weight_decay if group.weight_decay is None else group.weight_decay,
        "poly_power": cfg.poly_power if group.poly_power is None else group.poly_power,
    }


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD over `model.param_groups()` ({group name: parameters}) with each group's `optim.groups` settings."""
    groups = []
    seen: set[int] = set()
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise RuntimeError(f"parameter declared in two optimizer groups (second: {name})")
            seen.add(id(p))
        if not params:
            continue
        settings = group_settings(cfg, name)
        groups.append({"params": params, "name": name, "initial_lr": settings["lr"], **settings})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"parameters in no optimizer group: {missing[:5]}")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_factor(iteration: int, total: int, power: float, warmup: int = 0) -> float:
    factor = max(0.0, 1.0 - iteration / total) ** power
    if warmup > 0 and iteration < warmup:
        factor *= 0.1 + 0.9 * iteration / warmup
    return factor


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, warmup: int = 0, power: float = 0.9) -> None:
    """Set every group's LR for 0-based `iteration` of `total` (the LR used by that step): its "initial_lr"
    (taken from its "lr" at the first call if it has none) times the poly factor of its "poly_power"
    (`power` for a group without one, e.g. one of any torch optimizer)."""
    for group in optimizer.param_groups:
        initial = group.setdefault("initial_lr", group["lr"])
        group["lr"] = initial * poly_factor(iteration, total, group.get("poly_power", power), warmup)
