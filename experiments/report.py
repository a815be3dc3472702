r"""``python -m experiments report``: a paper table with our runs beside it, as Markdown, CSV, JSON and PNG plots.

    python -m experiments report table3 --tiny --out docs/reports     # -> docs/reports/table3_tiny.{md,csv,json,png}
    python -m experiments report --write-readme                       # every table folder's README.md
    python -m experiments report --check-readme                       # exit 1 when a README.md is stale

Ours (``--runs``, default ``runs`` or ``runs/tiny``; seed reruns in ``<runs>/seed<N>/``: mean ± sample sd): Tables
3-6 and 8 from ``<runs>/clip/<table>/<row>/stage2`` (or an identical row of another table, named), Table 7 from
``<runs>/dit/eval/<row>/<prompt set>/metrics.json``, Table 2 from ``count_params``; Table 1 (MMMU / MM-Vet) cannot be
scored offline (the tiny captioner's caption evaluation stands in). A row without a run is "not run", never filled in.
Commit and hardware: the run's recorded ones, else the last commit before its metrics (``*``) and its trainer config.
``--write-readme`` renders the table folders' READMEs from the registries and the committed ``docs/reports/*.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.paper_tables import CAPTIONER_ROWS, CAPTIONER_STAGES
from experiments.tables import captioner_eval, mean_sd, metrics_file, prompt_set_metrics, realised_p
from experiments.tables import markdown as markdown_table

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "experiments" / "configs"
REPORTS = REPO / "docs" / "reports"
TABLE_NAMES = tuple(f"table{i}" for i in range(1, 9))  # table8: beyond the paper (no paper numbers)
SWEEP_TABLES = ("table3", "table5", "table7")  # the p sweeps: plotted metric vs p

# Paper Table 1 (PAPER.md §1), VERBATIM. Only the LLaVA-1.5-LLaMA3-8B row is the paper's own model.
TABLE1 = {
    "LLaVA-1.5-7B": {"mmmu": 33.6, "mm_vet": 33.9},
    "LLaVA-1.5-13B": {"mmmu": 36.4, "mm_vet": 36.3},
    "LLaVA-1.5-LLaMA3-8B": {"mmmu": 45.2, "mm_vet": 37.8},
    "GPT-4V": {"mmmu": 56.8, "mm_vet": 44.6},
}
TABLE1_OURS = "LLaVA-1.5-LLaMA3-8B"

# Report column -> (label, harness key at real scale (eval/paper.yaml), tiny-world key (eval/tiny_world.yaml: 48-class
# zero-shot for ImageNet, short / long-caption retrieval for COCO / Urban-1K, colour swaps for VG-Attribution)).
COLUMNS = {
    "imagenet_top1": ("IN-1K top-1", "imagenet/top1", "classify/top1"),
    "coco_i2t_r1": ("COCO I→T R@1", "coco/image_to_text_R@1", "retrieval/image_to_text_R@1"),
    "coco_t2i_r1": ("COCO T→I R@1", "coco/text_to_image_R@1", "retrieval/text_to_image_R@1"),
    "flickr_i2t_r1": ("Flickr I→T R@1", "flickr/image_to_text_R@1", None),
    "flickr_t2i_r1": ("Flickr T→I R@1", "flickr/text_to_image_R@1", None),
    "urban1k_i2t_r1": ("Urban-1K I→T R@1", "urban1k/image_to_text_R@1", "long_retrieval/image_to_text_R@1"),
    "urban1k_t2i_r1": ("Urban-1K T→I R@1", "urban1k/text_to_image_R@1", "long_retrieval/text_to_image_R@1"),
    "vg_attribution": ("VG-Attribution", "vg_attribution/accuracy", "vg_attribution/accuracy"),
    "raw_fid": ("raw FID↓", None, None),
    "raw_clip": ("raw CLIP", None, None),
    "recap_fid": ("Recap FID↓", None, None),
    "recap_clip": ("Recap CLIP", None, None),
    "recap_recap_clip": ("Recap Recap-CLIP", None, None),
    "recap_gpt4v": ("Recap GPT-4V", None, None),
    "mmmu": ("MMMU", None, None),
    "mm_vet": ("MM-Vet", None, None),
    "vision_m": ("vision (M)", None, None),
    "text_m": ("text (M)", None, None),
    "total_m": ("total (M)", None, None),
}
LABELS = {c: label for c, (label, _, _) in COLUMNS.items()}
CLIP_KEYS = {c: key for c, (_, key, _) in COLUMNS.items() if key}
CLIP_KEYS_TINY = {c: key for c, (_, _, key) in COLUMNS.items() if key}
# The p a run trained on, read back from its own log (``experiments.tables.realised_p``): an ours-only column.
REALISED_P = "realised p"
# Ours-only columns of the tiny CLIP sweeps: long-caption retrieval (Urban-1K analog), what recaptions change most.
CLIP_EXTRAS_TINY = {
    "long i2t R@1": "long_retrieval/image_to_text_R@1",
    "long t2i R@1": "long_retrieval/text_to_image_R@1",
}

# Table 7's CLIP-score scorers are whatever dit-eval's --clip NAME=FOLDER named them: the paper's OpenAI ViT-B/32 as
# `openai_b32`, its Recap-CLIP as `recap_clip`; the tiny world has only its web CLIP (`web_clip`, Makefile tiny-dit).
DIT_SCORERS = {"clip": "openai_b32", "recap_clip": "recap_clip"}
DIT_SCORERS_TINY = {"clip": "web_clip", "recap_clip": "recap_clip"}
DIT_EXTRAS_TINY = {  # the pinned judge's accuracies, shown in percent
    "judge colour % (raw)": "caption/attributes/colour",
    "judge shape % (raw)": "caption/attributes/shape",
    "judge colour % (recap)": "recaption/attributes/colour",
    "judge shape % (recap)": "recaption/attributes/shape",
}


# ------------------------------------------------------------------------------------------------------ data model
@dataclass
class RunResult:
    path: str
    seed: str
    values: dict[str, float]  # by report column
    commit: str | None = None
    hardware: str | None = None


@dataclass
class ReportRow:
    id: str
    p: float | None
    paper: dict[str, float]
    config: str
    command: str
    runs: list[RunResult] = field(default_factory=list)
    status: str = "not run"  # shown when there is no run
    source: str | None = None  # "table3/p1.0" when the runs are an identical row's
    note: str = ""

    def stats(self, column: str) -> tuple[float | None, float | None, int]:
        """(mean, sample sd or None, n) of ``column`` over the runs that measured it."""
        vals = [r.values[column] for r in self.runs if column in r.values]
        return (*mean_sd(vals), len(vals)) if vals else (None, None, 0)


@dataclass
class Report:
    table: str
    title: str
    tiny: bool
    columns: list[str]  # paper columns (paper number, ours, delta)
    rows: list[ReportRow]
    keys: dict[str, str] = field(default_factory=dict)  # column -> harness key read for "ours"
    extras: dict[str, str] = field(default_factory=dict)  # ours-only column -> harness key
    notes: list[str] = field(default_factory=list)
    deltas: bool = True
    command: str = ""
    sections: list[str] = field(default_factory=list)  # extra markdown after the table

    @property
    def stem(self) -> str:
        return f"{self.table}_tiny" if self.tiny else self.table


# ------------------------------------------------------------------------------------------------------ run metadata
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_commit(metrics_json: dict, metrics_file: Path) -> str | None:
    """The run's recorded commit, else the last commit before its metrics file was written (marked ``*``)."""
    if metrics_json.get("commit"):
        return str(metrics_json["commit"])[:12]
    when = dt.datetime.fromtimestamp(metrics_file.stat().st_mtime, dt.timezone.utc).isoformat()
    sha = _git("log", "-1", "--format=%h", f"--before={when}")
    return f"{sha}*" if sha else None


