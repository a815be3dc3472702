"""The recaption job: one row per input key (caption or error), Recap-DataComp-1B schema, exactly once under SIGKILL
and restarts with other process counts."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from datamodules.formats import RECAP_SCHEMA
from datamodules.shards import shard_stem
from datamodules.tiny_world import WorldConfig, generate_world
from experiments.jobs.recaption import SCHEMA, Generated, degenerate, merge, pending_units, recaption_unit, run
from experiments.tiny_llm import train_world_tokenizer
from lightning_modules.components.llava import build_llava, save_llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recap")
    world = root / "world"
    generate_world(world, WorldConfig.tiny(seed=0, n_web=120, shard_size=20, workers=1))
    tok = train_world_tokenizer(world, root / "tok", vocab_size=400)
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    llm = dict(
        vocab_size=len(tok) + 8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
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


def test_pending_units_list_every_unfinished_unit_each_rank_starting_on_its_own_share(tmp_path):
    urls = [f"/d/{i:05d}.tar" for i in range(7)]
    (tmp_path / "00002.parquet").write_bytes(b"x")
    orders = [pending_units(urls, tmp_path, r, 3) for r in range(3)]
    unfinished = sorted(u for u in urls if shard_stem(u) != "00002")
    for order in orders:  # the claims decide who does a unit: every process may do any unfinished one
        assert sorted(u.url for u in order) == unfinished
    assert sorted(u.url for o in orders for u in o[:2]) == unfinished  # where they start: disjoint shares


def _spawn(setup, out: Path, rank: int, world: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "experiments",
        "recaption",
        "run",
        "--model",
        str(setup["model"]),
        "--shards",
        str(setup["world"] / "web"),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "10",
        "--rank",
        str(rank),
        "--world-size",
        str(world),
        "--device",
        "cpu",
    ]
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
    report = main(
        [
            "--model",
            str(setup["model"]),
            "--images",
            images,
            "--n",
            "8",
            "--n-single",
            "4",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
            "--repeats",
            "2",
        ]
    )
    assert len(report["round_ratios"]) == 2
    assert report["job_images_per_s"] > 0
    assert report["batch1_images_per_s"] > 0
    assert report["captions_equal"] == "4/4"  # batched (left-padded) greedy = one-by-one greedy


def test_gpu_benchmark_runs_its_code_path_on_a_tiny_shape(setup, tmp_path):
    from benchmarks.recaption_gpu import main

    report = main(
        [
            "--model-dir",
            str(tmp_path / "m"),
            "--shape",
            "tiny",
            "--tokenizer",
            str(setup["root"] / "tok"),
            "--backends",
            "hf",
            "--n",
            "4",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ]
    )
    assert (tmp_path / "m/model.safetensors").exists()  # built once, loaded back through the job's backend
    assert report["hf"]["images_per_s"] > 0
    assert 0 < report["hf"]["mean_new_tokens"] <= 3


def test_config_files_load_and_flags_override_them(setup, tmp_path):
    from experiments.jobs.recaption import _load_config, main

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


def test_shard_slices_survive_a_restart_with_another_split_and_merge_checks_them(setup, tmp_path):
    out = tmp_path / "out"
    shards = sorted((setup["world"] / "web").glob("*.tar"))[:2]
    spec = "::".join(map(str, shards))
    n = len(keys_of(shards[:1]))
    assert n == 20
    kw = dict(max_new_tokens=3, batch_size=8, device="cpu", progress=False)
    run(str(setup["model"]), spec, out, slice_size=7, **kw)
    for p in out.glob("*.part0000[12]-of-00003.parquet"):  # as if killed after the first slice of each shard
        p.unlink()
    names = sorted(p.stem for p in out.glob("*.parquet"))
    assert names == ["00000.part00000-of-00003", "00001.part00000-of-00003"]
    with pytest.raises(ValueError, match="slices missing"):
        merge(out, shards=spec)
    run(str(setup["model"]), spec, out, rank=0, world_size=1, slice_size=5, **kw)  # another split: the first is kept
    names = sorted(p.stem for p in out.glob("*.parquet"))
    assert names == [f"0000{s}.part0000{k}-of-00003" for s in (0, 1) for k in range(3)]
    last = pq.read_table(out / "00000.part00002-of-00003.parquet")
    assert last.num_rows == n - 2 * 7  # the last slice runs to the shard's end
    merged = pq.read_table(merge(out, shards=spec))
    assert sorted(merged.column("key").to_pylist()) == sorted(keys_of(shards))  # every key exactly once
    (out / "00001.part00001-of-00003.parquet").unlink()
    with pytest.raises(ValueError, match="00001: 1 of 3 slices missing"):
        merge(out, shards=spec)


def test_new_shards_carry_the_recaption_as_a_member_the_datamodule_reads(setup, tmp_path):
    from experiments.jobs.recaption import write_shards

    out, dest = tmp_path / "out", tmp_path / "new"
    shard = sorted((setup["world"] / "web").glob("*.tar"))[0]
    run(str(setup["model"]), str(shard), out, max_new_tokens=4, batch_size=8, device="cpu", progress=False)
    rows = {r["key"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    totals = write_shards(out, str(shard), dest)
    n_ok = sum(r["status"] == "ok" for r in rows.values())
    assert totals == {"shards": 1, "samples": 20, "with_recaption": n_ok, "skipped_shards": 0}
    assert (dest / "00000_stats.json").read_bytes() == (shard.parent / "00000_stats.json").read_bytes()
    with tarfile.open(shard) as a, tarfile.open(dest / "00000.tar") as b:
        old = {m.name: a.extractfile(m).read() for m in a.getmembers()}
        new = {m.name: b.extractfile(m).read() for m in b.getmembers()}
    assert {k: v for k, v in new.items() if not k.endswith(".recap.txt")} == old  # everything else byte for byte
    for key, row in rows.items():
        got = new.get(f"{key}.recap.txt")
        assert (got.decode() if got else None) == (row["re_caption"] if row["status"] == "ok" else None)
    assert write_shards(out, str(shard), dest)["skipped_shards"] == 1  # finished shards are not rewritten

    from datamodules.caption_mix import CaptionMixDataModule

    dm = CaptionMixDataModule(
        str(dest / "00000.tar"),
        batch_size=4,
        p_original=0.0,
        num_workers=0,
        sources={"original": "txt", "recaption": "recap.txt"},
        shuffle_buffer=1,
        image_transform=lambda im: im.size,
        text_transform=lambda t: t,
        persistent_workers=False,
    )
    dm.setup("fit")
    seen = {k: t for b in dm.train_dataloader() for k, t in zip(b["key"], b["text"], strict=True)}
    ok = {k: r["re_caption"] for k, r in rows.items() if r["status"] == "ok"}
    assert {k: seen[k] for k in ok} == ok  # at p=0 the member is the caption


class _FakeVLLM:
    """Records what ``VLLMBackend`` asks of vLLM's ``LLM`` / ``SamplingParams`` and answers like vLLM does: the stop
    token is the last of ``token_ids`` and not in the text; ``finish_reason`` is "length" at the token limit."""

    def __init__(self):
        self.init, self.requests, self.params = None, [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                fake.init = kw

            def generate(self, requests, params, use_tqdm=True):
                fake.requests.append(requests)
                fake.params.append(params.kw)
                outs = []
                for i, _ in enumerate(requests):
                    if i == 0:  # stopped by the end-of-turn token
                        stop = params.kw["stop_token_ids"][0]
                        c = types.SimpleNamespace(text=" a red star ", token_ids=[5, 6, 7, stop], finish_reason="stop")
                    else:  # hit the limit
                        c = types.SimpleNamespace(
                            text="a b c d", token_ids=list(range(params.kw["max_tokens"])), finish_reason="length"
                        )
                    outs.append(types.SimpleNamespace(outputs=[c]))
                return outs

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_asks_vllm_for_the_hf_backend_decoding(setup, monkeypatch):
    from transformers import AutoTokenizer

    from experiments.jobs.recaption import PAPER_PROMPT, HFBackend, VLLMBackend
    from lightning_modules.components.llava import eos_token_ids

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    backend = VLLMBackend(str(setup["model"]), PAPER_PROMPT, 9, dtype="bfloat16")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # one process per GPU under torchrun / srun
    assert fake.init["model"] == str(setup["model"])
    assert fake.init["dtype"] == "bfloat16"
    assert fake.init["trust_remote_code"] is False
    tok = AutoTokenizer.from_pretrained(setup["model"])
    hf = HFBackend(str(setup["model"]), PAPER_PROMPT, 9, device="cpu")
    # vLLM tokenizes with add_special_tokens=True: the same ids as hf's prompt (no doubled <|begin_of_text|>)
    assert tok(backend.prompt_text)["input_ids"] == tok(hf.prompt_text, add_special_tokens=False)["input_ids"]
    assert tok(backend.prompt_text)["input_ids"].count(tok.bos_token_id) == 1
    got = backend.generate(["im0", "im1"])
    assert fake.requests[0] == [
        {"prompt": backend.prompt_text, "multi_modal_data": {"image": im}} for im in ("im0", "im1")
    ]
    params = fake.params[0]
    assert (params["temperature"], params["max_tokens"], params["repetition_penalty"]) == (0.0, 9, 1.0)
    assert params["stop_token_ids"] == eos_token_ids(tok)
    assert got == [Generated("a red star", 3, False), Generated("a b c d", 9, True)]
    backend.generate(["im0"], repetition_penalty=1.3)
    assert fake.params[1]["repetition_penalty"] == 1.3


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="vLLM agreement needs a GPU and vllm installed",
)
def test_vllm_and_hf_greedy_captions_agree_on_a_fixed_image_set(setup):  # pragma: no cover - GPU machines only
    from PIL import Image

    from experiments.jobs.recaption import PAPER_PROMPT, HFBackend, VLLMBackend

    images = [Image.open(f).convert("RGB") for f in sorted((setup["world"] / "eval/t2i_prompts/images").glob("*.jpg"))]
    hf = HFBackend(str(setup["model"]), PAPER_PROMPT, 16, dtype="float32").generate(images[:16])
    vl = VLLMBackend(str(setup["model"]), PAPER_PROMPT, 16, dtype="float32", gpu_memory_utilization=0.3)
    assert [g.text for g in vl.generate(images[:16])] == [g.text for g in hf]
