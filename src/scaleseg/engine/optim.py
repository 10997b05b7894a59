"""SGD with parameter groups declared by the model parts, and the poly LR schedule (ESS supp. A).

    lr_g(t) = base_lr * lr_mult_g * (1 - t / T) ** power_g      stepped every iteration

Each group may override momentum, weight decay and poly power (the class-embedding table uses
momentum 0.95 and power 0.95). An optional linear warm-up multiplies by 0.1 + 0.9 t / warmup.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleseg.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    groups = []
    seen: set[int] = set()
    for group in model.param_groups():
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise RuntimeError(f"parameter declared in two optimizer groups (second: {group['name']})")
            seen.add(id(p))
        if not params:
            continue
        lr = cfg.lr * group.get("lr_mult", 1.0)
        groups.append(
            {
                "params": params,
                "name": group["name"],
                "lr": lr,
                "initial_lr": lr,
                "momentum": group.get("momentum", cfg.momentum),
                "weight_decay": group.get("weight_decay", cfg.weight_decay),
                "poly_power": group.get("poly_power", cfg.poly_power),
            }
        )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"parameters in no optimizer group: {missing[:5]}")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_factor(iteration: int, total: int, power: float, warmup: int = 0) -> float:
    factor = max(0.0, 1.0 - iteration / total) ** power
    if warmup > 0 and iteration < warmup:
        factor *= 0.1 + 0.9 * iteration / warmup
    return factor


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, warmup: int = 0) -> None:
    """Set every group's LR for 0-based `iteration` of `total` (the LR used by that step)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * poly_factor(iteration, total, group["poly_power"], warmup)
