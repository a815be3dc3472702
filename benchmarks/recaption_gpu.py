"""Recaptioning throughput of the real LLaVA-LLaMA3-8B architecture (CLIP ViT-L/14-336 + LLaMA-3-8B, random weights)
per GPU, on the ``hf`` and ``vllm`` backends of the recaption job, with the paper's decoding (greedy, at most 128 new
tokens); ``docs/recaption.md``. The random checkpoint is built once into ``--model-dir``; random weights seldom emit
the end-of-turn token, so the figure is a lower bound for real captions. ``--shape tiny``: the same code on CPU.

    python -m benchmarks.recaption_gpu --model-dir /tmp/llava-llama3-8b-random --backends hf vllm \
        --n 1024 --batch-size 256 --dtype bfloat16 --json runs/bench/recaption_gpu.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import ROOT, device_name, free_memory, parser, sync, write_json


def build_random_checkpoint(model_dir: Path, shape: str, layers: int, tokenizer: str, dtype: str) -> None:
    from transformers import AutoTokenizer

    from benchmarks.captioner_step import SHAPES
    from lightning_modules.components.llava import build_llava, save_llava

    llm = SHAPES[shape]["llm"] | ({"num_hidden_layers": layers} if layers else {})
    tok_dir = model_dir / "_tokenizer"
    tok = AutoTokenizer.from_pretrained(tokenizer)
    # every id of the LM head must decode (vLLM detokenizes as it goes): pad the vocabulary with plain tokens
    tok.add_tokens([f"<pad_{i}>" for i in range(llm["vocab_size"] - len(tok) - 8)])
    tok.save_pretrained(tok_dir)
    torch.manual_seed(0)
    model = build_llava(vision_tower=SHAPES[shape]["vision"], llm=llm, tokenizer=str(tok_dir), dtype=dtype)
    save_llava(model, model_dir)


def throughput(model_dir: Path, backend: str, n: int, batch_size: int, max_new_tokens: int, **kw: Any) -> dict:
    """Images/s and generated tokens/s of one backend of the recaption job on ``n`` random images (after a warm-up);
    ``kw``: the backend's ``device`` / ``dtype``."""
    from experiments.jobs.recaption import BACKENDS, PAPER_PROMPT

    size = json.loads((model_dir / "config.json").read_text())["vision_config"]["image_size"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    engine = BACKENDS[backend](str(model_dir), PAPER_PROMPT, max_new_tokens, **kw)
    engine.generate(images[: min(8, n)])  # warm-up (kernels, graphs, allocator)
    sync()
    t0 = time.perf_counter()
    out = [g for i in range(0, n, batch_size) for g in engine.generate(images[i : i + batch_size])]
    dt = time.perf_counter() - t0
    del engine
    free_memory()
    tokens = sum(g.n_tokens for g in out)
    figures = {"images_per_s": n / dt, "tokens_per_s": tokens / dt, "mean_new_tokens": tokens / n}
    return figures | {"at_limit": sum(g.hit_limit for g in out) / n, "seconds": dt}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser("recaption_gpu", __doc__)
    p.add_argument("--model-dir", required=True, help="random checkpoint folder (built when missing)")
    p.add_argument("--shape", choices=["llama3-8b", "tiny"], default="llama3-8b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: all of the shape's)")
    p.add_argument("--tokenizer", default=str(ROOT / "data/world/tokenizer"))
    p.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--n", type=int, default=1024, help="images timed per backend")
    p.add_argument("--batch-size", type=int, default=256, help="images per generate call")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        build_random_checkpoint(model_dir, args.shape, args.layers, args.tokenizer, args.dtype)
        print(f"built {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    device = device_name()
    report: dict[str, Any] = {"device": device, "shape": args.shape, "layers": args.layers or "all", "n": args.n}
    report |= {"dtype": args.dtype, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    for name in args.backends:
        kw = {"device": args.device, "dtype": args.dtype}
        report[name] = r = throughput(model_dir, name, args.n, args.batch_size, args.max_new_tokens, **kw)
        figures = f"{r['images_per_s']:.1f} images/s, {r['tokens_per_s']:,.0f} generated tokens/s"
        print(f"{name}: {figures} (mean {r['mean_new_tokens']:.1f} new tokens) on {device}", flush=True)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
