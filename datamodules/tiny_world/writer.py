"""Write a whole tiny world to disk in the layouts real data uses (README.md here: "Layout", "Determinism").

``generate_world(out_dir, cfg)`` renders every split in ``cfg.workers`` processes; every item is a pure function of
``(cfg.seed, split id, index)``. Command line: ``python -m experiments world --out DIR`` (experiments/world.py).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .scene import (
    CLASSNAMES,
    COLOURS,
    FINE_CLASSNAMES,
    SHAPES,
    Scene,
    SceneConfig,
    _index,
    item_rng,
    render_scene,
    sample_scene,
)
from .text import (
    INSTRUCT_KINDS,
    PROMPTS,
    AltTextNoise,
    alt_text,
    caption_pretrain_conversation,
    detailed_description,
    instruct_conversation,
    karpathy_tokens,
    long_caption,
    short_caption,
    short_captions,
    vocab,
)

FORMAT_VERSION = 2  # 2: the DOCCI-layout copy of the long pairs and the VG-Attribution split
SPLITS = ("web", "caption_pretrain", "instruct", "classify", "retrieval", "long_retrieval", "t2i_prompts")
SPLITS += ("vg_attribution",)  # added last: split ids are seeds, so the earlier splits' items stay as they were
SPLIT_IDS: dict[str, int] = {split: i for i, split in enumerate(SPLITS)}
# Two independent random streams per item: the image stream draws the scene, then (web only) the download failure,
# then the pixel noise; the text stream draws every text. Changing a text knob never changes an image.
STREAM_IMAGE, STREAM_TEXT = 0, 1
TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z: fixed member mtime so shards are byte-identical across runs
CLASSIFY_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "an illustration of a {c}.",
    "a graphic of a {c}.",
    "a rendering of a {c}.",
    "a {c}.",
)
DOWNLOAD_ERRORS = ("HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", "<urlopen error timed out>")
VG_ATTRIBUTION_JSON = "eval/vg_attribution/visual_genome_attribution.json"  # ARO's file name
VG_BOX_MARGIN = 2  # px of context around the two objects in a VG-Attribution box
_OUTPUTS = ("world.json", "web", "truth", "caption_pretrain", "instruct", "eval")


@dataclass
class WorldConfig:
    """Every knob of the tiny world. ``WorldConfig()`` is the default world; ``WorldConfig.tiny()`` a test world."""

    seed: int = 0  # World seed; every item is a pure function of (seed, split, index).
    n_web: int = 20_000  # Web (alt-text) images, written as img2dataset webdataset shards under ``web/``.
    shard_size: int = 1_000  # Samples per web shard (img2dataset ``number_sample_per_shard``).
    oom_shard_count: int = 5  # Digits of the shard id in shard names and keys (img2dataset ``oom_shard_count``).
    n_caption_pretrain: int = 5_000  # LCS-558K-style caption-pretraining samples.
    n_instruct: int = 5_000  # LLaVA-665K-style instruction conversations (some text-only).
    n_classify: int = 2_000  # Zero-shot classification eval images, class-balanced (label = index % 48); 0 or >= 48.
    n_retrieval: int = 2_000  # Short-caption (COCO/Flickr-style, Karpathy json) retrieval eval images.
    n_long_retrieval: int = 2_000  # Long-caption (Urban1K-style) retrieval eval images.
    n_t2i: int = 2_000  # Text-to-image eval prompts with reference images (Recap-COCO-30K-style).
    n_vg_attribution: int = 2_000  # Attribute-swap (ARO VG-Attribution layout) eval items, one two-object image each.
    n_short_captions: int = 5  # Human captions per retrieval image.
    instruct_mix: tuple[float, float, float, float] = (0.35, 0.10, 0.45, 0.10)  # Shares of INSTRUCT_KINDS.
    instruct_max_qa_turns: int = 4  # Maximum Q/A turns in one Q/A conversation.
    fail_rate: float = 0.0  # Share of web samples that 'failed to download' (a parquet row, no tar member).
    jpeg_quality: int = 95  # JPEG quality of every written image (img2dataset's default encode_quality is 95).
    url_template: str = "https://tinyworld.invalid/img/{key}.jpg"  # the .invalid TLD never resolves
    scene: SceneConfig = field(default_factory=SceneConfig)  # Scene sampling and rendering knobs.
    alt: AltTextNoise = field(default_factory=AltTextNoise)  # Alt-text noise rates.
    workers: int = 2  # Processes used for generation (1 = in-process). Output does not depend on it.
    chunk_size: int = 500  # Items per task for the non-web splits (web tasks are whole shards).
    start_method: str = field(default_factory=lambda: "fork" if "fork" in mp.get_all_start_methods() else "spawn")

    def __post_init__(self) -> None:
        if isinstance(self.scene, dict):
            self.scene = SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.scene.items()})
        if isinstance(self.alt, dict):
            self.alt = AltTextNoise(**self.alt)
        self.instruct_mix = tuple(self.instruct_mix)
        if len(self.instruct_mix) != len(INSTRUCT_KINDS) or not math.isclose(sum(self.instruct_mix), 1, abs_tol=1e-6):
            raise ValueError(f"instruct_mix must be {len(INSTRUCT_KINDS)} probabilities summing to 1")
        if min(self.counts().values()) < 0 or self.shard_size < 1 or self.workers < 1 or self.chunk_size < 1:
            raise ValueError("counts must be >= 0 and shard_size, workers, chunk_size >= 1")
        if not 0.0 <= self.fail_rate < 1.0:
            raise ValueError("fail_rate must be in [0, 1)")
        if 0 < self.n_classify < len(CLASSNAMES):
            raise ValueError(f"n_classify must be 0 or >= {len(CLASSNAMES)} (ImageFolder rejects empty class dirs)")

    @classmethod
    def tiny(cls, **overrides: Any) -> WorldConfig:
        """A world small enough for unit tests (about 1-2 s on 2 CPU cores)."""
        sizes = dict(n_web=200, shard_size=50, n_caption_pretrain=48, n_instruct=64, n_classify=96, n_retrieval=48)
        return cls(**sizes | dict(n_long_retrieval=32, n_t2i=32, n_vg_attribution=24, chunk_size=64) | overrides)

    @classmethod
    def from_world_json(cls, path: str | os.PathLike) -> WorldConfig:
        """The config a world directory (or its ``world.json``) was generated with."""
        p = Path(path)
        if p.is_dir():
            p = p / "world.json"
        return cls(**json.loads(p.read_text())["config"])

    def counts(self) -> dict[str, int]:
        return {split: getattr(self, f"n_{split.removesuffix('_prompts')}") for split in SPLITS}  # t2i_prompts: n_t2i

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_web / self.shard_size)

    @property
    def oom_sample_per_shard(self) -> int:
        """img2dataset: ``math.ceil(math.log10(number_sample_per_shard))``."""
        return math.ceil(math.log10(self.shard_size))


def world_fingerprint(world_dir: str | os.PathLike, **extra: Any) -> str:
    """sha256 of what determines a world's content (``world.json`` without wall-clock fields), plus ``extra``."""
    meta = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in meta.get("config", {}).items() if k not in ("workers", "chunk_size", "start_method")}
    key = {k: meta.get(k) for k in ("format_version", "name", "seed", "counts", "web")} | {"config": config, **extra}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


