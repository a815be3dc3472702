"""report: finds each row's runs (seeds -> mean ± sd), never invents a missing row, writes md/CSV/JSON/PNG, and the
table-folder READMEs are current."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from experiments import report


@pytest.fixture(autouse=True)
def _mpl(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def md_row(text: str, row: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is ``row``."""
    cells = ([x.strip() for x in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|"))
    return next(c for c in cells if c[0] == row)


def _clip_run(root: Path, table: str, row: str, metrics: dict, name: str = "step00000160.json") -> Path:
    d = root / "clip" / table / row / "stage2" / "metrics"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({"metrics": metrics, "step": 160}))
    return d / name


def test_seeds_give_mean_and_sd_and_missing_rows_stay_not_run(tmp_path):
    runs = tmp_path / "runs"
    _clip_run(runs, "table3", "p0.5", {"classify/top1": 20.0, "retrieval/image_to_text_R@1": 4.0})
    _clip_run(runs / "seed1", "table3", "p0.5", {"classify/top1": 30.0, "retrieval/image_to_text_R@1": 6.0})
    rep = report.build_report("table3", tiny=True, runs=runs)
    row = {r.id: r for r in rep.rows}
    mean, sd, n = row["p0.5"].stats("imagenet_top1")
    assert (mean, n) == (25.0, 2)
    assert sd == pytest.approx(math.sqrt(50))  # sample sd (n - 1)
    assert report.delta(row["p0.5"], "imagenet_top1") == pytest.approx(25.0 - 67.2)
    assert [r.seed for r in row["p0.5"].runs] == ["default seed", "seed1"]
    assert row["p0.0"].runs == []
    assert row["p0.0"].stats("imagenet_top1") == (None, None, 0)

    md = report.markdown(rep)
    assert md_row(md, "p0.5")[:4] == ["p0.5", "0.5", "67.2 / 25.0 ± 7.1 (-42.2)", "61.9 / 5.0 ± 1.4 (-56.9)"]
    line = " | ".join(md_row(md, "p0.0"))
    assert "36.0 / not run" in line
    assert "±" not in line
    assert "Flickr I→T R@1: paper / ours (Δ)" in md
    assert "No tiny analog: Flickr" in md

    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(report.csv_text(rep)))}
    assert float(rows["p0.5"]["imagenet_top1_ours"]) == 25.0
    assert float(rows["p0.5"]["imagenet_top1_paper"]) == 67.2
    assert rows["p0.5"]["flickr_i2t_r1_ours"] == ""  # no tiny analog: not measured
    assert rows["p0.0"]["status"] == "not run"
    assert rows["p0.0"]["imagenet_top1_ours"] == ""


def test_test_json_wins_over_in_loop_metrics(tmp_path):
    runs = tmp_path / "runs"
    _clip_run(runs, "table5", "p0.6", {"imagenet/top1": 10.0}, "step00000900.json")
    _clip_run(runs, "table5", "p0.6", {"imagenet/top1": 11.5}, "test.json")
    rep = report.build_report("table5", tiny=False, runs=runs)
    row = next(r for r in rep.rows if r.id == "p0.6")
    assert row.stats("imagenet_top1")[0] == 11.5
    assert row.runs[0].path.endswith("test.json")


def test_identical_row_of_another_table_is_reused_and_named(tmp_path):
    runs = tmp_path / "runs"
    _clip_run(runs, "table3", "p1.0", {"classify/top1": 26.0})
    rep = report.build_report("table4", tiny=True, runs=runs)
    row = {r.id: r for r in rep.rows}
    assert row["B16-base-p1.0"].source == "table3/p1.0"
    assert row["B16-base-p1.0"].stats("imagenet_top1")[0] == 26.0
    assert row["B16-base-p0.8"].runs == []  # table3/p0.8 did not run
    assert row["S16-small-p1.0"].runs == []  # different towers: never borrowed
    assert "run of table3/p1.0" in report.markdown(rep)


