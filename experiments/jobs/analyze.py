r"""``python -m experiments analyze``: caption statistics of the original vs recaptioned text (paper §4, Fig. 3).

    python -m experiments analyze --recap 'data/world/recap_llava/*.parquet' --out docs/analysis
    python -m experiments analyze --shards 'data/world/web/*.tar' --sidecar-dir data/world/sidecars_llava \
        --clip runs/tiny/captioner/web_clip/export --tokenizer data/world/tokenizer --out docs/analysis

Each input is summarised on its own: ``--shards`` read with the caption-mix loader's own stages, ``--recap``
(Recap-DataComp-1B-schema parquet) batch by batch. Writes ``lengths.png`` (Fig. 3), ``summary.json`` and ``summary.md``;
``DEFINITIONS`` defines each statistic, docs/analysis/README.md ("How it is computed") the inputs, the v2 columns and
the memory bound.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The loader internals this job reuses, all imported here (datamodules/ is being reshaped: fix their names here).
from datamodules.formats import RECAP_V2_COLUMNS
from datamodules.shards import expand_urls
from datamodules.sidecar import UnreadableSidecarError, _expand_recap, read_sidecar, sidecar_path
from datamodules.wds_stages import CountingHandler, ExtractCaptions, ReadShards, ShardSchedule, SkipStats, SourceSpec

SIDES = ("original", "recaption")
DEFAULT_SOURCES = ("original=txt", "recaption=sidecar:re_caption")
# The parquet columns of each caption side; the v2 one is read where a file has it (files of a run may mix).
PARQUET_SIDES = {"original": "org_caption", "recaption": "re_caption", "recaption_v2": RECAP_V2_COLUMNS[0]}
CONDITION_LENGTH = RECAP_V2_COLUMNS[1]
SHARE_SCALE = 100.0  # CLIP's logit scale (OpenAI CLIP's learned value saturates at 100)

# PAPER.md §4 (VERBATIM numbers; what they measure is partly INFERRED there).
PAPER = {
    "mean_words": {"original": 10.22, "recaption": 49.43},
    "vocab_coverage_recaption_pct": 82.86,
    "clip_share_pct": {
        "CLIP-L (~428M)": {"original": 50.43, "recaption": 49.57},
        "LongCLIP-L": {"original": 10.09, "recaption": 89.91},
    },
    "gpt4v_rating": {"original": 3.71, "recaption": 4.14},
}

# Words for the vocabulary: lower-cased alphanumeric runs (apostrophes inside a word kept). A regex, not an NLP
# tokenizer: the paper names no tokenizer, and the coverage ratio only needs a fixed, documented word definition.
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z0-9]+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def n_words(text: str) -> int:
    """Whitespace words, the unit of the schema's ``re_length`` / ``org_length`` (``experiments/jobs/recaption.py``)."""
    return len(text.split())


