"""W&B sweep specs, the local sweep runner and W&B logging (offline): every spec's grid corners pass ``--print_config``
with their values in place, the runner lists and runs exactly the grid, and an offline W&B run holds the media and
the resolved config."""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_shards

from experiments import sweep
from experiments.cli import cli_main
from experiments.paper_tables import tiny_model

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "experiments" / "sweeps"
CONFIGS = REPO / "experiments" / "configs"
SPECS = sorted(SWEEPS.rglob("*.yaml"))


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _print_config(args: list[str]) -> dict:
    buf = io.StringIO()
    with pytest.raises(SystemExit) as exc, redirect_stdout(buf):
        cli_main(args + ["--print_config"])
    assert exc.value.code in (None, 0)
    return yaml.safe_load(buf.getvalue())


def corners(spec: dict) -> list[dict]:
    """The grid's corners: every combination of each parameter's first and last value (deduplicated)."""
    names = sorted(spec["parameters"])
    ends = []
    for n in names:
        cfg = spec["parameters"][n]
        values = cfg["values"] if "values" in cfg else [cfg["value"]]
        ends.append([values[0]] if len(values) == 1 else [values[0], values[-1]])
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*ends)]


def _corner_cases():
    for path in SPECS:
        spec = sweep.load_spec(path)
        for i, point in enumerate(corners(spec)):
            yield pytest.param(path, point, id=f"{path.relative_to(SWEEPS)}-corner{i}")


def test_there_is_a_spec_and_a_tiny_twin_per_table():
    names = {p.relative_to(SWEEPS).as_posix() for p in SPECS}
    for table in ("table3_p", "table4_textenc_p", "table5_p_large_text", "table7_dit_p"):
        assert {f"{table}.yaml", f"tiny/{table}.yaml"} <= names


@pytest.mark.parametrize(("path", "point"), list(_corner_cases()))
def test_spec_corner_validates_with_print_config(path, point):
    """The W&B expansion of ``${args}`` (``--key=value``) after the spec's configs parses, and every swept value lands
    at its dotted key: renaming a key in a module, a config or a spec fails here."""
    spec = sweep.load_spec(path)
    args = sweep.lightning_args(spec, point)
    for key, value in point.items():
        assert f"--{key}={value}" in args  # exactly what `wandb agent` passes (create_sweep_command_args)
    printed = _print_config(args)
    for key, value in point.items():
        assert _get(printed, key) == value, key
    # a `wandb agent` run gets its own run dir (SweepCSVLogger) and the sweep's W&B run, no base names carried over
    csv, wb = printed["trainer"]["logger"]
    assert csv["class_path"] == "experiments.loggers.SweepCSVLogger"
    assert (csv["init_args"]["name"], csv["init_args"]["version"]) == (None, None)
    assert wb["class_path"] == "experiments.loggers.RecapWandbLogger"
    assert (wb["init_args"]["name"], wb["init_args"]["group"], wb["init_args"]["project"]) == (None, None, None)


def test_tiny_twins_sweep_the_same_grid_as_the_real_specs():
    for real_path in SWEEPS.glob("*.yaml"):
        real, tiny = sweep.load_spec(real_path), sweep.load_spec(SWEEPS / "tiny" / real_path.name)
        assert real["method"] == tiny["method"] == "grid"
        assert real["parameters"]["data.init_args.p_original"] == tiny["parameters"]["data.init_args.p_original"]
        model = real["parameters"].get("model.init_args.model")
        if model is None or model.get("value") == "recap-clip:B-16:base":  # the tiny base config's own model
            continue
        names = model["values"] if "values" in model else [model["value"]]
        tiny_values = tiny["parameters"]["model.init_args.model"]
        tiny_values = tiny_values["values"] if "values" in tiny_values else [tiny_values["value"]]
        expected = [tiny_model(*name.split(":")[1:3], image_size=32) for name in names]
        assert tiny_values == expected, real_path.name


