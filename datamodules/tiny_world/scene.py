"""Scene sampling (ground truth) and PIL rendering for the tiny world (README.md here, "What is in a scene").

Everything random comes from the ``numpy.random.Generator`` the caller passes in, so a scene (and its pixels) is a
pure function of that generator's seed; :func:`item_rng` builds the per-item generators the writer uses.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
# Two named shades per colour, visibly different in RGB. Only alt-text ever names a shade (the fine-grained label
# that recaptions lose); every rendered object is drawn in one of its colour's two shades.
SHADES: dict[str, tuple[tuple[str, tuple[int, int, int]], tuple[str, tuple[int, int, int]]]] = {
    "red": (("crimson", (170, 15, 45)), ("scarlet", (255, 45, 15))),
    "green": (("lime", (120, 230, 50)), ("forest", (20, 105, 35))),
    "blue": (("cobalt", (15, 40, 170)), ("cornflower", (95, 140, 245))),
    "yellow": (("lemon", (255, 245, 70)), ("gold", (215, 165, 10))),
    "orange": (("tangerine", (255, 150, 30)), ("rust", (185, 75, 15))),
    "purple": (("violet", (155, 75, 230)), ("plum", (100, 25, 95))),
    "pink": (("magenta", (235, 35, 175)), ("blush", (255, 175, 205))),
    "cyan": (("aqua", (80, 245, 250)), ("teal", (0, 135, 145))),
}
SHADE_TO_COLOUR: dict[str, str] = {name: colour for colour, pair in SHADES.items() for name, _ in pair}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (22, 22, 22),
    "beige": (222, 205, 170),
    "navy": (22, 32, 80),
    "white": (240, 240, 240),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "hstripes", "vstripes", "checker")

# Class vocabulary of the classification eval: index = colour_index * len(SHAPES) + shape_index.
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
FINE_CLASSNAMES: tuple[str, ...] = tuple(f"{name} {s}" for c in COLOURS for name, _ in SHADES[c] for s in SHAPES)


@dataclass(frozen=True)
class SceneConfig:
    """Geometry and appearance knobs of scene sampling and rendering (a slice of ``WorldConfig``)."""

    image_size: int = 64  # Output side length in pixels (square images).
    supersample: int = 4  # Drawing resolution multiplier; the canvas is downsampled to ``image_size``.
    downsample: str = "lanczos"  # "lanczos" (box-reduce to 2x, then LANCZOS) or "box" (area mean; ~0.4 ms cheaper).
    object_count_probs: tuple[float, ...] = (0.4, 0.4, 0.2)  # P(1 object), P(2), P(3).
    small_size: float = 16.0  # Nominal diameter (px at ``image_size``) of a small object.
    large_size: float = 28.0  # Nominal diameter of a large object.
    size_jitter: float = 0.1  # Each object's size is scaled by U(1 - size_jitter, 1 + size_jitter).
    position_jitter: float = 3.0  # Each object's centre moves by U(-j, j) px in x and y.
    edge_margin: float = 3.0  # Px between an edge-anchored object's bounding box and the border, before jitter.
    rgb_jitter: int = 20  # Each object's shade RGB is offset by an integer in [-rgb_jitter, rgb_jitter] per channel.
    pixel_noise_sigma: float = 6.0  # Std of the Gaussian noise added to every pixel after downsampling.
    background_kind_probs: tuple[float, ...] = (0.5, 0.2, 0.2, 0.1)  # Probabilities of ``BACKGROUND_KINDS``.
    stripe_width: int = 8  # Width (px) of background stripes and checker squares.
    min_background_contrast: float = 90.0  # Backgrounds are redrawn (<= 20 times) until objects are this far (L2).

    def __post_init__(self) -> None:
        for name, n in (("object_count_probs", 3), ("background_kind_probs", len(BACKGROUND_KINDS))):
            probs = getattr(self, name)
            if len(probs) != n or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} must be {n} probabilities summing to 1, got {probs}")
        if self.image_size < 16 or self.supersample < 1:
            raise ValueError("image_size must be >= 16 and supersample >= 1")
        if self.downsample not in ("lanczos", "box"):
            raise ValueError(f"downsample must be 'lanczos' or 'box', got {self.downsample!r}")


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``cx``/``cy``/``diameter`` are in output pixels; ``rgb`` is the exact fill colour drawn."""

    shape: str
    colour: str
    shade: str
    size: str
    position: str
    cx: float
    cy: float
    diameter: float
    rgb: tuple[int, int, int]

    @property
    def label(self) -> int:  # into CLASSNAMES
        return COLOURS.index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

    @property
    def fine_label(self) -> int:  # into FINE_CLASSNAMES
        shade_index = [name for name, _ in SHADES[self.colour]].index(self.shade)
        return (COLOURS.index(self.colour) * 2 + shade_index) * len(SHAPES) + SHAPES.index(self.shape)


