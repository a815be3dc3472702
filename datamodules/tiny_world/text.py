"""Every text of the tiny world: noisy alt-text, detailed descriptions, short human captions, long captions, Q/A.

All functions are deterministic given the ``numpy.random.Generator`` passed in. Only :func:`alt_text` ever names a
shade ("crimson", "teal", ...); every other text uses the 8 base colour names, so the shade is a fine-grained label
that survives only in the web captions (as ImageNet class names survive in alt-text but not in recaptions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from .scene import BACKGROUND_COLOURS, COLOURS, SHADE_TO_COLOUR, SHADES, SHAPES, Scene, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
ALT_KINDS = ("attribute", "partial", "wrong", "junk")


@dataclass(frozen=True)
class AltTextNoise:
    """How poor the web alt-text is. The four ``kind`` rates must sum to 1.

    Defaults follow the prototype (PROTOTYPE.md, "Setup" (b)), which gave a mean of about 5 BPE tokens.
    """

    attribute: float = 0.40  # One attribute of the main object: colour ("red thing"), shape ("star icon") or both.
    partial: float = 0.25  # Colour+shape phrases of all objects but one random non-main one ("red star, blue ring").
    wrong: float = 0.15  # The main object with a wrong colour or a wrong shape ("a green star" for a red star).
    junk: float = 0.20  # Unrelated web text: file names, shop slogans, dates ("IMG_2031.jpg", "free shipping").
    shade_rate: float = 0.30  # Share of correct (attribute, partial) texts naming the main object's shade, not colour.
    attribute_colour_only: float = 0.35  # Within ``attribute``: share naming only the colour (see README).
    attribute_shape_only: float = 0.35  # Within ``attribute``: share naming only the shape; the rest name both.
    partial_background: float = 0.40  # Within ``partial``: share appending the background ("... on gray").
    wrong_colour_share: float = 0.5  # Within ``wrong``: share with a wrong colour (the rest has a wrong shape).
    seo_rate: float = 0.25  # Any alt-text: probability of a web filler prefix/suffix ("png", "| free download").
    case_rate: float = 0.15  # Any alt-text: probability of casing noise (UPPER, Title Case or Capitalised).
    punct_rate: float = 0.10  # Any alt-text: probability of punctuation noise ("_" for spaces, "!!", "...", "#").

    def __post_init__(self) -> None:
        total = sum(self.kind_probs)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"alt-text kind rates must sum to 1, got {total}")
        for f in fields(self)[len(ALT_KINDS) :]:  # every knob after the four kind rates is a rate
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{f.name} must be in [0, 1], got {v}")
        if self.attribute_colour_only + self.attribute_shape_only > 1.0 + 1e-9:
            raise ValueError("attribute_colour_only + attribute_shape_only must be <= 1")

    @property
    def kind_probs(self) -> list[float]:
        return [getattr(self, kind) for kind in ALT_KINDS]


@dataclass(frozen=True)
class AltText:
    text: str
    kind: str  # One of ``ALT_KINDS``.
    uses_shade: bool  # True when the text names a shade of the main object.


def _phrases(text: str) -> list[str]:
    """A phrase list written as one ", "-separated string; _pick draws by position, so the order matters."""
    return text.split(", ")


_ALT_COLOUR = _phrases(
    "{c}, {c} thing, {c} icon, {c} graphic, {c} sticker, {c} design, something {c}, {c} clipart, {c} art"
)
_ALT_SHAPE = _phrases("{s}, {s} icon, a {s}, {s} shape, {s} clipart, {s} symbol, simple {s}, {s} sign, the {s}")
_ALT_BOTH = ("{c} {s}", "{c} {s} icon", "a {c} {s}", "{c} {s} clipart", "{c} {s} sticker", "{s} {c}")
_ALT_JOIN = (" and ", ", ", " with ", " + ", " & ")
_JUNK_FIXED = _phrases(
    "buy now, free shipping on all orders, click here, sale 50% off, untitled, thumbnail, logo, home, "
    "best price guaranteed, limited time offer, stock photo, image may contain: text, no description available, "
    "placeholder, view larger, loading..., advertisement, download, wallpaper hd, new arrivals, share on facebook, "
    "cover art, home decor ideas, shop the look, add to cart, as seen on tv, gift ideas for her, print on demand, "
    "best seller"
)
_SEO_SUFFIX = _phrases(" png,  clipart,  vector illustration,  | free download,  - stock image,  hd,  transparent")
_SEO_SUFFIX += _phrases(" icon set,  for kids,  printable")
_SEO_PREFIX = ("free ", "cute ", "simple ", "cartoon ", "vector ", "flat ")


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _junk(rng: np.random.Generator) -> str:
    r = int(rng.integers(8))
    y, mo, d = int(rng.integers(2008, 2024)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    forms = (  # lambdas: only the chosen form draws its numbers
        lambda: f"IMG_{int(rng.integers(1000, 10000))}.jpg",
        lambda: f"DSC{int(rng.integers(10000, 100000))}.JPG",
        lambda: f"{y}-{mo:02d}-{d:02d}",
        lambda: f"photo_{y}{mo:02d}{d:02d}_{int(rng.integers(0, 240000)):06d}.jpg",
        lambda: f"banner_final_v{int(rng.integers(1, 9))}.png",
        lambda: f"{_pick(rng, ('product image', 'page', 'slide', 'untitled-', 'image'))}{int(rng.integers(1, 60))}",
    )
    return forms[r]() if r < len(forms) else _pick(rng, _JUNK_FIXED)


_BG_SHORT = {"checker": "checkered", "hstripes": "stripes", "vstripes": "striped"}  # plain: its colour
_PUNCT = (  # punctuation noise: underscores, a trailing "!!", a hashtag, dashes
    lambda text, rng: text.replace(" ", "_"),
    lambda text, rng: text + _pick(rng, ("!", "!!", "...", " :)")),
    lambda text, rng: "#" + text.replace(" ", ""),
    lambda text, rng: text.replace(" ", "-"),
)


def alt_text(scene: Scene, rng: np.random.Generator, noise: AltTextNoise | None = None) -> AltText:
    """A web-like alt-text for ``scene`` (see ``AltTextNoise`` for the distribution)."""
    noise = noise or AltTextNoise()
    main = scene.main
    kind = ALT_KINDS[int(rng.choice(4, p=noise.kind_probs))]
    use_shade = bool(rng.random() < noise.shade_rate) and kind in ("attribute", "partial")
    colour_word = main.shade if use_shade else main.colour
    if kind == "attribute":
        u = rng.random()
        if u < noise.attribute_colour_only:
            text = _pick(rng, _ALT_COLOUR).format(c=colour_word)
        elif u < noise.attribute_colour_only + noise.attribute_shape_only and not use_shade:
            text = _pick(rng, _ALT_SHAPE).format(s=main.shape)
        else:
            text = _pick(rng, _ALT_BOTH).format(c=colour_word, s=main.shape)
    elif kind == "partial":
        n = len(scene.objects)
        others = [o for i, o in enumerate(scene.objects) if i != scene.main_index]
        order = rng.permutation(len(others))[: max(0, n - 2)]  # drops one object (a random non-main one) if n > 1
        phrases = [f"{colour_word} {main.shape}"] + [f"{others[int(j)].colour} {others[int(j)].shape}" for j in order]
        text = _pick(rng, _ALT_JOIN).join(phrases)
        if rng.random() < noise.partial_background:
            bg = scene.background
            text += _pick(rng, (" on ", " ", " - ")) + _BG_SHORT.get(bg.kind, bg.colours[0])
    elif kind == "wrong":
        if rng.random() < noise.wrong_colour_share:
            c = _pick(rng, [c for c in COLOURS if c != main.colour])
            s = main.shape
        else:
            c = main.colour
            s = _pick(rng, [s for s in SHAPES if s != main.shape])
        text = _pick(rng, ("a {c} {s}", "{c} {s}", "{c} {s} icon", "{s} {c}")).format(c=c, s=s)
    else:
        text = _junk(rng)
    text = fix_articles(text)
    if kind != "junk" and rng.random() < noise.seo_rate:
        text = _pick(rng, _SEO_PREFIX) + text if rng.random() < 0.3 else text + _pick(rng, _SEO_SUFFIX)
    if rng.random() < noise.case_rate:
        text = _pick(rng, (str.upper, str.title, str.capitalize))(text)
    if rng.random() < noise.punct_rate:
        text = _pick(rng, _PUNCT)(text, rng)
    return AltText(text=text, kind=kind, uses_shade=use_shade)


def mentions_shade(text: str) -> bool:
    """True if ``text`` contains any shade name (case-insensitive substring; used by tests and analysis)."""
    low = text.lower()
    return any(name in low for name in SHADE_TO_COLOUR)


DETAIL_POSITIONS = {
    "left": ("on the left side", "on the left"),
    "right": ("on the right side", "on the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}


# A background's phrasings (plain, checker, stripes), for the detailed descriptions and the short captions
_DETAIL_BG = (
    ("a solid {a} background", "a plain {a} background"),
    ("a {a} and {b} checkered background", "a checkerboard background of {a} and {b}"),
    ("a background of {o} {a} and {b} stripes", "a {o}ly striped {a} and {b} background"),
)
_SHORT_BG = (
    ("a {a} background", "a plain {a} background", "{a}"),
    ("a checkered background", "a {a} and {b} checkerboard", "{a} and {b} checks"),
    ("a striped background", "{a} and {b} stripes", "{o} stripes", "a {o}ly striped background"),
)
_LONG_BG = (  # a one-phrase tuple draws nothing: rng.integers(1) leaves the generator as it was
    ("a uniform {a} backdrop", "a backdrop of flat {a}"),
    ("a backdrop tiled like a chessboard in {a} and {b}",),
    ("a backdrop striped {o}ly in {a} and {b}",),
)


def _bg_phrase(scene: Scene, rng: np.random.Generator, phrasings=_DETAIL_BG) -> str:
    bg = scene.background
    templates = phrasings[0 if bg.kind == "plain" else 1 if bg.kind == "checker" else 2]
    ori = "horizontal" if bg.kind == "hstripes" else "vertical"
    return _pick(rng, templates).format(a=bg.colours[0], b=bg.colours[-1], o=ori)


def _full_np(o: SceneObject, article: str = "a") -> str:
    return f"{article} {o.size} {o.colour} {o.shape}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeioAEIO]|[uU](?!ni))")


def fix_articles(s: str) -> str:
    """'a orange star' -> 'an orange star' (templates insert colour words after a fixed 'a')."""
    return _A_BEFORE_VOWEL.sub(r"\1n ", s)


def detailed_description(scene: Scene, rng: np.random.Generator) -> str:
    """Ground-truth LLaVA "detailed caption": every object's size, colour, shape and position, plus the background."""
    return fix_articles(_detailed(scene, rng))


