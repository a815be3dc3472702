"""Config validation before any compute (``experiments/validate.py``): every rule fails through the real command line
(``python -m experiments fit ...`` in-process) with exit code 2, one stderr line naming the dotted key, and nothing
written; a valid config passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_shards

from datamodules.checks import ConfigError, RunContext, check_path, looks_like_hub_id, per_device_batch
from experiments.__main__ import main
from experiments.validate import run_context

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CLIP_STAGE1 = ["--row", "table3/p0.8"]  # a paper table row (experiments/paper_tables.py), tiny scale
CLIP_STAGE2 = ["--row", "table3/p0.8", "--stage", "2"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Real (tiny) inputs under ``tmp/data``; an empty working directory ``tmp/cwd`` that must stay empty."""
    data = tmp_path / "data"
    write_shards(data / "web", [8, 8], sidecar_dir=data / "side")
    (data / "folder").mkdir()
    (data / "chat.json").write_text("[]")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    clip_data = [
        f"--data.init_args.train_shards={data / 'web'}/{{00000..00001}}.tar",
        f"--data.init_args.val_shards={data / 'web'}/00001.tar",
        f"--data.init_args.sidecar_dir={data / 'side'}",
    ]
    return {"data": data, "cwd": cwd, "clip": ["fit", *CLIP_STAGE1, *clip_data], "clip_data": clip_data}


def _case(env, name):
    d = env["data"]
    clip = env["clip"]
    dit = ["fit", "--config", str(CONFIGS / "tiny/dit/base.yaml"), *env["clip_data"]]
    dit += [f"--model.init_args.text_encoder={d / 'folder'}"]
    captioner = ["fit", "--config", str(CONFIGS / "tiny/captioner/stage1.yaml")]
    captioner += [f"--model.init_args.vision_tower={d / 'folder'}", f"--model.init_args.llm={d / 'folder'}"]
    captioner += [f"--data.init_args.train_json={d / 'chat.json'}", f"--data.init_args.image_folder={d / 'folder'}"]
    return {
        "p_original": (
            clip + ["--data.init_args.p_original=1.5"],
            "data.init_args.p_original = 1.5: must be in [0, 1]",
        ),
        "clip_size": (clip + ["--model.init_args.model=recap-clip:B-16:gigantic"], "model.init_args.model = "),
        "dit_size": (dit + ["--model.init_args.size=DiT-Q/2"], "model.init_args.size = 'DiT-Q/2'"),
        "global_batch": (
            clip
            + ["--data.init_args.batch_size=null", "--data.init_args.global_batch_size=100", "--trainer.devices=3"],
            "data.init_args.global_batch_size = 100: must be divisible by devices x num_nodes",
        ),
        "train_shards": (
            clip + [f"--data.init_args.train_shards={d / 'nowhere'}/{{00000..00003}}.tar"],
            "data.init_args.train_shards = ",
        ),
        "sidecar_dir": (clip + [f"--data.init_args.sidecar_dir={d / 'no_sidecars'}"], "data.init_args.sidecar_dir = "),
        "resume_ckpt": (clip + [f"--ckpt_path={d / 'missing.ckpt'}"], "ckpt_path = "),
        "clip_stage2_init_from": (
            ["fit", *CLIP_STAGE2, *env["clip_data"]],
            "model.init_args.init_from = 'runs/tiny/clip/table3/p0.8/stage1/checkpoints/last.ckpt': must name an "
            "existing file",
        ),
        "captioner_stage2_init_from": (
            captioner
            + ["--config", str(CONFIGS / "tiny/captioner/stage2.yaml")]
            + [f"--data.init_args.train_json={d / 'chat.json'}", f"--data.init_args.image_folder={d / 'folder'}"],
            "model.init_args.init_from = 'runs/tiny/captioner/stage1/checkpoints/last.ckpt'",
        ),
        "captioner_local_llm": (
            captioner + ["--model.init_args.llm=runs/tiny/captioner/llm"],
            "model.init_args.llm = 'runs/tiny/captioner/llm'",
        ),
        "llava_json": (captioner + [f"--data.init_args.train_json={d / 'no.json'}"], "data.init_args.train_json = "),
        "dit_cache_dir": (
            dit + ["--config", str(CONFIGS / "tiny/dit/cached.yaml"), f"--data.init_args.cache_dir={d / 'folder'}"],
            "data.init_args.cache_dir = ",
        ),
    }[name]


CASES = [
    "p_original",
    "clip_size",
    "dit_size",
    "global_batch",
    "train_shards",
    "sidecar_dir",
    "resume_ckpt",
    "clip_stage2_init_from",
    "captioner_stage2_init_from",
    "captioner_local_llm",
    "llava_json",
    "dit_cache_dir",
]


@pytest.mark.parametrize("name", CASES)
def test_each_rule_stops_the_cli_with_one_line_and_writes_nothing(env, name, capsys):
    argv, expected = _case(env, name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"config error: {expected}"), lines
    assert list(env["cwd"].iterdir()) == []  # no run, log or checkpoint folder


