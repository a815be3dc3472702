"""A small byte-level BPE tokenizer for the LLaVA captioner, trained on a tiny world's own texts.

The captioner's language model is tiny and trained from scratch, so a 128k LLaMA-3 vocabulary would be almost all
unused embedding rows. :func:`train_world_tokenizer` trains a byte-level BPE (``tokenizers``) on every text of one
world and wraps it as a ``transformers`` fast tokenizer with the LLaMA-3 special tokens, LLaVA's ``<image>`` and
the LLaMA-3 LLaVA chat template (``datamodules/chat.py``), so ``ConversationEncoder`` and
``LlavaForConditionalGeneration`` use it exactly like a real LLaMA-3 tokenizer.

* Byte level, with the full 256-byte initial alphabet: any text is encodable and ``decode(encode(t)) == t``.
* The special tokens come first (ids 0-6, ``SPECIAL_TOKENS`` order) and are never split. The post-processor adds
  nothing: the chat template writes ``<|begin_of_text|>`` itself, so a rendered conversation has exactly one bos.
* Conversations are trained on as the chat template renders them, cut at the special tokens (the pieces the
  tokenizer actually sees: role names, ``"\\n\\n" + content``, ``"\\n" + question``), so the header newlines and
  prompts get their own merges. Alt-texts, captions, recaptions, long captions, class names and the prompts of
  ``text.py`` are trained on as they are.
* Deterministic: the same world and vocabulary size give an identical vocabulary and merge list.

``OUT/world_tokenizer.json`` records the world fingerprint (``world.json`` without wall-clock fields, plus the
prompts) and the vocabulary size; a second call with the same inputs reuses the saved tokenizer.

CLI: ``python -m datamodules.tiny_world.tokenizer --world DIR --out DIR [--vocab-size 1024] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .text import BRIEF_PROMPTS, DETAIL_PROMPTS, RECAPTION_PROMPT, SHORT_CAPTION_PROMPTS, SINGLE_WORD_SUFFIX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["RECIPE_VERSION", "STAMP_NAME", "main", "train_world_tokenizer", "world_fingerprint", "world_texts"]

RECIPE_VERSION = 2  # 2: LLaMA-3 pre-tokenizer split (newline runs are one piece)
"""Bump when the corpus or the training recipe changes, so saved tokenizers are rebuilt."""
STAMP_NAME = "world_tokenizer.json"
DEFAULT_MODEL_MAX_LENGTH = 1024
_PROMPTS: tuple[str, ...] = (RECAPTION_PROMPT, *DETAIL_PROMPTS, *SHORT_CAPTION_PROMPTS, *BRIEF_PROMPTS,
                             SINGLE_WORD_SUFFIX)  # fmt: skip
_WALL_CLOCK_CONFIG = ("workers", "chunk_size", "start_method")  # config keys that never change the world's content
_OWN_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", STAMP_NAME)


def _chat() -> Any:
    """``datamodules.chat``, imported on use (it imports torch; this module should not)."""
    from datamodules import chat

    return chat


def special_tokens() -> list[str]:
    """The special tokens in id order: bos, the other LLaMA-3 tokens, pad, ``<image>`` (ids 0..6)."""
    chat = _chat()
    s = chat.LLAMA3_SPECIAL_TOKENS
    out: list[str] = []
    for t in (s["bos_token"], *chat.LLAMA3_ADDITIONAL_TOKENS, s["eos_token"], s["pad_token"], chat.IMAGE_TOKEN):
        if t not in out:
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------------------- corpus


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


CONVERSATION_FILES = ("caption_pretrain/chat.json", "instruct/llava_instruct.json")


def conversations(world: Path) -> Iterator[list[dict]]:
    """The LLaVA-format conversations (turn lists) of the world's caption_pretrain and instruct sets, if present."""
    for rel in CONVERSATION_FILES:
        p = world / rel
        if p.is_file():
            for sample in _read_json(p):
                yield sample["conversations"]


