"""The CLI: command listing, a real fit on shards, the world command (every YAML: tests/test_configs.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_shards

from experiments.__main__ import LIGHTNING_COMMANDS, SUITE_COMMANDS, main
from experiments.cli import cli_main, scrub_secrets

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "experiments" / "configs" / "trainer" / "cpu.yaml"
TINY_CLIP = REPO / "experiments" / "configs" / "debug" / "tiny_clip.yaml"


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *SUITE_COMMANDS]:
        assert f"  {name} " in out


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fitt"])
    assert exc.value.code == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_fit_on_shards_logs_caption_sources_and_saves_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards(tmp_path / "web", [40, 40, 40], sidecar_dir=tmp_path / "side", image_size=64)
    cli_main(
        [
            "fit",
            "--config",
            str(TRAINER),
            "--config",
            str(TINY_CLIP),
            f"--data.init_args.train_shards={tmp_path / 'web'}",
            "--data.init_args.val_shards=null",
            "--data.init_args.sources={original: txt, recaption: 'sidecar:re_caption'}",
            f"--data.init_args.sidecar_dir={tmp_path / 'side'}",
            "--data.init_args.p_original=0.25",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=6",
            "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=null",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    run = next((tmp_path / "runs" / "tiny").glob("version_*"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    frac = [float(r["train/caption_source/original"]) for r in rows if r.get("train/caption_source/original")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(loss) >= 5
    assert all(x == x for x in loss)
    assert frac
    assert 0.0 < frac[-1] < 0.6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["init_args"]["p_original"] == 0.25


def test_scrub_secrets():
    cfg = {
        "trainer": {"logger": {"init_args": {"api_key": "abc123", "project": "p"}}},
        "hf_token": "tok",
        "list": [{"password": "x"}],
        "empty_token": None,
    }
    out = scrub_secrets(cfg)
    assert out["trainer"]["logger"]["init_args"] == {"api_key": "***", "project": "p"}
    assert out["hf_token"] == "***"
    assert out["list"][0]["password"] == "***"
    assert out["empty_token"] is None
    assert "abc123" not in json.dumps(out)


def test_world_command_flags(tmp_path):
    summary = main_world(
        ["--out", str(tmp_path / "w"), "--preset=tiny", "--n_web", "60", "--shard_size", "20", "--seed", "3"]
    )
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert sorted(p.name for p in (tmp_path / "w" / "web").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert world["config"]["n_web"] == 60
    assert world["config"]["seed"] == 3
    assert summary


def main_world(argv):
    from experiments.world import main as world_main

    return world_main(argv)