CONVERSATION_FILES = ("caption_pretrain/chat.json", "instruct/llava_instruct.json")


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def conversations(world: Path) -> Iterator[list[dict]]:
    """The LLaVA-format conversations (turn lists) of the world's caption_pretrain and instruct sets, if present."""
    for rel in CONVERSATION_FILES:
        if (world / rel).is_file():
            yield from (sample["conversations"] for sample in _read_json(world / rel))


def web_alt_texts(world: Path) -> list[str]:
    """The alt-texts of the web shards' successful samples (their ``.txt``), from img2dataset's per-shard parquet."""
    texts: list[str] = []
    for shard in sorted((world / "web").glob("*.parquet")):
        t = pq.read_table(shard, columns=["caption", "status"]).to_pydict()
        texts += [c for c, s in zip(t["caption"], t["status"], strict=True) if s == "success" and c is not None]
    return texts


def world_texts(world_dir: str | os.PathLike) -> list[str]:
    """Every text of the world, as stored (conversation values keep their ``<image>``), in a fixed order: web
    alt-texts, conversation values, t2i captions and recaptions, retrieval sentences, long captions, class names
    (coarse and fine) and ``PROMPTS``."""
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
        if (world / "eval/classify" / name).is_file():
            texts += list(_read_json(world / "eval/classify" / name))
    return texts + list(PROMPTS)


