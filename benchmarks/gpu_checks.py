"""The GPU checks in one run (``bash benchmarks/gpu_checks.sh``, at most 8 minutes on one lent GPU): recaptioning
images/s on the real LLaVA-LLaMA3-8B shapes (random weights, through the job's own backends), a Recap-CLIP B/16 train
step and a DiT-B/4 train step, all bf16, with the card's name; the figures are appended to ``docs/gpu.md`` (which
describes each check) and written to ``--out``. Each check runs in its own process on a GPU (a crash or a hang costs
one check) under a time budget. ``--tiny`` runs the same code on tiny shapes on CPU in seconds.

    bash benchmarks/gpu_checks.sh                                  # on a GPU machine: docs/gpu.md + $OUT
    python -m benchmarks.gpu_checks --tiny --doc /tmp/gpu.md       # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.common import ROOT, commit, device_name, peak_gib, timed_fit, write_json

DOC = ROOT / "docs" / "gpu.md"
CHECKS = ("recaption_build", "recaption_hf", "clip", "dit", "recaption_vllm")
STEPS = {"steps": 20, "skip": 5}
TINY_STEPS = {"steps": 3, "skip": 1}
TINY_DIT = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "patch_size": 4}
# the DiT's random text towers: OpenAI CLIP ViT-L/14's text shape, and a tiny one
_TEXT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
REAL_TEXT = dict(zip(_TEXT, (768, 3072, 12, 12, 77), strict=True))
TINY_TEXT = dict(zip(_TEXT, (32, 64, 1, 2, 16), strict=True))

# What each check runs at: the real shapes, and the tiny ones CI runs on CPU. ``limit_s``: the most a check may take
# (GPU, isolated); ``need_s``: the least time left for it to be started at all.
REAL: dict[str, Any] = {
    "recaption": {"shape": "llama3-8b", "n": 128, "batch_size": 64, "vllm_n": 256, "max_new_tokens": 128},
    "clip": {"model": "recap-clip:B-16:base", "image_size": 224, "context_length": 128, "batch_size": 256, **STEPS},
    "dit": {"size": "DiT-B/4", "image_size": 256, "batch_size": 256, **STEPS},
    "limit_s": {"recaption_build": 150, "recaption_hf": 150, "clip": 90, "dit": 90, "recaption_vllm": 200},
    "need_s": {"recaption_build": 60, "recaption_hf": 60, "clip": 40, "dit": 40, "recaption_vllm": 90},
}
TINY: dict[str, Any] = {
    "recaption": {"shape": "tiny", "n": 4, "batch_size": 4, "vllm_n": 4, "max_new_tokens": 8},
    "clip": {"model": None, "image_size": 32, "context_length": 16, "batch_size": 4, **TINY_STEPS},
    "dit": {"size": TINY_DIT, "image_size": 16, "batch_size": 4, **TINY_STEPS},
    "limit_s": dict.fromkeys(CHECKS, 120),
    "need_s": dict.fromkeys(CHECKS, 0),
}


def card() -> dict[str, Any]:
    """The accelerator's name as ``nvidia-smi`` reports it (name, memory, driver), else torch's, else the CPU."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
        if out:
            return {"name": out[0].split(",")[0].strip(), "nvidia_smi": out[0].strip(), "count": len(out)}
    if torch.cuda.is_available():
        return {"name": device_name(), "nvidia_smi": None, "count": torch.cuda.device_count()}
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"name": cpu, "nvidia_smi": None, "count": 0}


def tokenizer_folder(work: Path, given: str | None) -> str:
    """A LLaMA-3-style tokenizer (special tokens, chat template, ``<image>``): ``given``, else the tiny world's,
    trained here on a tiny world (seconds; a lent GPU machine has no ``data/``)."""
    if given:
        return given
    out = work / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from datamodules.tiny_world import WorldConfig, generate_world
        from experiments.tiny_llm import train_world_tokenizer

        generate_world(work / "world", WorldConfig.tiny(seed=0, workers=1))
        train_world_tokenizer(work / "world", out, vocab_size=1024)
    return str(out)


