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


def _printed_config(capsys, argv: list[str]) -> dict:
    """``python -m experiments <argv> --print_config`` (the same entry point, in this process), parsed."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--print_config"])
    assert exc.value.code in (None, 0), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_a_dotted_key_into_a_nested_dict_merges_into_the_configured_dict(capsys, monkeypatch, tmp_path):
    """--model.init_args.model.vision_cfg.patch_size=4 changes that one key of the YAML's vision_cfg; the rest of the
    model config stays as configured (jsonargparse alone left vision_cfg = {patch_size: 4})."""
    configured = yaml.safe_load(TINY_CLIP.read_text())["model"]["init_args"]["model"]
    base = ["fit", "--config", str(TINY_CLIP)]
    model = _printed_config(capsys, [*base, "--model.init_args.model.vision_cfg.patch_size=4"])["model"]
    cfg = model["init_args"]["model"]
    assert cfg["vision_cfg"] == {**configured["vision_cfg"], "patch_size": 4}
    assert cfg["text_cfg"] == configured["text_cfg"]
    assert cfg["embed_dim"] == configured["embed_dim"]

    # the space-separated form, two keys, a new nested key, a one-level key: all merged, in order (last wins)
    args = [*base, "--model.init_args.model.text_cfg.layers", "3", "--model.init_args.model.vision_cfg.width=32"]
    args += ["--model.init_args.model.vision_cfg.width=48", "--model.init_args.model.embed_dim=16"]
    args += ["--model.init_args.model.text_cfg.tokenizer_kwargs.strip_sep_token=true"]
    cfg = _printed_config(capsys, args)["model"]["init_args"]["model"]
    assert cfg["vision_cfg"] == {**configured["vision_cfg"], "width": 48}
    assert cfg["text_cfg"] == {**configured["text_cfg"], "layers": 3, "tokenizer_kwargs": {"strip_sep_token": True}}
    assert cfg["embed_dim"] == 16

    # a later --config still replaces the whole setting (last wins), whatever came before it
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"init_args": {"model": "ViT-B-32"}}}))
    args = [*base, "--model.init_args.model.vision_cfg.patch_size=4", "--config", str(other)]
    assert _printed_config(capsys, args)["model"]["init_args"]["model"] == "ViT-B-32"

    # the command-line path proper (LightningCLI reads sys.argv itself)
    argv = ["experiments", *base, "--model.init_args.model.vision_cfg.layers=1", "--print_config"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit):
        cli_main(None)
    cfg = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model"]
    assert cfg["vision_cfg"] == {**configured["vision_cfg"], "layers": 1}


def test_a_dotted_key_through_a_value_that_is_not_a_dict_is_refused(capsys, tmp_path):
    base = ["fit", "--config", str(TINY_CLIP)]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--model.init_args.model.embed_dim.size=4", "--print_config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.model.embed_dim is 64, not a dict" in err
    assert "--model.init_args.model='{...}'" in err
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({"model": {"init_args": {"model": "ViT-B-32"}}}))
    with pytest.raises(SystemExit) as exc:
        main([*base, "--config", str(named), "--model.init_args.model.vision_cfg.patch_size=4", "--print_config"])
    assert exc.value.code == 2
    assert "model.init_args.model is 'ViT-B-32', not a dict" in capsys.readouterr().err


def test_a_row_by_hand_and_its_errors(capsys):
    """--row TABLE/ROW [--stage N] [--scale S] composes a paper table row (experiments/paper_tables.py) before
    LightningCLI parses; a bad one exits 2 naming the table / row and the valid ones."""
    cfg = _printed_config(capsys, ["fit", "--row", "table4/S16-base-p0.8", "--stage", "2", "--trainer.max_steps=3"])
    assert cfg["model"]["init_args"]["model"] == "recap-clip:S-16:base:tiny"
    assert cfg["model"]["init_args"]["init_from"] == "runs/tiny/clip/table4/S16-base-p0.8/stage1/checkpoints/last.ckpt"
    assert (cfg["data"]["init_args"]["p_original"], cfg["trainer"]["max_steps"]) == (0.8, 3)
    for argv, message in [
        (["--row", "table3/p0.85"], "table3 has no row 'p0.85'; valid: p0.0"),
        (["--row=table9/p0.8"], "unknown paper table 'table9'; valid: table1"),
        (["--row", "table7/p0.5", "--stage", "2"], "table7/p0.5 has stages 1, got 2"),
        (["--stage", "2"], "--stage / --scale go with --row"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["fit", *argv, "--print_config"])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
