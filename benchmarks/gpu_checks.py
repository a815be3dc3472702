"""The GPU checks in one run (``bash benchmarks/gpu_checks.sh``, at most 8 minutes on one lent GPU): recaptioning
images/s on the real LLaVA-LLaMA3-8B shapes, a Recap-CLIP B/16 train step and a DiT-B/4 train step, all bf16, with
the card's name; the figures are appended to ``docs/gpu.md`` (and written to ``--out``).

* **recaption** (``hf``, and ``vllm`` where it imports): ``benchmarks.recaption_gpu`` on CLIP ViT-L/14-336 +
  LLaMA-3-8B with random weights in bf16, 336 px, the paper's greedy decoding with at most 128 new tokens, through
  the recaption job's own backends (``experiments.recaption.BACKENDS``). The random checkpoint is built on the GPU
  (``recaption_gpu.build_random_checkpoint`` under ``torch.device("cuda")``: seconds, not CPU minutes) and saved once.
  Random weights run nearly every caption to the limit: a lower bound for real captions.
* **clip**: ``ClipModule("recap-clip:B-16:base")`` (paper Table 2; HTxt style, context 128) at 224 px fitted by a
  Lightning ``Trainer`` (``bf16-mixed``) on fixed synthetic batches (``benchmarks.clip_step.make_batches``).
* **dit**: ``DiTModule("DiT-B/4")`` at 256 px (32x32x4 latents) with the random SD-shaped VAE and CLIP-L/14-shaped text
  tower of ``benchmarks.dit_cache``, fitted by a ``Trainer`` (``bf16-mixed``, EMA on) on cached-layout batches.

Each check runs in its own process on a GPU (vLLM keeps its memory; a crash or a hang costs one check, not the run),
under a time budget: a check that does not fit in what is left is reported as skipped, one that overruns its limit
as timed out. ``--tiny`` runs the same code on tiny shapes on CPU in seconds (``tests/test_benchmarks.py``); it writes
to ``docs/gpu.md`` only when ``--doc`` says so.

    bash benchmarks/gpu_checks.sh                                  # on a GPU machine: docs/gpu.md + $OUT
    python -m benchmarks.gpu_checks --tiny --doc /tmp/gpu.md       # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu.md"
CHECKS = ("recaption_build", "recaption_hf", "clip", "dit", "recaption_vllm")

# What each check runs at: the real shapes, and the tiny ones CI runs on CPU. ``limit_s``: the most a check may take
# (GPU, isolated); ``need_s``: the least time left for it to be started at all.
REAL: dict[str, Any] = {
    "recaption": {"shape": "llama3-8b", "n": 128, "batch_size": 64, "vllm_n": 256, "max_new_tokens": 128},
    "clip": {"model": "recap-clip:B-16:base", "image_size": 224, "context_length": 128, "batch_size": 256,
             "steps": 20, "skip": 5},
    "dit": {"size": "DiT-B/4", "image_size": 256, "batch_size": 256, "steps": 20, "skip": 5},
    "limit_s": {"recaption_build": 150, "recaption_hf": 150, "clip": 90, "dit": 90, "recaption_vllm": 200},
    "need_s": {"recaption_build": 60, "recaption_hf": 60, "clip": 40, "dit": 40, "recaption_vllm": 90},
}  # fmt: skip
TINY: dict[str, Any] = {
    "recaption": {"shape": "tiny", "n": 4, "batch_size": 4, "vllm_n": 4, "max_new_tokens": 8},
    "clip": {"model": None, "image_size": 32, "context_length": 16, "batch_size": 4, "steps": 3, "skip": 1},
    "dit": {"size": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "patch_size": 4},
            "image_size": 16, "batch_size": 4, "steps": 3, "skip": 1},
    "limit_s": {k: 120 for k in CHECKS},
    "need_s": {k: 0 for k in CHECKS},
}  # fmt: skip


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------------ the card
def card() -> dict[str, Any]:
    """The accelerator's name as ``nvidia-smi`` reports it (name, memory, driver), else torch's, else the CPU."""
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version"
        try:
            out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip().splitlines()  # fmt: skip
        except (subprocess.SubprocessError, OSError) as e:
            out = [f"nvidia-smi failed: {e}"]
        if out:
            return {"name": out[0].split(",")[0].strip(), "nvidia_smi": out[0].strip(), "count": len(out)}
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return {"name": torch.cuda.get_device_name(), "nvidia_smi": None, "count": torch.cuda.device_count()}
    return {"name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "nvidia_smi": None,
            "count": 0}  # fmt: skip


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return "unknown"


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
    import torch

    from benchmarks.recaption_gpu import build_random_checkpoint

    model_dir = work / f"llava-{s['recaption']['shape']}-random"
    if (model_dir / "recap_suite.json").exists():  # save_llava writes it last: a complete earlier build
        return {"model_dir": str(model_dir), "build_s": 0.0, "reused": True}
    shutil.rmtree(model_dir, ignore_errors=True)  # an interrupted build
    t0 = time.perf_counter()
    with torch.device(_device()):
        build_random_checkpoint(model_dir, s["recaption"]["shape"], 0, tok, "bfloat16")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"model_dir": str(model_dir), "build_s": time.perf_counter() - t0, "gib": size / 2**30}


def _recaption(backend: str) -> Callable[[dict[str, Any], Path, str], dict[str, Any]]:
    def run(s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
        from benchmarks.recaption_gpu import main as recaption_gpu

        r = s["recaption"]
        model_dir = work / f"llava-{r['shape']}-random"
        if not (model_dir / "recap_suite.json").exists():
            raise RuntimeError(f"no random checkpoint in {model_dir} (the recaption_build check did not finish)")
        n = r["vllm_n"] if backend == "vllm" else r["n"]
        report = recaption_gpu(["--model-dir", str(model_dir), "--shape", r["shape"], "--tokenizer", tok,
                                "--backends", backend, "--n", str(n), "--batch-size", str(r["batch_size"]),
                                "--max-new-tokens", str(r["max_new_tokens"]), "--dtype", "bfloat16"])  # fmt: skip
        return {**report[backend], "n": n, "batch_size": r["batch_size"], "device": report["device"]}

    return run


class _StepTimer:
    """A Lightning callback: a timestamp after every optimizer step (the device synchronised first)."""

    def __init__(self) -> None:
        import lightning as L

        timer = self

        class Hook(L.Callback):
            def on_train_batch_end(self, *_: Any) -> None:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter())

        self.times: list[float] = []
        self.callback = Hook()


class _Cycle:
    """``length`` items cycling over pre-built batches (a map-style dataset for ``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: Sequence[Any], length: int):
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.batches[i % len(self.batches)]