def test_grid_order_and_expansion_follow_wandb():
    spec = {
        "method": "grid",
        "parameters": {"model.x": {"values": ["a", "b"]}, "data.p": {"values": [0.0, 1.0]}},
        "command": ["${env}", "python", "-m", "experiments", "fit", "--config", "B.yaml", "${args}"],
    }
    points = sweep.grid(spec)
    # W&B: parameters sorted by name, itertools.product over their values (the last name varies fastest)
    assert points == [dict(zip(["data.p", "model.x"], c, strict=True)) for c in itertools.product([0.0, 1.0], "ab")]
    cmd = sweep.expand_command(spec, points[1], python="PY")
    assert cmd == ["PY", "-m", "experiments", "fit", "--config", "B.yaml", "--data.p=0.0", "--model.x=b"]


def test_load_spec_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "parameters": {"p_original": {"values": [1]}},
                "command": ["python", "-m", "experiments", "fit", "${args}"],
            }
        )
    )
    with pytest.raises(ValueError, match=r"bad.yaml: parameters.p_original: not a LightningCLI dotted key"):
        sweep.load_spec(bad)
    params = {"data.init_args.p_original": {"values": [1]}}
    command = ["python", "-m", "experiments", "fit", "${args_no_hyphens}"]
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": params, "command": command}))
    with pytest.raises(ValueError, match=r"bad.yaml: 'command' must be a list ending in \$\{args\}"):
        sweep.load_spec(bad)


