"""Learning-rate schedules as plain multiplier functions for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (CLIPA, open_clip, LLaVA)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def constant_with_warmup(step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (DiT's recipe with a warm-up)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def per_step(opt: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: ``opt`` with its lr times ``multiplier(step)`` at every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
