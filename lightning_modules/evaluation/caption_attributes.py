"""Read tiny-world captions back into objects and score them against the ground truth, attribute by attribute.

:func:`parse_caption` finds every object as ``(size, colour, shape, position)`` (unstated attributes None), the stated
count and the background, with the world's own phrase inventory (``datamodules/tiny_world/text.py``) plus a few general
forms, so paraphrases still parse; :func:`score_captions` scores them, :func:`chance_scores` against a deranged truth.
docs/captioner.md ("How captions are read back") gives the reading and scoring rules.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from datamodules.tiny_world.scene import BACKGROUND_COLOURS, COLOURS, SHADE_TO_COLOUR, SHAPES
from datamodules.tiny_world.text import (
    BIG_WORDS,
    DETAIL_POSITIONS,
    LONG_POSITIONS,
    NUMBER_WORDS,
    SHORT_POSITIONS,
    SMALL_WORDS,
)

from .metrics import derangement

GENERIC_SHAPE = "shape"  # an object named only "shape" ("a small red shape") states no shape


class CaptionObject(NamedTuple):
    """One object as a caption states it (or as the truth has it); unstated attributes are None."""

    size: str | None
    colour: str | None
    shape: str  # one of SHAPES or GENERIC_SHAPE
    position: str | None


@dataclass(frozen=True)
class ParsedBackground:
    kind: str | None  # "plain", "hstripes", "vstripes", "checker", or "stripes" when the orientation is not said
    colours: tuple[str, ...]  # in the caption's order (the truth's order: colours[0] is at (0, 0))


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[CaptionObject, ...]  # in order of first mention
    count: int | None  # the stated number of objects ("two shapes", "a single figure"), if any
    background: ParsedBackground | None

    @property
    def main(self) -> CaptionObject | None:
        return self.objects[0] if self.objects else None  # descriptions name the main (largest) object first


_COLOUR_WORDS: dict[str, str] = {c: c for c in COLOURS} | dict(SHADE_TO_COLOUR)
_SIZE_WORDS: dict[str, str] = {w: "large" for w in (*BIG_WORDS, "large", "big", "sizeable", "sizable", "huge")} | {
    w: "small" for w in (*SMALL_WORDS, "small", "little", "tiny", "compact")
}
_SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {GENERIC_SHAPE: GENERIC_SHAPE}
_PLURALS = {("crosses" if s == "cross" else s + "s") for s in _SHAPE_WORDS}
_FILLERS = {"coloured", "colored", "tinted", "painted", "lone", "single", "solid", "bright", "dark", "light", "pale"}
_FILLERS |= {"flat", "simple", "geometric", "filled", "outlined", "plain"}
_DETERMINERS = {"a", "an", "the", "one", "another", "this", "that"}
_POST_TRIGGERS = {"is", ",", "in", "coloured", "colored", "tinted", "painted"}
_LARGEST_CUES = {"largest", "biggest", "prominent", "main", "dominant"}
_SENTENCE_END = {".", "!", "?", ";"}
_ATTRIBUTE_WORDS = _COLOUR_WORDS.keys() | _SIZE_WORDS.keys()
_BG_COLOUR_WORDS: dict[str, str] = {c: c for c in BACKGROUND_COLOURS} | {"grey": "gray"}
_COUNT_WORDS: dict[str, int] = {w: i for i, w in enumerate(NUMBER_WORDS)} | dict.fromkeys(
    ("a single", "just one", "only one"), 1
)


def _phrase_table() -> dict[str, str]:
    """Absolute position phrase -> position, from text.py's tables plus general forms."""
    table = {
        p: pos
        for t in (DETAIL_POSITIONS, SHORT_POSITIONS, LONG_POSITIONS)
        for pos, phrases in t.items()
        for p in phrases
    }
    general = {"left": ("left",), "right": ("right",), "top": ("top", "upper"), "bottom": ("bottom", "lower")}
    for pos, words in (general | {"center": ("center", "centre", "middle")}).items():
        for w in words:
            for pre in ("on", "at", "near", "by", "towards", "toward", "to", "in", "close to", "along"):
                for very in ("", "very "):
                    for tail in ("", " side", " border", " edge", " margin", " part", " half", " area"):
                        table.setdefault(f"{pre} the {very}{w}{tail}", pos)
    table |= {"up top": "top", "down low": "bottom", "centered": "center", "centred": "center"}
    return table


