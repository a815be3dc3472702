"""Tests of the tiny world generator (datamodules/tiny_world): determinism, layouts, noise rates, renders, texts."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_img2dataset_writer
from PIL import Image

from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.scene import (
    BACKGROUND_COLOURS,
    CLASSNAMES,
    COLOURS,
    FINE_CLASSNAMES,
    SHADE_TO_COLOUR,
    SHAPES,
    Scene,
    SceneConfig,
    item_rng,
    render_scene,
    sample_scene,
)
from datamodules.tiny_world.text import (
    ALT_KINDS,
    DETAIL_PROMPTS,
    AltTextNoise,
    alt_text,
    detailed_description,
    karpathy_tokens,
    long_caption,
    mentions_shade,
    short_captions,
)
from datamodules.tiny_world.writer import FORMAT_VERSION, WEB_PARQUET_SCHEMA, compute_key

META_FIELDS = [
    "org_caption",
    "caption",
    "url",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
]
TIME_FIELDS = {"duration", "start_time", "end_time"}
DESCRIPTION_OPENERS = (
    "This is a simple graphic",
    "The image shows",
    "In this picture",
    "A minimalist illustration",
    "The image contains",
)
WORD = re.compile(r"[a-z]+")
NO_OTHER_SPLITS = dict(
    n_caption_pretrain=0, n_instruct=0, n_classify=0, n_retrieval=0, n_long_retrieval=0, n_t2i=0, n_vg_attribution=0
)


def web_only(**kw) -> WorldConfig:
    """A tiny world with only the splits ``kw`` asks for (by default just ``web/``)."""
    return WorldConfig.tiny(**{**NO_OTHER_SPLITS, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig.tiny(seed=0, workers=2))
    return out


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _strip_times(path: Path) -> dict:
    d = json.loads(path.read_text())
    if path.name == "world.json":
        d.pop("generation_seconds")
        d.pop("generated_at")
        d["config"].pop("workers")
    return {k: v for k, v in d.items() if k not in TIME_FIELDS}


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_is_byte_identical_across_runs_and_worker_counts(world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, WorldConfig.tiny(seed=0, workers=1))
    a, b = _files(world), _files(again)
    assert a.keys() == b.keys()
    assert len(a) > 300
    for rel, p in a.items():
        if rel == "world.json" or rel.endswith("_stats.json"):
            assert _strip_times(p) == _strip_times(b[rel]), rel
        else:
            assert p.read_bytes() == b[rel].read_bytes(), rel


def test_different_seed_differs(world, tmp_path):
    other = tmp_path / "seed1"
    generate_world(
        other,
        web_only(seed=1, n_web=50, n_retrieval=8),
    )
    assert (other / "web/00000.tar").read_bytes() != (world / "web/00000.tar").read_bytes()
    caps_0 = [
        i["sentences"][0]["raw"] for i in json.loads((world / "eval/retrieval/dataset.json").read_text())["images"]
    ]
    caps_1 = [
        i["sentences"][0]["raw"] for i in json.loads((other / "eval/retrieval/dataset.json").read_text())["images"]
    ]
    assert caps_0[:8] != caps_1


def test_refuses_non_empty_dir_and_overwrites_only_its_outputs(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_world(out, WorldConfig.tiny(workers=1))
    cfg = web_only(n_web=10, shard_size=10, workers=1)
    summary = generate_world(out, cfg, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert summary["counts"]["web"] == 10
    assert summary["web_successes"] == 10


# ------------------------------------------------------------------------------------------------ web layout


def test_key_rule_is_img2dataset_compute_key():
    # img2dataset: oom_sample_per_shard = ceil(log10(number_sample_per_shard)); key = shard * 10**oom + idx
    assert compute_key(3, 0, 4, 5) == "000000003"
    assert compute_key(7, 12, 3, 5) == "00012007"
    assert WorldConfig().oom_sample_per_shard == 3
    assert WorldConfig(shard_size=10_000).oom_sample_per_shard == 4
    assert WorldConfig.tiny().oom_sample_per_shard == 2


def test_web_shards_follow_img2dataset_layout(world):
    cfg = WorldConfig.from_world_json(world)
    shards = sorted((world / "web").glob("*.tar"))
    assert [p.name for p in shards] == [f"{s:05d}.tar" for s in range(cfg.n_shards)]
    seen = 0
    for shard_id, tar_path in enumerate(shards):
        members = _tar_members(tar_path)
        table = pq.read_table(tar_path.with_suffix(".parquet"))
        assert table.schema.equals(WEB_PARQUET_SCHEMA)
        rows = table.to_pylist()
        stats = json.loads((world / "web" / f"{shard_id:05d}_stats.json").read_text())
        assert stats["count"] == len(rows) == cfg.shard_size
        assert stats["successes"] == len(members) // 3 == sum(r["status"] == "success" for r in rows)
        assert stats["failed_to_download"] == 0
        assert stats["status_dict"] == {"success": len(rows)}
        assert {"duration", "start_time", "end_time", "failed_to_resize"} <= stats.keys()
        keys = [f"{shard_id:05d}{j:02d}" for j in range(cfg.shard_size)]
        assert [r["key"] for r in rows] == keys
        # webdataset's TarWriter (used by img2dataset) writes a sample's members in sorted-extension order
        assert [name for name, _ in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
        for (_, jpg), (_, js), (_, txt), row in zip(members[0::3], members[1::3], members[2::3], rows, strict=True):
            meta = json.loads(js)
            assert list(meta) == META_FIELDS
            assert meta == row
            assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()
            assert meta["caption"] == meta["org_caption"] == txt.decode()
            assert meta["status"] == "success"
            assert meta["error_message"] is None
            assert meta["exif"] is None
            assert meta["url"] == f"https://tinyworld.invalid/img/{meta['key']}.jpg"
            with Image.open(io.BytesIO(jpg)) as im:
                assert im.format == "JPEG"
                assert im.size == (meta["width"], meta["height"]) == (64, 64)
        seen += len(rows)
    truth = pq.read_table(world / "truth/web.parquet").to_pylist()
    assert seen == len(truth) == cfg.n_web
    assert {"key", "shard", "objects", "background", "main_index"} <= truth[0].keys()
    assert truth[57]["key"] == "0000107"
    assert truth[57]["shard"] == 1


def test_tar_matches_img2dataset_writer(world, tmp_path):
    """Write the same samples with img2dataset's own WebDatasetSampleWriter and compare member by member."""
    writer_mod = load_img2dataset_writer()
    # img2dataset's downloader schema: input columns (save_additional_columns + caption + url), then its own columns
    schema = pa.schema([("org_caption", pa.string()), ("caption", pa.string()), ("url", pa.string())])
    for name, typ in [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]:
        schema = schema.append(pa.field(name, typ))
    assert schema.equals(WEB_PARQUET_SCHEMA)
    ours = _tar_members(world / "web/00001.tar")
    rows = pq.read_table(world / "web/00001.parquet").to_pylist()
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    w = writer_mod.WebDatasetSampleWriter(1, str(ref_dir), True, 5, schema, "jpg")
    for (_, jpg), row in zip(ours[0::3], rows, strict=True):
        w.write(jpg, row["key"], row["caption"], dict(row))
    w.close()
    assert _tar_members(ref_dir / "00001.tar") == ours
    assert pq.read_table(ref_dir / "00001.parquet").equals(pq.read_table(world / "web/00001.parquet"))


