"""Captioner training throughput: ``CaptionerModule`` under a Lightning ``Trainer`` against a plain transformers loop.

Both sides train the SAME ``LlavaForConditionalGeneration`` (built by ``build_llava`` from configs, random init with
the same seed on the same device) on the SAME synthetic batches (``[bos] + image tokens + T text tokens``, labels on
the text, random pixels), with the same trainable parts (``--stage``: 1 = projector, 2-lora = projector + peft LoRA
r 128, 2-full = projector + LLM), AdamW, the same precision (``bf16-mixed``: autocast; ``32-true``) and the same
model dtype:

* **ours**: ``CaptionerModule`` fitted by ``L.Trainer(max_steps=N, ...)``; ``--strategy fsdp`` takes the strategy from
  ``experiments/configs/trainer/fsdp.yaml`` (the real FSDP config: one unit per decoder / encoder layer);
* **reference**: the model's own forward/backward/``AdamW.step`` in a loop (what ``transformers.Trainer`` reduces to).

Tokens/s counts every position of every sequence (image tokens included) per optimizer step, from step ``--skip`` on.
Peak memory is the accelerator's (``torch.cuda.max_memory_allocated``) where there is one.

    python -m benchmarks.captioner_step                                    # tiny shapes, CPU
    python -m benchmarks.captioner_step --shape llama3-8b --layers 4 --stage 2-lora --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14-336 + LLaMA-3-8B (PAPER.md §3), with --layers of the 32 decoder layers
    "llama3-8b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        "llm": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                    tie_word_embeddings=False, num_hidden_layers=32),
    },
    # the tiny world's captioner (tiny/captioner/*.yaml)
    "tiny": {
        "vision": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=3,
                       image_size=64, patch_size=8),
        "llm": dict(vocab_size=1088, hidden_size=160, intermediate_size=416, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, num_hidden_layers=2),
    },
}  # fmt: skip
STAGES = {"1": {}, "2-lora": {"train_llm": True, "lora": {"r": 128, "lora_alpha": 256}}, "2-full": {"train_llm": True}}


def module_args(args: argparse.Namespace) -> dict[str, Any]:
    shape = SHAPES[args.shape]
    llm = dict(shape["llm"])
    if args.layers:
        llm["num_hidden_layers"] = args.layers
    return dict(
        vision_tower=shape["vision"], llm=llm, tokenizer=args.tokenizer, lr=1e-5, warmup_ratio=0.0,
        max_length=4096, dtype=args.dtype, grad_checkpointing=args.grad_checkpointing,
        attn_implementation="sdpa", **STAGES[args.stage],
    )  # fmt: skip


def batches(args: argparse.Namespace, n: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vision = SHAPES[args.shape]["vision"]
    size = vision["image_size"]
    n_img = (size // vision["patch_size"]) ** 2  # vision_feature_select_strategy "default": no class token
    out = []
    for _ in range(n):
        text = torch.randint(10, len(tok), (args.batch_size, args.text_len), generator=g)
        img = torch.full((args.batch_size, n_img), tok.convert_tokens_to_ids("<image>"))
        bos = torch.full((args.batch_size, 1), tok.bos_token_id)
        ids = torch.cat([bos, img, text], 1)
        labels = torch.cat([torch.full((args.batch_size, 1 + n_img), -100), text], 1)
        pixels = torch.randn(args.batch_size, 3, size, size, generator=g)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        out.append(batch | {"n_truncated": 0})
    return out


class _Timer:
    def __init__(self, sync):
        self.times, self.sync = [], sync

    def __call__(self, *_: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter())


def _fsdp_strategy() -> Any:
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    spec = yaml.safe_load((ROOT / "experiments/configs/trainer/fsdp.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": spec})).strategy


def build(args):
    """The module, built with the same seed on the benchmark device (random init of billions of parameters is
    minutes on a CPU and seconds on a GPU), so both sides start from identical weights."""
    from lightning_modules.captioner import CaptionerModule

    torch.manual_seed(0)
    m = CaptionerModule(**module_args(args))
    with torch.device(args.device):
        m.configure_model()
    return m


def run_ours(args, data) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    m = build(args)
    timer = _Timer(_sync(args))

    class Hook(L.Callback):
        def on_train_batch_end(self, *a: Any) -> None:
            timer()

    strategy = _fsdp_strategy() if args.strategy == "fsdp" else "auto"
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, strategy=strategy, precision=args.precision,
        max_steps=len(data), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Hook()],
    )  # fmt: skip
    trainer.fit(m, DataLoader(data, batch_size=None, shuffle=False))
    return _summary(timer.times, args)


def run_reference(args, data) -> dict[str, Any]:
    model = build(args).model
    model.to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    timer = _Timer(_sync(args))
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    for b in data:
        inputs = {k: v.to(args.device) for k, v in b.items() if k != "n_truncated"}
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer()
    return _summary(timer.times, args)


def _sync(args):
    return torch.cuda.synchronize if args.device == "cuda" else (lambda: None)


def _summary(times: list[float], args) -> dict[str, Any]:
    k = args.skip
    per_step = (times[-1] - times[k - 1]) / (len(times) - k)
    tokens = args.batch_size * args.tokens_per_sample
    out = {"s_per_step": per_step, "tokens_per_s": tokens / per_step}
    if args.device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.captioner_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    p.add_argument("--stage", choices=sorted(STAGES), default="1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    p.add_argument("--dtype", default=None, help="weights dtype of the towers (bfloat16 for frozen ones)")
    p.add_argument("--strategy", choices=("auto", "fsdp"), default="auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--tokenizer", default=str(ROOT / "data/world/tokenizer"))
    p.add_argument("--impls", default="ours,reference")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    warnings.filterwarnings("ignore")
    data = batches(args, args.steps)
    args.tokens_per_sample = data[0]["input_ids"].shape[1]
    m = build(args)
    trainable = sum(p.numel() for p in m.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in m.model.parameters())
    del m
    results: dict[str, Any] = {}
    for impl in args.impls.split(","):
        results[impl] = (run_ours if impl == "ours" else run_reference)(args, data)
        if args.device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    report = {
        "shape": args.shape, "layers": args.layers or SHAPES[args.shape]["llm"]["num_hidden_layers"],
        "stage": args.stage, "strategy": args.strategy, "precision": args.precision, "dtype": args.dtype,
        "batch_size": args.batch_size, "tokens_per_sample": args.tokens_per_sample, "params": total,
        "trainable": trainable, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **{f"{impl}_{k}": v for impl, r in results.items() for k, v in r.items()},
    }  # fmt: skip
    if "ours" in results and "reference" in results:
        report["ratio_time_ours_over_reference"] = results["ours"]["s_per_step"] / results["reference"]["s_per_step"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) and not math.isnan(v) else v for k, v in report.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