def compute_key(idx: int, shard_id: int, oom_sample_per_shard: int, oom_shard_count: int) -> str:
    """img2dataset's key rule (``img2dataset/downloader.py::compute_key``)."""
    true_key = (10**oom_sample_per_shard) * shard_id + idx
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


def shard_name(shard_id: int, oom_shard_count: int = 5) -> str:
    return f"{shard_id:0{oom_shard_count}d}"


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _text_rng(cfg: WorldConfig, split: str, index: int) -> np.random.Generator:
    return item_rng(cfg.seed, SPLIT_IDS[split], index, STREAM_TEXT)


def _truth_row(scene: Scene) -> dict:
    row = {"objects": scene.objects_json(), "background": scene.background_json(), "main_index": scene.main_index}
    return row | {"content_key": scene.content_key(), "label": scene.label, "fine_label": scene.fine_label}


# img2dataset parquet schema for `--input_format parquet --caption_col re_caption --save_additional_columns
# '["org_caption"]'` (input columns first, in img2dataset's column_list order, then the downloader's columns).
WEB_PARQUET_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("org_caption", "caption", "url", "key", "status", "error_message")]
    + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    + [(c, pa.string()) for c in ("exif", "sha256")]
)


# Recap-COCO-30K's columns (image_id, caption, recaption; file_name for the image) plus the ground truth.
T2I_SCHEMA = pa.schema(
    [("image_id", pa.int64())]
    + [(c, pa.string()) for c in ("caption", "recaption", "file_name", "objects", "background", "content_key")]
)


def _tar_write(tar: tarfile.TarFile, sample: dict[str, str | bytes]) -> None:
    """``webdataset.TarWriter.write`` as img2dataset uses it (sorted extensions, bigdata:bigdata, mode 0o444), with a
    fixed mtime and without importing webdataset (which imports torch). tests/test_tiny_world.py checks the members
    equal those img2dataset's own writer produces."""
    key = sample["__key__"]
    for ext in sorted(k for k in sample if not k.startswith("_")):
        v = sample[ext]
        data = v.encode("utf-8") if isinstance(v, str) else v
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), TAR_MTIME, 0o444, "bigdata", "bigdata"
        tar.addfile(ti, io.BytesIO(data))


