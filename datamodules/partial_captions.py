"""Partial captions: a part of a long caption fed to the text encoder (CLIPS's "inverse effect": a CLIP learns more
from part of a long synthetic caption than from all of it; OpenVision samples parts the same way).

Modes (:class:`PartialSpec`): ``first``, the first ``k`` sentences (OpenVision ``first``); ``random``, ``k`` sentences
drawn without replacement, kept in caption order (OpenVision ``random``, CLIPS's sub-caption mask); ``block``, ``n``
contiguous words from a random start (OpenVision ``block``; CLIPS's ``simple`` reduction mask keeps a random
contiguous block of ``context_length - 2`` tokens, here counted in words so the part is text that every tokenizer can
encode). A caption of one sentence is its own partial view in every mode. The draw is a pure function of
``(seed, epoch, key, view)`` with its own salt: the same under any worker count, rank count or resume, and
independent of the p draw (``wds_stages.uniform_from_key``, salt ``caption``).

CLIPS's released fork also has token-level ``random``/``shuffle``/``syntax`` masks applied inside its tokenizer
(``open_clip/tokenizer.py``: ``get_reduction_mask_fn``); they act on tokens, not text, and are not offered here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from datamodules.checks import ConfigError
from datamodules.wds_stages import stable_int

MODES = ("first", "random", "block")

PRESETS: dict[str, dict[str, Any]] = {
    "first1": {"mode": "first", "k": 1},
    "first2": {"mode": "first", "k": 2},
    "random1": {"mode": "random", "k": 1},
    "random2": {"mode": "random", "k": 2},
    # CLIPS's default: the sub-caption mask (one sentence of the synthetic caption), which its README names, with the
    # block mask, the best of its four reduction strategies.
    "clips": {"mode": "random", "k": 1},
    # CLIPS's block ("simple") mask at its short text length (32 tokens, ~30 words minus the sot/eot slots)
    "clips_block": {"mode": "block", "n": 30},
}

# Words whose trailing period does not end a sentence (the recaptions write "e.g.", "approx.", "Dr.").
# Not "etc", "no" or "min": those end sentences as often as not.
_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "vs", "approx", "ca", "cf", "mr", "mrs", "ms", "dr", "st", "jr", "sr", "fig", "figs", "sq", "ft"}
)
# A sentence ends at ., ! or ? (plus closing quotes/brackets) before whitespace; decimals (3.5) have no whitespace.
_END = re.compile(r"[.!?]+[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences, stripped; a period after an abbreviation or an initial, or before a lowercase word,
    does not split."""
    sentences, start = [], 0
    for match in _END.finditer(text):
        before = text[start : match.start()].split()
        word = before[-1].lower().rstrip(".") if before else ""
        following = text[match.end() : match.end() + 1]
        period = text[match.start()] == "."
        if period and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or following.islower()):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


@dataclass(frozen=True)
class PartialSpec:
    """One partial-caption setting: ``mode`` with ``k`` sentences (first, random) or ``n`` words (block)."""

    mode: str
    k: int = 1
    n: int = 30

    @classmethod
    def parse(cls, value: str | dict[str, Any], key: str) -> PartialSpec:
        """A preset name or ``{mode: ..., k: ..., n: ...}``; a bad one raises :class:`ConfigError` naming ``key``."""
        if isinstance(value, str):
            if value not in PRESETS:
                raise ConfigError(key, value, f"is not a partial-caption preset; presets are {sorted(PRESETS)}")
            value = PRESETS[value]
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a preset name or a mapping {mode: first|random|block, k|n: ...}")
        unknown = sorted(set(value) - {"mode", "k", "n"})
        if unknown:
            raise ConfigError(key, value, f"has unknown fields {unknown} (fields: mode, k, n)")
        if value.get("mode") not in MODES:
            raise ConfigError(f"{key}.mode", value.get("mode"), f"must be one of {list(MODES)}")
        for size in ("k", "n"):
            got = value.get(size, 1)
            if isinstance(got, bool) or not isinstance(got, int) or got < 1:
                raise ConfigError(f"{key}.{size}", got, "must be an integer >= 1")
        return cls(**value)

    def apply(self, caption: str, rng: random.Random) -> str:
        sentences = split_sentences(caption)
        if len(sentences) <= 1:
            return caption.strip()
        if self.mode == "first":
            return " ".join(sentences[: self.k])
        if self.mode == "random":
            if self.k >= len(sentences):
                return " ".join(sentences)
            return " ".join(sentences[i] for i in sorted(rng.sample(range(len(sentences)), self.k)))
        words = caption.split()
        if len(words) <= self.n:
            return " ".join(words)
        start = rng.randrange(len(words) - self.n + 1)
        return " ".join(words[start : start + self.n])


def partial_caption(caption: str, spec: PartialSpec, seed: int, epoch: int, key: str, view: str) -> str:
    """``spec`` applied to ``caption``, drawn from ``(seed, epoch, key, view)`` only."""
    return spec.apply(caption, random.Random(stable_int("partial", seed, epoch, key, view)))


@dataclass(frozen=True)
class ViewSpec:
    """A text view every sample carries (the DataModule's ``views``): a caption source, optionally made partial."""

    name: str
    source: str
    partial: PartialSpec | None = None

    @classmethod
    def parse(cls, name: str, value: str | dict[str, Any], sources: list[str]) -> ViewSpec:
        key = f"views.{name}"
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"source", "partial"})
            if unknown:
                raise ConfigError(key, value, f"has unknown fields {unknown} (fields: source, partial)")
            source, partial = value.get("source"), value.get("partial")
        else:
            source, partial = value, None
        if source not in sources:
            raise ConfigError(
                f"{key}.source" if isinstance(value, dict) else key,
                source,
                f"names no caption source; sources are {sources}",
            )
        return cls(name, source, None if partial is None else PartialSpec.parse(partial, f"{key}.partial"))

    def text(self, caption: str, seed: int, epoch: int, key: str) -> str:
        return caption if self.partial is None else partial_caption(caption, self.partial, seed, epoch, key, self.name)