def run_hardware(metrics_json: dict, run_dir: Path, log: Path | None = None) -> str | None:
    """The run's recorded ``hardware``, else ``accelerator x devices [x nodes]`` from its saved trainer config and
    Lightning's "GPU available: ..., used: ..." log line."""
    if metrics_json.get("hardware"):
        return str(metrics_json["hardware"])
    config = next((p for p in (run_dir / "config.yaml", run_dir / "hparams.yaml") if p.is_file()), None)
    try:
        trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {} if config else {}
    except yaml.YAMLError:
        trainer = {}
    if not trainer:
        return None
    acc = str(trainer.get("accelerator", "auto"))
    if log is not None and log.is_file():
        m = re.search(r"GPU available: \w+, used: (True|False)", log.read_text(errors="replace"))
        if m:
            acc = "gpu" if m.group(1) == "True" else "cpu"
    nodes = trainer.get("num_nodes", 1)
    return f"{acc} x{trainer.get('devices', 1)}" + (f" x{nodes} nodes" if nodes and int(nodes) > 1 else "")


def _run(
    seed: str | None, values: dict, data: dict, found: Path, shown: Path, trained: list[Path], log: Path | None = None
) -> RunResult:
    """One run of a row: ``values`` (by column) and the realised p of its ``trained`` runs; its seed is the rerun
    root's name, else the first trained run's ``seed_everything``."""
    p = realised_p(*trained)
    values.update({REALISED_P: p} if p is not None else {})
    config = trained[0] / "config.yaml"
    m = re.search(r"^seed_everything:\s*(\S+)", config.read_text(), re.MULTILINE) if config.is_file() else None
    if seed is None:
        seed = f"seed{m.group(1)}" if m and m.group(1) not in ("null", "true", "false") else "default seed"
    hardware = run_hardware(data, trained[-1], log)
    return RunResult(os.path.relpath(shown, Path.cwd()), seed, values, run_commit(data, found), hardware)