def _detailed(scene: Scene, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    n = len(objs)
    count = "a single shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"
    bg = _bg_phrase(scene, rng)
    pos = [_pick(rng, DETAIL_POSITIONS[o.position]) for o in objs]
    t = int(rng.integers(5))
    if t == 0:
        parts = [f"{_full_np(o)} {p}" for o, p in zip(objs, pos, strict=True)]
        return f"This is a simple graphic with {count} on {bg}. There is {_join(parts)}."
    if t == 1:
        first = f"The image shows {count} against {bg}."
        if n == 1:
            return f"{first} It is {_full_np(objs[0])} {pos[0]}."
        rest = " ".join(f"There is also {_full_np(o)} {p}." for o, p in zip(objs[1:], pos[1:], strict=True))
        return f"{first} The largest one is a {objs[0].colour} {objs[0].shape} {pos[0]}. {rest}"
    if t == 2:
        first = f"In this picture, {_full_np(objs[0])} sits {pos[0]} of {bg}."
        lead = ("Next to it,", "Nearby,", "Also,")
        rest = " ".join(
            f"{_pick(rng, lead)} {_full_np(o)} appears {p}." for o, p in zip(objs[1:], pos[1:], strict=True)
        )
        return (first + " " + rest).strip()
    if t == 3:
        names = _join([f"a {o.colour} {o.shape}" for o in objs])
        detail = " ".join(f"The {o.colour} {o.shape} is {o.size} and {p}." for o, p in zip(objs, pos, strict=True))
        return f"A minimalist illustration featuring {names}, set against {bg}. {detail}"
    items = "; ".join(f"{_full_np(o)} {p}" for o, p in zip(objs, pos, strict=True))
    return f"The image contains {count}: {items}. The background is {bg[2:] if bg.startswith('a ') else bg}."


BIG_WORDS = ("big", "large")
SMALL_WORDS = ("small", "little", "tiny")
SHORT_POSITIONS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "up top"),
    "bottom": ("at the bottom", "near the bottom", "down low"),
    "center": ("in the center", "in the middle", "in the centre"),
}