def test_failed_downloads_are_parquet_rows_without_tar_members(tmp_path):
    cfg = web_only(n_web=100, shard_size=50, fail_rate=0.3, workers=1)
    summary = generate_world(tmp_path / "w", cfg)
    failed = 0
    for shard in range(2):
        rows = pq.read_table(tmp_path / f"w/web/{shard:05d}.parquet").to_pylist()
        names = {n.split(".")[0] for n, _ in _tar_members(tmp_path / f"w/web/{shard:05d}.tar")}
        stats = json.loads((tmp_path / f"w/web/{shard:05d}_stats.json").read_text())
        bad = [r for r in rows if r["status"] == "failed_to_download"]
        assert all(r["sha256"] is None and r["width"] is None and r["error_message"] for r in bad)
        assert names == {r["key"] for r in rows if r["status"] == "success"}
        assert stats["failed_to_download"] == len(bad)
        assert stats["successes"] == len(rows) - len(bad)
        assert sum(stats["status_dict"].values()) == len(rows)
        failed += len(bad)
    assert 15 <= failed <= 45
    assert summary["web_successes"] == 100 - failed
    # the failure draw never changes the images that did download
    clean = tmp_path / "clean"
    generate_world(clean, WorldConfig.tiny(**{**dataclasses.asdict(cfg), "fail_rate": 0.0}))
    ok = {n: b for n, b in _tar_members(tmp_path / "w/web/00000.tar") if n.endswith(".jpg")}
    ref = dict(_tar_members(clean / "web/00000.tar"))
    assert ok
    assert all(ref[n] == b for n, b in ok.items())