def row_runs(runs: Path, table: str, row_id: str, keys: dict[str, str]) -> list[RunResult]:
    """A row's runs (the configs' own root, then the ``seed<N>`` reruns of ``clip-table --seed N``): a CLIP row's last
    stage-2 evaluation, a Table 7 row's dit-eval prompt sets."""
    out = []
    for seed, root in [(None, runs)] + [(d.name, d) for d in sorted(runs.glob("seed*")) if d.is_dir()]:
        if table == "table7":
            shown, trained, log = root / "dit" / "eval" / row_id, [root / "dit" / "table7" / row_id / "fit"], None
            found = next(iter(sorted(shown.glob("*/metrics.json"))), None)
            # attribute accuracies are fractions in dit-eval's json; percent like every other column here
            metrics = {k: v * 100 if "/attributes/" in k else v for k, v in prompt_set_metrics(shown).items()}
        else:
            row_dir = root / "clip" / table / row_id
            found = shown = metrics_file(row_dir / "stage2")
            trained, log = [row_dir / "stage1", row_dir / "stage2"], row_dir.parent / "logs" / f"{row_id}_stage2.log"
        if found is None:
            continue
        data = json.loads(found.read_text())
        metrics = metrics if table == "table7" else data.get("metrics", {})
        values = {c: float(metrics[k]) for c, k in keys.items() if k in metrics}
        out.append(_run(seed, values, data, found, shown, trained, log))
    return out


# ------------------------------------------------------------------------------------------------------ CLIP tables
def clip_report(table_name: str, tiny: bool, runs: Path) -> Report:
    from experiments.paper_tables import TABLES

    table = TABLES[table_name]
    keys_all = CLIP_KEYS_TINY if tiny else CLIP_KEYS
    keys = {c: keys_all[c] for c in table.metrics if c in keys_all}
    extras = {REALISED_P: "train/caption_source/original"}
    extras.update({e: k for e, k in CLIP_EXTRAS_TINY.items() if tiny and k not in keys.values()})
    rows = []
    for row in table.rows:
        cfg = f"--row {table_name}/{row.id} --stage 1|2" + ("" if tiny else " --scale paper")
        cmd = f"python -m experiments clip-table --table {table_name} --rows {row.id}" + (" --tiny" if tiny else "")
        found = row_runs(runs, table_name, row.id, {**keys, **extras})
        rows.append(ReportRow(row.id, row.p, dict(row.paper), cfg, cmd, found, note=row.note))
    # A row without its own run reuses an identical row's (same towers, p, mix and objectives) of another table.
    spec = {(t, r.id): (r.vision, r.text, r.p, r.mix, r.objectives) for t, tab in TABLES.items() for r in tab.rows}
    for rr in (r for r in rows if not r.runs):
        same = [key for key, s in spec.items() if key[0] != table_name and s == spec[(table_name, rr.id)]]
        for other, other_id in same:
            found = row_runs(runs, other, other_id, {**keys, **extras})
            if found:
                rr.runs, rr.source = found, f"{other}/{other_id}"
                break
    notes = list(table.notes)
    if tiny:
        missing = ", ".join(LABELS[c] for c in table.metrics if c not in keys)
        tasks = ", ".join(f"{LABELS[c]} <- `{k}`" for c, k in keys.items())
        note = (
            f"Ours: the tiny world's stand-in tasks ({tasks}). Absolute numbers are not comparable with the paper's; "
        )
        notes.insert(0, note + "the shape over rows is." + (f" No tiny analog: {missing}." if missing else ""))
    deltas = any(row.paper for row in table.rows)  # Table 8 is beyond the paper: no paper numbers to subtract
    # without paper numbers a column the tiny world cannot measure would only ever read "-"
    columns = [c for c in table.metrics if deltas or not tiny or c in keys]
    return Report(table_name, table.caption, tiny, columns, rows, keys, extras, notes, deltas)


