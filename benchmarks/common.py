"""What the benchmarks share: their argument parser, fixed batches cycled through a quiet one-device ``Trainer`` with a
clock after every step, peak memory, the commit and machine a figure was measured on, and the history files."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


def parser(module: str, doc: str, **kw: Any) -> argparse.ArgumentParser:
    """``python -m benchmarks.<module>``'s parser (described by ``doc``'s first paragraph), with ``--json``."""
    kw.setdefault("description", doc.split("\n\n")[0])
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", **kw)
    p.add_argument("--json", metavar="FILE", help="write the whole report (every run, the settings) here")
    return p


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def quiet(threads: int = 0) -> Iterator[None]:
    """``threads`` intra-op threads (0: torch's own), no warnings (Lightning's "no workers" advice) and no INFO logs
    (Lightning's start-up lines) for the block; all restored afterwards."""
    saved, disabled = torch.get_num_threads(), logging.root.manager.disable
    if threads > 0:
        torch.set_num_threads(threads)
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(saved)
        logging.disable(disabled)


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
        sync()
        self.times.append(time.perf_counter())

    def on_train_batch_end(self, *_: Any) -> None:
        self.stamp()

    def seconds_per_step(self, skip: int) -> float:
        """The mean step time after the first ``skip`` stamps (all but the first when ``skip`` is 0)."""
        t, k = self.times, max(skip, 1)
        return (t[-1] - t[k - 1]) / (len(t) - k)


def fit(
    module: L.LightningModule, batches: Sequence[Any], steps: int, callbacks: Sequence[Any], **trainer: Any
) -> None:
    """``steps`` optimizer steps of ``module`` on ``batches`` (cycled) under a one-device ``Trainer`` that logs,
    checkpoints and prints nothing; ``trainer``: more ``Trainer`` arguments (accelerator, precision, strategy)."""
    off = dict.fromkeys(("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False)
    trainer = L.Trainer(devices=1, max_steps=steps, callbacks=list(callbacks), **off, **trainer)
    trainer.fit(module, loader(batches, steps))


def timed_fit(module: L.LightningModule, batches: Sequence[Any], steps: int, start: bool = False, **trainer: Any):
    """:func:`fit` with a :class:`StepStamps`, returned; ``start``: its first stamp is the start of the fit."""
    stamps = StepStamps()
    if start:
        stamps.stamp()
    fit(module, batches, steps, [stamps], **trainer)
    return stamps


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


def summarize(runs: Sequence[dict[str, Any]], key: str, medians: Sequence[str]) -> dict[str, float]:
    """Median, min and max of ``key`` over ``runs``, and the median of each of ``medians``."""
    values = [r[key] for r in runs]
    spread = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return spread | {k: statistics.median(r[k] for r in runs) for k in medians}


# ------------------------------------------------------------------------------------------- what a figure was run on
def git(*args: str) -> str | None:
    """``git args`` in the repository, its output stripped; None when git fails."""
    try:
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip()


def commit(length: int = 12) -> str:
    return git("rev-parse", f"--short={length}", "HEAD") or ""


def loadavg() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}


def write_json(path: str | Path | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str))


def record(path: str | Path | None, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one line to the history file ``path`` (``--record``)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"recorded in {path}", flush=True)
