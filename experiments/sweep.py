r"""``python -m experiments sweep SPEC.yaml``: run a W&B sweep spec's grid locally (no W&B), a whole row per point.

The spec is the file ``wandb sweep`` takes (``experiments/sweeps/*.yaml``): ``method: grid``, ``parameters``
(LightningCLI dotted keys) and a ``command`` ending in ``${args}``, expanded and ordered as ``wandb agent`` does.
A point, whether a ``wandb agent`` or this command starts it (``sweep row``), runs its whole row through the step
runner: the ``fit`` (stage 1); for a CLIPA ``stage1.yaml`` recipe also stage 2 and the standalone evaluation. Its run
dir is ``<out>/<spec stem>/<point id>`` (under an agent ``runs/sweeps/<sweep id>/<W&B run id>``); ``sweep_point.json``
there marks it done. ``--launch-lines``: one shell command per point (e.g. for a SLURM array).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.io import atomic_write
from experiments.paper_tables import logger_arg
from experiments.runner import REPO, Step, run_steps

DONE_FILE = "sweep_point.json"
UNSUPPORTED_MACROS = ("${args_no_hyphens}", "${args_json}", "${args_json_file}", "${args_no_boolean_flags}")
LAUNCHER = None  # the runner's default (forked steps); tests put a fake here


@dataclass(frozen=True)
class Point:
    """One grid point: its parameter values (in W&B's order), its id and run directory."""

    params: dict[str, Any]
    id: str
    run_dir: Path


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep spec; errors name the file and the key."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep spec not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping with method, parameters and command")
    if spec.get("method") != "grid":
        raise ValueError(f"{path}: method: {spec.get('method')!r}; the local runner runs grids only (method: grid)")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: 'parameters' must map LightningCLI dotted keys to {{values: [...]}}")
    for name, cfg in params.items():
        if not isinstance(cfg, dict) or not ("values" in cfg or "value" in cfg):
            raise ValueError(f"{path}: parameters.{name}: a grid parameter needs 'values' (a list) or 'value'")
        if "values" in cfg and (not isinstance(cfg["values"], list) or not cfg["values"]):
            raise ValueError(f"{path}: parameters.{name}.values must be a non-empty list")
        if not name.startswith(("model.", "data.", "trainer.", "seed_everything", "optimizer", "lr_scheduler")):
            raise ValueError(f"{path}: parameters.{name}: not a LightningCLI dotted key (model./data./trainer....)")
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise ValueError(f"{path}: 'command' must be a list ending in ${{args}} (LightningCLI reads --key=value)")
    bad = [c for c in command if c in UNSUPPORTED_MACROS]
    if bad:
        raise ValueError(f"{path}: command uses {bad}; LightningCLI needs ${{args}} (--key=value)")
    return spec


