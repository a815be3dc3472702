"""No secret reaches a saved config, a log or a checkpoint: a real tiny fit with W&B (offline) and CSV loggers, the
W&B key and a HF token in the environment and a credential under a secret-looking config key, then every file the run
wrote is searched for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_shards

from experiments.cli import cli_main, scrub_secrets

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
WANDB_KEY = "FAKEWANDBKEY0123456789abcdef0123456789ab"  # 40 characters, the shape of a real W&B key
HF_TOKEN = "hf_FAKETOKENxyzXYZ0123456789abcdefghij"
CONFIG_SECRET = "FAKE-CONFIG-SECRET-5f3c9a"


def _files_containing(root: Path, needles: dict[str, str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, needle in needles.items():
            if needle.encode() in data:
                hits.setdefault(name, []).append(str(path.relative_to(root)))
    return hits


def test_tiny_fit_with_wandb_writes_no_secret(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(inputs / "web", [16, 16], sidecar_dir=inputs / "side", image_size=32)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(out / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.chdir(out.parent)
    (out / "wandb_dir").mkdir(parents=True)
    overrides = {
        "trainer": {
            "max_steps": 3,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(out / "runs"), "name": "secrets", "version": "v0"},
                },
                {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {
                        "save_dir": str(out / "wandb_dir"),
                        "offline": True,
                        "project": "recap-secret-test",
                        # wandb.init's own run config: a credential under a secret-looking key
                        "config": {"hf_token": CONFIG_SECRET, "note": "kept"},
                    },
                },
            ],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(out / "ckpt"), "every_n_train_steps": 1, "save_last": True},
                }
            ],
        },
        "model": {"init_args": {"evaluation": None, "total_samples": None, "warmup_samples": 16}},
        "data": {
            "init_args": {
                "train_shards": str(inputs / "web" / "{00000..00001}.tar"),
                "val_shards": None,
                "sidecar_dir": str(inputs / "side"),
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 8,
                "shuffle_initial": 4,
            }
        },
    }
    (inputs / "override.yaml").write_text(yaml.safe_dump(overrides))
    args = ["fit", "--row", "table3/p0.8"]
    cli = cli_main([*args, "--config", str(inputs / "override.yaml")])
    import wandb

    # finish() returns once the run is closed, but wandb-core writes the offline log in its own process: teardown()
    # waits for that process to exit, so the log is whole before we read it (without it the file can hold only its
    # header, ~1 run in 3 here)
    wandb.finish()
    wandb.teardown()
    assert cli.trainer.global_step == 3
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # the run really wrote what we search: the saved config, CSV hparams and metrics, checkpoints, the W&B run
    assert {"runs/secrets/v0/config.yaml", "runs/secrets/v0/hparams.yaml", "runs/secrets/v0/metrics.csv"} <= written
    assert "ckpt/last.ckpt" in written
    run_file = next(out.rglob("*.wandb"))  # the offline W&B run (config, metrics, console) in one protobuf log
    assert b"recap-secret-test" in run_file.read_bytes()
    assert b"kept" in run_file.read_bytes()
    leaks = _files_containing(out, {"wandb key": WANDB_KEY, "hf token": HF_TOKEN, "config secret": CONFIG_SECRET})
    assert leaks == {}, sorted(written)


def test_scrub_keeps_tokenizer_settings_and_removes_credentials(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    cfg = {
        "model": {"max_new_tokens": 128, "tokenizer": "bert-base-uncased", "pad_token": "<pad>"},
        "text_cfg": {"tokenizer_kwargs": {"strip_sep_token": True}},
        "logger": {"api_key": "k", "wandb_api_key": "k", "access_token": "t", "client_secret": "s", "token": "t"},
        "notes": f"run with {HF_TOKEN} in it",
        "betas": (0.9, 0.95),
    }
    out = scrub_secrets(cfg)
    assert out["model"] == cfg["model"]
    assert out["text_cfg"] == cfg["text_cfg"]
    assert out["betas"] == (0.9, 0.95)
    assert set(out["logger"].values()) == {"***"}
    assert out["notes"] == "***"  # an environment credential is scrubbed under any key
