"""The tiny world's LLaMA-3 analog: its tokenizer (``world-tokenizer``) and a text-pretrained Llama (``tiny-llm``).

The tokenizer is a byte-level BPE trained on every text of one world, with the LLaMA-3 special tokens, ``<image>``
and the LLaMA-3 LLaVA chat template (tiny_world/README.md, "Captioner tokenizer"). The Llama stands in for the
pretrained LLM that LLaVA's stage 1 (projector only) relies on: trained on the world's text and, like
Meta-Llama-3-8B-Instruct, its conversations in the chat format. World preparation: plain PyTorch, no LightningModule.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules import chat
from datamodules.tiny_world.text import PROMPTS
from datamodules.tiny_world.writer import (
    CONVERSATION_FILES,
    conversations,
    web_alt_texts,
    world_fingerprint,
    world_texts,
)

RECIPE_VERSION = 2  # 2: LLaMA-3 pre-tokenizer split (newline runs are one piece); bump to rebuild saved tokenizers
STAMP_NAME = "world_tokenizer.json"
_OWN_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", STAMP_NAME)
# Meta-Llama-3's pre-tokenizer pattern (its tokenizer.json, = tiktoken's cl100k). It keeps a run of newlines one piece
# whatever follows (`\s*[\r\n]+`), so "<|end_header_id|>\n\n" tokenizes the same at the end of a generation prompt
# and before a reply. GPT-2's pattern (ByteLevel's default) splits "\n\nIn" into "\n", "\n", "In" but leaves a
# trailing "\n\n" whole: a captioner trained on the first and prompted with the second skipped its opening words.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def special_tokens() -> list[str]:
    """The special tokens in id order: bos, the other LLaMA-3 tokens, pad, ``<image>`` (ids 0..6)."""
    s = chat.LLAMA3_SPECIAL_TOKENS
    tokens = (s["bos_token"], *chat.LLAMA3_ADDITIONAL_TOKENS, s["eos_token"], s["pad_token"], chat.IMAGE_TOKEN)
    return list(dict.fromkeys(tokens))


def _training_pieces(world: Path) -> Iterator[str]:
    """What the BPE trains on: texts cut at the special tokens, as the tokenizer will see them when encoding;
    conversations as ``LLAMA3_LLAVA_CHAT_TEMPLATE`` renders them (string content: trimmed, no generation prompt)."""
    split = re.compile("|".join(re.escape(t) for t in special_tokens()))
    conversation_values = set()
    for conv in conversations(world):
        conversation_values.update(turn["value"] for turn in conv)
        parts = [chat.LLAMA3_SPECIAL_TOKENS["bos_token"]]
        for turn in chat.llava_to_messages(conv):
            parts.append(f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n{turn['content'].strip()}<|eot_id|>")
        yield from (p for p in split.split("".join(parts)) if p)
    for text in world_texts(world):
        if text not in conversation_values:  # already seen, in context, above
            yield from (p for p in split.split(text) if p)


def _stamp(world: Path, vocab_size: int, model_max_length: int) -> dict:
    return {
        "recipe_version": RECIPE_VERSION,
        "world_fingerprint": world_fingerprint(world, prompts=list(PROMPTS)),
        "vocab_size": int(vocab_size),
        "model_max_length": int(model_max_length),
    }


def _current(out: Path, stamp: dict) -> bool:
    """True if ``out`` holds a tokenizer this recipe made from the same world and settings."""
    if not ((out / STAMP_NAME).is_file() and (out / "tokenizer.json").is_file()):
        return False
    try:
        saved = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in stamp.items())


def _train_bpe(pieces: Iterator[str], vocab_size: int, model_max_length: int) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [AddedToken(t, special=True, normalized=False) for t in special_tokens()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer)
    tok.add_special_tokens(specials)  # added (never split); the trainer already put them at ids 0..6
    s = chat.LLAMA3_SPECIAL_TOKENS
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=s["bos_token"],
        eos_token=s["eos_token"],
        pad_token=s["pad_token"],
        additional_special_tokens=[t for t in special_tokens() if t not in s.values()],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat.LLAMA3_LLAVA_CHAT_TEMPLATE
    return hf


def train_world_tokenizer(
    world_dir: str | Path,
    out_dir: str | Path,
    vocab_size: int = 1024,
    *,
    model_max_length: int = 1024,
    overwrite: bool = False,
) -> Any:
    """Train the world's byte-level BPE, ``save_pretrained`` it to ``out_dir`` and return it.

    A tokenizer already in ``out_dir`` with the same stamp (world, settings) is loaded instead, unless ``overwrite``;
    one with another stamp is an error unless ``overwrite``. ``vocab_size`` counts the 7 special tokens and 256 bytes.
    """
    from transformers import AutoTokenizer

    world, out = Path(world_dir), Path(out_dir)
    if vocab_size < 256 + len(special_tokens()):
        raise ValueError(f"vocab_size must be >= {256 + len(special_tokens())} (bytes + special tokens)")
    stamp = _stamp(world, vocab_size, model_max_length)
    if not overwrite and _current(out, stamp):
        return AutoTokenizer.from_pretrained(str(out))
    if not overwrite and any((out / f).exists() for f in _OWN_FILES):
        raise FileExistsError(
            f"{out} holds a tokenizer made from another world or with other settings; pass overwrite=True "
            "(--overwrite) to replace it"
        )
    t0 = time.perf_counter()
    hf = _train_bpe(_training_pieces(world), vocab_size, model_max_length)
    out.mkdir(parents=True, exist_ok=True)
    for f in _OWN_FILES:
        (out / f).unlink(missing_ok=True)
    hf.save_pretrained(str(out))
    seconds = round(time.perf_counter() - t0, 3)
    stamp.update(world=str(world.resolve()), realised_vocab_size=len(hf), train_seconds=seconds)
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")  # last: marks the directory complete
    return hf


def tokenizer_main(argv: Sequence[str] | None = None) -> dict:
    """``python -m experiments world-tokenizer --world DIR --out DIR [--vocab-size N] [--overwrite]``."""
    ap = argparse.ArgumentParser(prog="world-tokenizer", description="Train the captioner's BPE on a world's texts.")
    ap.add_argument("--world", required=True, help="tiny world directory (generate_world output)")
    ap.add_argument("--out", required=True, help="output directory (AutoTokenizer.from_pretrained loads it)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size, special tokens and bytes included")
    ap.add_argument("--model-max-length", type=int, default=1024, help="tokenizer max length")
    ap.add_argument("--overwrite", action="store_true", help="retrain even if --out already holds this tokenizer")
    a = ap.parse_args(argv)
    skipped = not a.overwrite and _current(Path(a.out), _stamp(Path(a.world), a.vocab_size, a.model_max_length))
    tok = train_world_tokenizer(
        a.world, a.out, a.vocab_size, model_max_length=a.model_max_length, overwrite=a.overwrite
    )
    stamp = json.loads((Path(a.out) / STAMP_NAME).read_text(encoding="utf-8"))
    summary = {"out": str(a.out), "vocab_size": len(tok), "skipped": skipped, **stamp}
    print(json.dumps(summary, indent=1))
    return summary


def _conversations(world: Path) -> list[list[dict]]:
    missing = [str(world / rel) for rel in CONVERSATION_FILES if not (world / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"tiny-llm trains on the world's conversations; missing: {missing}")
    return list(conversations(world))


def world_conversations(world_dir: str | Path) -> list[list[dict[str, str]]]:
    """The caption_pretrain / instruct conversations as chat messages, ``<image>`` removed."""
    out = []
    for conv in _conversations(Path(world_dir)):
        messages = chat.llava_to_messages(conv, where=str(world_dir))
        out.append([{**m, "content": m["content"].replace("<image>", "").strip()} for m in messages])
    return out


def llm_texts(world_dir: str | Path) -> list[str]:
    """Training text: alt-texts of the web shards and every turn of the caption_pretrain / instruct json."""
    world = Path(world_dir)
    texts = web_alt_texts(world)
    texts += [turn["value"].replace("<image>", "").strip() for conv in _conversations(world) for turn in conv]
    return [t for t in texts if t]


def tiny_llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    sizes = dict(hidden_size=160, intermediate_size=416, num_hidden_layers=2, num_attention_heads=4)
    sizes |= dict(num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    return LlamaConfig(vocab_size=math.ceil(len(tokenizer) / 64) * 64, **sizes, **ids)


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
) -> dict[str, Any]:
    """Train and ``save_pretrained`` (model + tokenizer) into ``out_dir``; returns a small report."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|end_of_text|>")
    docs = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], end] for t in llm_texts(world_dir)]
    if chat:
        chats = world_conversations(world_dir)
        docs += [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in chats]
    model = LlamaForCausalLM(tiny_llama_config(tok))
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
    report = {"steps": steps, "docs": len(docs), "first_loss": losses[0], "last_loss": sum(losses[-50:]) / 50}
    report |= {"seconds": round(time.perf_counter() - t0, 1), "params": sum(p.numel() for p in model.parameters())}
    (out / "tiny_llm.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments tiny-llm", description="Text-pretrain the tiny Llama.")
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--tokenizer", required=True, help="the world tokenizer folder")
    parser.add_argument("--out", required=True)
    for flag, default in (("--steps", 800), ("--batch-size", 64), ("--lr", 2e-3), ("--seed", 0)):
        parser.add_argument(flag, type=type(default), default=default)
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