# ------------------------------------------------------------------------------------------------------- DiT table
def dit_report(tiny: bool, runs: Path, scorers: dict[str, str] | None = None) -> Report:
    from experiments.dit_tables import COLUMNS, TABLE7

    scorers = scorers or (DIT_SCORERS_TINY if tiny else DIT_SCORERS)
    keys = {  # Table 7's columns -> "<prompt set>/<dit-eval metric>"
        "raw_fid": "caption/fid",
        "raw_clip": f"caption/clip_score/{scorers['clip']}",
        "recap_fid": "recaption/fid",
        "recap_clip": f"recaption/clip_score/{scorers['clip']}",
        "recap_recap_clip": f"recaption/clip_score/{scorers['recap_clip']}",
        "recap_gpt4v": "recaption/judge/mean",
    }
    extras = {REALISED_P: "train/caption_source/original", **(DIT_EXTRAS_TINY if tiny else {})}
    rows = []
    for row in TABLE7:
        cfg = f"--row table7/{row.id}" + ("" if tiny else " --scale paper")
        cmd = f"python -m experiments fit {cfg}; then dit-eval"
        rows.append(
            ReportRow(row.id, row.p, dict(row.paper), cfg, cmd, row_runs(runs, "table7", row.id, {**keys, **extras}))
        )
    notes = [
        "Raw = prompts are the original (short) captions; Recap = their recaptions (COCO-Recap). Paper: COCO-30K, "
        "FID on 30k images, CLIP score with OpenAI ViT-B/32, GPT-4V score on 3k.",
        f"Ours: `dit-eval` metrics; CLIP score from the scorer named `{scorers['clip']}`, Recap-CLIP score from "
        f"`{scorers['recap_clip']}`, GPT-4V column from `judge/mean` (a local judge, not GPT-4V).",
    ]
    if tiny:
        notes.append(
            "Tiny world: 500 prompts per set, 16 px pixel DiT; FID on the pinned attribute judge's features, CLIP "
            "score with the web CLIP (alt-text trained); judge colour/shape = the pinned judge's accuracy (%) on what "
            "the prompt states. Not comparable with the paper in absolute terms."
        )
    title = "Text-to-image on COCO-30K, DiT-B/4 at mixed ratios p (paper Table 7)."
    return Report("table7", title, tiny, list(COLUMNS), rows, keys, extras, notes)


# ------------------------------------------------------------------------------------------------ Tables 1 and 2
def table1_report(tiny: bool, runs: Path) -> Report:
    scale, stem = "" if tiny else " --scale paper", CAPTIONER_ROWS[0]
    rows = []
    for model, nums in TABLE1.items():
        ours = model == TABLE1_OURS
        config = f"--row table1/{stem} --stage 1|2|3{scale}" if ours else "-"
        command = f"python -m experiments fit --row table1/{stem} --stage 1{scale} (then 2, 3; export-captioner)"
        status = "cannot be scored offline" if ours else "reference (not trained here)"
        rows.append(ReportRow(model, None, dict(nums), config, command if ours else "-", status=status))
    notes = [
        "MMMU and MM-Vet need their benchmark data and (MM-Vet) a GPT-4 grader; nothing here can reach them, so no row "
        "is scored. Score an `export-captioner` llava-hf folder with an external harness (lmms-eval, VLMEvalKit).",
    ]
    table = captioner_table(runs) if tiny else None
    standin = (
        "### Tiny-world stand-in (not Table 1's metrics)\n\nThe tiny captioner's held-out caption evaluation "
        "(attributes of the caption checked against the world's ground truth, percent; `lightning_modules/evaluation/"
        f"caption_attributes.py`), last evaluation of each stage:\n\n{table}\n"
        if table
        else "### Tiny-world stand-in\n\nNo tiny captioner runs found.\n"
    )
    title = "Performance comparison of LLaVA (MMMU, MM-Vet)."
    return Report("table1", title, tiny, ["mmmu", "mm_vet"], rows, notes=notes, sections=[standin] if tiny else [])


_CAPTION_EVAL = {
    "main object": "main_object_acc",
    "colour precision": "colour_precision",
    "shape precision": "shape_precision",
    "(colour, shape) precision": "pair_precision",
    "count": "count_acc",
    "background": "background_acc",
    "mean words": "mean_words",
}


