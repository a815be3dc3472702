"""Shared fixtures: an offline, quiet environment and small img2dataset-layout shards."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing.forkserver
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

# Fail fast instead of retrying a hub for ~50 s, and keep every cache out of $HOME. Set before heavy imports.
_CACHE = Path(tempfile.mkdtemp(prefix="recap-suite-tests-"))
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": str(_CACHE / "hf"),
    "TORCH_HOME": str(_CACHE / "torch"),
    "WANDB_DIR": str(_CACHE / "wandb"),
    "WANDB_CACHE_DIR": str(_CACHE / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_CACHE / "wandb-config"),
    "MPLCONFIGDIR": str(_CACHE / "mpl"),
    "XDG_CACHE_HOME": str(_CACHE / "xdg"),
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",  # as experiments/__main__.py: no spinning OpenMP threads on a shared CPU
}.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("WANDB_API_KEY", None)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests must not leak a process group or a changed default dtype into the next test (litgpt's conftest)."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_img2dataset_writer():
    """img2dataset's own ``writer`` module, loaded without its package ``__init__``.

    The package __init__ imports img2dataset's downloader (opencv, albumentations, fire...), which the suite does not
    need; the writer itself only imports fsspec, pyarrow, webdataset and numpy. `make install` adds img2dataset with
    ``--no-deps`` (it pins webdataset<0.3). Missing in CI is an error, elsewhere a skip.
    """
    import importlib.util

    spec = importlib.util.find_spec("img2dataset")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("img2dataset must be installed in CI (`make install` does it)")
        pytest.skip("img2dataset is not installed (`make install` adds it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "writer.py"
    writer_spec = importlib.util.spec_from_file_location("img2dataset_writer", path)
    module = importlib.util.module_from_spec(writer_spec)
    writer_spec.loader.exec_module(module)
    return module


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def img2dataset_key(shard: int, index: int) -> str:
    # img2dataset: f"{shard_id:0{oom_shard_count}d}{key_in_shard:0{oom_sample_per_shard}d}"
    return f"{shard:05d}{index:04d}"


def write_shards(
    root: Path,
    sizes: list[int],
    *,
    sidecar_dir: Path | None = None,
    missing_recap: set[str] = frozenset(),
    image_size: int = 16,
) -> dict[str, dict[str, str]]:
    """Write img2dataset-layout shards with source-tagged captions; return key -> {source: caption}.

    ``KEY.txt`` = "orig KEY", ``KEY.json["org_caption"]`` = "json KEY", sidecar ``re_caption`` = "recap KEY".
    """
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict[str, str]] = {}
    for shard, n in enumerate(sizes):
        rows = []
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(n):
                key = img2dataset_key(shard, i)
                img = jpeg_bytes(shard * 1000 + i, image_size)
                meta = {
                    "key": key,
                    "url": f"https://x.invalid/{key}.jpg",
                    "caption": f"orig {key}",
                    "status": "success",
                    "sha256": hashlib.sha256(img).hexdigest(),
                    "org_caption": f"json {key}",
                }
                sink.write({"__key__": key, "jpg": img, "txt": f"orig {key}", "json": json.dumps(meta)})
                rows.append(meta)
                truth[key] = {"original": f"orig {key}", "json": f"json {key}", "recaption": f"recap {key}"}
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
        if sidecar_dir is not None:
            sidecar_dir.mkdir(parents=True, exist_ok=True)
            keys = [r["key"] for r in rows if r["key"] not in missing_recap]
            pq.write_table(
                pa.table({"key": keys, "re_caption": [f"recap {k}" for k in keys]}),
                sidecar_dir / f"{shard:05d}.parquet",
            )
    for key in missing_recap:
        truth[key].pop("recaption", None)
    return truth


@pytest.fixture
def tiny_shards(tmp_path: Path):
    """4 shards of uneven size (24, 16, 20, 12 samples) with a recaption sidecar for every key."""
    truth = write_shards(tmp_path / "web", [24, 16, 20, 12], sidecar_dir=tmp_path / "sidecars")
    return {"web": tmp_path / "web", "sidecars": tmp_path / "sidecars", "truth": truth}


def make_dm(shards: dict, **kw):
    """A ``CaptionMixDataModule`` over the ``shards`` fixture's four web shards and sidecars, single-process, small
    shuffle buffer, seed 7; ``kw`` overrides any argument."""
    from datamodules.caption_mix import CaptionMixDataModule

    args = dict(
        train_shards=str(shards["web"] / "{00000..00003}.tar"),
        sidecar_dir=str(shards["sidecars"]),
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        shuffle_initial=4,
        seed=7,
    )
    args.update(kw)
    return CaptionMixDataModule(**args)


def cpu_trainer(**overrides):
    """A quiet single-process CPU ``lightning.Trainer``: no logger, checkpoints, progress bar or model summary;
    ``overrides`` replace or add any ``Trainer`` argument."""
    import lightning as L

    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**args, **overrides})


# ------------------------------------------------------------------------------------------- torch.distributed ranks
def free_port() -> int:
    """A free TCP port on localhost, for a test's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int) -> None:
    """Join a CPU (gloo) process group on localhost, one thread per rank."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world, timeout=timedelta(seconds=60))


def run_ranks(rank_main, out_dir: Path, world: int = 2) -> list:
    """``rank_main(rank, port, out_dir)`` in ``world`` fresh processes; each writes ``out_dir/rank<r>.pt``, returned in
    rank order. The processes are forked from a server that has imported lightning/open_clip once: with spawn each rank
    re-imports them (~9 s CPU apiece). If the session's forkserver is already running, the preload does not apply and
    the ranks import as under spawn."""
    import torch.multiprocessing as mp

    multiprocessing.forkserver.set_forkserver_preload(["lightning_modules.clip", "open_clip"])
    mp.start_processes(rank_main, args=(free_port(), str(out_dir)), nprocs=world, join=True, start_method="forkserver")
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