# ------------------------------------------------------------------------------------------------------ checks
def check_recaption_build(s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
    """The random-weight llava-hf checkpoint, built on the device the checks run on and saved once."""
    from benchmarks.recaption_gpu import build_random_checkpoint

    model_dir = work / f"llava-{s['recaption']['shape']}-random"
    if (model_dir / "recap_suite.json").exists():  # save_llava writes it last: a complete earlier build
        return {"model_dir": str(model_dir), "build_s": 0.0, "reused": True}
    shutil.rmtree(model_dir, ignore_errors=True)  # an interrupted build
    t0 = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        build_random_checkpoint(model_dir, s["recaption"]["shape"], 0, tok, "bfloat16")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"model_dir": str(model_dir), "build_s": time.perf_counter() - t0, "gib": size / 2**30}


def check_recaption(s: dict[str, Any], work: Path, tok: str, backend: str) -> dict[str, Any]:
    from benchmarks.recaption_gpu import throughput

    r = s["recaption"]
    model_dir = work / f"llava-{r['shape']}-random"
    if not (model_dir / "recap_suite.json").exists():
        raise RuntimeError(f"no random checkpoint in {model_dir} (the recaption_build check did not finish)")
    n = r["vllm_n"] if backend == "vllm" else r["n"]
    figures = throughput(model_dir, backend, n, r["batch_size"], r["max_new_tokens"], dtype="bfloat16")
    return {**figures, "n": n, "batch_size": r["batch_size"], "device": device_name()}


def _timed_fit(module: Any, model: Any, batches: Sequence[Any], n: int, steps: int, skip: int) -> dict[str, Any]:
    """``steps`` optimizer steps of batches of ``n`` in ``bf16-mixed`` on the default accelerator: ms/step after
    ``skip``, samples/s, the parameters of ``model`` and peak device memory."""
    peak_gib()
    ms = timed_fit(module, batches, steps, precision="bf16-mixed").seconds_per_step(skip) * 1e3
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    out = {"ms_per_step": ms, "steps": steps, "timed_steps": steps - skip, "samples_per_s": n / ms * 1e3}
    return out | {"params_m": params_m} | peak_gib()