# ---------------------------------------------------------------------------------------------------- accumulators
@dataclass
class LengthHistogram:
    """Counts of lengths 0..max_length, plus one overflow bin; exact mean (running sum) and max."""

    max_length: int
    counts: np.ndarray = field(init=False)
    total: int = 0
    n: int = 0
    max_seen: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.max_length + 2, dtype=np.int64)

    def add(self, length: int) -> None:
        self.counts[min(length, self.max_length + 1)] += 1
        self.total += length
        self.n += 1
        self.max_seen = max(self.max_seen, length)

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def median(self) -> float | None:
        """The median (mean of the two middle values for an even count); None past the last bin."""
        if not self.n:
            return None
        lo, hi = np.searchsorted(np.cumsum(self.counts), [(self.n - 1) // 2 + 1, self.n // 2 + 1])
        return None if hi > self.max_length else (int(lo) + int(hi)) / 2

    def summary(self) -> dict[str, Any]:
        summary = {"n": self.n, "mean": self.mean(), "median": self.median(), "max": self.max_seen}
        return summary | {"n_over_max_length": int(self.counts[-1])}


@dataclass
class Vocabulary:
    """word -> [count per side] (original, recaption, then any further caption columns), at most ``max_size`` words
    (see the module doc)."""

    max_size: int
    sides: Sequence[str] = SIDES
    counts: dict[str, list[int]] = field(default_factory=dict)
    oov_tokens: int = 0
    tokens: list[int] = field(init=False)  # word tokens per side (past the cap too)

    def __post_init__(self) -> None:
        self.tokens = [0] * len(self.sides)

    def add(self, side: int, tokens: Sequence[str]) -> None:
        self.tokens[side] += len(tokens)
        for w in tokens:
            c = self.counts.get(w)
            if c is None and len(self.counts) < self.max_size:
                c = self.counts[w] = [0] * len(self.sides)
            if c is None:
                self.oov_tokens += 1
            else:
                c[side] += 1

    def summary(self, top: int = 20) -> dict[str, Any]:
        """Each side against one partner: the original against the recaption, every other side against the original
        (``recaption_v2`` replaces ``re_caption`` in the same statistic, never changing the paper's pair)."""
        sizes = [sum(1 for c in self.counts.values() if c[i]) for i in range(len(self.sides))]
        coverage, share = {}, {}
        for i, side in enumerate(self.sides):
            j = 1 if i == 0 else 0
            union = sum(1 for c in self.counts.values() if c[i] or c[j])
            coverage[side] = 100.0 * sizes[i] / union if union else None
            pair = self.tokens[i] + self.tokens[j]
            share[side] = 100.0 * self.tokens[i] / pair if pair else None
        union = sum(1 for c in self.counts.values() if c[0] or c[1])
        both = sum(1 for c in self.counts.values() if c[0] and c[1])
        out: dict[str, Any] = {
            "size": dict(zip(self.sides, sizes, strict=True)) | {"union": union, "both": both},
            "coverage_pct": coverage,  # the recaption's: an earlier INFERRED reading of the paper's 82.86%
            "truncated": self.oov_tokens > 0,
            "oov_tokens": self.oov_tokens,
            "tokens": dict(zip(self.sides, self.tokens, strict=True)),
            "token_share_pct": share,  # the recaption's: the paper's 82.86% = 49.43 / (49.43 + 10.22) (§4)
        }
        out["top_words"] = {}
        for i, side in enumerate(self.sides):
            best = sorted((-c[i], w) for w, c in self.counts.items() if c[i])[:top]
            out["top_words"][side] = [[w, -n] for n, w in best]
        return out


def clip_share(score_original: np.ndarray, score_recaption: np.ndarray) -> np.ndarray:
    """Per pair, the recaption's softmax probability over the two caption logits (INFERRED reading of the paper's
    sum-to-100 "CLIP score"): ``exp(r) / (exp(o) + exp(r))`` = ``sigmoid(r - o)``, computed stably."""
    d = np.asarray(score_recaption, dtype=np.float64) - np.asarray(score_original, dtype=np.float64)
    e = np.exp(-np.abs(d))  # never overflows; each branch keeps full relative precision
    return np.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class ShareStats:
    """Running sums of the CLIP-score share, win rate and each side's CLIP score."""

    n: int = 0
    share_recaption: float = 0.0
    wins_recaption: int = 0
    ties: int = 0
    clip_score: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIDES, 0.0))

    def add(self, logit_original: np.ndarray, logit_recaption: np.ndarray, cos: tuple) -> None:
        """``logit_*`` = scale * cos per pair; ``cos`` = (cos_original, cos_recaption)."""
        o, r = np.asarray(logit_original, dtype=np.float64), np.asarray(logit_recaption, dtype=np.float64)
        self.n += len(o)
        self.share_recaption += float(clip_share(o, r).sum())
        self.wins_recaption += int((r > o).sum())
        self.ties += int((r == o).sum())
        for side, c in zip(SIDES, cos, strict=True):
            self.clip_score[side] += float((100 * np.clip(np.asarray(c, dtype=np.float64), 0, None)).sum())

    def summary(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        share = 100.0 * self.share_recaption / self.n
        return {
            "n_pairs": self.n,
            "share_pct": {"original": 100.0 - share, "recaption": share},
            "recaption_wins_pct": 100.0 * self.wins_recaption / self.n,
            "ties": self.ties,
            "inferred": "softmax over the two caption scores per image, averaged (PAPER.md §4, INFERRED)",
            "mean_clip_score": {s: v / self.n for s, v in self.clip_score.items()},
        }


@dataclass
class CaptionStats:
    """Everything one input contributes: lengths (words, tokens), vocabulary, CLIP share, judge ratings; per caption
    side (original, recaption, then any further ones such as ``recaption_v2``), and the distribution of the v2
    ``re_condition_length`` where the input has it."""

    max_length: int = 512
    max_vocab: int = 2_000_000
    tokenizer: Any = None
    sides: Sequence[str] = SIDES
    words: dict[str, LengthHistogram] = field(init=False)
    tokens: dict[str, LengthHistogram] | None = field(init=False)
    vocab: Vocabulary = field(init=False)
    share: ShareStats = field(default_factory=ShareStats)
    missing: dict[str, int] = field(init=False)
    condition_length: LengthHistogram = field(init=False)
    condition_missing: int = 0
    n_rows: int = 0
    judge: dict[str, list] = field(default_factory=lambda: {s: [] for s in SIDES})
    judge_examples: dict[str, list] = field(default_factory=lambda: {s: [] for s in SIDES})  # the first 3 answers
    share_source: str | None = None

    def __post_init__(self) -> None:
        if tuple(self.sides[:2]) != SIDES or len(set(self.sides)) != len(self.sides):
            raise ValueError(f"caption sides must be {list(SIDES)} then further distinct names, got {self.sides}")
        self.words = {s: LengthHistogram(self.max_length) for s in self.sides}
        with_tokens = self.tokenizer is not None
        self.tokens = {s: LengthHistogram(self.max_length) for s in self.sides} if with_tokens else None
        self.vocab = Vocabulary(self.max_vocab, self.sides)
        self.missing = dict.fromkeys(self.sides, 0)
        self.condition_length = LengthHistogram(self.max_length)

    def add_condition_length(self, value: Any) -> None:
        """One row's ``re_condition_length``: a length (int >= 0) or missing (null, a file without it, not an int)."""
        if isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0:
            self.condition_length.add(int(value))
        else:
            self.condition_missing += 1

    def add_captions(self, captions: dict[str, str | None]) -> None:
        self.n_rows += 1
        for i, side in enumerate(self.sides):
            text = captions.get(side)
            text = text.strip() if isinstance(text, str) else None
            if not text:
                self.missing[side] += 1
                continue
            self.words[side].add(n_words(text))
            self.vocab.add(i, words(text))
            if self.tokens is not None:
                self.tokens[side].add(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_rows": self.n_rows,
            "missing_caption": dict(self.missing),
            "length_words": {s: h.summary() for s, h in self.words.items()},
            "vocabulary": self.vocab.summary(),
            "clip_share": self.share.summary(),
            "clip_share_source": self.share_source if self.share.n else None,
        }
        if self.tokens is not None:
            out["length_tokens"] = {s: h.summary() for s, h in self.tokens.items()}
        h = self.condition_length
        if h.n:  # reported where the input has the column at all; rows without it count as missing
            values = {str(v): int(n) for v, n in enumerate(h.counts[:-1]) if n}
            values |= {f">{h.max_length}": int(h.counts[-1])} if h.counts[-1] else {}
            out["condition_length"] = h.summary() | {"missing": self.condition_missing, "distribution": values}
        if any(self.judge.values()):
            from lightning_modules.evaluation.generation import JudgeResult

            out["judge"] = {
                s: JudgeResult(r, []).summary() | {"examples": self.judge_examples[s]} for s, r in self.judge.items()
            }
        return out


# --------------------------------------------------------------------------------------------------------- inputs
def parquet_sides(paths: Sequence[str]) -> tuple[str, ...]:
    """The caption sides of Recap-DataComp-1B-schema files: ``recaption_v2`` too where any file has the v2 column."""
    import pyarrow.parquet as pq

    v2 = any(PARQUET_SIDES["recaption_v2"] in pq.read_schema(p).names for p in _expand_recap(list(paths)))
    return (*SIDES, "recaption_v2") if v2 else SIDES


def iter_parquet(paths: Sequence[str], batch_rows: int = 8192) -> Iterator[dict[str, list]]:
    """Record batches (as column lists) of Recap-DataComp-1B-schema parquet files, one batch in memory at a time;
    the v2 columns only from the files that have them."""
    import pyarrow.parquet as pq

    for path in _expand_recap(list(paths)):
        f = pq.ParquetFile(path)
        names = set(f.schema_arrow.names)
        missing = {"org_caption", "re_caption"} - names
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)} (Recap-DataComp-1B schema expected)")
        wanted = ("org_caption", "re_caption", "org_clip_score", "re_clip_score", *RECAP_V2_COLUMNS)
        for batch in f.iter_batches(batch_size=batch_rows, columns=[c for c in wanted if c in names]):
            yield batch.to_pydict()