_POSITION_OF = _phrase_table()
_POSITION_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_POSITION_OF, key=len, reverse=True)) + r")\b")
_RELATION_RE = re.compile(r"\bto the (?:left|right) of\b|(?<!the )\b(?:left|right) of\b|\b(?:above|over|below|under)\b")
_TOKEN_RE = re.compile(r"__[a-z]+__|[a-z]+|\d+|[.,;:!?]")
_COUNT_RE = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _COUNT_WORDS), key=len, reverse=True)) + r"|\d+) "
    r"(?:(?:geometric|simple|flat|distinct|different|separate|coloured|colored|colourful|colorful) )?"
    r"(?:shape|figure|form|motif|object|item)s?\b"
)


def _normalise(text: str) -> str:
    return re.sub(r"[-_/#]", " ", text.lower())


@dataclass
class _Mention:
    start: int  # token index of the noun phrase's first word
    end: int  # token index after the shape word and its post-modifiers
    definite: bool
    size: str | None
    colour: str | None
    shape: str
    position: str | None = None


def _tokens(text: str) -> list[str]:
    t = _RELATION_RE.sub(" __rel__ ", _normalise(text))
    t = _POSITION_RE.sub(lambda m: f" __pos{_POSITION_OF[m.group(1)]}__ ", t)
    return _TOKEN_RE.findall(t)


def _fill(words: Sequence[str], colour: str | None, size: str | None) -> tuple[str | None, str | None]:
    """The first colour and the first size word among ``words``, where not already known."""
    for w in words:
        if w in _COLOUR_WORDS and colour is None:
            colour = _COLOUR_WORDS[w]
        elif w in _SIZE_WORDS and size is None:
            size = _SIZE_WORDS[w]
    return colour, size


def _mentions(toks: list[str]) -> list[_Mention]:
    out = []
    n = len(toks)
    for i, tok in enumerate(toks):
        shape = _SHAPE_WORDS.get(tok)
        if shape is None:
            continue
        j = i - 1
        while j >= 0 and (toks[j] in _ATTRIBUTE_WORDS or toks[j] in _FILLERS):
            j -= 1
        colour, size = _fill(toks[j + 1 : i][::-1], None, None)  # nearest the shape word first
        det = toks[j] if j >= 0 and toks[j] in _DETERMINERS else None
        start = j if det is not None else j + 1
        end = i + 1
        if end < n and toks[end] in _POST_TRIGGERS:  # "a star in red", "a star, big and red,", "the star is large"
            m = end + 1
            while m < n and (toks[m] in _ATTRIBUTE_WORDS or toks[m] in ("and", ",")):
                m += 1
            attrs = [t for t in toks[end + 1 : m] if t in _ATTRIBUTE_WORDS]
            next_is_noun = m < n and (toks[m] in _SHAPE_WORDS or toks[m] in _PLURALS)
            if toks[end] == "in":
                attrs = [t for t in attrs if t in _COLOUR_WORDS]
            if attrs and not next_is_noun:
                colour, size = _fill(attrs, colour, size)
                end = m
        if shape == GENERIC_SHAPE and colour is None:  # "a single shape", "star shape": not an object
            continue
        # "The largest one is a red star", "the biggest being a red star", "the most prominent figure is the star"
        after_verb = det is not None and j >= 1 and toks[j - 1] in ("is", "being")
        if after_verb and _LARGEST_CUES & set(toks[max(0, j - 5) : j - 1]):
            size = size or "large"
        out.append(_Mention(start, end, det == "the", size, colour, shape))
    return out


def _claim_marker(toks: list[str], indices: range, used: set[int]) -> str | None:
    """The first unclaimed position marker along ``indices``, stopping at a relation or a sentence end."""
    for i in indices:
        if toks[i] == "__rel__" or toks[i] in _SENTENCE_END:
            return None
        if toks[i].startswith("__pos") and i not in used:
            used.add(i)
            return toks[i][5:-2]
    return None


