"""The tiny world's "truth recaptioner": an imperfect oracle that writes a Recap-DataComp-1B-schema table.

Each ``re_caption`` is the world's detailed description of a *perceived* copy of the scene, with the imperfections of
:class:`RecapNoise` (what LLaVA recaptions lose); a pure function of ``(world seed, recap seed, key)``. Layout, knobs
and their rationale: README.md here, "Truth recaptions".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.formats import RECAP_SCHEMA
from datamodules.io import TMP_MARK, atomic_write

from .scene import COLOURS, SHAPES, Scene
from .text import detailed_description, mentions_shade

SOURCE = "tiny-world truth recaptioner"
CONFIG_NAME = "_recap_config.json"
LENGTH_UNIT = "whitespace-separated words (len(text.split()))"

_TAG = 0x72656361  # "reca": keeps these generators apart from the world's item_rng([seed, split, index, stream])
_NOISE_STREAM, _TEXT_STREAM, _SHUFFLE_STREAM = 0, 1, 2
_FILE_RE = re.compile(r"^train-\d{5}-of-\d{5}\.parquet$")


@dataclass(frozen=True)
class RecapNoise:
    """How imperfect the truth recaptioner is: per-object probabilities; all 0 is a perfect captioner."""

    colour_confusion: float = 0.3  # a colour_map colour is named with its mapped word (orange -> "red")
    shape_coarsen: float = 0.2  # a shape_map shape is named with its coarser word (ring -> "circle")
    drop_small: float = 0.2  # a small non-main object is left out
    n_variants: int = 1  # recaptions per image; more than 1 adds re_caption_1 ... columns after re_caption
    # False: one perception per image shared by all variants (only the wording differs, as sampling one captioner
    # several times would); True: every variant draws its own imperfections
    independent_variants: bool = False
    colour_map: tuple[tuple[str, str], ...] = (("orange", "red"), ("pink", "purple"), ("cyan", "blue"))
    shape_map: tuple[tuple[str, str], ...] = (("ring", "circle"), ("star", "shape"), ("cross", "shape"))

    def __post_init__(self) -> None:
        for name in ("colour_confusion", "shape_coarsen", "drop_small"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_variants < 1:
            raise ValueError(f"n_variants must be >= 1, got {self.n_variants}")
        # tuples (not lists) so the dataclass stays hashable and JSON round-trips compare equal
        object.__setattr__(self, "colour_map", tuple(tuple(p) for p in self.colour_map))
        object.__setattr__(self, "shape_map", tuple(tuple(p) for p in self.shape_map))
        for what, pairs, vocab in (("colour_map", self.colour_map, COLOURS), ("shape_map", self.shape_map, SHAPES)):
            for pair in pairs:
                if len(pair) != 2 or pair[0] not in vocab:
                    raise ValueError(f"{what} entries must be (one of {vocab}, word), got {pair!r}")
                if mentions_shade(pair[1]):
                    raise ValueError(f"{what} maps {pair[0]!r} to {pair[1]!r}, which names a shade")

    @classmethod
    def perfect(cls, n_variants: int = 1) -> RecapNoise:
        return cls(colour_confusion=0.0, shape_coarsen=0.0, drop_small=0.0, n_variants=n_variants)


@dataclass(frozen=True)
class Perception:
    """What the recaptioner "saw": the scene it describes (confused / coarsened words, dropped objects removed) and
    the indices (into the true scene's objects) each imperfection hit."""

    scene: Scene
    colour_confused: tuple[int, ...]
    shape_coarsened: tuple[int, ...]
    dropped: tuple[int, ...]


def _rng(world_seed: int, seed: int, key: str, stream: int, variant: int) -> np.random.Generator:
    key_hash = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([_TAG, int(world_seed), int(seed), key_hash, stream, variant])


def perceive(scene: Scene, noise: RecapNoise, rng: np.random.Generator) -> Perception:
    """Apply ``noise`` to a copy of ``scene``. Three uniforms are drawn per object whatever the rates, so raising one
    rate only adds imperfections to the same images and never reshuffles the others."""
    cmap, smap = dict(noise.colour_map), dict(noise.shape_map)
    u = rng.random((len(scene.objects), 3))
    kept, confused, coarsened, dropped = [], [], [], []
    for i, o in enumerate(scene.objects):
        if i != scene.main_index and o.size == "small" and u[i, 2] < noise.drop_small:
            dropped.append(i)
            continue
        colour, shape = o.colour, o.shape
        if colour in cmap and u[i, 0] < noise.colour_confusion:
            colour = cmap[colour]
            confused.append(i)
        if shape in smap and u[i, 1] < noise.shape_coarsen:
            shape = smap[shape]
            coarsened.append(i)
        kept.append(replace(o, colour=colour, shape=shape))
    main = scene.main_index - sum(1 for d in dropped if d < scene.main_index)
    seen = replace(scene, objects=tuple(kept), main_index=main)
    return Perception(seen, tuple(confused), tuple(coarsened), tuple(dropped))


def recaption_scene(
    scene: Scene, key: str, *, world_seed: int, seed: int = 0, noise: RecapNoise | None = None
) -> list[tuple[str, Perception]]:
    """The ``noise.n_variants`` recaptions of one image, each with the perception it describes."""
    noise = noise or RecapNoise()
    out = []
    shared = None
    for v in range(noise.n_variants):
        if noise.independent_variants or shared is None:
            shared = perceive(scene, noise, _rng(world_seed, seed, key, _NOISE_STREAM, v))
        text = detailed_description(shared.scene, _rng(world_seed, seed, key, _TEXT_STREAM, v))
        if mentions_shade(text):  # the world's invariant: only alt-text names a shade
            raise RuntimeError(f"recaption of {key!r} names a shade: {text!r}")
        out.append((text, shared))
    return out


def _read_inputs(world: Path) -> tuple[dict, pa.Table, dict[str, dict]]:
    world_json, truth_path, web_dir = world / "world.json", world / "truth" / "web.parquet", world / "web"
    for path in (world_json, truth_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (is {world} a tiny world? see generate_world)")
    web_files = sorted(p for p in web_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not web_files:
        raise FileNotFoundError(f"no img2dataset shard parquets {web_dir}/*.parquet")
    meta = json.loads(world_json.read_text())
    cols = ["url", "key", "sha256", "caption", "status"]
    web = pa.concat_tables([pq.read_table(p, columns=cols) for p in web_files])
    web = web.filter(pc.equal(web.column("status"), "success"))
    truth = pq.read_table(truth_path, columns=["key", "objects", "background", "main_index"]).to_pylist()
    return meta, web, {r["key"]: r for r in truth}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite to replace a previous table)")
        for p in out.iterdir():
            if p.is_file() and (_FILE_RE.match(p.name) or p.name == CONFIG_NAME or TMP_MARK in p.name):
                p.unlink()
        left = sorted(p.name for p in out.iterdir())
        if left:
            raise FileExistsError(
                f"{out} holds files this writer did not write ({left[:5]}); a recap directory is read whole by "
                "the sidecar builder, so choose an empty out_dir"
            )
    out.mkdir(parents=True, exist_ok=True)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def truth_recaptions(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    noise: RecapNoise | None = None,
    seed: int = 0,
    files: int = 4,
    shuffle: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write a world's recaption table (``files`` parquets plus ``_recap_config.json``) to an empty ``out_dir``.

    ``seed`` draws the noise and the wording; ``overwrite`` deletes only this writer's files. The summary's ``rates``
    are the realised rate of each imperfection over all variants, plus ``main_object_misnamed``.
    """
    t0 = time.perf_counter()
    noise = noise or RecapNoise()
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    world, out = Path(world_dir), Path(out_dir)
    meta, web, truth = _read_inputs(world)
    _prepare_out(out, overwrite)
    world_seed = int(meta["seed"])
    image_size = int(meta.get("config", {}).get("scene", {}).get("image_size", 64))

    keys = web.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise ValueError(f"key {dup!r} appears more than once in {world / 'web'}/*.parquet")
    org = web.column("caption").to_pylist()
    n_var = noise.n_variants
    captions: list[list[str]] = [[] for _ in range(n_var)]
    cnt = Counter()
    cmap, smap = dict(noise.colour_map), dict(noise.shape_map)
    for key in keys:
        row = truth.get(key)
        if row is None:
            raise ValueError(f"web sample {key!r} has no row in {world / 'truth' / 'web.parquet'}")
        scene = Scene.from_json(row["objects"], row["background"], row["main_index"], image_size)
        for v, (text, p) in enumerate(recaption_scene(scene, key, world_seed=world_seed, seed=seed, noise=noise)):
            captions[v].append(text)
            kept = [o for i, o in enumerate(scene.objects) if i not in p.dropped]
            cnt.update(
                captions=1,
                small_eligible=sum(i != scene.main_index and o.size == "small" for i, o in enumerate(scene.objects)),
                small_dropped=len(p.dropped),
                colour_eligible=sum(o.colour in cmap for o in kept),
                colour_confused=len(p.colour_confused),
                shape_eligible=sum(o.shape in smap for o in kept),
                shape_coarsened=len(p.shape_coarsened),
                main_misnamed=int(scene.main_index in p.colour_confused + p.shape_coarsened),
            )

    n = len(keys)
    re_len = [len(t.split()) if t else 0 for t in captions[0]]
    org_len = [len(t.split()) if t else 0 for t in org]
    data = {"url": web.column("url").to_pylist(), "re_caption": captions[0], "org_caption": org}
    data |= {"sha256": web.column("sha256").to_pylist(), "key": keys, "re_length": re_len, "org_length": org_len}
    data |= {f"re_caption_{v}": captions[v] for v in range(1, n_var)}
    schema = pa.schema([*RECAP_SCHEMA, *(pa.field(f"re_caption_{v}", pa.string()) for v in range(1, n_var))])
    # the clip and gpt4v scores are 0, as in the released train split
    table = pa.Table.from_arrays([pa.array(data.get(f.name, [0] * n), f.type) for f in schema], schema=schema)

    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng([_TAG, world_seed, int(seed), _SHUFFLE_STREAM]).permutation(n)
    paths = []
    for i, part in enumerate(np.array_split(order, files)):
        path = out / f"train-{i:05d}-of-{files:05d}.parquet"
        piece = table.take(pa.array(part, pa.int64()))
        atomic_write(path, lambda tmp, piece=piece: pq.write_table(piece, tmp))
        paths.append(str(path))

    rates = {
        "colour_confusion": _rate(cnt["colour_confused"], cnt["colour_eligible"]),
        "shape_coarsen": _rate(cnt["shape_coarsened"], cnt["shape_eligible"]),
        "drop_small": _rate(cnt["small_dropped"], cnt["small_eligible"]),
        "main_object_misnamed": _rate(cnt["main_misnamed"], cnt["captions"]),
    }
    truth_sha = hashlib.sha256((world / "truth" / "web.parquet").read_bytes()).hexdigest()
    note = "re_caption is generated from the world's ground truth with RecapNoise imperfections, not by a model"
    config = {"source": SOURCE, "model": None, "note": note, "noise": asdict(noise), "seed": int(seed)}
    config |= {"world_seed": world_seed, "world_dir": os.fspath(world_dir)}
    config |= {"world_format_version": meta.get("format_version"), "world_truth_sha256": truth_sha}
    config |= {"files": files, "shuffle": shuffle, "rows": n}
    config |= {"columns": [f.name for f in schema], "length_unit": LENGTH_UNIT}
    config |= {"scores": "re/org clip and gpt4v scores are 0, as in the released train split"}
    config |= {"realised_rates": rates, "counts": dict(sorted(cnt.items()))}
    atomic_write(out / CONFIG_NAME, json.dumps(config, indent=1) + "\n")
    summary = {"out_dir": os.fspath(out), "rows": n, "files": files, "paths": paths, "world_seed": world_seed}
    summary |= {"seed": int(seed), "n_variants": n_var, "rates": rates, "counts": dict(sorted(cnt.items()))}
    for name, lengths in (("re", re_len), ("org", org_len)):
        summary[f"mean_{name}_length"] = round(float(np.mean(lengths)), 3) if n else 0.0
    return summary | {"elapsed_s": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> dict:
    """``python -m experiments truth-recaptions --world DIR --out DIR ...``; prints and returns the summary."""
    ap = argparse.ArgumentParser(prog="truth-recaptions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="tiny world directory (generate_world output)")
    ap.add_argument("--out", required=True, help="output directory (missing or empty)")
    ap.add_argument("--seed", type=int, default=0, help="recap seed (noise and wording)")
    ap.add_argument("--files", type=int, default=4, help="number of train-*.parquet files")
    ap.add_argument("--no-shuffle", action="store_true", help="keep shard order instead of shuffling rows")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous table in --out")
    knobs = ap.add_argument_group("RecapNoise knobs (default: RecapNoise's)", argument_default=argparse.SUPPRESS)
    for flag in ("colour-confusion", "shape-coarsen", "drop-small"):
        knobs.add_argument(f"--{flag}", type=float)
    knobs.add_argument("--n-variants", type=int, help="recaptions per image (>1 adds re_caption_1, ...)")
    knobs.add_argument("--independent-variants", action="store_true", help="each variant draws its own imperfections")
    a = vars(ap.parse_args(argv))
    noise = RecapNoise(**{k: a.pop(k) for k in list(a) if k in RecapNoise.__dataclass_fields__})
    summary = truth_recaptions(
        a["world"], a["out"], noise, a["seed"], a["files"], shuffle=not a["no_shuffle"], overwrite=a["overwrite"]
    )
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