def web_alt_texts(world: Path) -> list[str]:
    """The alt-texts of the web shards' successful samples (their ``.txt``), from img2dataset's per-shard parquet."""
    texts: list[str] = []
    for shard in sorted((world / "web").glob("*.parquet")):
        t = pq.read_table(shard, columns=["caption", "status"]).to_pydict()
        texts += [c for c, s in zip(t["caption"], t["status"], strict=True) if s == "success" and c is not None]
    return texts


def world_texts(world_dir: str | os.PathLike) -> list[str]:
    """Every text of the world, as stored (conversation values keep their ``<image>``), in a fixed order.

    Web alt-texts (``web/*.parquet`` ``caption`` of successful samples, i.e. the tars' ``.txt``), caption-pretrain
    and instruct conversation values, t2i captions and recaptions (detailed descriptions), retrieval sentences, long
    captions, class names (coarse and fine) and the prompts of ``text.py``.
    """
    world = Path(world_dir)
    if not (world / "world.json").is_file():
        raise FileNotFoundError(f"{world} is not a tiny world (no world.json)")
    texts = web_alt_texts(world)
    for conv in conversations(world):
        texts += [turn["value"] for turn in conv]
    prompts = world / "eval/t2i_prompts/prompts.parquet"
    if prompts.is_file():
        t = pq.read_table(prompts, columns=["caption", "recaption"]).to_pydict()
        texts += t["caption"] + t["recaption"]
    retrieval = world / "eval/retrieval/dataset.json"
    if retrieval.is_file():
        texts += [s["raw"] for img in _read_json(retrieval)["images"] for s in img["sentences"]]
    long_dir = world / "eval/long_retrieval/caption"
    if long_dir.is_dir():
        files = sorted(long_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
        texts += [p.read_text(encoding="utf-8") for p in files]
    for name in ("classnames.json", "fine_classnames.json"):
        p = world / "eval/classify" / name
        if p.is_file():
            texts += list(_read_json(p))
    texts += list(_PROMPTS)
    return texts


def _render(conv: list[dict]) -> str:
    """A LLaVA conversation as ``LLAMA3_LLAVA_CHAT_TEMPLATE`` renders it (string content: trimmed, no prompt)."""
    chat = _chat()
    parts = [chat.LLAMA3_SPECIAL_TOKENS["bos_token"]]
    for turn in chat.llava_to_messages(conv):
        parts.append(f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n{turn['content'].strip()}<|eot_id|>")
    return "".join(parts)


def _training_pieces(world: Path) -> Iterator[str]:
    """What the BPE trains on: texts cut at the special tokens, as the tokenizer will see them when encoding."""
    split = re.compile("|".join(re.escape(t) for t in special_tokens()))
    conversation_values = set()
    for conv in conversations(world):
        conversation_values.update(turn["value"] for turn in conv)
        yield from (p for p in split.split(_render(conv)) if p)
    for text in world_texts(world):
        if text not in conversation_values:  # already seen, in context, above
            yield from (p for p in split.split(text) if p)


# ----------------------------------------------------------------------------------------------- fingerprint


def world_fingerprint(world_dir: str | os.PathLike) -> str:
    """sha256 of what determines the world's texts: ``world.json`` minus wall-clock fields, plus the prompts.

    Reads one small file, so checking whether a saved tokenizer is current costs nothing.
    """
    meta = _read_json(Path(world_dir) / "world.json")
    config = {k: v for k, v in meta.get("config", {}).items() if k not in _WALL_CLOCK_CONFIG}
    key = {
        "format_version": meta.get("format_version"),
        "name": meta.get("name"),
        "seed": meta.get("seed"),
        "config": config,
        "counts": meta.get("counts"),
        "web": meta.get("web"),
        "prompts": list(_PROMPTS),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _stamp(world: Path, vocab_size: int, model_max_length: int) -> dict:
    return {
        "recipe_version": RECIPE_VERSION,
        "world_fingerprint": world_fingerprint(world),
        "vocab_size": int(vocab_size),
        "model_max_length": int(model_max_length),
    }


def _current(out: Path, stamp: dict) -> bool:
    """True if ``out`` holds a tokenizer this recipe made from the same world and settings."""
    p = out / STAMP_NAME
    if not (p.is_file() and (out / "tokenizer.json").is_file()):
        return False
    try:
        saved = _read_json(p)
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in stamp.items())


# ---------------------------------------------------------------------------------------------------- training


# Meta-Llama-3's pre-tokenizer pattern (its tokenizer.json, = tiktoken's cl100k). It keeps a run of newlines one piece
# whatever follows (`\s*[\r\n]+`), so "<|end_header_id|>\n\n" tokenizes the same at the end of a generation prompt
# and before a reply. GPT-2's pattern (ByteLevel's default) splits "\n\nIn" into "\n", "\n", "In" but leaves a
# trailing "\n\n" whole: a captioner trained on the first and prompted with the second skipped its opening words.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def _train_bpe(pieces: Iterator[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Regex

    specials = special_tokens()
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
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer)
    # Added (never split) and special; the trainer already put them at ids 0..len(specials)-1.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    chat = _chat()
    s = chat.LLAMA3_SPECIAL_TOKENS
    extra = [t for t in special_tokens() if t not in s.values()]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=s["bos_token"],
        eos_token=s["eos_token"],
        pad_token=s["pad_token"],
        additional_special_tokens=extra,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat.LLAMA3_LLAVA_CHAT_TEMPLATE
    return hf


def train_world_tokenizer(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Train the world's byte-level BPE, save it to ``out_dir`` (``save_pretrained``) and return it.

    If ``out_dir`` already holds a tokenizer made by this recipe from the same world (``world_fingerprint``),
    ``vocab_size`` and ``model_max_length``, it is loaded and returned without retraining, unless ``overwrite``.
    A tokenizer there from anything else is an error unless ``overwrite`` (which replaces only the tokenizer files).
    ``vocab_size`` counts the 7 special tokens and the 256 bytes; a small world may stop short of it (no more pairs).
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
    hf = _wrap(_train_bpe(_training_pieces(world), vocab_size), model_max_length)
    out.mkdir(parents=True, exist_ok=True)
    for f in _OWN_FILES:
        (out / f).unlink(missing_ok=True)
    hf.save_pretrained(str(out))
    stamp.update(
        world=str(world.resolve()),
        realised_vocab_size=len(hf),
        train_seconds=round(time.perf_counter() - t0, 3),
    )
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")  # last: marks the directory complete
    return hf


def main(argv: list[str] | None = None) -> dict:
    """``python -m datamodules.tiny_world.tokenizer --world DIR --out DIR [--vocab-size N] [--overwrite]``."""
    ap = argparse.ArgumentParser(
        prog="world-tokenizer",
        description="Train the LLaVA captioner's byte-level BPE tokenizer on a tiny world's texts.",
    )
    ap.add_argument("--world", required=True, help="tiny world directory (generate_world output)")
    ap.add_argument("--out", required=True, help="output directory (AutoTokenizer.from_pretrained loads it)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size, special tokens and bytes included")
    ap.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH, help="tokenizer max length")
    ap.add_argument("--overwrite", action="store_true", help="retrain even if --out already holds this tokenizer")
    a = ap.parse_args(argv)
    stamp = _stamp(Path(a.world), a.vocab_size, a.model_max_length)
    skipped = not a.overwrite and _current(Path(a.out), stamp)
    tok = train_world_tokenizer(
        a.world, a.out, a.vocab_size, model_max_length=a.model_max_length, overwrite=a.overwrite
    )
    summary = {"out": str(a.out), "vocab_size": len(tok), "skipped": skipped, **_read_json(Path(a.out) / STAMP_NAME)}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