def add_parquet_batch(stats: CaptionStats, batch: dict[str, list], limit: int | None = None) -> bool:
    """Add one record batch; returns False once ``limit`` rows have been read."""
    org, rec = batch["org_caption"], batch["re_caption"]
    so, sr = batch.get("org_clip_score"), batch.get("re_clip_score")
    n = len(org)
    columns = {side: batch.get(PARQUET_SIDES[side], [None] * n) for side in stats.sides}
    condition = batch.get(CONDITION_LENGTH, [None] * n)
    pairs_o, pairs_r = [], []
    for i in range(n):
        if limit is not None and stats.n_rows >= limit:
            break
        stats.add_captions({side: values[i] for side, values in columns.items()})
        stats.add_condition_length(condition[i])
        if so is not None and sr is not None and so[i] is not None and sr[i] is not None and org[i] and rec[i]:
            pairs_o.append(so[i])
            pairs_r.append(sr[i])
    if pairs_o:  # the schema's scores, read as 100 * cos: the logits of the share as they are
        stats.share.add(np.array(pairs_o), np.array(pairs_r), cos=(np.array(pairs_o) / 100, np.array(pairs_r) / 100))
        stats.share_source = "parquet org_clip_score / re_clip_score (read as 100 * cos)"
    return limit is None or stats.n_rows < limit