def test_no_ground_truth_description_in_web(world):
    detail_answers = [
        c["conversations"][1]["value"]
        for c in json.loads((world / "instruct/llava_instruct.json").read_text())
        if c["conversations"][0]["value"].replace("<image>", "").strip() in DETAIL_PROMPTS
    ]
    assert detail_answers
    recaptions = pq.read_table(world / "eval/t2i_prompts/prompts.parquet").column("recaption").to_pylist()
    web_texts: list[str] = []
    for tar_path in sorted((world / "web").glob("*.tar")):
        raw = tar_path.read_bytes()
        for opener in DESCRIPTION_OPENERS:
            assert opener.encode() not in raw
        for name, data in _tar_members(tar_path):
            if name.endswith(".txt"):
                web_texts.append(data.decode())
        table = pq.read_table(tar_path.with_suffix(".parquet"))
        web_texts += table.column("caption").to_pylist() + table.column("org_caption").to_pylist()
    assert set(web_texts).isdisjoint(detail_answers + recaptions)
    for t in web_texts:
        assert "background" not in t.lower(), t
        assert len(t.split()) <= 10, t
    truth_cols = set(pq.read_table(world / "truth/web.parquet").column_names)
    assert not truth_cols & {"description", "caption", "recaption", "re_caption", "text"}


# ------------------------------------------------------------------------------------------------ alt-text


def _alt_sample(noise: AltTextNoise, n: int = 4000) -> list[tuple[Scene, object]]:
    cfg = SceneConfig()
    out = []
    for i in range(n):
        scene = sample_scene(item_rng(7, 0, i, 0), cfg)
        out.append((scene, alt_text(scene, item_rng(7, 0, i, 1), noise)))
    return out


@pytest.mark.parametrize(
    "noise",
    [AltTextNoise(), AltTextNoise(attribute=0.1, partial=0.1, wrong=0.3, junk=0.5, shade_rate=0.7)],
    ids=["default", "noisy"],
)
def test_alt_text_noise_rates_are_realised(noise):
    sample = _alt_sample(noise)
    kinds = Counter(a.kind for _, a in sample)
    for kind, rate in zip(ALT_KINDS, noise.kind_probs, strict=True):
        assert kinds[kind] / len(sample) == pytest.approx(rate, abs=0.03), kind
    correct = [a for _, a in sample if a.kind in ("attribute", "partial")]
    assert sum(a.uses_shade for a in correct) / len(correct) == pytest.approx(noise.shade_rate, abs=0.035)
    assert np.mean([len(a.text.split()) for _, a in sample]) < 4.5  # web alt-text is short


def test_alt_text_content_matches_its_kind():
    colour_words = set(COLOURS) | set(SHADE_TO_COLOUR)
    for scene, a in _alt_sample(AltTextNoise(punct_rate=0.0), 3000):
        words = set(WORD.findall(a.text.lower()))
        main = scene.main
        assert mentions_shade(a.text) == a.uses_shade
        if a.uses_shade:
            assert main.shade in words
        if a.kind == "junk":
            assert not words & (colour_words | set(SHAPES)), a.text
        elif a.kind == "attribute":
            assert words & {main.colour, main.shade, main.shape}, a.text
            assert not words & (colour_words - {main.colour, main.shade}), a.text
            assert not words & (set(SHAPES) - {main.shape}), a.text
        elif a.kind == "partial":
            assert main.shape in words, a.text
            assert words & {main.colour, main.shade}, a.text
            present = {o.shape for o in scene.objects} | {o.colour for o in scene.objects} | {main.shade}
            assert words & (colour_words | set(SHAPES)) <= present, a.text
        elif a.kind == "wrong":
            assert (main.colour in words) != (main.shape in words), a.text


def test_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        AltTextNoise(junk=0.5)
    with pytest.raises(ValueError, match="shade_rate"):
        AltTextNoise(shade_rate=1.5)
    with pytest.raises(ValueError, match="n_classify"):
        WorldConfig(n_classify=10)
    with pytest.raises(ValueError, match="instruct_mix"):
        WorldConfig(instruct_mix=(0.5, 0.5, 0.5, 0.0))


# ------------------------------------------------------------------------------------------------ rendering