def _web_shard(cfg: WorldConfig, out: Path, shard_id: int) -> list[dict]:
    start_time = time.time()
    name = shard_name(shard_id, cfg.oom_shard_count)
    web = out / "web"
    lo, hi = shard_id * cfg.shard_size, min(cfg.n_web, (shard_id + 1) * cfg.shard_size)
    metas, truth = [], []
    status_dict: Counter = Counter()
    size = cfg.scene.image_size
    with open(web / f"{name}.tar", "wb") as fd, tarfile.open(fileobj=fd, mode="w|") as tar:
        for j, g in enumerate(range(lo, hi)):
            key = compute_key(j, shard_id, cfg.oom_sample_per_shard, cfg.oom_shard_count)
            rng = item_rng(cfg.seed, SPLIT_IDS["web"], g, STREAM_IMAGE)
            scene = sample_scene(rng, cfg.scene)
            alt = alt_text(scene, _text_rng(cfg, "web", g), cfg.alt)
            u_fail, u_err = rng.random(2).tolist()  # always drawn, so fail_rate never changes the pixels
            meta: dict[str, Any] = dict.fromkeys(WEB_PARQUET_SCHEMA.names)  # the columns, in order
            meta.update(org_caption=alt.text, caption=alt.text, url=cfg.url_template.format(key=key), key=key)
            if u_fail < cfg.fail_rate:
                err = DOWNLOAD_ERRORS[_index(u_err, len(DOWNLOAD_ERRORS))]
                meta.update(status="failed_to_download", error_message=err)
                status_dict[err] += 1
            else:
                jpg = _jpeg(render_scene(scene, rng, cfg.scene), cfg.jpeg_quality)
                meta.update(status="success", width=size, height=size, original_width=size, original_height=size)
                meta["sha256"] = hashlib.sha256(jpg).hexdigest()
                status_dict["success"] += 1
                _tar_write(tar, {"__key__": key, "jpg": jpg, "txt": alt.text, "json": json.dumps(meta, indent=4)})
            metas.append(meta)
            row = {"key": key, "shard": shard_id, "index": g, "status": meta["status"], **_truth_row(scene)}
            truth.append(row | {"alt_kind": alt.kind, "alt_uses_shade": alt.uses_shade})
    pq.write_table(pa.Table.from_pylist(metas, schema=WEB_PARQUET_SCHEMA), web / f"{name}.parquet")
    successes, end_time = status_dict["success"], time.time()
    stats = {"count": hi - lo, "successes": successes, "failed_to_download": hi - lo - successes, "failed_to_resize": 0}
    stats |= {"duration": end_time - start_time, "start_time": start_time, "end_time": end_time}
    stats["status_dict"] = dict(status_dict)
    (web / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return truth


def _split_chunk(cfg: WorldConfig, out: Path, split: str, lo: int, hi: int) -> list[dict]:
    recs: list[dict] = []
    for i in range(lo, hi):
        rng = _text_rng(cfg, split, i)  # the image stream is separate, so drawing the scene first changes no text
        sid, label, kind = f"{i:06d}", i % len(CLASSNAMES), None
        if split == "instruct":
            kind = INSTRUCT_KINDS[int(rng.choice(len(INSTRUCT_KINDS), p=cfg.instruct_mix))]
            if kind == "text":
                recs.append({"id": sid, "conversations": instruct_conversation(None, rng, kind), "_index": i})
                continue
        pin = {}
        if split == "classify":
            pin = {"main_colour": COLOURS[label // len(SHAPES)], "main_shape": SHAPES[label % len(SHAPES)]}
        elif split == "vg_attribution":
            pin = {"n_objects": 2}
        image_rng = item_rng(cfg.seed, SPLIT_IDS[split], i, STREAM_IMAGE)
        scene = sample_scene(image_rng, cfg.scene, **pin)
        while split == "vg_attribution" and not _swappable(scene):
            scene = sample_scene(image_rng, cfg.scene, **pin)
        jpg = _jpeg(render_scene(scene, image_rng, cfg.scene), cfg.jpeg_quality)
        if split in ("caption_pretrain", "instruct"):
            image = f"{split}/images/{sid}.jpg"
            if kind is None:
                conv = caption_pretrain_conversation(scene, rng)
            else:
                conv = instruct_conversation(scene, rng, kind, cfg.instruct_max_qa_turns)
            rec = {"id": sid, "image": f"images/{sid}.jpg", "conversations": conv, "_id": sid}
        elif split == "classify":
            rel = f"images/{label:03d}/{sid}.jpg"
            image = f"eval/classify/{rel}"
            rec = {"filename": rel, "label": label, "fine_label": scene.fine_label, "_id": rel}
        elif split == "retrieval":
            image = f"eval/retrieval/images/{sid}.jpg"
            caps = short_captions(scene, rng, cfg.n_short_captions)
            rec = {"filename": f"{sid}.jpg", "captions": caps, "content_key": scene.content_key(), "_id": f"{sid}.jpg"}
        elif split == "long_retrieval":
            image = f"eval/long_retrieval/image/{i + 1}.jpg"
            (out / "eval/long_retrieval/caption" / f"{i + 1}.txt").write_text(long_caption(scene, rng))
            rec = {"_id": f"{i + 1}"}
        elif split == "vg_attribution":
            image = f"eval/vg_attribution/images/{sid}.jpg"
            rec = {"image_path": f"{sid}.jpg", **_attribute_swap(scene, rng, cfg.scene.image_size), "_id": sid}
        else:
            image = f"eval/t2i_prompts/images/{i}.jpg"
            caption, recaption = short_caption(scene, rng), detailed_description(scene, rng)
            rec = {"image_id": i, "file_name": f"images/{i}.jpg", "caption": caption, "recaption": recaption}
            rec["_id"] = str(i)
        (out / image).write_bytes(jpg)
        recs.append(rec | {"_index": i, "_truth": _truth_row(scene)})  # scenes travel back as plain (cheap) dicts
    return recs


def _swappable(scene: Scene) -> bool:
    """Two objects whose colours and shapes both differ: swapping the colours then gives a false caption."""
    a, b = scene.objects
    return a.colour != b.colour and a.shape != b.shape


def _attribute_swap(scene: Scene, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """An ARO VG-Attribution item: a square box around both objects (a CLIP centre crop of it keeps them whole),
    "the red circle and the blue square" and its colour swap, objects in random order."""
    first, second = (scene.objects[int(k)] for k in rng.permutation(2))
    lo = [min(o.cx - o.diameter / 2 for o in scene.objects), min(o.cy - o.diameter / 2 for o in scene.objects)]
    hi = [max(o.cx + o.diameter / 2 for o in scene.objects), max(o.cy + o.diameter / 2 for o in scene.objects)]
    side = min(size, math.ceil(max(h - low for low, h in zip(lo, hi, strict=True))) + 2 * VG_BOX_MARGIN)
    x, y = (min(max(0, round((low + h - side) / 2)), size - side) for low, h in zip(lo, hi, strict=True))
    true = f"the {first.colour} {first.shape} and the {second.colour} {second.shape}"
    false = f"the {second.colour} {first.shape} and the {first.colour} {second.shape}"
    box = {"bbox_x": x, "bbox_y": y, "bbox_w": side, "bbox_h": side}
    return box | {"true_caption": true, "false_caption": false, "attributes": [first.colour, second.colour]}


def _run_task(args: tuple) -> tuple[str, list[dict]]:
    cfg_dict, out, (split, *span) = args
    cfg = WorldConfig(**cfg_dict)
    if split == "web":
        return split, _web_shard(cfg, Path(out), *span)
    return split, _split_chunk(cfg, Path(out), split, *span)


def _tasks(cfg: WorldConfig) -> list[tuple]:
    tasks: list[tuple] = [("web", s) for s in range(cfg.n_shards)]
    for split, n in cfg.counts().items():
        if split == "web":
            continue
        tasks += [(split, lo, min(n, lo + cfg.chunk_size)) for lo in range(0, n, cfg.chunk_size)]
    return tasks


def _prepare(out: Path, overwrite: bool, n_classify: int) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace a previous world)")
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    subdirs = "web truth caption_pretrain/images instruct/images eval/retrieval/images eval/long_retrieval/image "
    subdirs += "eval/vg_attribution/images "
    for sub in (subdirs + "eval/long_retrieval/caption eval/t2i_prompts/images eval/classify/images").split():
        (out / sub).mkdir(parents=True, exist_ok=True)
    for label in range(min(n_classify, len(CLASSNAMES))):
        (out / "eval" / "classify" / "images" / f"{label:03d}").mkdir(exist_ok=True)


def _json_dump(path: Path, obj: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False))


def _truth_table(rows: list[dict], id_col: str) -> pa.Table:
    return pa.Table.from_pylist(rows) if rows else pa.table({id_col: pa.array([], pa.string())})


def _long_retrieval_as_docci(out: Path, n: int) -> None:
    """The long-retrieval pairs again in DOCCI's released layout (``docci_descriptions.jsonlines`` with
    ``example_id``/``split``/``image_file``/``description``, images in ``images/``), so the evaluation suite runs a
    second long-caption reader on the same pairs. Images are hard links where the file system allows."""
    root = out / "eval/docci"
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        example_id = f"test_{i:05d}"
        src, dst = out / f"eval/long_retrieval/image/{i + 1}.jpg", root / f"images/{example_id}.jpg"
        try:
            os.link(src, dst)
        except OSError:  # no hard links here (another device, FAT, ...): a copy reads the same
            shutil.copyfile(src, dst)
        text = (out / f"eval/long_retrieval/caption/{i + 1}.txt").read_text(encoding="utf-8")
        row = {"example_id": example_id, "split": "test", "image_file": dst.name, "description": text}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    (root / "docci_descriptions.jsonlines").write_text("".join(lines), encoding="utf-8")


def generate_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, *, overwrite: bool = False) -> dict:
    """Generate the world described by ``cfg`` (default ``WorldConfig()``) under ``out_dir``; return a summary.

    ``out_dir`` must be missing or empty unless ``overwrite=True`` (which deletes only this writer's outputs).
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _prepare(out, overwrite, cfg.n_classify)
    cfg_dict = asdict(cfg)
    jobs = [(cfg_dict, str(out), t) for t in _tasks(cfg)]
    if cfg.workers == 1 or len(jobs) <= 1:
        results = [_run_task(j) for j in jobs]
    else:
        with mp.get_context(cfg.start_method).Pool(min(cfg.workers, len(jobs))) as pool:
            results = list(pool.imap(_run_task, jobs))
    t_render = time.perf_counter() - t0

    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}  # web: its truth rows; other splits: records
    for split, recs in results:  # imap keeps task order, so records are in index order
        by_split[split] += recs
    web_truth = by_split["web"]
    pq.write_table(_truth_table(web_truth, "key"), out / "truth" / "web.parquet")
    for split in SPLITS[1:]:
        rows = [{"id": r["_id"], "index": r["_index"], **r["_truth"]} for r in by_split[split] if "_truth" in r]
        pq.write_table(_truth_table(rows, "id"), out / "truth" / f"{split}.parquet")

    for path in CONVERSATION_FILES:
        split = path.split("/")[0]
        _json_dump(out / path, [{k: v for k, v in r.items() if not k.startswith("_")} for r in by_split[split]])

    cls_dir = out / "eval" / "classify"
    _json_dump(cls_dir / "classnames.json", list(CLASSNAMES), indent=1)
    _json_dump(cls_dir / "fine_classnames.json", list(FINE_CLASSNAMES), indent=1)
    _json_dump(cls_dir / "templates.json", list(CLASSIFY_TEMPLATES), indent=1)
    with open(cls_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["filename", "label", "fine_label"])
        for r in by_split["classify"]:
            w.writerow([r["filename"], r["label"], r["fine_label"]])

    images, sentid = [], 0
    for imgid, r in enumerate(by_split["retrieval"]):
        sents = []
        for cap in r["captions"]:
            sents.append({"raw": cap, "tokens": karpathy_tokens(cap), "imgid": imgid, "sentid": sentid})
            sentid += 1
        entry = {"filename": r["filename"], "filepath": "images", "imgid": imgid, "split": "test"}
        entry |= {"sentids": [s["sentid"] for s in sents], "sentences": sents, "content_key": r["content_key"]}
        images.append(entry)
    _json_dump(out / "eval" / "retrieval" / "dataset.json", {"dataset": "tinyworld", "images": images})

    vga = [{k: v for k, v in r.items() if not k.startswith("_")} for r in by_split["vg_attribution"]]
    _json_dump(out / VG_ATTRIBUTION_JSON, vga, indent=1)

    t2i = [r | r["_truth"] for r in by_split["t2i_prompts"]]
    pq.write_table(pa.Table.from_pylist(t2i, schema=T2I_SCHEMA), out / "eval" / "t2i_prompts" / "prompts.parquet")
    if cfg.n_long_retrieval:
        _long_retrieval_as_docci(out, cfg.n_long_retrieval)

    seconds = time.perf_counter() - t0
    web_ok = sum(1 for r in web_truth if r["status"] == "success")
    counts = cfg.counts()
    summary = {"out_dir": str(out), "format_version": FORMAT_VERSION, "seed": cfg.seed, "counts": counts}
    summary["web_successes"] = web_ok
    summary["web_shards"] = [f"web/{shard_name(s, cfg.oom_shard_count)}.tar" for s in range(cfg.n_shards)]
    summary["instruct_text_only"] = sum(1 for r in by_split["instruct"] if "image" not in r)
    summary |= {"seconds": round(seconds, 3), "render_seconds": round(t_render, 3), "workers": cfg.workers}
    web = {"shards": cfg.n_shards, "successes": web_ok, "oom_shard_count": cfg.oom_shard_count}
    web["oom_sample_per_shard"] = cfg.oom_sample_per_shard
    world = {"format_version": FORMAT_VERSION, "name": "tinyworld", "seed": cfg.seed, "config": cfg_dict}
    world |= {"counts": counts, "web": web, "split_ids": SPLIT_IDS, "vocab": vocab(), "classnames": list(CLASSNAMES)}
    world |= {"generated_at": started, "generation_seconds": round(seconds, 3)}
    _json_dump(out / "world.json", world, indent=2)
    return summary