def parse_sources(sources: Sequence[str]) -> list[SourceSpec]:
    """``NAME=SPEC`` items: ``original`` and ``recaption``, then any further caption sources in the order given."""
    specs = []
    for item in sources:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--sources wants NAME=SPEC (e.g. recaption=sidecar:re_caption), got {item!r}")
        specs.append(SourceSpec.parse(name, spec))
    names = [s.name for s in specs]
    if sorted(n for n in names if n in SIDES) != sorted(SIDES) or len(set(names)) != len(names):
        raise ValueError(f"--sources must name exactly {list(SIDES)} once each (others beside them), got {names}")
    return sorted(specs, key=lambda s: SIDES.index(s.name) if s.name in SIDES else len(SIDES))


def condition_lengths(sidecar_dir: str, url: str) -> dict[str, Any]:
    """``key -> re_condition_length`` from a shard's sidecar; empty where the sidecar is missing or unreadable."""
    with contextlib.suppress(FileNotFoundError, UnreadableSidecarError):  # the loader counts these
        t = read_sidecar(sidecar_path(sidecar_dir, url), [CONDITION_LENGTH])
        return dict(zip(t["key"].to_pylist(), t[CONDITION_LENGTH].to_pylist(), strict=True))
    return {}


def iter_shard_samples(shards: str | Sequence[str], sources: Sequence[str], sidecar_dir: str | None) -> Iterator[dict]:
    """``{key, url, image_bytes, captions: {name: str | None}}`` in file order, through the loader's own stages."""
    specs = parse_sources(sources)
    stats = SkipStats(max_consecutive_drops=None)
    once = {"seed": 0, "epoch": 0, "rank": 0, "world_size": 1, "worker": 0, "num_workers": 1, "mode": "once"}
    schedule = ShardSchedule(expand_urls(shards), **once, shuffle=False)
    yield from ExtractCaptions(specs, sidecar_dir, stats)(ReadShards(CountingHandler(stats))(schedule))
    if stats.counts:
        print(f"analyze: shard reader skipped / counted {dict(stats.counts)}", file=sys.stderr)


def load_scorer(folder: str):
    from lightning_modules.evaluation.generation import HFClipScorer, OpenClipScorer

    return OpenClipScorer(folder) if (Path(folder) / "open_clip_config.json").is_file() else HFClipScorer(folder)


