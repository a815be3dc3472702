"""clip-table: runs only the stages that have no metrics yet (resume), in order, and tabulates both stages."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import run_table


def _fake_metrics(run: Path, step: int, top1: float) -> None:
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / f"step{step:08d}.json").write_text(json.dumps({"metrics": {"classify/top1": top1}}))


def test_runs_missing_stages_in_order_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_run_stage(configs, extra, log):
        calls.append((configs[-1].name, list(extra)))
        run = run_table.run_dir(configs)
        _fake_metrics(run, 10, 40.0 if "stage2" in configs[-1].name else 30.0)
        return 60.0

    monkeypatch.setattr(run_table, "run_stage", fake_run_stage)
    # p0.5 already finished stage 1 in an earlier (interrupted) sweep
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.5/stage1", 800, 25.0)
    results = run_table.main(["--table", "table3", "--rows", "p0.0", "p0.5", "--tiny", "--", "--trainer.max_steps=5"])
    assert calls == [
        ("p0.0.yaml", ["--trainer.max_steps=5"]),
        ("p0.0.stage2.yaml", ["--trainer.max_steps=5"]),
        ("p0.5.stage2.yaml", ["--trainer.max_steps=5"]),
    ]
    assert results["p0.5"]["stage1_metrics"] == {"classify/top1": 25.0}
    assert results["p0.5"]["metrics"] == {"classify/top1": 40.0}
    table = (tmp_path / "runs/tiny/clip/table3/results.md").read_text()
    assert "| p0.0 | 0.0 | 40.0 |" in table  # final
    assert "| p0.5 | 0.5 | 25.0 |" in table  # end of stage 1
    assert results["p0.0"]["seconds"] == 120.0
    assert results["p0.5"]["seconds"] is None  # stage 1 ran in another invocation that recorded no time
    calls.clear()
    again = run_table.main(["--table", "table3", "--rows", "p0.0", "p0.5", "--tiny"])
    assert calls == []  # everything done: a rerun trains nothing ...
    assert again["p0.0"]["seconds"] == 120.0  # ... and keeps the wall times measured before


def test_unknown_row_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        run_table.main(["--table", "table3", "--rows", "p0.45", "--tiny"])
    assert "unknown rows ['p0.45']" in capsys.readouterr().err


def test_seed_reruns_go_to_their_own_folder_and_chain_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_run_stage(configs, extra, log):
        calls.append(extra)
        save_dir = next(a.split("=", 1)[1] for a in extra if a.startswith("--trainer.logger.init_args.save_dir="))
        name = "stage2" if "stage2" in configs[-1].name else "stage1"
        _fake_metrics(Path(save_dir) / "clip/table3/p0.8" / name, 5, 1.0)
        return 1.0

    monkeypatch.setattr(run_table, "run_stage", fake_run_stage)
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.8/stage1", 800, 25.0)  # the seed-0 run: not reused
    _fake_metrics(tmp_path / "runs/tiny/clip/table3/p0.8/stage2", 160, 25.0)
    results = run_table.main(["--table", "table3", "--rows", "p0.8", "--tiny", "--seed", "2"])
    assert len(calls) == 2
    assert calls[0][:3] == [
        "--seed_everything=2",
        "--data.init_args.seed=2",
        "--trainer.logger.init_args.save_dir=runs/tiny/seed2",
    ]
    assert calls[1][-1] == "--model.init_args.init_from=runs/tiny/seed2/clip/table3/p0.8/stage1/checkpoints/last.ckpt"
    assert results["p0.8"]["metrics"] == {"classify/top1": 1.0}
    assert (tmp_path / "runs/tiny/seed2/clip/table3/results.md").is_file()