def _assign_positions(toks: list[str], mentions: list[_Mention]) -> None:
    used: set[int] = set()
    for k, m in enumerate(mentions):  # 1. the first free marker after the object, in its clause
        stop = mentions[k + 1].start if k + 1 < len(mentions) else len(toks)
        if (pos := _claim_marker(toks, range(m.end, stop), used)) is not None:
            m.position = pos
    for k, m in enumerate(mentions):  # 2. else a free marker earlier in its sentence ("Near the top, one can see ...")
        if m.position is not None:
            continue
        stop = mentions[k - 1].end if k > 0 else 0
        if (pos := _claim_marker(toks, range(m.start - 1, stop - 1, -1), used)) is not None:
            m.position = pos


def _compatible(a: CaptionObject, m: _Mention) -> bool:
    return a.shape == m.shape and all(
        x is None or y is None or x == y for x, y in ((a.colour, m.colour), (a.size, m.size), (a.position, m.position))
    )


def _resolve(mentions: list[_Mention]) -> list[CaptionObject]:
    objects: list[CaptionObject] = []
    for m in mentions:
        if m.definite:
            hit = next((k for k, o in enumerate(objects) if _compatible(o, m)), None)
            if hit is not None:
                o = objects[hit]
                objects[hit] = CaptionObject(o.size or m.size, o.colour or m.colour, o.shape, o.position or m.position)
                continue
        objects.append(CaptionObject(m.size, m.colour, m.shape, m.position))
    return objects


def _background(t: str) -> ParsedBackground | None:
    colours = list(dict.fromkeys(_BG_COLOUR_WORDS[w] for w in re.findall(r"[a-z]+", t) if w in _BG_COLOUR_WORDS))
    if re.search(r"\b(?:checker|chequer|chessboard|checks\b)", t):
        kind: str | None = "checker"
    elif re.search(r"\bstripe|\bstriped\b", t):
        horizontal, vertical = re.search(r"\bhorizontal", t), re.search(r"\bvertical", t)
        kind = "hstripes" if horizontal and not vertical else "vstripes" if vertical and not horizontal else "stripes"
    elif colours or re.search(r"\b(?:plain|solid|uniform) (?:\w+ )?(?:background|backdrop)\b", t):
        kind = "plain"
    else:
        return None
    return ParsedBackground(kind, tuple(colours))


def parse_caption(text: str | None) -> ParsedCaption:
    if not text:
        return ParsedCaption((), None, None)
    toks = _tokens(text)
    mentions = _mentions(toks)
    _assign_positions(toks, mentions)
    t = _normalise(text)
    m = _COUNT_RE.search(t)
    count = None if m is None else (int(m.group(1)) if m.group(1).isdigit() else _COUNT_WORDS[m.group(1)])
    return ParsedCaption(tuple(_resolve(mentions)), count, _background(t))


def truth_objects(objects: str | Sequence[Mapping[str, Any]] | Sequence[CaptionObject] | Any) -> list[CaptionObject]:
    """Ground-truth objects (main first) from a ``truth/*.parquet`` ``objects`` JSON, its decoded list, a list of
    ``CaptionObject`` or ``SceneObject``, or a ``Scene``."""
    if hasattr(objects, "objects") and hasattr(objects, "background"):  # a Scene
        objects = objects.objects
    if isinstance(objects, str):
        objects = json.loads(objects)
    out = []
    for o in objects:
        if isinstance(o, CaptionObject):
            out.append(o)
        elif isinstance(o, Mapping):
            out.append(CaptionObject(o["size"], o["colour"], o["shape"], o["position"]))
        else:
            out.append(CaptionObject(o.size, o.colour, o.shape, o.position))
    return out


def truth_background(background: str | Mapping[str, Any] | Any) -> ParsedBackground:
    """A ``truth/*.parquet`` ``background`` JSON (or its dict, or a ``scene.Background``) as a ``ParsedBackground``."""
    if isinstance(background, str):
        background = json.loads(background)
    if isinstance(background, Mapping):
        return ParsedBackground(background["kind"], tuple(background["colours"]))
    return ParsedBackground(background.kind, tuple(background.colours))


_TUPLES = {
    "colour": lambda o: (o.colour,),
    "shape": lambda o: (o.shape,),
    "pair": lambda o: (o.colour, o.shape),
    "triple": lambda o: (o.colour, o.shape, o.position),
    "quad": lambda o: (o.size, o.colour, o.shape, o.position),
}


