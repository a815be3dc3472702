"""``python -m experiments tiny-llm``: the tiny world's stand-in for LLaMA-3-8B, a text-pretrained Llama.

LLaVA composes a *pretrained* LLM with a vision tower; stage 1 trains only the projector and relies on the LLM already
knowing the language. In the tiny world nothing is pretrained, so this step trains a small ``LlamaForCausalLM`` on the
world's text (web alt-text, LLaVA-Pretrain captions, instruction turns; never the evaluation sets) and saves it with
``save_pretrained`` next to the world tokenizer. The captioner then loads it by path, through the same code path as
``meta-llama/Meta-Llama-3-8B-Instruct``.

Like Meta-Llama-3-8B-*Instruct*, the model also learns the chat format: the world's conversations (LLaVA-Pretrain and
instruction sets, with the ``<image>`` placeholder removed) are rendered with the tokenizer's LLaMA-3 chat template
and trained on whole. Without this, stage 1 (projector only) has a frozen LLM that has never seen a chat turn.

This is world preparation, not an experiment of the paper, so it is a short plain PyTorch loop (next-token loss
from transformers' model, AdamW, cosine) rather than a LightningModule.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _conversations(world: Path) -> list[list[dict]]:
    from datamodules.tiny_world.tokenizer import CONVERSATION_FILES, conversations

    missing = [str(world / rel) for rel in CONVERSATION_FILES if not (world / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"tiny-llm trains on the world's conversations; missing: {missing}")
    return list(conversations(world))


def world_conversations(world_dir: str | Path) -> list[list[dict[str, str]]]:
    """The caption_pretrain / instruct conversations as chat messages, ``<image>`` removed."""
    from datamodules.chat import llava_to_messages

    out = []
    for conv in _conversations(Path(world_dir)):
        messages = llava_to_messages(conv, where=str(world_dir))
        out.append([{**m, "content": m["content"].replace("<image>", "").strip()} for m in messages])
    return out


def world_texts(world_dir: str | Path) -> list[str]:
    """Training text: alt-texts of the web shards and every turn of the caption_pretrain / instruct json."""
    from datamodules.tiny_world.tokenizer import web_alt_texts

    world = Path(world_dir)
    texts = web_alt_texts(world)
    texts += [turn["value"].replace("<image>", "").strip() for conv in _conversations(world) for turn in conv]
    return [t for t in texts if t]


def tiny_llama_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kwargs = {
        "vocab_size": int(math.ceil(len(tokenizer) / 64) * 64),
        "hidden_size": 160,
        "intermediate_size": 416,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def pretrain_tiny_llm(
    world_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
    chat: bool = True,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Train and ``save_pretrained`` (model + tokenizer) into ``out_dir``; returns a small report."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|end_of_text|>")
    docs = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], end] for t in world_texts(world_dir)]
    if chat:
        chats = world_conversations(world_dir)
        docs += [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in chats]
    model = LlamaForCausalLM(tiny_llama_config(tok, **config_overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    rng = random.Random(seed)
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        batch = [docs[rng.randrange(len(docs))] for _ in range(batch_size)]
        n = max(len(d) for d in batch)
        ids = torch.full((batch_size, n), tok.pad_token_id)
        labels = torch.full((batch_size, n), -100)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = labels[i, : len(d)] = torch.tensor(d)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"tiny-llm step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = {
        "steps": steps,
        "docs": len(docs),
        "first_loss": losses[0],
        "last_loss": sum(losses[-50:]) / 50,
        "seconds": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "tiny_llm.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments tiny-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--tokenizer", required=True, help="the world tokenizer folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="raw text only (no chat-formatted conversations)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if (Path(args.out) / "tiny_llm.json").is_file() and not args.overwrite:
        print(f"{args.out} exists (tiny_llm.json); --overwrite to retrain")
        return json.loads((Path(args.out) / "tiny_llm.json").read_text())
    report = pretrain_tiny_llm(
        args.world, args.tokenizer, args.out, args.steps, args.batch_size, args.lr, args.seed, chat=not args.no_chat
    )
    print(json.dumps(report))
    return report
