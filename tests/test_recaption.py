"""The recaption job: one row per input key (caption or error), Recap-DataComp-1B schema, exactly once under SIGKILL
and restarts with other process counts."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.recaption import RECAP_SCHEMA
from datamodules.tiny_world.tokenizer import train_world_tokenizer
from experiments.recaption import SCHEMA, Generated, degenerate, merge, pending_units, recaption_unit, run, unit_name
from lightning_modules.components.llava import build_llava, save_llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recap")
    world = root / "world"
    generate_world(world, WorldConfig.tiny(seed=0, n_web=120, shard_size=20, workers=1))
    tok = train_world_tokenizer(world, root / "tok", vocab_size=400)
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    llm = dict(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    parts = build_llava(vision_tower=vision, llm=llm, tokenizer=str(root / "tok"))
    save_llava(parts, root / "model")
    return {"world": world, "model": root / "model", "root": root}


def keys_of(shards: list[Path]) -> list[str]:
    keys = []
    for s in shards:
        with tarfile.open(s) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def test_rows_schema_and_error_rows(setup, tmp_path):
    shard = tmp_path / "00000.tar"
    src = sorted((setup["world"] / "web").glob("*.tar"))[0]
    with tarfile.open(src) as tin, tarfile.open(shard, "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
        bad = b"not a jpeg"
        info = tarfile.TarInfo("99999999.jpg")
        info.size = len(bad)
        tout.addfile(info, io.BytesIO(bad))
    run(str(setup["model"]), str(shard), tmp_path / "out", max_new_tokens=6, batch_size=8, rank=0, world_size=1)
    table = pq.read_table(tmp_path / "out/00000.parquet")
    assert table.schema.names[: len(RECAP_SCHEMA)] == RECAP_SCHEMA.names  # released column order first
    assert table.schema.equals(SCHEMA)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert sorted(rows) == keys_of([shard])
    assert rows["99999999"]["status"] == "error"
    assert "image" in rows["99999999"]["error"]
    done = [r for k, r in rows.items() if k != "99999999"]
    assert {r["status"] for r in done} <= {"ok", "flagged"}  # a random model may loop: flagged, never kept
    ok = [r for r in done if r["status"] == "ok"]
    assert ok
    assert all(r["n_generated_tokens"] <= 6 and r["org_caption"] and r["url"] and r["sha256"] for r in done)
    assert all(r["re_caption"] is None and r["error"] for r in done if r["status"] == "flagged")
    assert all(r["re_length"] == len(r["re_caption"].split()) for r in ok)
    assert {r["model_hash"] for r in rows.values()} == {ok[0]["model_hash"]}
    assert len(ok[0]["model_hash"]) == 16


def test_pending_units_split_the_unfinished_shards(tmp_path):
    urls = [f"/d/{i:05d}.tar" for i in range(7)]
    (tmp_path / "00002.parquet").write_bytes(b"x")
    owned = [pending_units(urls, tmp_path, r, 3) for r in range(3)]
    flat = sorted(u for o in owned for u in o)
    assert flat == sorted(u for u in urls if unit_name(u) != "00002")  # each unfinished shard exactly once


def _spawn(setup, out: Path, rank: int, world: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments", "recaption", "run", "--model", str(setup["model"]),
           "--shards", str(setup["world"] / "web"), "--out", str(out), "--max-new-tokens", "4", "--batch-size", "10",
           "--rank", str(rank), "--world-size", str(world), "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _done(out: Path) -> int:
    return len([p for p in out.glob("*.parquet") if not p.name.startswith(".")])


def _kill_when(procs, out: Path, n_done: int, timeout: float = 120) -> None:
    t0 = time.time()
    while _done(out) < n_done and time.time() - t0 < timeout and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


def test_sigkill_and_restart_with_other_process_counts_give_every_key_exactly_once(setup, tmp_path):
    out = tmp_path / "out"
    shards = sorted((setup["world"] / "web").glob("*.tar"))
    assert len(shards) == 6
    _kill_when([_spawn(setup, out, 0, 1)], out, 1)  # 1 process, killed after its first shard
    first = _done(out)
    assert 1 <= first < 6
    _kill_when([_spawn(setup, out, r, 3) for r in range(3)], out, first + 1)  # 3 processes, killed mid-way
    killed_again = _done(out)
    procs = [_spawn(setup, out, r, 2) for r in range(2)]  # 2 processes to the end
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert _done(out) == 6
    assert killed_again < 6
    merged = pq.read_table(merge(out, shards=str(setup["world"] / "web")))
    keys = merged.column("key").to_pylist()
    assert sorted(keys) == sorted(keys_of(shards))  # every input key exactly once
    assert set(merged.column("status").to_pylist()) <= {"ok", "flagged"}


def test_degenerate_captions_are_detected():
    assert degenerate("") == "empty caption"
    assert degenerate("a red circle on the left") is None
    assert degenerate("a red circle circle circle circle").startswith("repetition loop (1-gram x4)")
    assert "2-gram" in degenerate("the image shows red star red star red star red star")
    assert degenerate("red star red star red star") is None  # 3 repeats: allowed


class _ScriptedBackend:
    """A test double with HFBackend's interface: loops until asked with a repetition penalty (then, for the image
    of size 17, still loops)."""

    def __init__(self):
        self.calls = []

    def generate(self, images, repetition_penalty=None):
        self.calls.append((len(images), repetition_penalty))
        out = []
        for im in images:
            if repetition_penalty is None and im.size[0] in (16, 17):
                out.append(Generated("a a a a a", 5, False))
            elif im.size[0] == 17:
                out.append(Generated("star star star star", 4, False))
            else:
                out.append(Generated(f"a shape of width {im.size[0]}", 5, False))
        return out


def test_garbage_is_retried_once_with_a_penalty_then_flagged(tmp_path):
    from PIL import Image

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, width in (("a", 15), ("b", 16), ("c", 17)):
            buf = io.BytesIO()
            Image.new("RGB", (width, 8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"alt")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    backend = _ScriptedBackend()
    rows = {r["key"]: r for r in recaption_unit(str(shard), backend, 8, {"model": "m"}).to_pylist()}
    assert backend.calls == [(3, None), (2, 1.3)]  # one retry, of the two loops only
    assert rows["a"]["status"] == "ok"
    assert not rows["a"]["retried"]
    assert rows["b"]["status"] == "ok"
    assert rows["b"]["retried"]
    assert rows["b"]["re_caption"] == "a shape of width 16"
    assert rows["c"]["status"] == "flagged"
    assert rows["c"]["re_caption"] is None
    assert "repetition" in rows["c"]["error"]


def test_throughput_benchmark_reports_both_and_agrees(setup):
    from benchmarks.recaption_throughput import main

    images = str(setup["world"] / "eval/t2i_prompts/images/*.jpg")
    report = main(["--model", str(setup["model"]), "--images", images, "--n", "8", "--n-single", "4",
                   "--batch-size", "4", "--max-new-tokens", "5", "--device", "cpu",
                   "--repeats", "2"])  # fmt: skip
    assert len(report["round_ratios"]) == 2
    assert report["job_images_per_s"] > 0
    assert report["batch1_images_per_s"] > 0
    assert report["captions_equal"] == "4/4"  # batched (left-padded) greedy = one-by-one greedy


def test_config_files_load_and_flags_override_them(setup, tmp_path):
    from experiments.recaption import _load_config, main

    for path in sorted((ROOT / "experiments/configs/recaption").glob("*.yaml")):
        cfg = _load_config(str(path))
        assert {"model", "shards", "out"} <= set(cfg), path
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"model: {setup['model']}\nshards: /nonexistent/*.tar\nout: {tmp_path / 'out'}\nmax_new_tokens: 3\n")
    shard = sorted((setup["world"] / "web").glob("*.tar"))[0]
    totals = main(["run", "--config", str(cfg), "--shards", str(shard), "--batch-size", "8", "--device", "cpu"])
    assert totals["units"] == 1
    assert totals["rows"] == len(keys_of([shard]))
    table = pq.read_table(tmp_path / "out" / f"{shard.stem}.parquet")
    assert max(table.column("n_generated_tokens").to_pylist()) <= 3  # from the file
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    with pytest.raises(ValueError, match="modle"):
        _load_config(str(tmp_path / "bad.yaml"))