def test_dry_run_lists_exactly_the_grid_and_done_points(tmp_path, capsys):
    path = SWEEPS / "table4_textenc_p.yaml"
    raw = yaml.safe_load(path.read_text())["parameters"]
    expected = {
        (f"--data.init_args.p_original={p}", f"--model.init_args.model={m}")
        for p, m in itertools.product(
            raw["data.init_args.p_original"]["values"], raw["model.init_args.model"]["values"]
        )
    }
    pts = sweep.points(sweep.load_spec(path), tmp_path, "table4_textenc_p")
    (pts[3].run_dir).mkdir(parents=True)
    (pts[3].run_dir / sweep.DONE_FILE).write_text("{}")
    sweep.main([str(path), "--dry-run", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(expected) == 12
    assert {tuple(line.split()[-2:]) for line in lines} == expected
    assert [line.split()[1] for line in lines].count("done") == 1
    assert lines[3].split()[1] == "done"
    assert len({line.split()[2] for line in lines}) == 12  # one run dir per point
    sweep.main([str(path), "--launch-lines", "--out", str(tmp_path)])
    launch = capsys.readouterr().out.strip().splitlines()
    assert len(launch) == 12
    assert all(" -m experiments sweep row --out " in line and " fit --config " in line for line in launch)
    assert str(pts[0].run_dir) in launch[0]


def test_logging_overlay_keeps_the_run_dir_and_adds_wandb():
    """``logging/wandb.yaml`` last: the CSV logger keeps the row's run dir, W&B joins with the same save_dir/name."""
    args = ["fit", "--row", "table3/p0.8", "--config", str(CONFIGS / "logging/wandb.yaml")]
    csv, wb = _print_config(args)["trainer"]["logger"]
    own = {"save_dir": "runs/tiny", "name": "clip/table3/p0.8", "version": "stage1"}  # the row's run dir
    assert csv["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert {k: csv["init_args"][k] for k in own} == own
    assert wb["class_path"] == "experiments.loggers.RecapWandbLogger"
    assert (wb["init_args"]["save_dir"], wb["init_args"]["name"]) == (own["save_dir"], own["name"])


def _real_training_configs_with_a_logger() -> list[str]:
    """Every real-scale config that sets ``trainer.logger`` (tiny twins, the reproduce profiles, evaluation/predict
    configs, the CPU trainer overlay and the logging overlays, tested on their own, are not row configs)."""
    out = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS).as_posix()
        if rel.split("/")[0] in ("tiny", "reproduce", "eval", "trainer", "logging") or rel == "dit/sample.yaml":
            continue
        cfg = yaml.safe_load(path.read_text()) or {}
        if isinstance(cfg.get("trainer"), dict) and "logger" in cfg["trainer"]:
            out.append(rel)
    return out


def test_every_real_training_config_is_found():
    found = _real_training_configs_with_a_logger()
    for base in ("clip/stage1.yaml", "captioner/stage2.yaml", "dit/base.yaml"):  # rows: tests/test_configs.py
        assert base in found


@pytest.mark.parametrize("base", _real_training_configs_with_a_logger())
def test_real_configs_log_to_csv_then_wandb(base):
    cfg = yaml.safe_load((CONFIGS / base).read_text())
    csv, wb = cfg["trainer"]["logger"]
    assert csv["class_path"] == "lightning.pytorch.loggers.CSVLogger"  # first: its dir is the run dir
    assert wb["class_path"] == "experiments.loggers.RecapWandbLogger"
    assert wb["init_args"]["name"] == f"{csv['init_args']['name']}/{csv['init_args']['version']}"


def test_wandb_offline_unless_credentials(monkeypatch, tmp_path):
    from experiments.loggers import wandb_offline_by_default

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline_by_default()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline_by_default()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_by_default()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    os.chmod(tmp_path / "netrc", 0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_offline_by_default()


def test_media_samples_of_each_batch_kind():
    from experiments.media import batch_samples

    clip = {
        "image": torch.randn(3, 3, 8, 8),
        "caption": ["a", "b", "c"],
        "caption_source": ["original"] * 3,
        "key": ["k0", "k1", "k2"],
    }
    out = batch_samples(clip, None, 2)
    assert [(s["key"], s["source"], s["caption"]) for s in out] == [("k0", "original", "a"), ("k1", "original", "b")]
    assert out[0]["image"].shape == (8, 8, 3)
    assert out[0]["image"].dtype.name == "uint8"
    assert out[0]["image"].min() == 0
    assert out[0]["image"].max() == 255

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Module:
        tokenizer = Tok()

    llava = {
        "labels": torch.tensor([[-100, 5, 6], [-100, -100, 7]]),
        "pixel_values": torch.randn(1, 3, 4, 4),
        "id": ["x", "y"],
    }
    out = batch_samples(llava, Module(), 8)  # one image for two samples: captions without images, never misaligned
    assert [(s["key"], s["caption"], s["image"]) for s in out] == [("x", "5 6", None), ("y", "7", None)]
    assert batch_samples({"latent": torch.zeros(2, 4), "caption": ["p", "q"]}, None, 8)[1]["caption"] == "q"


def _tiny_fit_args(tmp_path: Path) -> list[str]:
    write_shards(tmp_path / "web", [24, 24], image_size=64)
    write_shards(tmp_path / "val", [16], image_size=64)
    return [
        "--config",
        str(CONFIGS / "trainer/cpu.yaml"),
        "--config",
        str(CONFIGS / "debug/tiny_clip.yaml"),
        f"--data.init_args.train_shards={tmp_path / 'web'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.sources={original: txt, recaption: 'json:org_caption'}",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
    ]


@pytest.mark.slow  # ~15 s of CPU: W&B's service start-up and a 2-step fit
def test_wandb_offline_run_holds_media_and_resolved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    secret = "s3cr3t" * 7
    monkeypatch.setenv("WANDB_API_KEY", secret)  # set, but offline: nothing may write it anywhere
    args = ["fit", *_tiny_fit_args(tmp_path), f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    args += ["--config", str(CONFIGS / "logging/wandb.yaml"), "--data.init_args.p_original=0.25"]
    args += ["--trainer.callbacks+=experiments.media.WandbMediaCallback", "--trainer.callbacks.num_samples=3"]
    cli_main(args)
    import wandb

    wandb.finish()  # what the process exit does: flush the offline run (config.yaml, media) to disk
    wandb.teardown()  # ... and wait for wandb-core, which writes the .wandb log in its own process, to finish it
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    tables = {p.parent.name: p for p in (files / "media" / "table").rglob("*.table.json")}
    assert {"train_samples", "val_samples"} <= set(tables), sorted(tables)
    table = json.loads(tables["train_samples"].read_text())
    assert table["columns"] == ["key", "source", "caption", "image"]
    assert len(table["data"]) == 3
    assert all(row[2].startswith(("orig ", "json ")) for row in table["data"])
    assert {row[1] for row in table["data"]} <= {"original", "recaption"}
    assert len(list((files / "media" / "images").rglob("*.png"))) >= 6  # 3 train + 3 val samples as wandb.Image
    # The resolved config is in the run's record (an offline run writes files/config.yaml only when synced): wandb
    # 0.31 has no Python reader for the .wandb log, but its config record holds the config as plain JSON text.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b'"p_original":0.25' in record
    assert b'"class_path":"experiments.loggers.RecapWandbLogger"' in record  # only the CLI's resolved config has it
    # the CSV run dir is unchanged by the overlay, and the key is nowhere in what the run wrote
    assert (tmp_path / "runs" / "tiny").is_dir()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two `fit` subprocesses: ~1 min on 2 idle cores, 7 min each on a busy one
def test_runner_runs_a_two_point_grid_into_two_run_dirs_and_resumes(tmp_path, capsys):
    args = _tiny_fit_args(tmp_path)
    spec = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"data.init_args.p_original": {"values": [0.0, 1.0]}},
        "command": [
            "${env}",
            "python",
            "-m",
            "experiments",
            "fit",
            *args,
            "--trainer.val_check_interval=null",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.val_shards=null",
            "${args}",
        ],
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweeps"
    sweep.main([str(path), "--out", str(out)])
    dirs = sorted(p for p in (out / "two").iterdir() if p.is_dir())
    assert [d.name for d in dirs] == ["p_original-0.0", "p_original-1.0"]
    for d, p in zip(dirs, (0.0, 1.0), strict=True):  # a one-stage row: its fit in <point>/fit
        saved = yaml.safe_load((d / "fit" / "config.yaml").read_text())
        assert saved["data"]["init_args"]["p_original"] == p
        assert (d / "fit" / "metrics.csv").is_file()
        assert (d / sweep.DONE_FILE).is_file()
    stamp = [(d / sweep.DONE_FILE).stat().st_mtime_ns for d in dirs]
    capsys.readouterr()
    sweep.main([str(path), "--out", str(out)])  # resumable: both points are done, nothing runs again
    assert capsys.readouterr().out.count("done already") == 2
    assert [(d / sweep.DONE_FILE).stat().st_mtime_ns for d in dirs] == stamp


class FakeStage:
    """Stands in for a row's steps: records their argv, writes their outputs (or fails the named ones)."""

    def __init__(self, fail: str = "") -> None:
        self.argv: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, env, threads=None):
        from experiments.runner import launch_fresh

        argv = list(cmd[3:])
        self.argv.append(argv)
        code = 3 if self.fail and self.fail in " ".join(argv) else 0
        if not code:
            logger = json.loads(next(a for a in argv if a.startswith("--trainer.logger=")).split("=", 1)[1])
            if isinstance(logger, list):  # an agent's: SweepCSVLogger under runs/sweeps/<sweep id>
                logger = {
                    "init_args": {"save_dir": f"runs/sweeps/{os.environ['WANDB_SWEEP_ID']}", **logger[0]["init_args"]}
                }
            run = Path(logger["init_args"]["save_dir"]) / logger["init_args"]["version"]
            for out in ("checkpoints/last.ckpt", "config.yaml", "metrics/test.json"):
                (run / out).parent.mkdir(parents=True, exist_ok=True)
                (run / out).write_text("{}")
        return launch_fresh([sys.executable, "-c", f"raise SystemExit({code})"], env)


def test_a_point_runs_its_whole_row_stage1_stage2_then_the_evaluation(tmp_path, monkeypatch):
    spec = sweep.load_spec(SWEEPS / "tiny" / "table4_textenc_p.yaml")
    point = sweep.points(spec, tmp_path, "t4")[0]
    steps = sweep.row_steps(sweep.lightning_args(spec, point.params), point.run_dir)
    assert [s.name for s in steps] == ["stage1", "stage2", "eval"]
    s1, s2, ev = (s.argv for s in steps)
    assert "experiments/configs/tiny/clip/stage1.yaml" in s1
    assert "experiments/configs/tiny/clip/stage2.yaml" in s2
    assert f"--model.init_args.init_from={point.run_dir}/stage1/checkpoints/last.ckpt" in s2
    assert "--data.init_args.p_original=0.8" in s2  # the point's values in every stage ...
    assert not any(a.startswith("--data.") for a in ev)  # ... but the evaluation's data are the eval sets
    assert ev[0] == "test"
    assert "experiments/configs/eval/tiny_world.yaml" in ev
    assert f"--ckpt_path={point.run_dir}/stage2/checkpoints/last.ckpt" in ev
    # stage 2 (and its evaluation) at stage 2's resolution: the swept tiny model dict gets its image size
    printed = _print_config(s2)
    assert printed["model"]["init_args"]["model"]["vision_cfg"]["image_size"] == 64
    assert printed["data"]["init_args"]["p_original"] == 0.8
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(point.run_dir)
    printed = _print_config(ev)  # the evaluation parses too: the eval sets' DataModule, stage 2's model
    assert printed["data"]["class_path"] == "datamodules.eval_sets.EvalDataModule"
    assert printed["model"]["init_args"]["model"]["vision_cfg"]["image_size"] == 64
    one_stage = sweep.row_steps(["fit", "--config", "experiments/configs/tiny/dit/base.yaml", "--x=1"], tmp_path / "d")
    assert [s.name for s in one_stage] == ["fit"]

    # run locally: the three steps in order, then the point counts as done and a rerun runs nothing
    fake = FakeStage()
    monkeypatch.setattr(sweep, "LAUNCHER", fake)
    assert sweep.run_row(sweep.lightning_args(spec, point.params), point.run_dir) == 0
    assert [a[0] for a in fake.argv] == ["fit", "fit", "test"]
    assert sweep.is_done(point)
    fake.argv.clear()
    assert sweep.run_row(sweep.lightning_args(spec, point.params), point.run_dir) == 0
    assert fake.argv == []


def test_a_wandb_agent_point_logs_every_stage_to_its_run(tmp_path, monkeypatch):
    """The spec's command under ``wandb agent`` (offline here): ``sweep row fit ...`` runs the row into
    runs/sweeps/<sweep id>/<run id>/<stage>, each stage with the sweep's W&B logger."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    spec = sweep.load_spec(SWEEPS / "tiny" / "table3_p.yaml")
    cmd = sweep.expand_command(spec, {"data.init_args.p_original": 0.5})
    assert cmd[1:6] == ["-m", "experiments", "sweep", "row", "fit"]
    fake = FakeStage()
    monkeypatch.setattr(sweep, "LAUNCHER", fake)
    with pytest.raises(SystemExit) as exc:
        sweep.main(cmd[4:])  # python -m experiments sweep <these>
    assert exc.value.code == 0
    assert [a[0] for a in fake.argv] == ["fit", "fit", "test"]
    for argv, stage in zip(fake.argv, ("stage1", "stage2", "eval"), strict=True):
        csv, wb = json.loads(next(a for a in argv if a.startswith("--trainer.logger=")).split("=", 1)[1])
        assert csv["class_path"] == "experiments.loggers.SweepCSVLogger"
        assert csv["init_args"]["version"] == f"run7/{stage}"
        assert wb["class_path"] == "experiments.loggers.RecapWandbLogger"
    assert (tmp_path / "runs/sweeps/sw1/run7" / sweep.DONE_FILE).is_file()


def test_runner_stops_on_a_failed_point_and_marks_nothing_done(tmp_path, monkeypatch):
    spec = {
        "method": "grid",
        "parameters": {"data.init_args.p_original": {"values": [0.5]}},
        "command": ["python", "-m", "experiments", "sweep", "row", "fit", "--config", "x.yaml", "${args}"],
    }
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(sweep, "LAUNCHER", FakeStage(fail="fit"))
    with pytest.raises(SystemExit, match="1 point\\(s\\) failed: p_original-0.5"):
        sweep.main([str(path), "--out", str(tmp_path / "o")])
    assert not list((tmp_path / "o").rglob(sweep.DONE_FILE))