def fit_and_time(module: Any, batches: Sequence[Any], steps: int, skip: int) -> dict[str, Any]:
    """``steps`` optimizer steps of ``module`` under a Lightning ``Trainer`` (``bf16-mixed``, one device) on the
    fixed ``batches`` (cycled); ms/step over the steps after ``skip``, peak device memory."""
    import lightning as L
    import torch

    device = _device()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = _StepTimer()
    loader = torch.utils.data.DataLoader(_Cycle(batches, steps), batch_size=None)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer.callback])  # fmt: skip
    trainer.fit(module, loader)
    t = timer.times
    ms = (t[-1] - t[skip - 1]) / (len(t) - skip) * 1e3 if skip else (t[-1] - t[0]) / max(1, len(t) - 1) * 1e3
    out: dict[str, Any] = {"ms_per_step": ms, "steps": len(t), "timed_steps": len(t) - skip}
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


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
    module = ClipModule(model, image_size=c["image_size"], context_length=c["context_length"], lr=5e-4,
                        weight_decay=0.2, betas=(0.9, 0.95), **kwargs)  # fmt: skip
    cfg, _ = resolve_model_config(model)
    cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"] = c["image_size"], c["context_length"]
    batches = [{"image": i, "text": t} for i, t in make_batches(cfg, c["batch_size"], 4, seed=0)]
    n_params = sum(p.numel() for p in module.model.parameters())
    out = fit_and_time(module, batches, c["steps"], c["skip"])
    model_name = c["model"] or "tiny CLIP (benchmarks.clip_step.TINY_CLIP)"
    return {**out, "samples_per_s": c["batch_size"] / out["ms_per_step"] * 1e3, "params_m": n_params / 1e6,
            "model": model_name, "batch_size": c["batch_size"], "image_size": c["image_size"],
            "context_length": c["context_length"]}  # fmt: skip


def _dit_folders(work: Path, tok: str, tiny: bool) -> dict[str, Any]:
    """Random-weight text tower (+ VAE) folders: ``benchmarks.dit_cache``'s real shapes, or a tiny CLIP text tower."""
    if not tiny:
        from benchmarks.dit_cache import _real_shapes

        parts = _real_shapes(work, tok)
        parts.pop("size"), parts.pop("image_size")
        return parts
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    t = AutoTokenizer.from_pretrained(tok)
    if t.pad_token is None:
        t.pad_token = t.eos_token
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=t.bos_token_id,
                         eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)  # fmt: skip
    CLIPTextModel(cfg).save_pretrained(work / "text")
    t.save_pretrained(work / "text")
    return {"text_encoder": str(work / "text"), "text_max_length": 16, "vae": None}


