"""The one results collector and the one Markdown renderer behind every report (``reproduce``, ``clip-table``,
``report``): a run's last evaluation, the p it really trained on, and tabulate's pipe tables."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.io import latest_metrics_file
from experiments.paper_tables import CAPTIONER_ROWS


def metrics_file(run: Path) -> Path | None:
    """A run's last evaluation: the standalone ``<run>/metrics/test.json``, else the newest in-loop ``step*.json``."""
    test = Path(run) / "metrics" / "test.json"
    return test if test.is_file() else latest_metrics_file(Path(run) / "metrics")


def last_metrics(run: Path) -> dict[str, float] | None:
    found = metrics_file(run)
    return json.loads(found.read_text()).get("metrics") if found else None


def captioner_eval(runs: Path, stage: str) -> tuple[Path, dict[str, float]] | None:
    """(file, metrics without ``eval/caption_attributes/``) of a captioner stage's last held-out evaluation: the Table 1
    row's run, else the ``tiny-captioner`` chain's (the same recipe); None without either."""
    for run in (runs / "captioner" / "table1" / CAPTIONER_ROWS[0] / stage, runs / "captioner" / stage):
        found = metrics_file(run)
        if found is not None:
            metrics = json.loads(found.read_text()).get("metrics") or {}
            return found, {k.removeprefix("eval/caption_attributes/"): v for k, v in metrics.items()}
    return None


def prompt_set_metrics(eval_dir: Path) -> dict[str, float]:
    """A ``dit-eval`` output's metrics of every prompt set as ``<set>/<metric>`` (``<eval_dir>/<set>/metrics.json``)."""
    return {
        f"{f.parent.name}/{k}": v
        for f in sorted(Path(eval_dir).glob("*/metrics.json"))
        for k, v in json.loads(f.read_text()).get("metrics", {}).items()
    }


def realised_p(*runs: Path, source: str = "original") -> float | None:
    """The fraction of ``source`` captions the training runs (CSV logger folders) trained on: the last
    ``train/caption_source/*`` row of each ``metrics.csv`` (the caption-mix monitor's exact totals), weighted by the
    samples counted (``train/caption_source_samples``; equally without). None when no run logged it."""
    fractions, weights = [], []
    for run in runs:
        path = Path(run) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            logged = [
                {k: v for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)
                if any(k.startswith("train/caption_source/") and v not in ("", None) for k, v in row.items())
            ]
        if not logged:
            continue
        last = logged[-1]
        fractions.append(float(last.get(f"train/caption_source/{source}", 0.0)))  # a source never drawn: no column
        weights.append(float(last.get("train/caption_source_samples", 1.0)))
    if not fractions:
        return None
    return sum(f * w for f, w in zip(fractions, weights, strict=True)) / sum(weights)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample sd (n - 1; None for a single value)."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def markdown(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    """A Markdown pipe table as ``DataFrame.to_markdown`` renders it (tabulate, no frame needed); cells as given
    (no number parsing: "0.50" stays "0.50")."""
    from tabulate import tabulate

    return tabulate(
        [[str(c) for c in row] for row in rows], headers=list(columns), tablefmt="pipe", disable_numparse=True
    )
