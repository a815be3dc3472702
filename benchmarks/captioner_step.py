"""Captioner training throughput: ``CaptionerModule`` under a Lightning ``Trainer`` against a plain transformers loop.

Both sides train the same ``LlavaForConditionalGeneration`` (same seed, device, synthetic batches, trainable parts,
AdamW, precision and dtype). Tokens/s counts every position (image tokens included) per optimizer step from step
``--skip`` on. Details and figures: ``benchmarks/README.md``, ``docs/captioner.md``.

    python -m benchmarks.captioner_step                                    # tiny shapes, CPU
    python -m benchmarks.captioner_step --shape llama3-8b --layers 4 --stage 2-lora --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from benchmarks.common import ROOT, StepStamps, device_name, free_memory, parser, peak_gib, quiet, timed_fit, write_json

# CLIP ViT-L/14-336 + LLaMA-3-8B (PAPER.md §3), with --layers of the 32 decoder layers
VISION_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
VISION_L14_336 |= {"image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}
LLAMA3_8B |= {"num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192}
LLAMA3_8B |= {"tie_word_embeddings": False, "num_hidden_layers": 32}
# the tiny world's captioner (tiny/captioner/*.yaml)
TINY_VISION = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 3}
TINY_VISION |= {"image_size": 64, "patch_size": 8}
TINY_LLM = {"vocab_size": 1088, "hidden_size": 160, "intermediate_size": 416, "num_attention_heads": 4}
TINY_LLM |= {"num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}
TINY_LLM["num_hidden_layers"] = 2
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"vision": VISION_L14_336, "llm": LLAMA3_8B},
    "tiny": {"vision": TINY_VISION, "llm": TINY_LLM},
}
STAGES = {"1": {}, "2-lora": {"train_llm": True, "lora": {"r": 128, "lora_alpha": 256}}, "2-full": {"train_llm": True}}


def module_args(args: argparse.Namespace) -> dict[str, Any]:
    shape = SHAPES[args.shape]
    llm = shape["llm"] | ({"num_hidden_layers": args.layers} if args.layers else {})
    training = {"lr": 1e-5, "warmup_ratio": 0.0, "max_length": 4096, "grad_checkpointing": args.grad_checkpointing}
    model = {"vision_tower": shape["vision"], "llm": llm, "tokenizer": args.tokenizer, "dtype": args.dtype}
    return model | training | {"attn_implementation": "sdpa"} | STAGES[args.stage]


def batches(args: argparse.Namespace, n: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vision = SHAPES[args.shape]["vision"]
    size, b = vision["image_size"], args.batch_size
    n_img = (size // vision["patch_size"]) ** 2  # vision_feature_select_strategy "default": no class token
    out = []
    for _ in range(n):
        text = torch.randint(10, len(tok), (b, args.text_len), generator=g)
        img = torch.full((b, n_img), tok.convert_tokens_to_ids("<image>"))
        ids = torch.cat([torch.full((b, 1), tok.bos_token_id), img, text], 1)
        labels = torch.cat([torch.full((b, 1 + n_img), -100), text], 1)
        pixels = torch.randn(b, 3, size, size, generator=g)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
        out[-1]["n_truncated"] = 0
    return out


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


def run_ours(args, data) -> StepStamps:
    strategy = _fsdp_strategy() if args.strategy == "fsdp" else "auto"
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return timed_fit(build(args), data, len(data), accelerator=accelerator, strategy=strategy, precision=args.precision)


def run_reference(args, data) -> StepStamps:
    model = build(args).model
    model.to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    stamps = StepStamps()
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    for b in data:
        inputs = {k: v.to(args.device) for k, v in b.items() if k != "n_truncated"}
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.stamp()
    return stamps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser("captioner_step", __doc__)
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
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    with quiet():
        data = batches(args, args.steps)
        per_sample = data[0]["input_ids"].shape[1]
        m = build(args)
        trainable = sum(p.numel() for p in m.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in m.model.parameters())
        del m
        peak_gib()
        layers = args.layers or SHAPES[args.shape]["llm"]["num_hidden_layers"]
        report: dict[str, Any] = {"shape": args.shape, "layers": layers}
        report |= {k: getattr(args, k) for k in ("stage", "strategy", "precision", "dtype", "batch_size")}
        report |= {"tokens_per_sample": per_sample, "params": total, "trainable": trainable}
        report["device"] = device_name() if args.device == "cuda" else "cpu"
        for impl in args.impls.split(","):
            per_step = (run_ours if impl == "ours" else run_reference)(args, data).seconds_per_step(args.skip)
            result = {"s_per_step": per_step, "tokens_per_s": args.batch_size * per_sample / per_step} | peak_gib()
            report |= {f"{impl}_{k}": v for k, v in result.items()}
            free_memory()
        if "ours_s_per_step" in report and "reference_s_per_step" in report:
            report["ratio_time_ours_over_reference"] = report["ours_s_per_step"] / report["reference_s_per_step"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) and not math.isnan(v) else v for k, v in report.items()}))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
