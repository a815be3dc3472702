"""Config validation before any compute: every problem a parsed config has, as one line naming the dotted key:

    config error: data.init_args.p_original = 1.5: must be in [0, 1] (in experiments/configs/x.yaml)

``RecapCLI`` (``experiments/cli.py``) runs it after parsing and before anything is instantiated, so a bad config exits
with code 2 and writes nothing. The rules live next to their classes as ``validate_config(args, run)`` classmethods
(``datamodules/checks.py``), also on nested ``class_path`` objects (``model.init_args.evaluation``); here the config
is walked and what they raise formatted. ``ckpt_path`` (resume / evaluate) must name an existing local checkpoint.
"""

from __future__ import annotations

import os
import pydoc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from datamodules.checks import ConfigError, RunContext, check_path

# Lightning's special ``ckpt_path`` values, which name no file
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces (and lists of them) as plain dicts."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def run_context(trainer: Mapping[str, Any] | None) -> RunContext:
    """The world size the trainer config fixes: ``devices`` (an int, a digit string, a list or ``"0,1"`` string of
    device ids) x ``num_nodes``; ``None`` for ``auto`` / ``-1``."""
    trainer = _plain(trainer) or {}
    devices = trainer.get("devices", "auto")
    if isinstance(devices, list | tuple):
        count: int | None = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        count = _int_or_none(devices)
        if count is not None and count < 1:
            count = None
    nodes = _int_or_none(trainer.get("num_nodes", 1)) or 1
    accumulate = _int_or_none(trainer.get("accumulate_grad_batches", 1)) or 1
    return RunContext(world_size=None if count is None else count * nodes, accumulate_grad_batches=accumulate)


def _check_object(prefix: str, node: Any, run: RunContext) -> list[tuple[str, Any, str]]:
    """``(dotted key, value, problem)`` for a ``{class_path, init_args}`` node and the class nodes nested in it."""
    node = _plain(node)
    if not isinstance(node, Mapping) or "class_path" not in node:
        return []
    args = dict(node.get("init_args") or {})
    problems: list[tuple[str, Any, str]] = []
    cls = pydoc.locate(node["class_path"])  # jsonargparse already resolved it; None here is not the config's fault
    hook = getattr(cls, "validate_config", None)
    if callable(hook):
        try:
            hook(args, run)
        except ConfigError as e:
            problems.append((f"{prefix}.init_args.{e.key}", e.value, e.problem))
        except (ValueError, FileNotFoundError) as e:  # a rule without a key: name the class's section
            problems.append((f"{prefix}.init_args", cls.__name__, str(e)))
    for key, value in args.items():
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{prefix}.init_args.{key}" + (f"[{i}]" if isinstance(value, list) else "")
            problems += _check_object(where, item, run)
    return problems


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    node = tree
    for part in dotted.replace("[", ".[").split("."):
        index = part.startswith("[")  # a list item, `key[2]`
        if not isinstance(node, list if index else Mapping):
            return False, None
        try:
            node = node[int(part[1:-1])] if index else node[part]
        except (KeyError, IndexError):
            return False, None
    return True, node


def _source_file(dotted: str, value: Any, config_files: Sequence[Any]) -> str | None:
    """The last config file that sets ``dotted`` to ``value`` (``None``: a command-line override or a default)."""
    for f in reversed(list(config_files)):
        path = getattr(f, "absolute", None) or os.fspath(f)
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        found, there = _lookup(tree, dotted)
        if not found and ".init_args." in dotted:  # rows may write `model: {init_args: ...}` or the flat form
            found, there = _lookup(tree, dotted.replace(".init_args.", ".", 1))
        if found:
            return str(f) if _plain(there) == value else None
    return None


def validate_config(cfg: Any, config_files: Sequence[Any] = ()) -> list[str]:
    """Every problem of a parsed LightningCLI config (one subcommand's namespace) as a one-line message; ``[]`` when
    the config can run."""
    run = run_context(cfg.get("trainer"))
    problems: list[tuple[str, Any, str]] = []
    for section in ("model", "data"):
        problems += _check_object(section, cfg.get(section), run)
    ckpt_path = cfg.get("ckpt_path")
    if isinstance(ckpt_path, str) and ckpt_path not in _CKPT_KEYWORDS and not ckpt_path.startswith("registry:"):
        try:
            check_path("ckpt_path", ckpt_path, "file", what="the checkpoint to resume / evaluate")
        except ConfigError as e:
            problems.append((e.key, e.value, e.problem))
    lines = []
    for key, value, problem in problems:
        source = _source_file(key, value, config_files)
        lines.append(f"config error: {key} = {value!r}: {problem}" + (f" (in {source})" if source else ""))
    return lines
