"""Optimizers (SGD, AdamW, LARS) and the learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * base_lr``.

    ``step`` counts optimizer steps already taken (0 for the first update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def scaled_lr(config: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr = base_lr * global_batch / 256."""
    return config.lr * global_batch / 256 if config.scale_lr else config.lr


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR/BYOL: SGD with momentum and a per-layer trust ratio.

    Groups with ``lars_exclude=True`` (biases, norms) take plain SGD steps without weight decay scaling.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.norm(param), torch.norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (grad_norm > 0), group["eta"] * param_norm / grad_norm, torch.ones_like(param_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(groups: list[dict], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, momentum), AdamW or LARS over the objective's parameter groups."""
    name = config.optimizer.lower()
    if name == "sgd":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.SGD(clean, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name == "adamw":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.AdamW(clean, lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose sgd, adamw or lars")