def _image_tensors(images: Sequence[Any]) -> list[Any]:
    """PIL images -> float (3, H, W) tensors in [0, 1]."""
    import torch

    return [torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1) / 255 for im in images]


def encode_images(scorer: Any, images: Sequence[Any]) -> Any:
    """Normalised image features; same-size images go through the scorer together, others one by one."""
    import torch
    import torch.nn.functional as F

    tensors = _image_tensors(images)
    feats: dict[int, Any] = {}
    for size in dict.fromkeys(t.shape for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.shape == size]
        f = F.normalize(scorer.encode_image(torch.stack([tensors[i] for i in idx])).float(), dim=-1)
        feats |= zip(idx, f, strict=True)
    return torch.stack([feats[i] for i in range(len(tensors))])


def score_pairs(stats: CaptionStats, scorer: Any, images: list, originals: list, recaptions: list, scale: float):
    """CLIP features of the images and both captions; adds the share (softmax over scale * cos) per image."""
    import torch.nn.functional as F

    img = encode_images(scorer, images)
    cos = []
    for texts in (originals, recaptions):
        txt = F.normalize(scorer.encode_text(list(texts)).float(), dim=-1).to(img.device)
        cos.append((img * txt).sum(-1).double().cpu().numpy())
    stats.share.add(scale * cos[0], scale * cos[1], cos=(cos[0], cos[1]))


class AttributeRater:
    """Tiny world only: a judge callable (``judge(image, prompt_text) -> answer``) built on the pinned attribute
    judge (``world-judge``), not a language model. It predicts the image's main-object colour, shape and position,
    the object count and the background kind, reads what the caption in the prompt states about them
    (``caption_attributes.parse_caption``) and answers ``"Rating: N"``, N = 1 + round(4 * matched / stated), or 1
    when the caption states none of them. It rates correctness against the image, not fluency (the paper's
    GPT-4V prompt asks for both)."""

    def __init__(self, folder: str) -> None:
        from lightning_modules.evaluation.generation import JUDGE_PROMPT
        from lightning_modules.evaluation.judge import load_judge

        self.judge = load_judge(folder)
        self.prefix, _, self.suffix = JUDGE_PROMPT.partition("{caption}")

    def predict(self, image: Any) -> dict[str, str]:
        from lightning_modules.evaluation.judge import HEADS

        x = _image_tensors([image])[0].unsqueeze(0)
        return {name: HEADS[name][int(idx[0])] for name, idx in self.judge.predict(x).items()}

    def __call__(self, image: Any, prompt_text: str) -> str:
        from lightning_modules.evaluation.caption_attributes import GENERIC_SHAPE, parse_caption

        if not (prompt_text.startswith(self.prefix) and prompt_text.endswith(self.suffix)):
            raise ValueError("AttributeRater expects the paper's rating prompt (generation.JUDGE_PROMPT)")
        caption = prompt_text[len(self.prefix) : len(prompt_text) - len(self.suffix)]
        parsed, pred = parse_caption(caption), self.predict(image)
        main, background = parsed.main, parsed.background
        stated = {"count": None if parsed.count is None else str(parsed.count)}
        if main is not None:
            shape = None if main.shape == GENERIC_SHAPE else main.shape
            stated |= {"colour": main.colour, "shape": shape, "position": main.position}
        checks = [value == pred[head] for head, value in stated.items() if value is not None]
        if background is not None and background.kind is not None:
            kind = background.kind
            checks.append(
                pred["background"] in ("hstripes", "vstripes") if kind == "stripes" else kind == pred["background"]
            )
        rating = 1 + round(4 * sum(checks) / len(checks)) if checks else 1
        return f"Rating: {rating}"


def make_judge(spec: str) -> Any:
    """``attributes:DIR`` (tiny world: :class:`AttributeRater`) or a llava-hf folder (``LlavaJudge``)."""
    if spec.startswith("attributes:"):
        return AttributeRater(spec.split(":", 1)[1])
    from lightning_modules.evaluation.generation import LlavaJudge

    return LlavaJudge(spec)