def test_renders_show_the_objects_and_background():
    cfg = SceneConfig()
    checked = 0
    for i in range(300):
        scene = sample_scene(item_rng(3, 9, i, 0), cfg)
        img = render_scene(scene, item_rng(3, 9, i, 0), cfg)
        with Image.open(io.BytesIO(_jpeg_bytes(img))) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.int32)
        assert arr.shape == (64, 64, 3)
        # the top-left corner is never covered (objects are edge-anchored at mid-edges) and shows colours[0]
        bg = BACKGROUND_COLOURS[scene.background.colours[0]]
        assert np.abs(arr[1, 1] - bg).mean() < 25, (scene.background, arr[1, 1])
        for k, o in enumerate(scene.objects):
            px, py = _probe_point(o)
            if any(_inside(px, py, _bbox(later)) for later in scene.objects[k + 1 :]):
                continue  # occluded by a smaller object drawn on top
            got = arr[int(round(py)), int(round(px))]
            tol = 40 if o.shape == "ring" else 30  # a small ring's band is under 4 px wide
            assert np.abs(got - np.array(o.rgb)).mean() < tol, (o, got)
            checked += 1
    assert checked > 500


def _probe_point(o) -> tuple[float, float]:
    """A point that lies inside the drawn shape (the centre, except for rings where the centre is a hole)."""
    return (o.cx, o.cy - 0.78 * o.diameter / 2) if o.shape == "ring" else (o.cx, o.cy)


def _bbox(o) -> tuple[float, float, float, float]:
    r = o.diameter / 2
    return o.cx - r, o.cy - r, o.cx + r, o.cy + r


def _inside(x: float, y: float, box: tuple[float, float, float, float]) -> bool:
    return box[0] - 1 <= x <= box[2] + 1 and box[1] - 1 <= y <= box[3] + 1


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_scene_invariants():
    cfg = SceneConfig()
    counts = Counter()
    for i in range(2000):
        scene = sample_scene(item_rng(5, 1, i, 0), cfg)
        n = len(scene.objects)
        counts[n] += 1
        assert len({o.position for o in scene.objects}) == n
        assert len({(o.colour, o.shape) for o in scene.objects}) == n
        if n > 1:
            assert [o.size for o in scene.objects].count("large") == 1
            assert scene.main.size == "large"
        assert SHADE_TO_COLOUR[scene.main.shade] == scene.main.colour
        assert Scene.from_json(scene.objects_json(), scene.background_json(), scene.main_index) == scene
    assert counts[1] / 2000 == pytest.approx(0.4, abs=0.04)
    assert counts[3] / 2000 == pytest.approx(0.2, abs=0.04)


def test_shades_differ_visibly():
    from datamodules.tiny_world.scene import SHADES

    for colour, ((_, a), (_, b)) in SHADES.items():
        assert np.abs(np.subtract(a, b)).max() >= 60, colour


# ------------------------------------------------------------------------------------------------ texts


def test_short_captions_are_mostly_distinct():
    cfg = SceneConfig()
    caps = []
    for i in range(2000):
        scene = sample_scene(item_rng(0, 4, i, 0), cfg)
        five = short_captions(scene, item_rng(0, 4, i, 1))
        assert len(set(five)) == 5
        for c in five:
            words = set(WORD.findall(c.lower()))
            assert scene.main.shape in words  # main object always named with >= 2 attributes
            assert (
                len(
                    words
                    & {
                        scene.main.colour,
                        "big",
                        "large",
                        "small",
                        "little",
                        "tiny",
                        "left",
                        "right",
                        "top",
                        "bottom",
                        "center",
                        "middle",
                        "centre",
                    }
                )
                >= 1
            )
            assert not words & set(SHADE_TO_COLOUR)
        caps += five
    assert len(set(caps)) / len(caps) > 0.8


def test_descriptions_cover_every_object_and_never_name_shades():
    cfg = SceneConfig()
    for i in range(300):
        scene = sample_scene(item_rng(0, 2, i, 0), cfg)
        rng = item_rng(0, 2, i, 1)
        desc, long = detailed_description(scene, rng), long_caption(scene, rng)
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in desc, desc
            assert o.shape in long
            assert o.colour in long
        assert scene.background.colours[0] in desc
        assert scene.background.colours[0] in long
        for text in (desc, long):
            assert not set(WORD.findall(text.lower())) & set(SHADE_TO_COLOUR), text
        assert not long.startswith(DESCRIPTION_OPENERS)


# ------------------------------------------------------------------------------------------------ other outputs


