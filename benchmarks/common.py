"""What the step benchmarks share: fixed batches cycled, a quiet one-device ``Trainer``, a clock after every step."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def loader(batches: Sequence[Any], length: int) -> torch.utils.data.DataLoader:
    """``length`` pre-built batches, cycled (a list is a map-style dataset)."""
    cycled = [batches[i % len(batches)] for i in range(length)]
    return torch.utils.data.DataLoader(cycled, batch_size=None, shuffle=False)


class StepStamps(L.Callback):
    """``time.perf_counter()`` after every training step (the device synchronised first); ``stamp()`` outside a
    ``Trainer``."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def stamp(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_batch_end(self, *_: Any) -> None:
        self.stamp()

    def seconds_per_step(self, skip: int) -> float:
        """The mean step time after the first ``skip`` steps (all steps but the first when ``skip`` is 0)."""
        t, k = self.times, max(skip, 1)
        return (t[-1] - t[k - 1]) / (len(t) - k)


def fit(
    module: L.LightningModule, batches: Sequence[Any], steps: int, callbacks: Sequence[Any], **trainer: Any
) -> None:
    """``steps`` optimizer steps of ``module`` on ``batches`` (cycled) under a one-device ``Trainer`` that logs,
    checkpoints and prints nothing; ``trainer``: more ``Trainer`` arguments (accelerator, precision, strategy)."""
    quiet = dict.fromkeys(("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False)
    trainer = L.Trainer(devices=1, max_steps=steps, callbacks=list(callbacks), **quiet, **trainer)
    trainer.fit(module, loader(batches, steps))


def peak_gib() -> dict[str, float]:
    """The accelerator's peak memory since the last call (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gib": peak}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: str | Path | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str))