def analyze_shards(stats: CaptionStats, args: argparse.Namespace, scorer: Any = None, judge: Any = None) -> None:
    from PIL import Image

    pending: list[tuple[Any, str, str]] = []
    judged = 0
    lengths_of = functools.lru_cache(maxsize=1)(condition_lengths)  # this run's: one shard's sidecar held at a time

    def flush() -> None:
        if pending and scorer is not None:
            score_pairs(stats, scorer, *map(list, zip(*pending, strict=True)), args.share_scale)
        pending.clear()

    for sample in iter_shard_samples(args.shards, args.sources, args.sidecar_dir):
        if args.limit is not None and stats.n_rows >= args.limit:
            break
        caps = sample["captions"]
        stats.add_captions(caps)
        if args.sidecar_dir:
            stats.add_condition_length(lengths_of(args.sidecar_dir, sample["url"]).get(sample["key"]))
        both = bool(caps.get("original")) and bool(caps.get("recaption"))
        if not both or (scorer is None and (judge is None or judged >= args.judge_limit)):
            continue
        try:
            image = Image.open(io.BytesIO(sample["image_bytes"]))
            image.load()
        except Exception as exn:  # an undecodable image loses its scores, never the run
            print(f"analyze: undecodable image {sample['url']}:{sample['key']}: {exn}", file=sys.stderr)
            continue
        if judge is not None and judged < args.judge_limit:
            from lightning_modules.evaluation.generation import judge_score

            for side in SIDES:
                result = judge_score([image.convert("RGB")], [caps[side]], judge)
                stats.judge[side] += result.ratings
                if len(stats.judge_examples[side]) < 3:
                    stats.judge_examples[side].append({"caption": caps[side], "answer": result.answers[0]})
            judged += 1
        if scorer is not None:
            pending.append((image, caps["original"], caps["recaption"]))
            if len(pending) >= args.batch_size:
                flush()
    flush()
    if scorer is not None:
        stats.share_source = f"computed with {args.clip} on the shards' images (scale {args.share_scale:g})"


