"""The tiny world's caption-tuning set: the paper's HQ-Edit step in miniature.

The paper tunes the captioner after LLaVA-1.5's two stages on high-quality pairs (HQ-Edit). Here they are the
ground-truth detailed descriptions of the captioner's own training images (``caption_pretrain`` and ``instruct``),
as a LLaVA json whose image paths are relative to the world: ``python -m experiments caption-tune --world DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from datamodules.io import atomic_write

from .scene import Scene
from .text import DETAIL_PROMPTS, detailed_description

SPLITS = ("caption_pretrain", "instruct")
_STREAM = 4242  # an rng stream of its own: the descriptions differ from the instruct set's detail answers


def detail_records(world_dir: str | os.PathLike, seed: int = 0) -> list[dict]:
    world = Path(world_dir)
    records = []
    for split_index, split in enumerate(SPLITS):
        truth = world / "truth" / f"{split}.parquet"
        if not truth.is_file():
            raise FileNotFoundError(f"{truth} does not exist (is {world} a tiny world? see generate_world)")
        for row in pq.read_table(truth, columns=["id", "index", "objects", "background", "main_index"]).to_pylist():
            image = f"{split}/images/{row['id']}.jpg"
            if not (world / image).is_file():
                raise FileNotFoundError(f"{world / image} (truth row {row['id']} of {truth}) does not exist")
            rng = np.random.default_rng([seed, _STREAM, split_index, row["index"]])
            scene = Scene.from_json(row["objects"], row["background"], row["main_index"])
            prompt = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))]
            answer = {"from": "gpt", "value": detailed_description(scene, rng)}
            turns = [{"from": "human", "value": f"<image>\n{prompt}"}, answer]
            records.append({"id": f"{split}-{row['id']}", "image": image, "conversations": turns})
    return records


def write_caption_tune(world_dir: str | os.PathLike, out: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write ``<world>/caption_tune/detail.json`` (images stay where they are; image_folder is the world)."""
    world = Path(world_dir)
    path = Path(out) if out is not None else world / "caption_tune" / "detail.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(detail_records(world, seed=seed)))
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m datamodules.tiny_world.caption_tune", description=__doc__)
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_caption_tune(args.world, args.out, args.seed)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
