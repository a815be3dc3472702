"""``python -m experiments dit-cache --config DIT.yaml [--config ...] --out DIR``: the DiT's latent + text cache.

Reads the same LightningCLI configs as ``fit`` (model: ``DiTModule``; data: ``CaptionMixDataModule``), so the cache is
made by exactly the text encoder, VAE, image transform, shards and caption sources the uncached run would use.
Resumable (finished shards are skipped) and splittable over processes (``--rank/--world-size``, or torchrun's
``RANK``/``WORLD_SIZE``). Train on it with ``data: LatentCacheDataModule`` (``experiments/configs/*/dit/cached.yaml``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m experiments dit-cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cache folder for the training shards")
    p.add_argument("--val-out", default=None, help="cache folder for the validation shards (if the data has them)")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when a GPU exists, else cpu")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    args, rest = p.parse_known_args(argv)
    import torch

    from datamodules.latent_cache import build_cache
    from datamodules.shards import local_rank, rank_world
    from experiments.cli import cli_main

    cli = cli_main(list(rest) + ["--trainer.logger=false"], run=False)
    model, data = cli.model, cli.datamodule
    if not all(hasattr(data, need) for need in ("train_shards", "sources")):
        raise ValueError(f"dit-cache needs a caption-shard DataModule (CaptionMixDataModule); got {type(data)}")
    rank, world = rank_world(args.rank, args.world_size)
    device = args.device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    model.configure_model()
    model.to(device)
    sources = {s.name: (s.where if s.kind == "member" else f"{s.kind}:{s.where}") for s in data.sources}
    common = {"sources": sources, "sidecar_dir": data.sidecar_dir, "batch_size": args.batch_size, "dtype": args.dtype}
    common |= {"rank": rank, "world_size": world, "limits": data.limits}
    totals = {"train": build_cache(model, data.train_shards, args.out, **common)}
    if args.val_out and data.val_shards:
        totals["val"] = build_cache(model, data.val_shards, args.val_out, **common)
    print(f"dit-cache [{rank}/{world}] -> {args.out}: {json.dumps(totals)}", flush=True)
    return totals