def _size_word(o: SceneObject, rng: np.random.Generator) -> str:
    return _pick(rng, BIG_WORDS if o.size == "large" else SMALL_WORDS)


def _relation(o: SceneObject, ref: SceneObject, rng: np.random.Generator) -> str:
    """Where ``o`` is relative to ``ref`` ("to the left of", "above", ...)."""
    dx, dy = o.cx - ref.cx, o.cy - ref.cy
    if abs(dx) >= abs(dy):
        return _pick(rng, ("to the left of", "left of")) if dx < 0 else _pick(rng, ("to the right of", "right of"))
    return _pick(rng, ("above", "over")) if dy < 0 else _pick(rng, ("below", "under"))


def _short_candidates(scene: Scene, rng: np.random.Generator) -> list[str]:
    objs = list(scene.objects)
    m = scene.main
    n = len(objs)
    others = objs[1:]
    o = others[int(rng.integers(len(others)))] if others else None
    msz, mpos = _size_word(m, rng), _pick(rng, SHORT_POSITIONS[m.position])
    mnp = _pick(rng, (f"a {m.colour} {m.shape}", f"a {msz} {m.colour} {m.shape}", f"a {msz} {m.colour} {m.shape}"))
    bgp = _bg_phrase(scene, rng, _SHORT_BG)
    c = [
        f"{mnp} {mpos} on {bgp}",
        f"{mnp} drawn {mpos} over {bgp}",
        f"{mnp} sitting {mpos} with {bgp} behind it",
        f"{_pick(rng, ('picture', 'image', 'drawing', 'graphic'))} of a {m.colour} {m.shape} on {bgp}",
        f"{bgp} behind {mnp}",
        f"a {m.colour} {m.shape} {mpos} against {bgp}",
        f"a {msz} {m.shape} in {m.colour} on {bgp}",
    ]
    if o is None:
        c += [
            f"a lone {m.colour} {m.shape} {mpos} on {bgp}",
            f"just one {msz} {m.colour} {m.shape} on {bgp}",
            f"a single {m.shape}, {m.colour} and {m.size}, on {bgp}",
        ]
        return c
    osz = _size_word(o, rng)
    onp = _pick(rng, (f"a {o.colour} {o.shape}", f"a {osz} {o.colour} {o.shape}", f"a {osz} {o.shape}"))
    rel = _relation(o, m, rng)
    opos = _pick(rng, SHORT_POSITIONS[o.position])
    c += [
        f"{mnp} and {onp} on {bgp}",
        f"{mnp} next to {onp}",
        f"{onp} {rel} {mnp}",
        f"{mnp} {mpos} with {onp} {opos}",
        f"there is {mnp} {mpos} and {onp} {opos}",
        f"{NUMBER_WORDS[n]} shapes on {bgp}, the biggest being a {m.colour} {m.shape}",
        f"a {m.colour} {m.shape} and a {o.colour} {o.shape} on {bgp}",
        f"{_pick(rng, ('graphic', 'drawing', 'cartoon'))} of {mnp} with {onp} nearby",
        f"{onp} and {mnp} {_pick(rng, ('together', 'side by side', 'in one picture'))}",
        f"a {o.colour} {o.shape} {opos} and a {msz} {m.colour} {m.shape} {mpos}",
    ]
    if n == 3:
        o1, o2 = others
        c.append(f"{mnp}, a {o1.colour} {o1.shape} and a {o2.colour} {o2.shape}")
        c.append(f"three shapes: {mnp}, a {o1.colour} {o1.shape} and a {o2.colour} {o2.shape}")
    return c