@dataclass(frozen=True)
class Background:
    kind: str
    colours: tuple[str, ...]


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. Objects are in drawing order: the large object (if any) first."""

    objects: tuple[SceneObject, ...]
    background: Background
    main_index: int
    image_size: int = 64

    @property
    def main(self) -> SceneObject:
        return self.objects[self.main_index]

    @property
    def label(self) -> int:
        return self.main.label

    @property
    def fine_label(self) -> int:
        return self.main.fine_label

    def content_key(self) -> str:
        """Jitter- and shade-free description of the content: images with equal keys are indistinguishable to any
        caption that uses base colour names, so retrieval evals can treat them as duplicates."""
        objs = sorted(f"{o.size}-{o.colour}-{o.shape}-{o.position}" for o in self.objects)
        return "|".join(objs) + "|bg:" + self.background.kind + ":" + "/".join(self.background.colours)

    def objects_json(self) -> str:
        return json.dumps([asdict(o) for o in self.objects], separators=(",", ":"))

    def background_json(self) -> str:
        return json.dumps(asdict(self.background), separators=(",", ":"))

    @classmethod
    def from_json(cls, objects: str, background: str, main_index: int, image_size: int = 64) -> Scene:
        """Rebuild a scene from the JSON columns of ``truth/*.parquet``."""
        objs = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in json.loads(objects))
        bg = json.loads(background)
        return cls(objs, Background(bg["kind"], tuple(bg["colours"])), int(main_index), int(image_size))


def item_rng(seed: int, split_id: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one aspect (``stream``) of one item: a pure function of its arguments."""
    return np.random.default_rng([seed, split_id, index, stream])


def _index(u: float, n: int) -> int:
    """Uniform index in [0, n) from a uniform draw ``u`` in [0, 1)."""
    return min(int(u * n), n - 1)


def _weighted(u: float, probs: tuple[float, ...]) -> int:
    """The first index whose cumulative probability exceeds ``u``."""
    return min(bisect.bisect_right(list(itertools.accumulate(probs)), u), len(probs) - 1)


def sample_scene(
    rng: np.random.Generator,
    cfg: SceneConfig | None = None,
    *,
    main_colour: str | None = None,
    main_shape: str | None = None,
    n_objects: int | None = None,
) -> Scene:
    """Draw a random scene. ``main_colour``/``main_shape``/``n_objects`` pin those choices (class-balanced evals).

    With 2-3 objects exactly one is large (the main object) and every object sits at a distinct position; no two
    objects share both colour and shape. With one object its size is random and it is the main object.
    """
    cfg = cfg or SceneConfig()
    head = rng.random(2)
    n = n_objects if n_objects is not None else 1 + _weighted(float(head[0]), cfg.object_count_probs)
    if not 1 <= n <= len(POSITIONS):
        raise ValueError(f"n_objects must be in [1, {len(POSITIONS)}], got {n}")
    positions = [POSITIONS[int(i)] for i in rng.permutation(len(POSITIONS))[:n]]
    sizes = ["large"] + ["small"] * (n - 1) if n > 1 else [SIZES[_index(float(head[1]), 2)]]
    used: set[tuple[str, str]] = set()
    objects = []
    j = cfg.rgb_jitter
    for i in range(n):
        u = rng.random(9).tolist()
        colour, shape = COLOURS[_index(u[0], len(COLOURS))], SHAPES[_index(u[1], len(SHAPES))]
        if i == 0:
            colour, shape = main_colour or colour, main_shape or shape
        while (colour, shape) in used:
            v = rng.random(2).tolist()
            colour, shape = COLOURS[_index(v[0], len(COLOURS))], SHAPES[_index(v[1], len(SHAPES))]
        used.add((colour, shape))
        shade_name, shade_rgb = SHADES[colour][_index(u[2], 2)]
        nominal = cfg.large_size if sizes[i] == "large" else cfg.small_size
        diameter = nominal * (1 - cfg.size_jitter + 2 * cfg.size_jitter * u[3])
        near, mid = cfg.edge_margin + diameter / 2, cfg.image_size / 2
        far = cfg.image_size - near
        anchors = dict(left=(near, mid), right=(far, mid), top=(mid, near), bottom=(mid, far), center=(mid, mid))
        ax, ay = anchors[positions[i]]
        cx = ax + cfg.position_jitter * (2 * u[4] - 1)
        cy = ay + cfg.position_jitter * (2 * u[5] - 1)
        rgb = tuple(min(255, max(0, c + _index(w, 2 * j + 1) - j)) for c, w in zip(shade_rgb, u[6:], strict=True))
        xyd = round(cx, 3), round(cy, 3), round(diameter, 3)
        objects.append(SceneObject(shape, colour, shade_name, sizes[i], positions[i], *xyd, rgb))
    kind = BACKGROUND_KINDS[_weighted(float(rng.random()), cfg.background_kind_probs)]
    names = list(BACKGROUND_COLOURS)
    best: tuple[str, ...] = ()
    best_contrast = -1.0
    for _ in range(20):
        v = rng.random(2).tolist()
        a, b = _index(v[0], len(names)), _index(v[1], len(names) - 1)  # b: the second colour, never a
        bg_cols = (names[a],) if kind == "plain" else (names[a], names[b + (b >= a)])
        contrast = min(math.dist(o.rgb, BACKGROUND_COLOURS[c]) for o in objects for c in bg_cols)
        if contrast > best_contrast:
            best, best_contrast = bg_cols, contrast
        if contrast >= cfg.min_background_contrast:
            break
    return Scene(tuple(objects), Background(kind, best), main_index=0, image_size=cfg.image_size)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.47
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        arm, pts = [(-w, -r), (w, -r), (w, -w)], []  # one arm of the plus, rotated by 90 degrees three times
        for _ in range(4):
            pts += [(cx + x, cy + y) for x, y in arm]
            arm = [(-y, x) for x, y in arm]
        return pts
    raise ValueError(shape)


def _draw_background(draw: ImageDraw.ImageDraw, bg: Background, side: int, stripe: int) -> None:
    rgbs = [BACKGROUND_COLOURS[c] for c in bg.colours]
    draw.rectangle((0, 0, side, side), fill=rgbs[0])
    if bg.kind == "plain":
        return
    for k in range(0, side // stripe + 1):
        lo, hi = k * stripe, (k + 1) * stripe - 1
        if bg.kind == "hstripes" and k % 2:
            draw.rectangle((0, lo, side, hi), fill=rgbs[1])
        elif bg.kind == "vstripes" and k % 2:
            draw.rectangle((lo, 0, hi, side), fill=rgbs[1])
        elif bg.kind == "checker":
            for m in range((k + 1) % 2, side // stripe + 1, 2):  # square (0, 0) keeps colours[0]
                draw.rectangle((m * stripe, lo, (m + 1) * stripe - 1, hi), fill=rgbs[1])


def render_scene(scene: Scene, rng: np.random.Generator, cfg: SceneConfig | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``cfg.image_size`` px; ``rng`` only drives the pixel noise."""
    cfg = cfg or SceneConfig()
    k = cfg.supersample
    side = cfg.image_size * k
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, scene.background, side, cfg.stripe_width * k)
    for o in scene.objects:
        cx, cy, r = o.cx * k, o.cy * k, o.diameter * k / 2
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=o.rgb)
        elif o.shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=o.rgb, width=max(1, round(r * 0.45)))
        elif o.shape == "square":
            h = r * 0.86
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=o.rgb)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, r), fill=o.rgb)
    if k > 1 and cfg.downsample == "box":
        img = img.reduce(k)
    elif k > 1:
        # reducing_gap=2 box-reduces to 2x first, then LANCZOS: same look, about 2x faster than plain LANCZOS.
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    if cfg.pixel_noise_sigma > 0:
        bank = _noise_bank(cfg.image_size, float(cfg.pixel_noise_sigma))
        s = cfg.image_size
        f, y, x = (int(v) for v in rng.integers(0, (len(bank), s, s)))
        arr = np.asarray(img, dtype=np.int16) + bank[f, y : y + s, x : x + s]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


NOISE_FIELDS = 32


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int, sigma: float) -> np.ndarray:
    """Fixed Gaussian noise fields; each image adds a random window, chosen by its generator: as noisy as drawing 12k
    normals per image (which cost more than the rest of rendering), and about 10x cheaper."""
    g = np.random.default_rng([0x7E57, size])
    fields = g.standard_normal((NOISE_FIELDS, 2 * size, 2 * size, 3), dtype=np.float32) * np.float32(sigma)
    return np.rint(fields).astype(np.int16)