# -------------------------------------------------------------------------------------------------------- outputs
def plot_lengths(results: dict[str, CaptionStats], path: Path) -> Path:
    """Fig. 3: histogram of caption lengths in words, original vs recaption overlaid, one panel per input."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.4), squeeze=False)
    for ax, (name, stats) in zip(axes[0], results.items(), strict=True):
        hists = stats.words
        top = max((int(np.nonzero(h.counts)[0].max()) for h in hists.values() if h.n), default=1)
        edges = np.arange(0, top + 2) - 0.5
        for i, (side, h) in enumerate(hists.items()):
            colour = f"C{i}"  # matplotlib's cycle: tab:blue, tab:orange, tab:green, ...
            if not h.n:
                continue
            share = h.counts[: top + 1] / h.n
            ax.stairs(share, edges, fill=True, alpha=0.45, color=colour, label=f"{side} (mean {h.mean():.2f})")
            ax.axvline(h.mean(), color=colour, ls="--", lw=1)
        ax.set_xlabel("words per caption" + (f" (last bin: >{stats.max_length})" if top > stats.max_length else ""))
        ax.set_ylabel("share of captions")
        ax.set_title(f"{name}: {stats.n_rows:,} rows", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Caption length distribution (cf. paper Fig. 3: mean 10.22 original vs 49.43 recaption)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return f"{v:,}" if isinstance(v, int) else str(v)


def summary_markdown(summary: dict[str, Any], command: str) -> str:
    paper = summary["paper"]
    pm, pj, ps = paper["mean_words"], paper["gpt4v_rating"], paper["clip_share_pct"]
    lines = ["# Caption analysis: original vs recaption (paper §4, Fig. 3)", "", "```bash", command, "```", ""]
    lines += ["![caption length histogram](lengths.png)", ""]
    for name, s in summary["inputs"].items():
        v, c = s["vocabulary"], s["clip_share"]
        sides = list(s["length_words"])  # original, recaption, then any further caption columns

        def row(label: str, values: dict[str, Any], ref: str = "-", digits: int = 2, sides=sides) -> list[str]:
            return [label, *(_f(values.get(side), digits) for side in sides), ref]

        rows = []
        for unit, lengths in (("words", s["length_words"]), ("tokens", s.get("length_tokens"))):
            if lengths is not None:
                ref = f"{pm['original']} / {pm['recaption']} (unit not stated)" if unit == "words" else "-"
                rows.append(row(f"mean length ({unit})", {x: lengths[x]["mean"] for x in sides}, ref))
                rows.append(row(f"median length ({unit})", {x: lengths[x]["median"] for x in sides}, digits=1))
                if unit == "words":
                    rows.append(row("max length (words)", {x: lengths[x]["max"] for x in sides}))
        share_ref = f"- / {paper['vocab_coverage_recaption_pct']} (= 49.43 / (49.43 + 10.22))"
        label = (
            f"share of the word tokens of both sets, % ({_f(v['tokens']['original'] + v['tokens']['recaption'])} words)"
        )
        rows.append(row(label, v["token_share_pct"], share_ref))
        rows.append(row("vocabulary (distinct words)", v["size"]))
        label = f"vocabulary coverage, % of the union ({_f(v['size']['union'])} words)"
        rows.append(row(label, v["coverage_pct"], "- / - (an earlier INFERRED reading of the paper's 82.86%)"))
        rows.append(row("missing / empty captions", s["missing_caption"]))
        if c is not None:
            ref = "; ".join(f"{k}: {x['original']} / {x['recaption']}" for k, x in ps.items())
            rows.append(row("CLIP-score share, % (INFERRED: softmax per image)", c["share_pct"], ref))
            rows.append(row("recaption scores higher, % of images", {"recaption": c["recaption_wins_pct"]}))
            rows.append(row("mean CLIP score (100 · cos)", c["mean_clip_score"]))
        else:
            why = "no scores (give --clip FOLDER with shards, or a parquet with scores)"
            rows.append(["CLIP-score share", why, *[""] * len(sides)])
        if "judge" in s:
            cell = {k: f"{_f(x['mean'])} ({x['n_rated']}/{x['n']} parseable)" for k, x in s["judge"].items()}
            label = f"judge rating 1-5 ({summary.get('judge', '-')})"
            rows.append([label, *(cell.get(x, "-") for x in sides), f"GPT-4V: {pj['original']} / {pj['recaption']}"])
        head = ["", *sides, "paper (original / recaption)"]
        table = pd.DataFrame(rows, columns=head).to_markdown(index=False, disable_numparse=True, missingval="")
        lines += [f"## {name}: {s['n_rows']:,} rows", "", table, ""]
        if len(sides) > 2:
            lines += [f"Beside the recaption, {', '.join(sides[2:])} is compared with the original the same way.", ""]
        if "condition_length" in s:
            h, dist = s["condition_length"], s["condition_length"]["distribution"]
            lines.append(f"{CONDITION_LENGTH} (v2): {_f(h['n'])} rows, mean {_f(h['mean'])}, median {_f(h['median'])},")
            lines[-1] += f" max {_f(h['max'])}, missing {_f(h['missing'])}; counts: "
            lines[-1] += ", ".join(f"{k}: {n:,}" for k, n in list(dist.items())[:24]) + "."
            lines.append("")
        if c is not None:
            lines += [f"CLIP share source: {s['clip_share_source']}; {c['n_pairs']:,} image pairs.", ""]
        if v["truncated"]:
            cap, oov = summary["max_vocab"], v["oov_tokens"]
            lines.append(f"Vocabulary capped at {cap:,} words: {oov:,} word occurrences past the cap were not added; ")
            lines[-1] += "coverage is on the truncated vocabulary."
            lines.append("")
        for side in sides:
            top = ", ".join(f"{w} ({n:,})" for w, n in v["top_words"][side][:12])
            lines += [f"Most frequent words, {side}: {top}", ""]
    lines += ["Definitions: " + "; ".join(f"{k}: {v}" for k, v in summary["definitions"].items()) + ".", ""]
    lines.append(f"Memory bound: {summary['memory_bound']}")
    return "\n".join(lines).rstrip() + "\n"


DEFINITIONS = {
    "length": "whitespace words (len(text.split()), the unit of the schema's re_length / org_length); tokens with the "
    "given tokenizer, no special tokens",
    "words": "lower-cased [a-z0-9]+ word tokens; share = n_side / (n_original + n_recaption), the paper's 82.86% "
    "(§4: 49.43 / (49.43 + 10.22) of its own mean lengths); a further caption column (recaption_v2) takes the "
    "recaption's place: n_v2 / (n_original + n_v2)",
    "vocabulary": "distinct words; coverage = |V_side| / |V_original ∪ V_recaption| (an earlier INFERRED reading of "
    "the 82.86%, kept as a statistic); for a further column |V_v2| / |V_original ∪ V_v2|",
    "condition length": f"{CONDITION_LENGTH}, the v2 length the recaption was conditioned on, as released; rows of "
    "files (or sidecars) without it count as missing",
    "clip share": "per image softmax(scale · [cos(img, original), cos(img, recaption)]), averaged, scale 100 "
    "(PAPER.md §4, INFERRED from the paper's pairs summing to 100); parquet scores are read as 100 · cos",
    "judge": "the paper's GPT-4V rating prompt (generation.JUDGE_PROMPT), 1-5, unparseable answers counted not scored",
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=None, help="image shards (paths, braces, globs, dirs)")
    why = "NAME=SPEC for 'original' and 'recaption' (the DataModule's source specs); further names are analyzed beside"
    why += " them, e.g. recaption_v2=sidecar:re_caption_condition_diverse_topk"
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), help=why)
    parser.add_argument("--sidecar-dir", default=None, help="per-shard sidecars for sidecar:COLUMN sources")
    parser.add_argument("--recap", nargs="+", default=None, help="Recap-DataComp-1B-schema parquet files / globs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip", default=None, help="CLIP folder (open_clip export or HF) for the share on shards")
    parser.add_argument("--share-scale", type=float, default=SHARE_SCALE, help="logit scale of the CLIP share")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder for lengths in tokens")
    parser.add_argument("--limit", type=int, default=None, help="at most N rows per input")
    why = "on shards: a llava-hf folder answering the paper's rating prompt, or attributes:DIR (tiny world's judge)"
    parser.add_argument("--judge", default=None, help=why)
    parser.add_argument("--judge-limit", type=int, default=8, help="images rated by the judge (both captions)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per CLIP batch")
    parser.add_argument("--max-length", type=int, default=512, help="histogram bins (longer: one overflow bin)")
    parser.add_argument("--max-vocab", type=int, default=2_000_000, help="vocabulary cap (memory bound)")
    args = parser.parse_args(argv)
    if not args.shards and not args.recap:
        parser.error("give --shards and/or --recap")
    if (args.clip or args.judge) and not args.shards:
        parser.error("--clip / --judge need images: give --shards")

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    results: dict[str, CaptionStats] = {}
    if args.recap:
        sides = parquet_sides(args.recap)
        stats = results["parquet"] = CaptionStats(args.max_length, args.max_vocab, tokenizer, sides)
        for batch in iter_parquet(args.recap):
            if not add_parquet_batch(stats, batch, args.limit):
                break
    if args.shards:
        scorer = load_scorer(args.clip) if args.clip else None
        judge = make_judge(args.judge) if args.judge else None
        sides = tuple(spec.name for spec in parse_sources(args.sources))
        stats = results["shards"] = CaptionStats(args.max_length, args.max_vocab, tokenizer, sides)
        analyze_shards(stats, args, scorer, judge)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quoted = (f"'{a}'" if any(c in a for c in "*?{} ") else a for a in (argv if argv is not None else sys.argv[2:]))
    command = "python -m experiments analyze " + " ".join(quoted)
    summary = {
        "inputs": {name: s.summary() for name, s in results.items()},
        "paper": PAPER,
        "definitions": DEFINITIONS,
        "command": command,
        "max_vocab": args.max_vocab,
        "judge": args.judge,
        "memory_bound": f"{args.max_length + 2} histogram bins per side and unit, a vocabulary of at most "
        f"{args.max_vocab:,} words, one parquet batch (8,192 rows) or one shard's sidecar and {args.batch_size} "
        "decoded images at a time; no per-row state.",
    }
    plot_lengths(results, out / "lengths.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, command))
    print((out / "summary.md").read_text())
    return summary
