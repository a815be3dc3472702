"""Learning-rate schedules as plain multiplier functions for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (CLIPA, open_clip,
    LLaVA's ``cosine`` with ``warmup_ratio``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def constant_with_warmup(step: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant (DiT's recipe with a warm-up)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