def captioner_table(runs: Path) -> str | None:
    """The tiny captioner's held-out caption evaluation, the last of each stage (percent), with the chance level of
    the last stage's; None when no stage has one (also ``reproduce``'s captioner table)."""
    rows, chance = [], None
    for stage in CAPTIONER_STAGES:
        found = captioner_eval(runs, stage)
        if found is None:
            rows.append([stage, *("not run" for _ in _CAPTION_EVAL), "-"])
            continue
        last, m = found
        rows.append([stage, *(f"{m[k]:.1f}" if k in m else "-" for k in _CAPTION_EVAL.values())])
        rows[-1].append(f"`{os.path.relpath(last, Path.cwd())}`")
        chance = [f"{m['chance_' + k]:.1f}" if "chance_" + k in m else "-" for k in _CAPTION_EVAL.values()]
        chance = ["chance (last stage)", *chance]
    return markdown_table([*rows, [*chance, "-"]], ["stage", *_CAPTION_EVAL, "metrics file"]) if chance else None


def table2_report(tiny: bool) -> Report:
    """Table 2's sizes with parameter counts of the models as built (open_clip.CLIP on the meta device)."""
    from experiments import paper_tables
    from lightning_modules.components.clip_sizes import count_params, recap_clip_config

    stand_in, rows = [], []
    for row in paper_tables.TABLE2.rows:  # each vision size with its own row's text tower
        size, vision, text = row.vision.replace("-", "/"), row.vision, row.text
        paper = {k.removeprefix("params_"): float(v) for k, v in row.paper.items() if k.startswith("params_")}
        if tiny:
            if vision not in paper_tables.TINY_VISION:  # no tiny H/14 vision: its huge text on the largest one
                vision = list(paper_tables.TINY_VISION)[-1]
                stand_in.append(f"{size}: huge text on the tiny {vision} vision")
            cfg, spec = paper_tables.tiny_model(vision, text), f"tiny {vision} + {text}"
        else:
            cfg, spec = recap_clip_config(vision, text), f"`model: recap-clip:{vision}:{text}`"
        spec += f"; --row table2/{row.id}" + ("" if tiny else " --scale paper")  # trains the size at p = 0.8
        counts = count_params(cfg)
        values = {f"{k}_m": counts[k] / 1e6 for k in ("vision", "text", "total")}
        counted = RunResult("count_params (meta device)", "computed", values, _git("rev-parse", "--short", "HEAD"), "-")
        command = "python -m experiments report table2" + (" --tiny" if tiny else "")
        rows.append(ReportRow(size, None, paper, config=spec, command=command, runs=[counted]))
    notes = [
        "Ours: `lightning_modules.components.clip_sizes.count_params`, i.e. `open_clip.CLIP` built on the meta device "
        "(no memory) and its parameters counted; text = everything but `visual.*` and the logit scale.",
        "The text counts need a 32,000-token vocabulary (BERT, as CLIPA and the released model); the H/14 vision tower "
        "was never trained by the authors (its text tower is Table 4's huge).",
    ]
    if tiny:
        notes.append(
            "Tiny world: the CPU stand-ins of `experiments/paper_tables.py` (open_clip's 49,408-token BPE)"
            + (f" ({'; '.join(stand_in)})" if stand_in else "")
            + "; the paper column is the real size, no delta."
        )
    title = "Recap-CLIP model configurations (parameters in millions)."
    return Report("table2", title, tiny, ["vision_m", "text_m", "total_m"], rows, notes=notes, deltas=not tiny)


def build_report(table: str, tiny: bool, runs: Path | None = None, scorers: dict[str, str] | None = None) -> Report:
    if table not in TABLE_NAMES:
        raise ValueError(f"unknown table {table!r}; known: {list(TABLE_NAMES)}")
    runs = Path(runs) if runs is not None else Path("runs/tiny" if tiny else "runs")
    if table == "table1":
        return table1_report(tiny, runs)
    if table == "table2":
        return table2_report(tiny)
    if table == "table7":
        return dit_report(tiny, runs, scorers)
    return clip_report(table, tiny, runs)


# ---------------------------------------------------------------------------------------------------------- writers
def _digits(report: Report, column: str) -> int:
    return 2 if column == "recap_gpt4v" or report.table == "table2" else 1


