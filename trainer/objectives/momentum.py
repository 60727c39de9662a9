"""Momentum (EMA) target networks, shared by MoCo v1-v3, BYOL, DINO and the like.

* ``momentum_copy(module)``: the key/target network, a deep copy of the online one (so both start equal, as
  in MoCo's "initialised as the query encoder") whose parameters take no gradient. A deep copy draws no
  random numbers, so every process builds the same copy.
* ``ema_update_(target, online, momentum)``: theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2, BYOL's
  tau), on parameters only: buffers such as batch-norm running statistics stay the target's own, as in the
  papers' code.
* ``momentum_at(step, total_steps, base, final)``: the cosine schedule of BYOL and MoCo v3,
  m = final - (final - base) (cos(pi step / total) + 1) / 2, a pure function of the step.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` on every parameter (updated by EMA only)."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every parameter of ``target`` <- momentum * target + (1 - momentum) * online.

    Parameters are matched by name, so ``target`` may differ from ``online`` in module classes (e.g. its
    batch norms swapped for split batch norm) as long as the parameter names and shapes agree.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online_parameters = dict(online.named_parameters())
    target_parameters = dict(target.named_parameters())
    if online_parameters.keys() != target_parameters.keys():
        missing = sorted(set(online_parameters) ^ set(target_parameters))
        raise ValueError(f"target and online networks have different parameters: {missing[:5]}")
    for name, target_parameter in target_parameters.items():
        # lerp_(x, w) = self + w (x - self) = (1 - w) self + w x, with w = 1 - m.
        target_parameter.lerp_(online_parameters[name].detach(), 1.0 - momentum)


def momentum_at(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Cosine momentum schedule (BYOL sec. 3.2, MoCo v3 sec. 4): ``base`` at step 0, ``final`` at the end.

    Args:
        step: optimizer steps taken so far (0-based); clamped to [0, total_steps].
        total_steps: steps of the whole run (> 0).
        base, final: momentum at the start and at the end.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
