"""``python -m experiments clip-table``: train and evaluate the rows of a paper CLIP table, then print the table.

Each row is CLIPA stage 1 then stage 2 (``experiments.paper_tables.row_args``, stage 2 from stage 1's ``last.ckpt``),
steps of the suite's runner (logs and timings in ``<save_dir>/clip/<table>/``); a rerun skips every stage whose metrics
exist. The table (``report``'s, with the paper's numbers, then the end of stage 1) goes to Markdown and JSON next to
the runs. One machine; multi-node sweeps go through the cluster launcher / W&B sweeps.

    python -m experiments clip-table --table table3 --rows p0.0 p0.5 p0.8 p1.0 --tiny
    python -m experiments clip-table --table table3 --tiny --collect-only   # only (re)build the table
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from experiments.paper_tables import TABLES, logger_arg, row_args
from experiments.runner import Step, run_steps
from experiments.tables import last_metrics, markdown

LAUNCHER = None  # the runner's default (forked steps); tests put a fake here

# Columns of the stage-1 table: the harness's metric keys, shown under short names.
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


def row_steps(
    table: str, row: str, stage_runs: dict[int, Path], scale: str, seed: int | None, extra: Sequence[str] = ()
) -> list[Step]:
    """The steps of one row: CLIPA stage 1, then stage 2 from stage 1's ``last.ckpt``, in ``stage_runs[stage]``."""
    steps = []
    for stage, run in stage_runs.items():
        logger = logger_arg(str(run.parents[3]), f"clip/{table}/{row}", f"stage{stage}", wandb=scale == "paper")
        argv = ["fit", *row_args(table, row, stage, scale), logger]
        argv += [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"] if seed is not None else []
        if stage == 2:
            argv.append(f"--model.init_args.init_from={stage_runs[1]}/checkpoints/last.ckpt")
        title = f"{table} {row} stage {stage}"
        steps.append(Step(f"{row}_stage{stage}", title, [*argv, *extra], [f"{run}/metrics"], [str(run)]))
    return steps


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments clip-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, choices=sorted(TABLES))
    parser.add_argument("--rows", nargs="*", default=None, help="row ids (default: all rows of the table)")
    parser.add_argument("--tiny", action="store_true", help="the tiny-world configs (CPU)")
    parser.add_argument("--collect-only", action="store_true", help="only collect finished rows into the table")
    parser.add_argument("--seed", type=int, default=None, help="rerun the rows with this seed, in <save_dir>/seed<N>")
    parser.add_argument("--jobs", type=int, default=1, help="stages run at once (independent rows side by side)")
    parser.add_argument("--out", default=None, help="table output stem (default: <save_dir>/clip/<table>/results)")
    parser.add_argument("overrides", nargs="*", help="extra CLI overrides for every stage, after '--'")
    args = parser.parse_args(argv)

    table = TABLES[args.table]
    by_id = {r.id: r for r in table.rows}
    unknown = [r for r in args.rows or [] if r not in by_id]
    if unknown:
        parser.error(f"unknown rows {unknown} of {args.table}; known: {list(by_id)}")
    rows = [by_id[r] for r in args.rows] if args.rows else list(table.rows)
    # runs[/tiny], a seed other than the rows' own in .../seed<N>; absolute: the runner starts steps in the repository
    root = Path("runs/tiny" if args.tiny else "runs", f"seed{args.seed}" if args.seed is not None else "").resolve()
    folder = root / "clip" / args.table
    out = Path(args.out) if args.out else folder / "results"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else {}

    stage_runs = {r.id: {s: folder / r.id / f"stage{s}" for s in (1, 2)} for r in rows}
    steps = []
    for row in rows:  # a stage whose metrics exist is done, stamped by the runner or not (an earlier sweep's run)
        scale = "tiny" if args.tiny else "paper"
        new = row_steps(args.table, row.id, stage_runs[row.id], scale, args.seed, args.overrides)
        steps += [s for s, run in zip(new, stage_runs[row.id].values(), strict=True) if last_metrics(run) is None]
    record = {"steps": []}
    if steps and not args.collect_only:
        record = run_steps(steps, folder, jobs=args.jobs, launcher=LAUNCHER)
        if record["failed"]:
            raise SystemExit(f"clip-table: step {record['failed']} failed (log: {folder}/logs/{record['failed']}.log)")
    ran = {s["name"]: s["seconds"] for s in record["steps"] if s.get("status") == "ran"}

    results: dict[str, dict] = {}
    for row in rows:
        # wall time per stage, kept from earlier invocations for the stages this one skips
        stage_seconds = dict((previous.get(row.id) or {}).get("stage_seconds") or {})
        stage_seconds.update({f"stage{s}": ran[f"{row.id}_stage{s}"] for s in (1, 2) if f"{row.id}_stage{s}" in ran})
        final = last_metrics(stage_runs[row.id][2])
        if final is not None:
            results[row.id] = {
                "metrics": final,
                "stage1_metrics": last_metrics(stage_runs[row.id][1]),
                "stage_seconds": stage_seconds,
                "seconds": sum(stage_seconds.values()) if len(stage_seconds) == 2 else None,
                "p": row.p,
                "mix": row.mix,
            }

    text = table_text(args.table, args.tiny, root, [r.id for r in rows], results)
    out.with_suffix(".md").write_text(f"{table.caption}\n\n{text}")
    out.with_suffix(".json").write_text(json.dumps({"table": args.table, "tiny": args.tiny, "rows": results}, indent=2))
    print(text)
    return results


def table_text(table: str, tiny: bool, root: Path, rows: Sequence[str], results: dict[str, dict]) -> str:
    """``report``'s table of the rows (final = stage 2, beside the paper), then each row's end of stage 1."""
    from experiments import report

    rep = report.clip_report(table, tiny, root)
    rep.rows = [r for r in rep.rows if r.id in rows]
    cols = list(TINY_COLUMNS) if tiny else sorted({k for r in results.values() for k in r["stage1_metrics"] or {}})
    stage1 = []
    for rid in rows:
        res = results.get(rid) or {}
        seconds, metrics = res.get("seconds"), res.get("stage1_metrics") or {}
        values = [f"{metrics[c]:.1f}" if c in metrics else "-" for c in cols]
        stage1.append([rid, *values, f"{seconds / 60:.1f}" if seconds else "-"])
    names = ["end of stage 1", *(TINY_COLUMNS.get(c, c) for c in cols), "train min"]
    return f"{report.table_markdown(rep)}\n\n{markdown(stage1, names)}\n"
