"""``python -m experiments clip-table``: train and evaluate the rows of a paper CLIP table, then print the table.

Each row runs CLIPA stage 1 then stage 2 (``experiments/configs/[tiny/]clip/stage{1,2}.yaml`` + the row's YAMLs from
``experiments/paper_tables.py``) as separate ``python -m experiments fit`` processes, one after another. The result
of a row is its last in-loop evaluation (``<run>/stage2/metrics/step*.json``). A rerun skips every stage whose
metrics already exist, so an interrupted sweep resumes where it stopped. The table is written as Markdown and JSON
next to the runs, with the paper's numbers for the same rows.

    python -m experiments clip-table --table table3 --rows p0.0 p0.5 p0.8 p1.0 --tiny
    python -m experiments clip-table --table table3 --tiny --collect-only   # only (re)build the table

Multi-node sweeps go through the cluster launcher / W&B sweeps instead; this runner is for one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from experiments.paper_tables import CONFIG_ROOT, TABLES, Row, Table

# Columns of the tiny-world table: the harness's metric keys, shown under short names.
TINY_COLUMNS = {
    "classify/top1": "cls top1",
    "classify/top5": "cls top5",
    "retrieval/image_to_text_R@1": "short i2t R@1",
    "retrieval/text_to_image_R@1": "short t2i R@1",
    "retrieval/image_to_text_R@5": "short i2t R@5",
    "retrieval/text_to_image_R@5": "short t2i R@5",
    "long_retrieval/image_to_text_R@1": "long i2t R@1",
    "long_retrieval/text_to_image_R@1": "long t2i R@1",
}


def stage_configs(table: Table, row: Row, stage: int, tiny: bool) -> list[Path]:
    base = CONFIG_ROOT / ("tiny/clip" if tiny else "clip")
    stem = row.id if stage == 1 else f"{row.id}.stage2"
    return [base / f"stage{stage}.yaml", base / table.name / f"{stem}.yaml"]


def _logger_args(configs: Sequence[Path]) -> dict:
    logger = yaml.safe_load(configs[-1].read_text())["trainer"]["logger"]
    return (logger[0] if isinstance(logger, list) else logger)["init_args"]  # a list: CSV first (the run dir)


def save_dir_of(configs: Sequence[Path], seed: int | None = None) -> Path:
    """The row's logger save_dir; a ``seed`` other than the configs' own runs in ``save_dir/seed<N>``."""
    return Path(_logger_args(configs)["save_dir"]) / (f"seed{seed}" if seed is not None else "")


def run_dir(configs: Sequence[Path], seed: int | None = None) -> Path:
    """The run directory the configs resolve to: save_dir/name/version."""
    logger = _logger_args(configs)
    return save_dir_of(configs, seed) / logger["name"] / logger["version"]


def seed_overrides(table: Table, row: Row, stage: int, tiny: bool, seed: int | None) -> list[str]:
    """Overrides that rerun a row with another seed (model init, data order and caption draws) in its own folder."""
    if seed is None:
        return []
    configs = stage_configs(table, row, stage, tiny)
    out = [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger.init_args.save_dir={save_dir_of(configs, seed)}",
    ]
    loggers = yaml.safe_load(configs[-1].read_text())["trainer"]["logger"]
    if isinstance(loggers, list):  # a dotted override reaches only a list's last logger: give the whole list
        for lg in loggers:
            lg["init_args"]["save_dir"] = str(save_dir_of(configs, seed))
        out[-1] = f"--trainer.logger={json.dumps(loggers)}"
    if stage == 2:
        stage1 = run_dir(stage_configs(table, row, 1, tiny), seed)
        out.append(f"--model.init_args.init_from={stage1}/checkpoints/last.ckpt")
    return out


def latest_metrics(run: Path) -> dict | None:
    from datamodules.io import latest_metrics_file

    found = latest_metrics_file(run / "metrics")
    return json.loads(found.read_text()) if found else None


def run_stage(configs: Sequence[Path], extra: Sequence[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "experiments", "fit"] + [a for c in configs for a in ("--config", str(c))]
    cmd += list(extra)
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), f"> {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return time.perf_counter() - t0


def markdown(table: Table, rows: Sequence[Row], results: dict[str, dict], tiny: bool) -> str:
    """One line per row with its final (stage-2) metrics, then the same for the end of stage 1."""
    cols = list(TINY_COLUMNS) if tiny else sorted({k for r in results.values() for k in r.get("metrics", {})})
    names = [TINY_COLUMNS.get(c, c) for c in cols]
    out = []
    for stage, key in (("final (stage 2)", "metrics"), ("end of stage 1", "stage1_metrics")):
        lines = [
            f"| {stage} | p | {' | '.join(names)} | train min | paper ({', '.join(table.metrics)}) |",
            "|" + "---|" * (len(cols) + 4),
        ]
        for row in rows:
            res = (results.get(row.id) or {}).get(key) or {}
            vals = [f"{res[c]:.1f}" if c in res else "-" for c in cols]
            p = "concat" if row.mix == "concat" else f"{row.p:.1f}"
            seconds = (results.get(row.id) or {}).get("seconds")
            minutes = f"{seconds / 60:.1f}" if seconds and key == "metrics" else "-"
            paper = " / ".join(f"{v:g}" for v in row.paper.values())
            lines.append(f"| {row.id} | {p} | {' | '.join(vals)} | {minutes} | {paper} |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments clip-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, choices=sorted(TABLES))
    parser.add_argument("--rows", nargs="*", default=None, help="row ids (default: all rows of the table)")
    parser.add_argument("--tiny", action="store_true", help="the tiny-world configs (CPU)")
    parser.add_argument("--collect-only", action="store_true", help="only collect finished rows into the table")
    parser.add_argument("--seed", type=int, default=None, help="rerun the rows with this seed, in <save_dir>/seed<N>")
    parser.add_argument("--out", default=None, help="table output stem (default: <save_dir>/clip/<table>/results)")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides for every stage, after '--'")
    args = parser.parse_args(argv)

    table = TABLES[args.table]
    by_id = {r.id: r for r in table.rows}
    unknown = [r for r in args.rows or [] if r not in by_id]
    if unknown:
        parser.error(f"unknown rows {unknown} of {args.table}; known: {list(by_id)}")
    rows = [by_id[r] for r in args.rows] if args.rows else list(table.rows)

    save_dir = run_dir(stage_configs(table, rows[0], 1, args.tiny), args.seed).parents[2]
    out = Path(args.out) if args.out else save_dir / args.table / "results"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else {}

    results: dict[str, dict] = {}
    for row in rows:
        # wall time per stage, kept from earlier invocations for the stages this one skips
        stage_seconds = dict((previous.get(row.id) or {}).get("stage_seconds") or {})
        for stage in (1, 2):
            configs = stage_configs(table, row, stage, args.tiny)
            run = run_dir(configs, args.seed)
            if latest_metrics(run) is None and not args.collect_only:
                extra = seed_overrides(table, row, stage, args.tiny, args.seed) + list(args.overrides)
                stage_seconds[f"stage{stage}"] = run_stage(configs, extra, run.parent / f"stage{stage}.log")
        final = latest_metrics(run_dir(stage_configs(table, row, 2, args.tiny), args.seed))
        if final is not None:
            first = latest_metrics(run_dir(stage_configs(table, row, 1, args.tiny), args.seed))
            results[row.id] = {
                "metrics": final["metrics"],
                "stage1_metrics": first["metrics"] if first else None,
                "stage_seconds": stage_seconds,
                "seconds": sum(stage_seconds.values()) if len(stage_seconds) == 2 else None,
                "p": row.p,
                "mix": row.mix,
            }

    text = markdown(table, rows, results, args.tiny)
    out.with_suffix(".md").write_text(f"{table.caption}\n\n{text}")
    out.with_suffix(".json").write_text(json.dumps({"table": args.table, "tiny": args.tiny, "rows": results}, indent=2))
    print(text)
    return results