def check_dit(s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
    import torch

    from lightning_modules.dit import DiTModule

    d = s["dit"]
    folders = _dit_folders(work / "dit", tok, tiny=not isinstance(d["size"], str))
    module = DiTModule(size=d["size"], image_size=d["image_size"], **folders)  # the paper's recipe: EMA, CFG drop 0.1
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    n, side, length = d["batch_size"], module.latent_size, folders["text_max_length"]
    batches = [{"latent": torch.randn(n, module.codec.channels, side, side, generator=g),
                "text": torch.randn(n, length, module.text_encoder.width, generator=g),
                "text_mask": torch.ones(n, length, dtype=torch.long)} for _ in range(4)]  # fmt: skip
    n_params = sum(p.numel() for p in module.dit.parameters())
    out = fit_and_time(module, batches, d["steps"], d["skip"])
    return {**out, "samples_per_s": n / out["ms_per_step"] * 1e3, "params_m": n_params / 1e6,
            "size": d["size"] if isinstance(d["size"], str) else "tiny", "batch_size": n,
            "image_size": d["image_size"], "latent": [module.codec.channels, side, side]}  # fmt: skip


CHECK_FUNCS: dict[str, Callable[[dict[str, Any], Path, str], dict[str, Any]]] = {
    "recaption_build": check_recaption_build,
    "recaption_hf": _recaption("hf"),
    "recaption_vllm": _recaption("vllm"),
    "clip": check_clip,
    "dit": check_dit,
}


# ------------------------------------------------------------------------------------------------------ running
def _run_isolated(
    name: str, args: argparse.Namespace, work: Path, tok: str, limit: float, logs: Path | None = None
) -> dict[str, Any]:
    """One check in a child process (its own GPU memory), killed with its process group after ``limit`` seconds; its
    output goes to ``logs/<name>.log`` (default ``work``)."""
    logs = logs or work
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_checks", "--check", name, "--work", str(work), "--tokenizer", tok,
           "--check-json", str(result)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        (logs / f"{name}.log").write_text(log or "")
        return {"error": f"timed out after {limit:.0f} s"}
    (logs / f"{name}.log").write_text(log or "")
    if proc.returncode != 0 or not result.exists():
        last = [ln for ln in (log or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit code {proc.returncode}: {last[0][:300]}"}
    return json.loads(result.read_text())


def _run_here(name: str, s: dict[str, Any], work: Path, tok: str) -> dict[str, Any]:
    try:
        return CHECK_FUNCS[name](s, work, tok)
    except Exception as e:  # noqa: BLE001 - a failed check is a row of the report, the others still run
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = TINY if args.tiny else REAL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # scratch (the ~17 GB random checkpoint, kept for a rerun) outside OUT, which may be copied back from the machine
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "recap_gpu_checks"
    work.mkdir(parents=True, exist_ok=True)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and _cuda_visible())
    report: dict[str, Any] = {"card": card(), "commit": commit(), "date": datetime.date.today().isoformat(),
                              "tiny": args.tiny, "settings": {k: s[k] for k in ("recaption", "clip", "dit")},
                              "isolated": isolate, "checks": {}}  # fmt: skip
    print(
        f"gpu_checks on {report['card']['name']} (commit {report['commit']}, budget {args.budget_s:.0f} s)", flush=True
    )
    tok = tokenizer_folder(work, args.tokenizer)
    for name in args.checks:
        left = args.budget_s - (time.perf_counter() - t0)
        if name == "recaption_vllm" and importlib.util.find_spec("vllm") is None:
            result: dict[str, Any] = {"skipped": "vllm does not import here"}
        elif left < max(s["need_s"][name], 1):
            result = {"skipped": f"out of time ({left:.0f} s of the {args.budget_s:.0f} s budget left)"}
        else:
            t = time.perf_counter()
            limit = min(s["limit_s"][name], left)
            if isolate:
                result = _run_isolated(name, args, work, tok, limit, logs=out)
            else:
                result = _run_here(name, s, work, tok)
            result["wall_s"] = time.perf_counter() - t
        report["checks"][name] = result
        print(f"  {name}: {json.dumps(result, default=str)}", flush=True)
    report["total_s"] = time.perf_counter() - t0
    section = format_section(report)
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_checks.md").write_text(section)
    if args.doc:
        append_to_doc(Path(args.doc), section)
    print(section, flush=True)
    return report


def _cuda_visible() -> bool:
    return _device() == "cuda"


# ------------------------------------------------------------------------------------------------------ report
def _fmt(result: dict[str, Any], figure: Callable[[dict[str, Any]], str]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    if "skipped" in result:
        return f"not run: {result['skipped']}"
    return figure(result)


def format_section(report: dict[str, Any]) -> str:
    """The Markdown section appended to ``docs/gpu.md``: the card, the commit, one row per check."""
    c, s = report["checks"], report["settings"]
    r, cl, dt = s["recaption"], s["clip"], s["dit"]
    shape = "CLIP ViT-L/14-336 + LLaMA-3-8B" if r["shape"] == "llama3-8b" else f"{r['shape']} shapes"
    rec = f"{shape}, random weights, bf16, greedy, <= {r['max_new_tokens']} new tokens"

    def recaption(x: dict[str, Any]) -> str:
        return (f"**{x['images_per_s']:.2f} images/s per GPU** ({x['tokens_per_s']:,.0f} generated tokens/s, mean "
                f"{x['mean_new_tokens']:.0f} new tokens, {x['at_limit']:.0%} at the limit; {x['n']} images, batch "
                f"{x['batch_size']})")  # fmt: skip

    def step(x: dict[str, Any]) -> str:
        mem = f", peak {x['peak_gib']:.1f} GiB" if "peak_gib" in x else ""
        return (f"**{x['ms_per_step']:.1f} ms/step**, {x['samples_per_s']:,.0f} samples/s ({x['params_m']:.1f} M "
                f"params, batch {x['batch_size']}, {x['timed_steps']} timed steps{mem})")  # fmt: skip

    build = c.get("recaption_build", {"skipped": "not asked"})

    def build_figure(x: dict[str, Any]) -> str:
        return "reused from an earlier run" if x.get("reused") else f"built in {x['build_s']:.0f} s, {x['gib']:.1f} GiB"

    built = _fmt(build, build_figure)
    clip_model = cl["model"] or "tiny CLIP"
    dit_size = dt["size"] if isinstance(dt["size"], str) else "tiny DiT"
    rows = [
        ("recaption, `hf`", rec, _fmt(c.get("recaption_hf", {"skipped": "not asked"}), recaption)),
        ("recaption, `vllm`", rec, _fmt(c.get("recaption_vllm", {"skipped": "not asked"}), recaption)),
        ("Recap-CLIP train step", f"`{clip_model}`, {cl['image_size']} px, context {cl['context_length']}, "
         "bf16-mixed, AdamW, Lightning Trainer", _fmt(c.get("clip", {"skipped": "not asked"}), step)),
        ("DiT train step", f"`{dit_size}`, {dt['image_size']} px, cached latents + text features, bf16-mixed, EMA, "
         "Lightning Trainer", _fmt(c.get("dit", {"skipped": "not asked"}), step)),
    ]  # fmt: skip
    card_line = report["card"].get("nvidia_smi") or report["card"]["name"]
    title = f"### {report['date']} · {report['card']['name']} · commit {report['commit']}"
    if report["tiny"]:
        title += " · tiny shapes (a check of the code path, not a figure)"
    lines = [title, "", f"`nvidia-smi`: {card_line}; random checkpoint: {built}; whole run {report['total_s']:.0f} s.",
             "", "| check | setting | figure |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {f} |" for a, b, f in rows]
    return "\n".join(lines) + "\n"


def append_to_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else "# GPU figures\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n\n" + section)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, seconds): the code path, not the figures")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_checks"), help="json + markdown section + logs here")
    p.add_argument("--doc", default=None, help=f"append the section here (default {DOC.relative_to(ROOT)}; "
                   "none with --tiny)")  # fmt: skip
    p.add_argument("--no-doc", action="store_true", help="do not append to any doc")
    p.add_argument("--budget-s", type=float, default=440.0, help="seconds for all checks (default 440)")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one process per check (auto: where there is a GPU)")  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="LLaMA-3-style tokenizer folder (default: trained on a tiny world)"
    )
    p.add_argument("--work", default=None, help="scratch folder (default: TMPDIR/recap_gpu_checks; --tiny: a temp dir)")
    p.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)  # child mode: run one check
    p.add_argument("--check-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_doc:
        args.doc = None
    elif args.doc is None and not args.tiny:
        args.doc = str(DOC)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.check:  # a child: one check, its result as json
        s = TINY if args.tiny else REAL
        result = CHECK_FUNCS[args.check](s, Path(args.work), args.tokenizer)
        Path(args.check_json).write_text(json.dumps(result, default=str))
        return result
    if args.work is None and args.tiny:
        with tempfile.TemporaryDirectory() as work:
            args.work = work
            return run_checks(args)
    return run_checks(args)


if __name__ == "__main__":
    main()