def grid(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's points as ``{param: value}``, in W&B's order: parameters sorted, the last one varying fastest."""
    names = sorted(spec["parameters"])
    choices = [cfg["values"] if "values" in cfg else [cfg["value"]] for cfg in (spec["parameters"][n] for n in names)]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def sweep_args(params: dict[str, Any]) -> list[str]:
    """``${args}`` for a point, exactly as ``wandb agent`` builds it (``--key=value`` with ``str(value)``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def expand_command(spec: dict[str, Any], params: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The spec's ``command`` for one point, its macros replaced as ``wandb agent`` does (``${env}`` dropped: the
    environment is inherited)."""
    out: list[str] = []
    for chunk in spec["command"]:
        chunk = str(chunk)
        if chunk == "${env}":
            continue
        if chunk in ("${interpreter}", "python", "python3"):
            out.append(python)
        elif chunk == "${program}":
            out.append(str(spec["program"]))
        elif chunk == "${args}":
            out += sweep_args(params)
        else:
            out.append(chunk)
    return out


def lightning_args(spec: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The LightningCLI part of a point's command (subcommand onwards), for in-process use (``cli_main``)."""
    cmd = expand_command(spec, params, python="python")
    for i, chunk in enumerate(cmd):
        if chunk in ("fit", "validate", "test", "predict"):
            return cmd[i:]
    raise ValueError(f"command {spec['command']} names no LightningCLI subcommand (fit/validate/test/predict)")


def _slug(value: Any) -> str:
    if isinstance(value, (dict, list)):  # e.g. a tiny model config: a short stable hash
        return "cfg" + hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    text = re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")
    return text or "none"


def point_id(params: dict[str, Any]) -> str:
    """A readable, stable id: ``<last key part>-<value>`` per parameter (``p_original-0.8_model-recap-clip-B-16``)."""
    return "_".join(f"{name.rsplit('.', 1)[-1]}-{_slug(v)}" for name, v in params.items())


def points(spec: dict[str, Any], out: Path, name: str) -> list[Point]:
    pts = [Point(p, point_id(p), out / name / point_id(p)) for p in grid(spec)]
    ids = [p.id for p in pts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sweep {name}: two grid points have the same id; make parameter names' last parts differ")
    return pts


def _stage2_value(arg: str, image_size: int) -> str:
    """A stage-1 point value for stage 2: a tiny model given as a config dict gets stage 2's image size."""
    key, _, value = arg.partition("=")
    model = yaml.safe_load(value) if key == "--model.init_args.model" else None
    if not isinstance(model, dict) or "vision_cfg" not in model:
        return arg
    return f"{key}={json.dumps({**model, 'vision_cfg': {**model['vision_cfg'], 'image_size': image_size}})}"


def row_steps(fit_args: Sequence[str], run: Path, agent: bool = False) -> list[Step]:
    """A point's row as runner steps, each logging to ``run/<stage>``: the ``fit`` (stage 1), and for a CLIPA
    ``stage1.yaml`` recipe stage 2 from stage 1's ``last.ckpt`` and the standalone evaluation."""
    fit_args = list(fit_args[1:] if fit_args[:1] == ["fit"] else fit_args)
    configs = [fit_args[i + 1] for i, a in enumerate(fit_args[:-1]) if a == "--config"]
    values = [a for i, a in enumerate(fit_args) if a != "--config" and (i == 0 or fit_args[i - 1] != "--config")]

    def logger(stage: str) -> str:
        if agent:  # ``logging/wandb_sweep.yaml``'s loggers: the agent's W&B run, one CSV folder per stage
            csv = {"version": f"{os.environ['WANDB_RUN_ID']}/{stage}"}
            wandb = {"save_dir": "runs/sweeps", **dict.fromkeys(("project", "entity", "name", "group", "offline"))}
            loggers = [
                {"class_path": "experiments.loggers.SweepCSVLogger", "init_args": csv},
                {"class_path": "experiments.loggers.RecapWandbLogger", "init_args": wandb},
            ]
            return "--trainer.logger=" + json.dumps(loggers)
        return logger_arg(str(run), "", stage)

    def step(stage: str, argv: list[str], output: str) -> Step:
        out = f"{run}/{stage}"
        return Step(stage, f"{run.name} {stage}", [*argv, logger(stage)], [f"{out}/{output}"], [out])

    stage1 = next((c for c in configs if c.endswith("stage1.yaml")), None)
    if stage1 is None:  # a one-stage row (the DiT's, a debug recipe)
        return [step("fit", ["fit", *fit_args], "config.yaml")]
    stage2 = stage1.removesuffix("stage1.yaml") + "stage2.yaml"
    image_size = yaml.safe_load((REPO / stage2).read_text())["model"]["init_args"]["image_size"]
    # every stage-1 config becomes its stage-2 twin: the recipe, and an objective whose stages differ (Table 8's p
    # schedule, objectives/p_schedule_stage{1,2}.yaml)
    twin = {c: c.removesuffix("stage1.yaml") + "stage2.yaml" for c in configs if c.endswith("stage1.yaml")}
    args2 = [twin.get(a, a) if a in configs else _stage2_value(a, image_size) for a in fit_args]
    args2.append(f"--model.init_args.init_from={run}/stage1/checkpoints/last.ckpt")
    # the evaluation: stage 2's model (its recipe, then the point's other configs: an objective's model, e.g. Table 8's
    # decoder) and point values on the eval sets (its own data), in run/eval
    evaluation = "experiments/configs/eval/" + ("tiny_world.yaml" if "/tiny/" in stage1 else "paper.yaml")
    others = [a for c in configs if c != stage1 for a in ("--config", twin.get(c, c))]
    test = ["test", "--config", stage2, *others, "--config", evaluation]
    test.append(f"--ckpt_path={run}/stage2/checkpoints/last.ckpt")
    test += [_stage2_value(a, image_size) for a in values if not a.startswith("--data.")]
    ckpt = "checkpoints/last.ckpt"
    return [
        step("stage1", ["fit", *fit_args], ckpt),
        step("stage2", ["fit", *args2], ckpt),
        step("eval", test, "metrics/test.json"),
    ]


def run_row(fit_args: Sequence[str], run: Path, agent: bool = False, jobs: int = 1) -> int:
    """Run a point's row (``row_steps``) in ``run``; on success write ``sweep_point.json`` (what marks it done)."""
    t0 = time.time()
    record = run_steps(row_steps(fit_args, run, agent), run, jobs=jobs, launcher=LAUNCHER)
    if record["failed"]:
        return 1
    steps = [s["name"] for s in record["steps"]]
    done = {"command": list(fit_args), "seconds": round(time.time() - t0, 1), "steps": steps}
    atomic_write(run / DONE_FILE, json.dumps(done, indent=2, default=str))
    return 0


def row_main(argv: Sequence[str]) -> None:
    """``sweep row [--out RUN_DIR] fit ARGS...``: one point's row; under ``wandb agent`` in
    ``runs/sweeps/<sweep id>/<run id>``, the stages logging to the agent's W&B run."""
    argv = list(argv)
    out = argv[1] if argv[:1] == ["--out"] else None
    fit_args = argv[2:] if out else argv
    agent = out is None and "WANDB_RUN_ID" in os.environ
    if agent:  # every stage is a process of its own: the later ones join the agent's run
        os.environ.setdefault("WANDB_RESUME", "allow")
        out = f"runs/sweeps/{os.environ.get('WANDB_SWEEP_ID', 'local')}/{os.environ['WANDB_RUN_ID']}"
    # absolute: the runner starts the steps in the repository, the done-file is checked from here
    raise SystemExit(run_row(fit_args, Path(out or "runs/sweeps/local/row").resolve(), agent))


def is_done(point: Point) -> bool:
    return (point.run_dir / DONE_FILE).is_file()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["row"]:
        return row_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m experiments sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
    ap.add_argument("--out", default="runs/sweeps", help="root of the run dirs: OUT/<spec stem>/<point id>")
    ap.add_argument("--name", default=None, help="sweep name (default: the spec's file stem)")
    ap.add_argument("--dry-run", action="store_true", help="list the grid points and whether each is done")
    ap.add_argument("--launch-lines", action="store_true", help="print one shell command per point and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining points after a failed one")
    args = ap.parse_args(argv)

    spec = load_spec(args.spec)
    name = args.name or Path(args.spec).stem
    pts = points(spec, Path(args.out).resolve(), name)
    if args.launch_lines:
        for p in pts:  # the shell command that runs a point's whole row into its run dir
            row = [sys.executable, "-m", "experiments", "sweep", "row", "--out", str(p.run_dir)]
            print(shlex.join(row + lightning_args(spec, p.params)))
        return
    if args.dry_run:
        for i, p in enumerate(pts):
            values = " ".join(f"--{k}={v}" for k, v in p.params.items())
            print(f"[{i + 1}/{len(pts)}] {'done' if is_done(p) else 'todo'} {p.run_dir} {values}")
        return
    failed = []
    for i, p in enumerate(pts):
        if is_done(p):
            print(f"[{i + 1}/{len(pts)}] done already: {p.run_dir}", flush=True)
            continue
        print(f"[{i + 1}/{len(pts)}] running {p.id} -> {p.run_dir}", flush=True)
        if run_row(lightning_args(spec, p.params), p.run_dir):
            failed.append(p)
            print(f"[{i + 1}/{len(pts)}] FAILED: {p.id} (logs in {p.run_dir}/logs)", file=sys.stderr, flush=True)
            if not args.keep_going:
                break
    if failed:
        raise SystemExit(f"sweep {name}: {len(failed)} point(s) failed: {', '.join(p.id for p in failed)}")
    print(f"sweep {name}: all {len(pts)} points done under {Path(args.out) / name}")
