r"""``python -m experiments sweep SPEC.yaml``: run a W&B sweep spec's grid locally, without W&B.

The spec is the same file ``wandb sweep`` takes (``experiments/sweeps/*.yaml``): ``method: grid``, ``parameters``
(LightningCLI dotted keys with ``values`` or ``value``) and a ``command`` that ends in ``${args}``. Each grid point
runs as a subprocess, one after another::

    python -m experiments fit --config BASE.yaml ... --data.init_args.p_original=0.8 \
        --trainer.logger='{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {...}}'

The expansion is W&B's own (``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``: ``${args}`` becomes
``--key=value``); the grid order is W&B's (parameters sorted by name, values in the order given, last parameter
fastest). Every point gets its own run directory ``<out>/<spec stem>/<point id>`` (the CSV logger replaces the spec's
loggers, so checkpoints, ``config.yaml`` and metrics land there), and a point whose run directory holds
``sweep_point.json`` (written after the run exits with 0) is done and skipped: rerunning the command resumes the sweep.

``--dry-run`` lists the points and their state; ``--launch-lines`` prints one shell command per point (e.g. for a
SLURM job array: ``sed -n "$((SLURM_ARRAY_TASK_ID+1))p" lines.txt | bash``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.io import atomic_write

DONE_FILE = "sweep_point.json"
ARGS_MACROS = {"${args}"}
UNSUPPORTED_MACROS = ("${args_no_hyphens}", "${args_json}", "${args_json_file}", "${args_no_boolean_flags}")


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
    """The grid's points as ``{param: value}``: parameters in sorted order, the last one varying fastest (W&B's grid
    search enumerates ``itertools.product`` over the sorted parameters the same way)."""
    names = sorted(spec["parameters"])
    choices = [
        spec["parameters"][n]["values"] if "values" in spec["parameters"][n] else [spec["parameters"][n]["value"]]
        for n in names
    ]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def corners(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's corners: every combination of each parameter's first and last value (deduplicated)."""
    names = sorted(spec["parameters"])
    ends = []
    for n in names:
        cfg = spec["parameters"][n]
        values = cfg["values"] if "values" in cfg else [cfg["value"]]
        ends.append([values[0]] if len(values) == 1 else [values[0], values[-1]])
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*ends)]


def sweep_args(params: dict[str, Any]) -> list[str]:
    """``${args}`` for a point, exactly as ``wandb agent`` builds it (``--key=value`` with ``str(value)``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def expand_command(spec: dict[str, Any], params: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The spec's ``command`` for one point, its macros replaced as ``wandb agent`` does (``${env}`` dropped: the
    environment is inherited; ``${interpreter}`` and a literal ``python`` -> this interpreter)."""
    out: list[str] = []
    for chunk in spec["command"]:
        chunk = str(chunk)
        if chunk == "${env}":
            continue
        if chunk in ("${interpreter}", "python", "python3"):
            out.append(python)
        elif chunk == "${program}":
            out.append(str(spec["program"]))
        elif chunk in ARGS_MACROS:
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
    """A readable, stable id: ``<last key part>-<value>`` per parameter (``p_original-0.8_model-recap-clip-B-16-large``;
    dict values as a short hash)."""
    return "_".join(f"{name.rsplit('.', 1)[-1]}-{_slug(v)}" for name, v in params.items())


def points(spec: dict[str, Any], out: Path, name: str) -> list[Point]:
    pts = [Point(p, point_id(p), out / name / point_id(p)) for p in grid(spec)]
    ids = [p.id for p in pts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sweep {name}: two grid points have the same id; make parameter names' last parts differ")
    return pts


def point_command(spec: dict[str, Any], point: Point, out: Path, name: str) -> list[str]:
    """A point's full command: the spec's command with the point's values, logging to CSV in its own run dir."""
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(out), "name": name, "version": point.id},
    }
    return expand_command(spec, point.params) + [f"--trainer.logger={json.dumps(logger)}"]


def is_done(point: Point) -> bool:
    return (point.run_dir / DONE_FILE).is_file()


def run_point(spec: dict[str, Any], point: Point, out: Path, name: str, cwd: Path | None = None) -> int:
    """Run one point in a subprocess; on success write ``sweep_point.json`` (what makes it count as done)."""
    cmd = point_command(spec, point, out, name)
    point.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=cwd)
    if rc == 0:
        record = {"params": point.params, "command": cmd, "seconds": round(time.time() - t0, 1)}
        atomic_write(point.run_dir / DONE_FILE, json.dumps(record, indent=2, default=str))
    return rc


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m experiments sweep",
        description="Run a W&B sweep spec's grid locally (no W&B): one `fit` per point, sequentially, resumable.",
    )
    ap.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
    ap.add_argument("--out", default="runs/sweeps", help="root of the run dirs: OUT/<spec stem>/<point id>")
    ap.add_argument("--name", default=None, help="sweep name (default: the spec's file stem)")
    ap.add_argument("--dry-run", action="store_true", help="list the grid points and whether each is done")
    ap.add_argument("--launch-lines", action="store_true", help="print one shell command per point and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining points after a failed one")
    args = ap.parse_args(None if argv is None else list(argv))

    spec = load_spec(args.spec)
    name = args.name or Path(args.spec).stem
    out = Path(args.out)
    pts = points(spec, out, name)
    if args.launch_lines:
        for p in pts:
            print(shlex.join(point_command(spec, p, out, name)))
        return
    if args.dry_run:
        for i, p in enumerate(pts):
            state = "done" if is_done(p) else "todo"
            values = " ".join(f"--{k}={v}" for k, v in p.params.items())
            print(f"[{i + 1}/{len(pts)}] {state} {p.run_dir} {values}")
        return
    failed = []
    for i, p in enumerate(pts):
        if is_done(p):
            print(f"[{i + 1}/{len(pts)}] done already: {p.run_dir}", flush=True)
            continue
        print(f"[{i + 1}/{len(pts)}] running {p.id} -> {p.run_dir}", flush=True)
        rc = run_point(spec, p, out, name)
        if rc:
            failed.append(p)
            print(f"[{i + 1}/{len(pts)}] FAILED (exit {rc}): {p.id}", file=sys.stderr, flush=True)
            if not args.keep_going:
                break
    if failed:
        raise SystemExit(f"sweep {name}: {len(failed)} point(s) failed: {', '.join(p.id for p in failed)}")
    print(f"sweep {name}: all {len(pts)} points done under {out / name}")


if __name__ == "__main__":
    main()