def test_llava_jsons(world):
    pretrain = json.loads((world / "caption_pretrain/chat.json").read_text())
    assert len(pretrain) == 48
    for s in pretrain:
        assert (world / "caption_pretrain" / s["image"]).is_file()
        human, gpt = s["conversations"]
        assert human["from"] == "human"
        assert gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert "<image>" not in gpt["value"]
        assert gpt["value"]
    instruct = json.loads((world / "instruct/llava_instruct.json").read_text())
    truth = {r["id"]: r for r in pq.read_table(world / "truth/instruct.parquet").to_pylist()}
    text_only = 0
    for s in instruct:
        conv = s["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        joined = "".join(t["value"] for t in conv)
        if "image" not in s:
            text_only += 1
            assert "<image>" not in joined
            continue
        assert (world / "instruct" / s["image"]).is_file()
        assert joined.count("<image>") == 1
        assert "<image>" in conv[0]["value"]
        assert not set(WORD.findall(joined.lower())) & set(SHADE_TO_COLOUR)
        if conv[0]["value"].replace("<image>", "").strip() in DETAIL_PROMPTS:
            for o in json.loads(truth[s["id"]]["objects"]):
                assert f"{o['colour']} {o['shape']}" in conv[1]["value"]
    assert 1 <= text_only < len(instruct) // 3


def test_karpathy_retrieval_json(world):
    d = json.loads((world / "eval/retrieval/dataset.json").read_text())
    assert d["dataset"] == "tinyworld"
    assert len(d["images"]) == 48
    sentids = []
    for imgid, im in enumerate(d["images"]):
        assert im["imgid"] == imgid
        assert im["split"] == "test"
        assert (world / "eval/retrieval" / im["filepath"] / im["filename"]).is_file()
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == imgid
            assert s["tokens"] == karpathy_tokens(s["raw"])
            assert s["tokens"]
            assert all(t == t.lower() and t.isalnum() for t in s["tokens"])
        assert im["content_key"]
        sentids += im["sentids"]
    assert sentids == list(range(len(sentids)))
    raws = [s["raw"] for im in d["images"] for s in im["sentences"]]
    assert len(set(raws)) / len(raws) > 0.9


def test_classify_imagefolder(world):
    root = world / "eval/classify"
    names = json.loads((root / "classnames.json").read_text())
    assert names == list(CLASSNAMES)
    assert len(names) == 48
    assert names[0] == "red circle"
    assert json.loads((root / "fine_classnames.json").read_text()) == list(FINE_CLASSNAMES)
    templates = json.loads((root / "templates.json").read_text())
    assert templates
    assert all("{c}" in t for t in templates)
    dirs = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    assert dirs == [f"{i:03d}" for i in range(48)]  # torchvision ImageFolder: class_to_idx == label
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96
    assert list(rows[0]) == ["filename", "label", "fine_label"]
    truth = {r["id"]: r for r in pq.read_table(world / "truth/classify.parquet").to_pylist()}
    for r in rows:
        label, fine = int(r["label"]), int(r["fine_label"])
        assert (root / r["filename"]).is_file()
        assert Path(r["filename"]).parent.name == f"{label:03d}"
        main = json.loads(truth[r["filename"]]["objects"])[truth[r["filename"]]["main_index"]]
        assert names[label] == f"{main['colour']} {main['shape']}"
        assert FINE_CLASSNAMES[fine] == f"{main['shade']} {main['shape']}"
    assert Counter(int(r["label"]) for r in rows) == Counter({i: 2 for i in range(48)})


def test_long_retrieval_and_t2i(world):
    root = world / "eval/long_retrieval"
    for i in range(1, 33):
        assert (root / "image" / f"{i}.jpg").is_file()
        assert len((root / "caption" / f"{i}.txt").read_text().split()) > 15
    assert len(list((root / "image").iterdir())) == 32
    t = pq.read_table(world / "eval/t2i_prompts/prompts.parquet")
    assert t.column_names[:3] == ["image_id", "caption", "recaption"]
    assert t.num_rows == 32
    for r in t.to_pylist():
        assert (world / "eval/t2i_prompts/images" / f"{r['image_id']}.jpg").is_file()
        assert len(r["recaption"]) > len(r["caption"])


def test_world_json_and_split_separation(world):
    meta = json.loads((world / "world.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["seed"] == 0
    assert meta["config"]["alt"]["junk"] == pytest.approx(0.2)
    assert meta["vocab"]["shapes"] == list(SHAPES)
    assert len(meta["vocab"]["shades"]["red"]) == 2
    assert meta["counts"]["web"] == 200
    assert meta["generation_seconds"] > 0
    assert WorldConfig.from_world_json(world) == WorldConfig.tiny(seed=0, workers=2)
    web = {
        hashlib.sha256(b).digest()
        for p in (world / "web").glob("*.tar")
        for n, b in _tar_members(p)
        if n.endswith(".jpg")
    }
    evals = {hashlib.sha256(p.read_bytes()).digest() for p in (world / "eval").rglob("*.jpg")}
    assert len(web) == 200
    assert len(evals) == 96 + 48 + 32 + 32 + 24  # classify, retrieval, long_retrieval, t2i, vg_attribution
    assert web.isdisjoint(evals)