def ours_cell(report: Report, row: ReportRow, column: str) -> str:
    mean, sd, _ = row.stats(column)
    if not row.runs:
        return row.status
    if mean is None:
        return "-"  # the run did not measure it
    d = _digits(report, column) if column in report.columns else 3 if column == REALISED_P else 1
    return f"{mean:.{d}f}" + (f" ± {sd:.{d}f}" if sd is not None else "")


def delta(row: ReportRow, column: str) -> float | None:
    mean = row.stats(column)[0]
    return None if mean is None or column not in row.paper else mean - row.paper[column]


def _runs_cell(row: ReportRow) -> str:
    if not row.runs:
        return "0"
    seeds = ", ".join(r.seed for r in row.runs)
    return f"{len(row.runs)} ({seeds})" + (f", run of {row.source}" if row.source else "")


def _unique(row: ReportRow, attribute: str) -> str:
    """The distinct ``commit`` / ``hardware`` of a row's runs."""
    return ", ".join(dict.fromkeys(v for r in row.runs if (v := getattr(r, attribute)))) or "-"


def table_markdown(report: Report) -> str:
    """The report's table: per row the paper's number / ours (Δ) per column, the ours-only columns, runs, commit (a
    table without paper numbers, Table 8, shows ours alone)."""
    with_paper = any(row.paper for row in report.rows)
    head = [LABELS.get(c, c) + (": paper / ours" if with_paper else "") for c in report.columns]
    head = [h + (" (Δ)" if report.deltas else "") for h in head]
    rows = []
    for row in report.rows:
        cells = [row.id, "-" if row.p is None else f"{row.p:g}"]
        for c in report.columns:
            d = _digits(report, c)
            paper = (f"{row.paper[c]:.{d}f}" if c in row.paper else "-") + " / " if with_paper else ""
            dv = delta(row, c) if report.deltas else None
            cells.append(f"{paper}{ours_cell(report, row, c)}" + (f" ({dv:+.{d}f})" if dv is not None else ""))
        cells += [ours_cell(report, row, e) for e in report.extras]
        rows.append([*cells, _runs_cell(row), _unique(row, "commit"), _unique(row, "hardware")])
    return markdown_table(rows, ["row", "p", *head, *report.extras, "runs", "commit", "hardware"])


def markdown(report: Report) -> str:
    scale = "tiny world" if report.tiny else "real scale"
    lines = [f"# Paper {report.table.replace('table', 'Table ')} ({scale}): {report.title}", ""]
    if report.command:
        lines += ["```bash", report.command, "```", ""]
    lines += [table_markdown(report), ""]
    if report.keys:
        read = [f"{LABELS.get(c, c)} = `{k}`" for c, k in report.keys.items()]
        read += [f"{e} = `{k}`" for e, k in report.extras.items()]
        lines += ["Ours read from: " + ", ".join(read) + ".", ""]
    lines.append(
        'Ours = mean ± sample sd over the runs (seeds); Δ = ours − paper. "not run": no run of this row was found '
        '(nothing is filled in); "-": the run did not measure it. Commit `*` = the last commit before the run\'s '
        "metrics were written (the run does not record its commit)."
    )
    lines += [""] + [f"- {n}" for n in report.notes]
    for s in report.sections:
        lines += ["", s.rstrip()]
    sources = [f"- {row.id}: " + ", ".join(f"`{r.path}`" for r in row.runs) for row in report.rows if row.runs]
    if sources and report.table != "table2":
        lines += ["", "Run files:", ""] + sources
    return "\n".join(lines).rstrip() + "\n"


def csv_text(report: Report) -> str:
    """One line per row: paper, ours, sd and delta of each column, the ours-only columns, the runs (pandas' CSV)."""
    import pandas as pd

    r4 = lambda v: None if v is None else round(v, 4)  # noqa: E731
    records = []
    for row in report.rows:
        rec: dict[str, Any] = {"row": row.id, "p": row.p}
        for c in report.columns:
            mean, sd, _ = row.stats(c)
            dv = delta(row, c) if report.deltas else None
            rec.update({f"{c}_paper": row.paper.get(c), f"{c}_ours": r4(mean), f"{c}_ours_sd": r4(sd)})
            rec[f"{c}_delta"] = r4(dv)
        rec.update({e: r4(row.stats(e)[0]) for e in report.extras})
        rec.update(n_runs=len(row.runs), status="ok" if row.runs else row.status, source=row.source or "")
        rec.update(seeds=";".join(r.seed for r in row.runs), commit=_unique(row, "commit"))
        records.append({**rec, "hardware": _unique(row, "hardware")})
    return pd.DataFrame(records).to_csv(index=False, lineterminator="\n")