def short_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct COCO-style captions; each names the main object with >= 2 attributes plus context."""
    out: list[str] = []
    for _ in range(50):
        cands = _short_candidates(scene, rng)
        for j in rng.permutation(len(cands)):
            s = fix_articles(_cap(cands[int(j)])) + ("." if rng.random() < 0.7 else "")
            if s.rstrip(".") not in {x.rstrip(".") for x in out}:
                out.append(s)
            if len(out) == n:
                return out
    while len(out) < n:  # pragma: no cover - only with absurd n
        out.append(out[len(out) % max(1, len(out))])
    return out


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One short, correct caption (the answer of caption-pretraining samples)."""
    return short_captions(scene, rng, 1)[0]


LONG_POSITIONS = {
    "left": ("near the left border", "by the left edge", "towards the left margin"),
    "right": ("near the right border", "by the right edge", "towards the right margin"),
    "top": ("near the upper edge", "towards the top edge", "close to the upper border"),
    "bottom": ("near the lower edge", "towards the bottom edge", "close to the lower border"),
    "center": ("at the very middle of the frame", "in the middle of the frame", "right at the centre of the frame"),
}


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Urban1K-style long caption, phrased unlike the training descriptions (different words and object order)."""
    objs = sorted(scene.objects, key=lambda o: (round(o.cy / 8), o.cx))  # reading order, not main-first
    n = len(objs)
    noun = _pick(rng, ("figure", "form", "motif"))
    what = _pick(rng, ("A drawing", "A rendering", "A flat composition", "An abstract sketch"))
    count = f"a single {noun}" if n == 1 else f"{NUMBER_WORDS[n]} {noun}s"
    sents = [f"{what} of {count} over {_bg_phrase(scene, rng, _LONG_BG)}."]
    for o in objs:
        size = _pick(rng, ("big", "sizeable")) if o.size == "large" else _pick(rng, ("little", "compact"))
        p = _pick(rng, LONG_POSITIONS[o.position])
        t = int(rng.integers(3))
        if t == 0:
            verb = _pick(rng, ("is located", "rests", "can be seen", "is placed"))
            sents.append(f"A {size} {o.shape} {_pick(rng, ('coloured', 'tinted', 'painted'))} {o.colour} {verb} {p}.")
        elif t == 1:
            sents.append(f"There is a {o.shape}, {size} and {o.colour}, {p}.")
        else:
            sents.append(f"{_cap(p)}, one can see a {size} {o.colour}-coloured {o.shape}.")
    if n > 1:
        sents.append(f"The most prominent {noun} is the {scene.main.shape}.")
    return fix_articles(" ".join(sents))


SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."


def qa_pairs(scene: Scene, rng: np.random.Generator, n: int = 3) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs about colours, shapes, counts, positions and the background.

    With probability 0.3 a question asks for a single word or phrase (LLaVA-665K VQA style) and gets a short answer.
    """
    objs = list(scene.objects)
    m = scene.main
    k = len(objs)
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    pool: list[tuple[str, str, str]] = []  # (question, long answer, short answer)
    count = f"There {'is one shape' if k == 1 else f'are {NUMBER_WORDS[k]} shapes'} in the image."
    pool.append(("How many shapes are in the image?", count, _cap(NUMBER_WORDS[k])))
    for o in objs:
        if shapes.count(o.shape) == 1:
            pool.append((f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}.", _cap(o.colour)))
            at = _pick(rng, DETAIL_POSITIONS[o.position])
            where = f"The {o.colour} {o.shape} is {at} of the image."
            pool.append((f"Where is the {o.colour} {o.shape}?", where, _cap(DETAIL_POSITIONS[o.position][1])))
            pool.append((f"Is the {o.shape} large or small?", f"The {o.shape} is {o.size}.", _cap(o.size)))
        if colours.count(o.colour) == 1:
            shape_a = f"The {o.colour} object is a {o.shape}."
            pool.append((f"What shape is the {o.colour} object?", shape_a, _cap(o.shape)))
    if k > 1:
        largest = f"The largest object is {_full_np(m)}."
        pool.append(("What is the largest object in the image?", largest, _cap(f"{m.colour} {m.shape}")))
    present = _pick(rng, shapes)
    pm = next(o for o in scene.objects if o.shape == present)
    at = _pick(rng, DETAIL_POSITIONS[pm.position])
    pool.append((f"Is there a {present} in the image?", f"Yes, there is a {pm.colour} {present} {at}.", "Yes"))
    absent = [s for s in SHAPES if s not in shapes]
    if absent:
        a = _pick(rng, absent)
        pool.append((f"Is there a {a} in the image?", f"No, there is no {a} in the image.", "No"))
    absent_c = [c for c in COLOURS if c not in colours]
    if absent_c:
        a = _pick(rng, absent_c)
        pool.append((f"Is anything in the image {a}?", f"No, none of the shapes is {a}.", "No"))
    bg = scene.background
    if bg.kind == "plain":
        looks = (f"The background is plain {bg.colours[0]}.", _cap(bg.colours[0]))
    else:
        style = {"hstripes": "horizontal stripes", "vstripes": "vertical stripes", "checker": "a checkerboard"}[bg.kind]
        looks = (f"The background has {style} of {bg.colours[0]} and {bg.colours[1]}.", _cap(style))
    pool.append(("What does the background look like?", *looks))
    side = _pick(rng, ("left", "right", "top", "bottom"))
    there = [o for o in objs if o.position == side]
    where = DETAIL_POSITIONS[side][0]
    if there:
        o_np = f"{there[0].colour} {there[0].shape}"
        pool.append((f"What is {where} of the image?", f"There is {_full_np(there[0])} {where}.", _cap(o_np)))
    else:
        pool.append((f"What is {where} of the image?", f"Nothing, the {side} of the image is empty.", "Nothing"))
    out = []
    for j in rng.permutation(len(pool))[:n]:
        q, long_a, short_a = pool[int(j)]
        if rng.random() < 0.3:
            out.append((f"{q}\n{SINGLE_WORD_SUFFIX}", short_a))
        else:
            out.append((q, fix_articles(long_a)))
    return out


# colour a + colour b = colour c
_MIXES = [tuple(m.split()) for m in ("red yellow orange", "blue yellow green", "red blue purple", "red white pink")]
_MIXES += [("blue", "green", "cyan"), ("black", "white", "gray")]
_SIDES = (("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6))


def text_only_qa(rng: np.random.Generator, n: int = 1) -> list[tuple[str, str]]:
    """Questions answerable without an image (colour mixing, shape facts, simple arithmetic)."""
    pool: list[tuple[str, str]] = []
    a, b, c = _pick(rng, _MIXES)
    if rng.random() < 0.5:
        a, b = b, a
    pool.append((f"What colour do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {c}."))
    pool.append((f"Which two colours can be mixed to make {c}?", f"You can mix {a} and {b} to make {c}."))
    s, k = _pick(rng, _SIDES)
    pool.append((f"How many sides does a {s} have?", f"A {s} has {NUMBER_WORDS[k] if k < 6 else 'six'} sides."))
    pool.append(("How many points does a typical star shape have?", "A typical star shape has five points."))
    pool.append(("Which shape has no corners: a circle or a square?", "A circle has no corners."))
    ring = "A ring is a circle with a hole in the middle, so only its outline band is filled."
    pool.append(("What is the difference between a ring and a circle?", ring))
    pool.append(("How many arms does a plus-shaped cross have?", "A plus-shaped cross has four arms."))
    x, y = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    pool.append((f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."))
    dark, light = _pick(rng, (("navy", "beige"), ("black", "white"), ("navy", "white"), ("gray", "white")))
    pool.append((f"Which colour is darker, {dark} or {light}?", f"{_cap(dark)} is darker than {light}."))
    things = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow")]
    sky = _pick(rng, [*things, ("a ripe tomato", "red"), ("a pumpkin", "orange")])
    pool.append((f"What colour is {sky[0]} usually?", f"{_cap(sky[0])} is usually {sky[1]}."))
    return [pool[int(j)] for j in rng.permutation(len(pool))[:n]]


# LLaVA-1.5 brief-description prompts (LCS-558K / BLIP captions) and detailed-description prompts (detail_23k and
# ShareGPT4V). The first detailed prompt is the one recaptioning uses.
RECAPTION_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
SHORT_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAIL_PROMPTS: tuple[str, ...] = (
    RECAPTION_PROMPT,
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)
BRIEF_PROMPTS: tuple[str, ...] = (
    "Provide a one-sentence caption for the provided image.",
    "Briefly describe this image.",
    "Write a short caption for this picture.",
)
# Every prompt of the world, in a fixed order (the world tokenizer trains on them).
PROMPTS = (RECAPTION_PROMPT, *DETAIL_PROMPTS, *SHORT_CAPTION_PROMPTS, *BRIEF_PROMPTS, SINGLE_WORD_SUFFIX)


def _with_image(question: str, rng: np.random.Generator) -> str:
    return f"{question}\n<image>" if rng.random() < 0.3 else f"<image>\n{question}"


def caption_pretrain_conversation(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """LCS-558K-style turn pair: a brief-caption prompt and one short correct caption."""
    prompt = _pick(rng, SHORT_CAPTION_PROMPTS)
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": short_caption(scene, rng)}]


INSTRUCT_KINDS = ("detail", "brief", "qa", "text")


def instruct_conversation(
    scene: Scene | None, rng: np.random.Generator, kind: str, max_qa_turns: int = 4
) -> list[dict]:
    """One LLaVA-665K-style conversation. ``kind`` is one of ``INSTRUCT_KINDS``; "text" takes ``scene=None``.

    Image conversations carry ``<image>`` exactly once, in the first human turn (before or after the question).
    """
    turns: list[tuple[str, str]]
    if kind == "text":
        turns = text_only_qa(rng, 1 + int(rng.integers(2)))
    elif scene is None:
        raise ValueError(f"kind {kind!r} needs a scene")
    elif kind == "detail":
        turns = [(_pick(rng, DETAIL_PROMPTS), detailed_description(scene, rng))]
    elif kind == "brief":
        turns = [(_pick(rng, BRIEF_PROMPTS), short_caption(scene, rng))]
    elif kind == "qa":
        turns = qa_pairs(scene, rng, 1 + int(rng.integers(max_qa_turns)))
    else:
        raise ValueError(f"unknown instruct kind {kind!r}")
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": _with_image(q, rng) if i == 0 and kind != "text" else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def karpathy_tokens(sentence: str) -> list[str]:
    """Tokens as in Karpathy's COCO/Flickr splits: lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", sentence.lower())


def vocab() -> dict:
    """The world's vocabulary (written into ``world.json``)."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "shades": {c: {name: list(rgb) for name, rgb in SHADES[c]} for c in COLOURS},
        "background_colours": {k: list(v) for k, v in BACKGROUND_COLOURS.items()},
    }