def test_dit_rows_read_both_prompt_sets(tmp_path):
    runs = tmp_path / "runs"
    for column, fid, clip in (("caption", 100.0, 30.0), ("recaption", 150.0, 21.0)):
        d = runs / "dit" / "eval" / "p1.0" / column
        d.mkdir(parents=True)
        metrics = {"fid": fid, "clip_score/web_clip": clip, "attributes/colour": 0.25}
        (d / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    rep = report.build_report("table7", tiny=True, runs=runs)
    row = next(r for r in rep.rows if r.id == "p1.0")
    assert row.stats("raw_fid")[0] == 100.0
    assert row.stats("recap_fid")[0] == 150.0
    assert row.stats("raw_clip")[0] == 30.0
    assert row.stats("recap_clip")[0] == 21.0
    assert row.stats("recap_gpt4v")[0] is None  # no judge in the run: "-", not a number
    assert row.stats("judge colour % (recap)")[0] == 25.0
    assert report.delta(row, "recap_clip") == pytest.approx(21.0 - 29.3)
    assert all(not r.runs for r in rep.rows if r.id != "p1.0")


def test_write_report_files_and_json_round_trip(tmp_path):
    runs = tmp_path / "runs"
    _clip_run(runs, "table3", "p0.8", {"classify/top1": 24.0})
    rep = report.build_report("table3", tiny=True, runs=runs)
    paths = report.write_report(rep, tmp_path / "out")
    assert {p.name for p in paths.values()} == {f"table3_tiny.{x}" for x in ("md", "csv", "json", "png")}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![metric vs p](table3_tiny.png)" in paths["md"].read_text()
    back = report.from_json(json.loads(paths["json"].read_text()))
    assert report.markdown(back) == report.markdown(rep)
    # not a p sweep: no plot
    assert "png" not in report.write_report(report.build_report("table6", True, runs), tmp_path / "out")


def test_table1_is_not_scored():
    t1 = report.build_report("table1", tiny=False, runs=Path("/nonexistent"))
    assert all(not r.runs for r in t1.rows)
    md = report.markdown(t1)
    row = ["LLaVA-1.5-LLaMA3-8B", "-", "45.2 / cannot be scored offline", "37.8 / cannot be scored offline"]
    assert md_row(md, "LLaVA-1.5-LLaMA3-8B")[:4] == row
    assert "MMMU and MM-Vet need their benchmark data" in md


def test_table2_tiny_counts_equal_a_real_build():
    import open_clip

    from experiments.paper_tables import TINY_VISION, tiny_model

    t2 = report.build_report("table2", tiny=True)
    row = {r.id: r for r in t2.rows}
    vision = "H-14" if "H-14" in TINY_VISION else list(TINY_VISION)[-1]  # no tiny H/14: the largest tiny vision
    built = open_clip.CLIP(**tiny_model(vision, "huge"))  # really built (the report counts on the meta device)
    total = sum(p.numel() for n, p in built.named_parameters() if n not in ("logit_scale", "logit_bias"))
    assert row["H/14"].stats("total_m")[0] == pytest.approx(total / 1e6)
    assert row["H/14"].paper["total_m"] == 967.0
    assert not t2.deltas
    assert "(Δ)" not in report.markdown(t2)


def test_cli_writes_into_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _clip_run(tmp_path / "runs/tiny", "table3", "p0.0", {"classify/top1": 13.0})
    paths = report.main(["table3", "--tiny", "--out", "rep"])
    assert paths["md"] == Path("rep/table3_tiny.md")
    text = paths["md"].read_text()
    assert "python -m experiments report table3 --tiny --out rep" in text
    assert md_row(text, "p0.0")[:3] == ["p0.0", "0", "36.0 / 13.0 (-23.0)"]


def test_table_readmes_are_current():
    """Regenerate with: python -m experiments report --write-readme"""
    files = report.readme_files()
    assert len(files) == 16  # tables 1-8, real and tiny
    stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
    assert not stale, f"stale table READMEs (python -m experiments report --write-readme): {stale}"
