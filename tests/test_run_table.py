"""clip-table: runs only the stages that have no metrics yet (resume), in order, through the step runner, and
tabulates both stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from experiments import run_table
from experiments.runner import launch_fresh


def _fake_metrics(run: Path, step: int, top1: float) -> None:
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / f"step{step:08d}.json").write_text(json.dumps({"metrics": {"classify/top1": top1}}))


class FakeFit:
    """Stands in for a stage's launch: records its argv and writes metrics into the run dir its logger names."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.calls = tmp_path, []

    def __call__(self, cmd, env, threads=None):
        argv = list(cmd[3:])
        self.calls.append(argv)
        logger = json.loads(next(a for a in argv if a.startswith("--trainer.logger=")).split("=", 1)[1])
        init = logger["init_args"]
        run = Path(init["save_dir"]) / init["name"] / init["version"]
        _fake_metrics(run, 10, 40.0 if init["version"] == "stage2" else 30.0)
        return launch_fresh([sys.executable, "-c", "pass"], env)


def md_rows(text: str, row: str) -> list[list[str]]:
    """The cells after the id of every Markdown table row of ``row`` in ``text`` (final table, then stage 1)."""
    cells = ([x.strip() for x in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|"))
    return [c[1:] for c in cells if c[0] == row]


def test_runs_missing_stages_in_order_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeFit(tmp_path)
    monkeypatch.setattr(run_table, "LAUNCHER", fake)
    # p0.5 already finished stage 1 in an earlier (interrupted) sweep
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.5/stage1", 800, 25.0)
    results = run_table.main(["--table", "table3", "--rows", "p0.0", "p0.5", "--tiny", "--", "--trainer.max_steps=5"])
    ran = [
        (json.loads(a.split("=", 1)[1])["init_args"]["name"], json.loads(a.split("=", 1)[1])["init_args"]["version"])
        for argv in fake.calls
        for a in argv
        if a.startswith("--trainer.logger=")
    ]
    assert ran == [("clip/table3/p0.0", "stage1"), ("clip/table3/p0.0", "stage2"), ("clip/table3/p0.5", "stage2")]
    assert all(argv[-1] == "--trainer.max_steps=5" for argv in fake.calls)
    assert (
        f"--model.init_args.init_from={tmp_path}/runs/tiny/clip/table3/p0.0/stage1/checkpoints/last.ckpt"
        in fake.calls[1]
    )
    assert results["p0.5"]["stage1_metrics"] == {"classify/top1": 25.0}
    assert results["p0.5"]["metrics"] == {"classify/top1": 40.0}
    text = (tmp_path / "runs/tiny/clip/table3/results.md").read_text()
    assert md_rows(text, "p0.0")[0][:2] == ["0", "36.0 / 40.0 (+4.0)"]  # final, beside the paper
    assert md_rows(text, "p0.5")[1][0] == "25.0"  # end of stage 1
    assert results["p0.0"]["seconds"] == sum(results["p0.0"]["stage_seconds"].values())  # both stages timed here
    assert results["p0.5"]["seconds"] is None  # stage 1 ran in another invocation that recorded no time
    fake.calls.clear()
    again = run_table.main(["--table", "table3", "--rows", "p0.0", "p0.5", "--tiny"])
    assert fake.calls == []  # everything done: a rerun trains nothing ...
    assert again["p0.0"]["seconds"] == results["p0.0"]["seconds"]  # ... and keeps the wall times measured before


def test_unknown_row_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run_table.main(["--table", "table3", "--rows", "p0.45", "--tiny"])
    assert "unknown rows ['p0.45']" in capsys.readouterr().err


def test_seed_reruns_go_to_their_own_folder_and_chain_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeFit(tmp_path)
    monkeypatch.setattr(run_table, "LAUNCHER", fake)
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.8/stage1", 800, 25.0)  # the seed-0 run: not reused
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.8/stage2", 160, 25.0)
    results = run_table.main(["--table", "table3", "--rows", "p0.8", "--tiny", "--seed", "2"])
    assert len(fake.calls) == 2
    for argv in fake.calls:
        assert {"--seed_everything=2", "--data.init_args.seed=2"} <= set(argv)
        logger = next(a for a in argv if a.startswith("--trainer.logger="))
        assert json.loads(logger.split("=", 1)[1])["init_args"]["save_dir"] == f"{tmp_path}/runs/tiny/seed2"
    stage1 = f"{tmp_path}/runs/tiny/seed2/clip/table3/p0.8/stage1"
    assert fake.calls[1][-1] == f"--model.init_args.init_from={stage1}/checkpoints/last.ckpt"
    assert results["p0.8"]["metrics"] == {"classify/top1": 40.0}
    assert (tmp_path / "runs/tiny/seed2/clip/table3/results.md").is_file()


def test_paper_scale_rows_log_to_csv_then_wandb(tmp_path):
    runs = {s: tmp_path / "clip/table3/p0.8" / f"stage{s}" for s in (1, 2)}
    for step in run_table.row_steps("table3", "p0.8", runs, "paper", None):
        logger = next(a for a in step.argv if a.startswith("--trainer.logger="))
        csv, wb = json.loads(logger.split("=", 1)[1])
        assert csv["init_args"] == {"save_dir": str(tmp_path), "name": "clip/table3/p0.8", "version": step.name[5:]}
        assert wb["class_path"] == "experiments.loggers.RecapWandbLogger"
        assert wb["init_args"]["name"] == f"clip/table3/p0.8/{step.name[5:]}"