def test_the_error_names_the_config_file_that_set_the_key(env, capsys, tmp_path):
    row = tmp_path / "row.stage2.yaml"
    row.write_text("model:\n  init_args:\n    init_from: runs/tiny/clip/mine/stage1/checkpoints/last.ckpt\n")
    with pytest.raises(SystemExit):
        main(["fit", *CLIP_STAGE2, "--config", str(row), *env["clip_data"]])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "init_from = 'runs/tiny/clip/mine/stage1/checkpoints/last.ckpt'" in line
    assert line.endswith(f"(in {row})"), line


def test_a_command_line_override_is_not_blamed_on_a_file(env, capsys):
    with pytest.raises(SystemExit):
        main([*env["clip"], "--data.init_args.p_original=-0.1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "p_original = -0.1" in line
    assert "(in " not in line


def test_suite_commands_on_fit_configs_run_the_same_validation(env, capsys):
    d = env["data"]
    argv = ["dit-cache", "--out", str(env["cwd"] / "cache"), "--config", str(CONFIGS / "tiny/dit/base.yaml")]
    argv += [*env["clip_data"], f"--model.init_args.text_encoder={d / 'folder'}", "--model.init_args.size=DiT-Q/2"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "config error: model.init_args.size = 'DiT-Q/2'" in capsys.readouterr().err
    assert list(env["cwd"].iterdir()) == []


def test_a_valid_config_passes_and_builds(env, capsys):
    from experiments.cli import cli_main

    args = [a for a in env["clip"] if a != "fit"] + ["--model.init_args.evaluation=null"]
    args += ["--data.init_args.batch_size=null", "--data.init_args.global_batch_size=16"]
    cli = cli_main(args, run=False)
    assert "config error" not in capsys.readouterr().err
    assert cli.datamodule.hparams.global_batch_size == 16
    assert cli.model.hparams.init_from is None


# ------------------------------------------------------------------------------------------------- the rules alone
def test_global_batch_splits_over_devices_nodes_and_accumulation():
    assert per_device_batch(None, 32768, 64) == 512  # the paper: 8 nodes x 8 GPUs x 512
    assert per_device_batch(None, 32768, 64, accumulate_grad_batches=2) == 256
    assert per_device_batch(None, 32768, None) is None  # devices: auto -- decided once the processes exist
    assert per_device_batch(48, None, 3) == 48  # a per-device batch fits any world size
    with pytest.raises(ConfigError, match="global_batch_size must be divisible"):
        per_device_batch(None, 100, 3)
    with pytest.raises(ConfigError, match="exactly one"):
        per_device_batch(8, 64, 1)


def test_the_datamodule_takes_its_share_of_the_global_batch(tmp_path):
    from datamodules.caption_mix import CaptionMixDataModule

    write_shards(tmp_path / "web", [8, 8, 8])
    dm = CaptionMixDataModule(str(tmp_path / "web"), global_batch_size=12, world_size=3, rank=1, sources={"o": "txt"})
    assert dm.batch_size == 4
    dm = CaptionMixDataModule(str(tmp_path / "web"), global_batch_size=12, sources={"o": "txt"}, num_workers=0)
    dm._stream(dm.train_shards, "fit", training=True)  # no Trainer: world size 1
    assert dm.batch_size == 12


def test_world_size_from_the_trainer_config():
    assert run_context({"devices": 8, "num_nodes": 8}).world_size == 64
    assert run_context({"devices": "4", "num_nodes": 2, "accumulate_grad_batches": 3}) == RunContext(8, 3)
    assert run_context({"devices": [0, 1]}).world_size == 2
    assert run_context({"devices": "0,1,2"}).world_size == 3
    assert run_context({"devices": "auto"}).world_size is None
    assert run_context({"devices": -1, "num_nodes": 4}).world_size is None


def test_local_paths_vs_hub_names_vs_remote_urls(tmp_path):
    assert looks_like_hub_id("openai/clip-vit-large-patch14-336")
    assert looks_like_hub_id("gpt2")
    for local in ("runs/tiny/captioner/llm", "./llm", "/models/llm", "../llm", "~/llm", "last.ckpt", "a/b.safetensors"):
        assert not looks_like_hub_id(local), local
    check_path("llm", "meta-llama/Meta-Llama-3-8B-Instruct", hub_ok=True)  # a hub name: left to from_pretrained
    check_path("x", "s3://bucket/shards/{0..9}.tar", "file")  # remote: not checked
    check_path("x", "pipe:curl -s https://x/0.tar", "file")
    with pytest.raises(ConfigError, match="must name an existing file or folder"):
        check_path("llm", str(tmp_path / "missing" / "llm"), hub_ok=True)
    with pytest.raises(ConfigError, match="must name an existing file"):
        check_path("init_from", "openai/clip-vit-large-patch14", "file")  # no hub for checkpoints
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"\(a folder is there\)"):
        check_path("init_from", str(tmp_path / "d"), "file")