def _per_index(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def score_captions(
    captions: Sequence[str | ParsedCaption],
    truths: Sequence[Any],
    backgrounds: Sequence[Any] | None = None,
    main_index: int | Sequence[int] = 0,
) -> dict[str, float]:
    """Score captions (or parsed ones) against their images' truths (:func:`truth_objects`), in percent.

    ``{colour,shape,pair,triple,quad}_{precision,recall}`` are micro-averaged multiset precision and recall of the
    stated attribute tuples. Per caption: ``count_acc`` (parsed objects == true count), ``exact_objects_acc`` (the
    (colour, shape, position) multiset equals the truth's), ``main_object_acc`` (the first-mentioned object's colour and
    shape are the main object's), ``stated_count_acc`` (over the ``n_stated_count`` captions that state a count) and,
    with ``backgrounds``, ``background_acc`` (kind and ordered colours) and ``background_kind_acc``. ``main_index`` is
    one int or one per image; ``n_unparsed`` counts captions with no object found.
    """
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} truths")
    if backgrounds is not None and len(backgrounds) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(backgrounds)} backgrounds")
    n = len(captions)
    mains = _per_index(main_index, n)
    if len(mains) != n:
        raise ValueError(f"{n} captions but {len(mains)} main indices")
    tp, pred, true = Counter(), Counter(), Counter()
    acc = Counter()
    n_unparsed = n_stated = 0
    for i, (cap, truth) in enumerate(zip(captions, truths, strict=True)):
        parsed = cap if isinstance(cap, ParsedCaption) else parse_caption(cap)
        objs, gold = list(parsed.objects), truth_objects(truth)
        n_unparsed += not objs
        for name, key in _TUPLES.items():
            p = Counter(k for k in map(key, objs) if all(v is not None and v != GENERIC_SHAPE for v in k))
            g = Counter(map(key, gold))
            tp[name] += sum((p & g).values())
            pred[name] += sum(p.values())
            true[name] += sum(g.values())
        acc["count"] += len(objs) == len(gold)
        acc["exact_objects"] += Counter(_TUPLES["triple"](o) for o in objs) == Counter(map(_TUPLES["triple"], gold))
        main = gold[mains[i]]
        acc["main_object"] += bool(objs) and (objs[0].colour, objs[0].shape) == (main.colour, main.shape)
        if parsed.count is not None:
            n_stated += 1
            acc["stated_count"] += parsed.count == len(gold)
        if backgrounds is not None:
            bg, said = truth_background(backgrounds[i]), parsed.background
            acc["background_kind"] += said is not None and said.kind == bg.kind
            acc["background"] += said is not None and said == bg
    out: dict[str, float] = {}
    for name in _TUPLES:
        out[f"{name}_precision"] = 100.0 * tp[name] / pred[name] if pred[name] else 0.0
        out[f"{name}_recall"] = 100.0 * tp[name] / true[name] if true[name] else 0.0
    rate = (lambda k: 100.0 * acc[k] / n) if n else (lambda k: 0.0)
    out |= {f"{k}_acc": rate(k) for k in ("count", "exact_objects", "main_object")}
    out["stated_count_acc"] = 100.0 * acc["stated_count"] / n_stated if n_stated else 0.0
    if backgrounds is not None:
        out |= {"background_acc": rate("background"), "background_kind_acc": rate("background_kind")}
    out |= {"n": float(n), "n_unparsed": float(n_unparsed), "n_stated_count": float(n_stated)}
    return out


def chance_scores(
    captions: Sequence[str | ParsedCaption],
    truths: Sequence[Any],
    seed: int = 0,
    backgrounds: Sequence[Any] | None = None,
    main_index: int | Sequence[int] = 0,
) -> dict[str, float]:
    """:func:`score_captions` against a seeded derangement of the truths: the score of a captioner that writes
    plausible descriptions (its own distribution of colours, shapes and positions) without looking at the image."""
    perm = derangement(len(captions), seed)
    mains = _per_index(main_index, len(captions))
    return score_captions(
        captions,
        [truths[j] for j in perm],
        None if backgrounds is None else [backgrounds[j] for j in perm],
        [mains[j] for j in perm],
    )
