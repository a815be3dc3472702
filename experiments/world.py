"""``python -m experiments world --out DIR``: generate the tiny world (see datamodules/tiny_world/README.md).

Every ``WorldConfig`` knob is a flag (``--n_web 5000``, ``--alt.junk 0.3``, ``--scene.rgb_jitter 10``...) or a
key of a ``--config world.yaml``; ``--preset tiny`` starts from the test-sized world.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.tiny_world import WorldConfig, generate_world


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments world", description=__doc__, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of WorldConfig knobs")
    parser.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world previously written to --out")
    parser.add_argument(
        "--preset",
        choices=["default", "tiny"],
        default="default",
        help="start from WorldConfig() or WorldConfig.tiny(); flags override either",
    )
    parser.add_class_arguments(WorldConfig, "world", sub_configs=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The preset sets the defaults that the other flags override, so it is read first (both --preset X and =X).
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="default")
    if preset.parse_known_args(argv)[0].preset == "tiny":
        tiny = dataclasses.asdict(WorldConfig.tiny())
        parser.set_defaults({f"world.{k}": v for k, v in tiny.items() if not isinstance(v, dict)})
    args = parser.parse_args(_flatten_world_flags(argv))
    cfg = WorldConfig(**args.world.as_dict())
    t0 = time.perf_counter()
    summary = generate_world(args.out, cfg, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    print(f"tiny world written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return summary


def _flatten_world_flags(argv: list[str]) -> list[str]:
    """Accept ``--n_web 10`` as shorthand for ``--world.n_web 10`` (the dataclass lives under ``world``)."""
    names = {f.name for f in dataclasses.fields(WorldConfig)}
    return [f"--world.{a[2:]}" if a.startswith("--") and re.split(r"[=.]", a[2:])[0] in names else a for a in argv]