def to_json(report: Report) -> dict:
    out = asdict(report)
    for row, data in zip(report.rows, out["rows"], strict=True):
        stats = {c: row.stats(c) for c in [*report.columns, *report.extras]}
        data["mean"] = {c: mean for c, (mean, _, _) in stats.items() if mean is not None}
        data["sd"] = {c: sd for c, (_, sd, _) in stats.items() if sd is not None}
    return out


def from_json(data: dict) -> Report:
    rows = [
        ReportRow(
            **{k: v for k, v in r.items() if k not in ("runs", "mean", "sd")}, runs=[RunResult(**x) for x in r["runs"]]
        )
        for r in data["rows"]
    ]
    return Report(**{**data, "rows": rows})


def plot(report: Report, path: Path) -> Path | None:
    """Metric vs p, one panel per paper column: the paper's numbers (left axis) and ours (right axis, ± sd)."""
    points = [r for r in report.rows if r.p is not None]
    if not points:
        return None
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in report.columns if any(c in r.paper for r in points)]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.3 * len(cols), 3.2), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=True):
        paper = [(r.p, r.paper[c]) for r in points if c in r.paper]
        ax.plot(*zip(*paper, strict=True), "o-", color="tab:blue")
        ax.set_xlabel("p (share of original captions)")
        ax.set_title(LABELS.get(c, c), fontsize=9)
        ax.tick_params(axis="y", labelcolor="tab:blue")
        ours = [(r.p, *r.stats(c)[:2]) for r in points if r.stats(c)[0] is not None]
        twin = ax.twinx()
        if ours:
            xs, ys, sds = zip(*ours, strict=True)
            twin.errorbar(xs, ys, yerr=[sd or 0 for sd in sds], fmt="s--", color="tab:orange", capsize=3)
        else:
            why = "not measured" if report.keys and c not in report.keys else "not run"
            twin.text(0.5, 0.5, f"ours: {why}", transform=ax.transAxes, ha="center", color="tab:orange")
        twin.tick_params(axis="y", labelcolor="tab:orange")
    handles = [
        plt.Line2D([], [], color="tab:blue", marker="o", label="paper (left axis)"),
        plt.Line2D([], [], color="tab:orange", marker="s", ls="--", label="ours (right axis, ± sd)"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=8, frameon=False)
    scale = "tiny world" if report.tiny else "real scale"
    fig.text(0.01, 0.97, f"{report.table.replace('table', 'Table ')} ({scale})", fontsize=9, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Report, out: Path) -> dict[str, Path]:
    """Write ``<out>/<table>[_tiny].{md,csv,json}`` and, for the p sweeps, ``.png``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{report.stem}.md", "csv": out / f"{report.stem}.csv", "json": out / f"{report.stem}.json"}
    text = markdown(report)
    if report.table in SWEEP_TABLES:
        png = plot(report, out / f"{report.stem}.png")
        if png is not None:
            paths["png"] = png
            text = text.replace("\n\n", f"\n\n![metric vs p]({png.name})\n\n", 1)
    paths["md"].write_text(text)
    paths["csv"].write_text(csv_text(report))
    paths["json"].write_text(json.dumps(to_json(report), indent=1, ensure_ascii=False) + "\n")
    return paths


# ------------------------------------------------------------------------------------------------ table READMEs
def table_folder(table: str, tiny: bool) -> Path:
    family = {"table1": "captioner", "table7": "dit"}.get(table, "clip")
    return CONFIG_ROOT / ("tiny" if tiny else "") / family / table


def _numbers(values: dict[str, float | str]) -> str:
    return "; ".join(f"{LABELS.get(c, c)} {v}" for c, v in values.items())


def readme(report: Report) -> str:
    """A table folder's README: row | config | command | paper | ours | commit | hardware."""
    scale = "tiny world (CPU stand-ins; numbers not comparable with the paper in absolute terms)"
    scale = scale if report.tiny else "real scale"
    lines = [
        f"# Paper {report.table.replace('table', 'Table ')}: {report.title}",
        "",
        f"Scale: {scale}. Generated by `python -m experiments report --write-readme` from the paper registry and "
        f"`docs/reports/{report.stem}.json` (the committed output of `python -m experiments report {report.table}"
        f"{' --tiny' if report.tiny else ''} --out docs/reports`); edit those, not this file.",
        "",
    ]
    rows = []
    for row in report.rows:
        paper = _numbers({c: f"{row.paper[c]:g}" for c in report.columns if c in row.paper}) or "-"
        ours = row.status
        if row.runs:
            ours = _numbers({c: ours_cell(report, row, c) for c in report.columns})
            ours += f" ({_runs_cell(row)})" if report.table != "table2" else ""
        command = f"`{row.command}`" if row.command != "-" else "-"
        rows.append([row.id, row.config, command, paper, ours, _unique(row, "commit"), _unique(row, "hardware")])
    lines.append(markdown_table(rows, ["row", "config", "command", "paper", "ours", "commit", "hardware"]))
    lines += ["", *[f"- {n}" for n in report.notes]]
    if report.table == "table8":  # its rows are objectives: say what each one is
        lines += ["", "Rows:", "", *[f"- {r.id}: {r.note}" for r in report.rows if r.note]]
    if report.table == "table1":
        lines += [
            "",
            "## Scoring MMMU / MM-Vet (not run here)",
            "",
            "1. Train (stage 1, stage 2) and `python -m experiments export-captioner --ckpt ... --out DIR`: a "
            "llava-hf folder (`LlavaForConditionalGeneration` + `AutoProcessor`).",
            "2. Score DIR with an external harness that loads llava-hf models (lmms-eval, VLMEvalKit) on MMMU "
            "(val) and MM-Vet (GPT-4 graded). The paper does not state the MMMU split.",
        ]
    lines += [
        "",
        f"Full report with deltas and run files: `docs/reports/{report.stem}.md`"
        + (" (exists once the report has been run)" if not (REPORTS / f"{report.stem}.md").exists() else ""),
    ]
    return "\n".join(lines).rstrip() + "\n"


def readme_report(table: str, tiny: bool, reports: Path = REPORTS) -> Report:
    """The report a README shows: the committed JSON when there is one, else the registry with no runs."""
    path = reports / f"{table}{'_tiny' if tiny else ''}.json"
    registry = build_report(table, tiny, REPO / ".no-runs")  # a folder that does not exist: every row "not run"
    if path.is_file():
        report = from_json(json.loads(path.read_text()))
        current = {row.id: row for row in registry.rows}
        for row in report.rows:  # the committed runs, with how a row is run today
            if row.id in current:
                row.config, row.command = current[row.id].config, current[row.id].command
        return report
    report = registry
    for row in report.rows:  # no commit of the moment into a committed file (Table 2's counts need no run)
        for run in row.runs:
            run.commit = None
    return report


def readme_files(reports: Path = REPORTS) -> dict[Path, str]:
    return {
        table_folder(t, tiny) / "README.md": readme(readme_report(t, tiny, reports))
        for t in TABLE_NAMES
        for tiny in (False, True)
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Path] | list[Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments report", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("table", nargs="?", choices=TABLE_NAMES, help="which paper table")
    add("--tiny", action="store_true", help="the tiny-world runs and configs")
    add("--runs", default=None, help="runs root (default: runs, or runs/tiny with --tiny)")
    add("--out", default=None, help="output folder (default: <runs>/reports)")
    add("--dit-clip", default=None, help="dit-eval scorer name of Table 7's CLIP column")
    add("--dit-recap-clip", default=None, help="dit-eval scorer name of the Recap-CLIP column")
    add("--write-readme", action="store_true", help="(re)write every table folder's README.md")
    add("--check-readme", action="store_true", help="exit 1 if a table folder's README.md is stale")
    args = parser.parse_args(argv)

    if args.write_readme or args.check_readme:
        from experiments.paper_tables import write_generated

        stale = write_generated(readme_files(), check=args.check_readme)
        print("\n".join(str(p) for p in stale) or "all table READMEs are up to date")
        if stale and args.check_readme:
            raise SystemExit(1)
        return stale
    if args.table is None:
        parser.error("give a TABLE (table1..table8), or --write-readme / --check-readme")
    runs = Path(args.runs or ("runs/tiny" if args.tiny else "runs"))
    default = DIT_SCORERS_TINY if args.tiny else DIT_SCORERS
    scorers = {"clip": args.dit_clip or default["clip"], "recap_clip": args.dit_recap_clip or default["recap_clip"]}
    report = build_report(args.table, args.tiny, runs, scorers)
    out = Path(args.out) if args.out else runs / "reports"
    shown = [args.table, "--tiny" * args.tiny, args.runs and f"--runs {args.runs}", args.out and f"--out {args.out}"]
    report.command = " ".join(["python -m experiments report", *filter(None, shown)])
    paths = write_report(report, out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return paths