def _bert_folder(path: Path) -> str:
    """A BERT WordPiece tokenizer folder (the HTxt towers' kind; only its type matters for a step on token ids)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "star", "on", "the", "left"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    return str(path)


def check_clip(s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
    from benchmarks.clip_step import TINY_CLIP, make_batches
    from lightning_modules.clip import ClipModule
    from lightning_modules.components.clip_model import resolve_model_config

    c = s["clip"]
    model = c["model"] or TINY_CLIP
    kwargs = {"tokenizer": _bert_folder(work / "bert")} if c["model"] else {}
    optim = {"lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.95)}
    module = ClipModule(model, image_size=c["image_size"], context_length=c["context_length"], **optim, **kwargs)
    cfg, _ = resolve_model_config(model)
    cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"] = c["image_size"], c["context_length"]
    batches = [{"image": i, "text": t} for i, t in make_batches(cfg, c["batch_size"], 4, seed=0)]
    out = _timed_fit(module, module.model, batches, c["batch_size"], c["steps"], c["skip"])
    model_name = c["model"] or "tiny CLIP (benchmarks.clip_step.TINY_CLIP)"
    return out | {"model": model_name} | {k: c[k] for k in ("batch_size", "image_size", "context_length")}


def check_dit(s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
    from benchmarks.dit_cache import random_text_tower, random_vae
    from lightning_modules.dit import DiTModule

    d, folder = s["dit"], work / "dit"
    real = isinstance(d["size"], str)  # the real shapes: SD's VAE and CLIP-L/14's text tower; tiny: a tiny text tower
    tower = REAL_TEXT if real else TINY_TEXT
    length = tower["max_position_embeddings"]
    folders = {"text_encoder": random_text_tower(folder / "text", tok, **tower), "text_max_length": length}
    folders["vae"] = random_vae(folder / "vae") if real else None
    module = DiTModule(size=d["size"], image_size=d["image_size"], **folders)  # the paper's recipe: EMA, CFG drop 0.1
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    n, side, width = d["batch_size"], module.latent_size, module.text_encoder.width
    latent = (n, module.codec.channels, side, side)
    batches = [
        {"latent": torch.randn(latent, generator=g), "text": torch.randn(n, length, width, generator=g)}
        | {"text_mask": torch.ones(n, length, dtype=torch.long)}
        for _ in range(4)
    ]
    out = _timed_fit(module, module.dit, batches, n, d["steps"], d["skip"]) | {"latent": latent[1:]}
    return out | {"size": d["size"] if real else "tiny", "batch_size": n, "image_size": d["image_size"]}


CHECK_FUNCS: dict[str, Callable[[dict[str, Any], Path, str], dict[str, Any]]] = {
    "recaption_build": check_recaption_build,
    "recaption_hf": functools.partial(check_recaption, backend="hf"),
    "recaption_vllm": functools.partial(check_recaption, backend="vllm"),
    "clip": check_clip,
    "dit": check_dit,
}


# ------------------------------------------------------------------------------------------------------ running
def _run_isolated(
    name: str, args: argparse.Namespace, work: Path, tok: str, limit: float, logs: Path | None = None
) -> dict[str, Any]:
    """One check in a child process (its own GPU memory), killed with its process group after ``limit`` seconds; its
    output goes to ``logs/<name>.log`` (default ``work``)."""
    log_path = (logs or work) / f"{name}.log"
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_checks", "--check", name, "--work", str(work), "--tokenizer", tok]
    cmd += ["--check-json", str(result)] + (["--tiny"] if args.tiny else [])
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "start_new_session": True}
    proc = subprocess.Popen(cmd, cwd=ROOT, **kw)
    try:
        log, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log_path.write_text(proc.communicate()[0] or "")
        return {"error": f"timed out after {limit:.0f} s"}
    log_path.write_text(log or "")
    if proc.returncode != 0 or not result.exists():
        last = [ln for ln in (log or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit code {proc.returncode}: {last[0][:300]}"}
    return json.loads(result.read_text())


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = TINY if args.tiny else REAL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # scratch (the ~17 GB random checkpoint, kept for a rerun) outside OUT, which may be copied back from the machine
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "recap_gpu_checks"
    work.mkdir(parents=True, exist_ok=True)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and torch.cuda.is_available())
    report: dict[str, Any] = {"card": card(), "commit": commit(7) or "unknown", "date": str(datetime.date.today())}
    report |= {"tiny": args.tiny, "settings": {k: s[k] for k in ("recaption", "clip", "dit")}, "isolated": isolate}
    report["checks"] = {}
    budget = f"commit {report['commit']}, budget {args.budget_s:.0f} s"
    print(f"gpu_checks on {report['card']['name']} ({budget})", flush=True)
    tok = tokenizer_folder(work, args.tokenizer)
    for name in args.checks:
        left = args.budget_s - (time.perf_counter() - t0)
        if name == "recaption_vllm" and importlib.util.find_spec("vllm") is None:
            result: dict[str, Any] = {"skipped": "vllm does not import here"}
        elif left < max(s["need_s"][name], 1):
            result = {"skipped": f"out of time ({left:.0f} s of the {args.budget_s:.0f} s budget left)"}
        else:
            t = time.perf_counter()
            if isolate:
                result = _run_isolated(name, args, work, tok, min(s["limit_s"][name], left), logs=out)
            else:
                try:
                    result = CHECK_FUNCS[name](s, work, tok)
                except Exception as e:  # noqa: BLE001 - a failed check is a row of the report, the others still run
                    result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            result["wall_s"] = time.perf_counter() - t
        report["checks"][name] = result
        print(f"  {name}: {json.dumps(result, default=str)}", flush=True)
    report["total_s"] = time.perf_counter() - t0
    section = format_section(report)
    write_json(out / "gpu_checks.json", report)
    (out / "gpu_checks.md").write_text(section)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text() if doc.exists() else "# GPU figures\n"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(text.rstrip("\n") + "\n\n" + section)
    print(section, flush=True)
    return report


# ------------------------------------------------------------------------------------------------------ report
def format_section(report: dict[str, Any]) -> str:
    """The Markdown section appended to ``docs/gpu.md``: the card, the commit, one row per check."""
    c, s = report["checks"], report["settings"]
    r, cl, dt = s["recaption"], s["clip"], s["dit"]
    shape = "CLIP ViT-L/14-336 + LLaMA-3-8B" if r["shape"] == "llama3-8b" else f"{r['shape']} shapes"
    rec = f"{shape}, random weights, bf16, greedy, <= {r['max_new_tokens']} new tokens"

    def cell(name: str, figure: Callable[[dict[str, Any]], str]) -> str:
        x = c.get(name, {"skipped": "not asked"})
        if "error" in x:
            return f"failed: {x['error']}"
        return f"not run: {x['skipped']}" if "skipped" in x else figure(x)

    def recaption(x: dict[str, Any]) -> str:
        tokens = f"{x['tokens_per_s']:,.0f} generated tokens/s, mean {x['mean_new_tokens']:.0f} new tokens"
        of = f"{tokens}, {x['at_limit']:.0%} at the limit; {x['n']} images, batch {x['batch_size']}"
        return f"**{x['images_per_s']:.2f} images/s per GPU** ({of})"

    def step(x: dict[str, Any]) -> str:
        mem = f", peak {x['peak_gib']:.1f} GiB" if "peak_gib" in x else ""
        of = f"{x['params_m']:.1f} M params, batch {x['batch_size']}, {x['timed_steps']} timed steps{mem}"
        return f"**{x['ms_per_step']:.1f} ms/step**, {x['samples_per_s']:,.0f} samples/s ({of})"

    def build(x: dict[str, Any]) -> str:
        return "reused from an earlier run" if x.get("reused") else f"built in {x['build_s']:.0f} s, {x['gib']:.1f} GiB"

    clip = f"`{cl['model'] or 'tiny CLIP'}`, {cl['image_size']} px, context {cl['context_length']}, bf16-mixed, AdamW"
    dit = f"`{dt['size'] if isinstance(dt['size'], str) else 'tiny DiT'}`, {dt['image_size']} px, cached latents"
    rows = [
        ("recaption, `hf`", rec, cell("recaption_hf", recaption)),
        ("recaption, `vllm`", rec, cell("recaption_vllm", recaption)),
        ("Recap-CLIP train step", f"{clip}, Lightning Trainer", cell("clip", step)),
        ("DiT train step", f"{dit} + text features, bf16-mixed, EMA, Lightning Trainer", cell("dit", step)),
    ]
    table = pd.DataFrame(rows, columns=["check", "setting", "figure"]).to_markdown(index=False, disable_numparse=True)
    card_line = report["card"].get("nvidia_smi") or report["card"]["name"]
    title = f"### {report['date']} · {report['card']['name']} · commit {report['commit']}"
    if report["tiny"]:
        title += " · tiny shapes (a check of the code path, not a figure)"
    line = f"`nvidia-smi`: {card_line}; random checkpoint: {cell('recaption_build', build)}"
    return f"{title}\n\n{line}; whole run {report['total_s']:.0f} s.\n\n{table}\n"


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, seconds): the code path, not the figures")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_checks"), help="json + markdown section + logs here")
    p.add_argument("--doc", default=None, help="append the section here (default docs/gpu.md; none with --tiny)")
    p.add_argument("--no-doc", action="store_true", help="do not append to any doc")
    p.add_argument("--budget-s", type=float, default=440.0, help="seconds for all checks (default 440)")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto", help="a process per check (auto: GPU)")
    p.add_argument("--tokenizer", default=None, help="LLaMA-3-style tokenizer folder (default: a tiny world's)")
    p.add_argument("--work", default=None, help="scratch folder (default: TMPDIR/recap_gpu_checks; --tiny: a temp dir)")
    p.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)  # child mode: run one check
    p.add_argument("--check-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_doc:
        args.doc = None
    elif args.doc is None and not args.tiny:
        args.doc = str(DOC)
    if args.check:  # a child: one check, its result as json
        result = CHECK_FUNCS[args.check](TINY if args.tiny else REAL, Path(args.work), args.tokenizer)
        Path(args.check_json).write_text(json.dumps(result, default=str))
        return result
    if args.work is None and args.tiny:
        with tempfile.TemporaryDirectory() as work:
            args.work = work
            return run_checks(args)
    return run_checks(args)


if __name__ == "__main__":
    main()
