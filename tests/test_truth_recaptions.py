"""The tiny world's truth recaptioner: a Recap-DataComp-1B-schema table with LLaVA-like imperfections."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.recaption import RecapNoise, main, perceive, truth_recaptions
from datamodules.tiny_world.scene import Background, Scene, SceneObject
from datamodules.tiny_world.text import mentions_shade

# PAPER.md §7, the paper-era schema, verbatim (name, dtype)
PAPER_SCHEMA = [
    ("url", "string"),
    ("re_caption", "string"),
    ("org_caption", "string"),
    ("sha256", "string"),
    ("key", "string"),
    ("re_clip_score", "float64"),
    ("org_clip_score", "float64"),
    ("re_length", "int64"),
    ("org_length", "int64"),
    ("re_gpt4v_score", "int64"),
    ("org_gpt4v_score", "int64"),
]
_ARROW = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64()}
DEFAULT = RecapNoise()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig.tiny(seed=0, n_web=600, fail_rate=0.05, workers=1))
    return out


@pytest.fixture(scope="module")
def recap(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("recap") / "r"
    return out, truth_recaptions(world, out)


def web_rows(world: Path) -> dict[str, dict]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((world / "web").glob("*.parquet"))])
    return {r["key"]: r for r in t.to_pylist()}


def tar_txt(world: Path) -> dict[str, str]:
    out = {}
    for p in sorted((world / "web").glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    out[m.name[: -len(".txt")]] = tf.extractfile(m).read().decode("utf-8")
    return out


def scenes(world: Path) -> dict[str, Scene]:
    t = pq.read_table(world / "truth" / "web.parquet").to_pylist()
    return {r["key"]: Scene.from_json(r["objects"], r["background"], r["main_index"]) for r in t}


def read_table(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("train-*.parquet"))])


def word(w: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(w)}\b", text) is not None


def n_small(text: str) -> int:
    return len(re.findall(r"\bsmall\b", text))


# ------------------------------------------------------------------------------------------------ schema and rows
def test_schema_rows_and_columns_match_the_release(world, recap):
    out, summary = recap
    from experiments.jobs.sidecars import RECAP_COLUMNS

    assert [n for n, _ in PAPER_SCHEMA] == list(RECAP_COLUMNS)
    files = sorted(out.glob("*.parquet"))
    assert [p.name for p in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    want = pa.schema([(n, _ARROW[d]) for n, d in PAPER_SCHEMA])
    for p in files:
        assert pq.read_schema(p).remove_metadata() == want, p
    table = read_table(out)
    rows = table.to_pylist()
    web, txt = web_rows(world), tar_txt(world)
    success = {k for k, r in web.items() if r["status"] == "success"}
    assert len(success) < len(web)  # the world has failed downloads, which must not appear
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(success) == summary["rows"]
    assert set(keys) == success == set(txt)
    for r in rows:
        w = web[r["key"]]
        assert (r["url"], r["sha256"]) == (w["url"], w["sha256"])
        assert r["org_caption"] == txt[r["key"]] == w["caption"]
        assert r["re_length"] == len(r["re_caption"].split()) > 10
        assert r["org_length"] == len(r["org_caption"].split())
        assert r["re_clip_score"] == r["org_clip_score"] == 0.0
        assert r["re_gpt4v_score"] == r["org_gpt4v_score"] == 0
    # rows are spread over the files in an order unrelated to the shards
    sizes = [pq.read_metadata(p).num_rows for p in files]
    assert max(sizes) - min(sizes) <= 1
    first = [r["key"] for r in pq.read_table(files[0]).to_pylist()]
    assert first != sorted(first)
    assert {k[:-2] for k in first} != {k[:-2] for k in sorted(keys)[: len(first)]}
    cfg = json.loads((out / "_recap_config.json").read_text())
    assert cfg["source"] == "tiny-world truth recaptioner"
    assert cfg["model"] is None
    assert cfg["world_seed"] == 0
    assert cfg["noise"]["colour_confusion"] == DEFAULT.colour_confusion
    assert cfg["length_unit"].startswith("whitespace-separated words")


def test_deterministic_bytes_and_seed_sensitive(world, recap, tmp_path):
    out, _ = recap
    again = tmp_path / "again"
    truth_recaptions(world, again)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    # and in a fresh interpreter with another hash seed (nothing may depend on Python's salted str hash)
    fresh = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "datamodules.tiny_world.recaption", "--world", str(world), "--out", str(fresh)]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1])
    for name in names:
        if name.endswith(".parquet"):
            assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    base = {r["key"]: r for r in read_table(out).to_pylist()}
    other = tmp_path / "seed1"
    truth_recaptions(world, other, seed=1)
    seeded = {r["key"]: r for r in read_table(other).to_pylist()}
    assert seeded.keys() == base.keys()
    assert all(seeded[k]["org_caption"] == base[k]["org_caption"] for k in base)
    changed = sum(seeded[k]["re_caption"] != base[k]["re_caption"] for k in base)
    assert changed > 0.6 * len(base)
    assert (out / "train-00000-of-00004.parquet").read_bytes() != (other / "train-00000-of-00004.parquet").read_bytes()
    # unshuffled: shard order; the same recaption per key whatever the order and file count
    plain = tmp_path / "plain"
    truth_recaptions(world, plain, shuffle=False, files=3)
    rows = read_table(plain).to_pylist()
    assert [r["key"] for r in rows] == sorted(base)
    assert all(r["re_caption"] == base[r["key"]]["re_caption"] for r in rows)


# ---------------------------------------------------------------------------------------------- imperfections
def test_realised_rates_near_the_knobs(world, recap):
    out, summary = recap
    rates = summary["rates"]
    assert rates["colour_confusion"] == pytest.approx(DEFAULT.colour_confusion, abs=0.07)
    assert rates["shape_coarsen"] == pytest.approx(DEFAULT.shape_coarsen, abs=0.07)
    assert rates["drop_small"] == pytest.approx(DEFAULT.drop_small, abs=0.07)
    assert 0.1 < rates["main_object_misnamed"] < 0.3
    # measured again from the text alone, independent of the writer's own counters
    truth = scenes(world)
    colour = {"n": 0, "hit": 0}
    shape = {"n": 0, "hit": 0}
    small = {"n": 0, "kept": 0}
    for r in read_table(out).to_pylist():
        text, sc = r["re_caption"], truth[r["key"]]
        assert not mentions_shade(text)
        objs = sc.objects
        true_small = sum(o.size == "small" for o in objs)
        said_small = n_small(text)
        assert said_small <= true_small
        assert word(sc.main.size, text) or len(objs) > 1  # the main object is never dropped
        if len(objs) > 1:
            small["n"] += true_small
            small["kept"] += said_small
        if said_small != true_small:
            continue  # an object is missing: colour/shape absence would be ambiguous
        for o in objs:
            if o.colour in dict(DEFAULT.colour_map) and sum(x.colour == o.colour for x in objs) == 1:
                colour["n"] += 1
                colour["hit"] += not word(o.colour, text)
            if o.shape in dict(DEFAULT.shape_map) and sum(x.shape == o.shape for x in objs) == 1:
                shape["n"] += 1
                shape["hit"] += not word(o.shape, text)
    assert min(colour["n"], shape["n"], small["n"]) > 200
    assert colour["hit"] / colour["n"] == pytest.approx(DEFAULT.colour_confusion, abs=0.09)
    assert shape["hit"] / shape["n"] == pytest.approx(DEFAULT.shape_coarsen, abs=0.08)
    assert 1 - small["kept"] / small["n"] == pytest.approx(DEFAULT.drop_small, abs=0.08)


def test_perfect_captioner_names_every_object(world, tmp_path):
    summary = truth_recaptions(world, tmp_path / "perfect", RecapNoise.perfect())
    assert summary["rates"] == {"colour_confusion": 0, "shape_coarsen": 0, "drop_small": 0, "main_object_misnamed": 0}
    truth = scenes(world)
    for r in read_table(tmp_path / "perfect").to_pylist():
        text, sc = r["re_caption"], truth[r["key"]]
        assert not mentions_shade(text)
        assert n_small(text) == sum(o.size == "small" for o in sc.objects), text
        for o in sc.objects:
            assert word(o.colour, text), (text, sc.content_key())
            assert word(o.shape, text), (text, sc.content_key())


def test_perceive_extremes_and_monotone():
    objs = [
        SceneObject("ring", "cyan", "teal", "large", "center", 32.0, 32.0, 28.0, (0, 135, 145)),
        SceneObject("star", "orange", "rust", "small", "left", 10.0, 32.0, 16.0, (185, 75, 15)),
        SceneObject("square", "pink", "blush", "small", "right", 54.0, 32.0, 16.0, (255, 175, 205)),
    ]
    sc = Scene(tuple(objs), Background("plain", ("gray",)), 0)
    allin = perceive(sc, RecapNoise(1.0, 1.0, 0.0), np.random.default_rng(0))
    assert [(o.colour, o.shape) for o in allin.scene.objects] == [
        ("blue", "circle"),
        ("red", "shape"),
        ("purple", "square"),
    ]
    alldrop = perceive(sc, RecapNoise(0.0, 0.0, 1.0), np.random.default_rng(0))
    assert alldrop.dropped == (1, 2)
    assert [o.shape for o in alldrop.scene.objects] == ["ring"]
    assert alldrop.scene.main_index == 0
    # a higher rate only adds imperfections to the same draws
    for s in range(50):
        lo = perceive(sc, RecapNoise(0.2, 0.2, 0.2), np.random.default_rng(s))
        hi = perceive(sc, RecapNoise(0.6, 0.6, 0.6), np.random.default_rng(s))
        assert set(lo.dropped) <= set(hi.dropped)
        assert set(lo.colour_confused) - set(hi.dropped) <= set(hi.colour_confused)


def test_variants_share_the_perception(world, tmp_path):
    summary = truth_recaptions(world, tmp_path / "v", RecapNoise(n_variants=3), files=2)
    names = pq.read_schema(tmp_path / "v" / "train-00000-of-00002.parquet").names
    assert names == [n for n, _ in PAPER_SCHEMA] + ["re_caption_1", "re_caption_2"]
    rows = read_table(tmp_path / "v").to_pylist()
    assert sum(r["re_caption"] != r["re_caption_1"] for r in rows) > 0.5 * len(rows)
    assert summary["counts"]["captions"] == 3 * len(rows)
    vocab = r"\b(red|green|blue|yellow|orange|purple|pink|cyan|circle|square|triangle|star|cross|ring|small)\b"
    for r in rows:  # same objects named with the same words, only the phrasing differs
        said = [sorted(set(re.findall(vocab, r[c]))) for c in ("re_caption", "re_caption_1", "re_caption_2")]
        assert said[0] == said[1] == said[2], r
    base = read_table(tmp_path / "v").column("re_caption")
    single = truth_recaptions(world, tmp_path / "one", files=2)
    assert single["rates"] == summary["rates"]
    assert read_table(tmp_path / "one").column("re_caption") == base


# ------------------------------------------------------------------------------------------------ files and CLI
def test_errors_name_the_problem(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing" / "world.json"))):
        truth_recaptions(tmp_path / "nothing", tmp_path / "o")
    fake = tmp_path / "fake"
    (fake / "web").mkdir(parents=True)
    (fake / "world.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(fake / "truth" / "web.parquet"))):
        truth_recaptions(fake, tmp_path / "o")
    (fake / "truth").mkdir()
    (fake / "truth" / "web.parquet").write_bytes((world / "truth" / "web.parquet").read_bytes())
    with pytest.raises(FileNotFoundError, match="web"):
        truth_recaptions(fake, tmp_path / "o")
    with pytest.raises(ValueError, match="colour_confusion"):
        RecapNoise(colour_confusion=1.5)
    with pytest.raises(ValueError, match="names a shade"):
        RecapNoise(colour_map=(("cyan", "teal"),))
    out = tmp_path / "o"
    truth_recaptions(world, out, files=2)
    with pytest.raises(FileExistsError, match="not empty"):
        truth_recaptions(world, out)
    summary = truth_recaptions(world, out, files=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["_recap_config.json"] + [
        f"train-{i:05d}-of-00003.parquet" for i in range(3)
    ]
    assert summary["files"] == 3
    (out / "stray.parquet").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="stray.parquet"):
        truth_recaptions(world, out, overwrite=True)


def test_cli_main(world, tmp_path, capsys):
    out = tmp_path / "cli"
    summary = main(
        [
            "--world",
            str(world),
            "--out",
            str(out),
            "--seed",
            "3",
            "--files",
            "2",
            "--colour-confusion",
            "0",
            "--shape-coarsen",
            "1",
            "--drop-small",
            "0",
        ]
    )
    assert json.loads(capsys.readouterr().out)["rows"] == summary["rows"]
    assert summary["files"] == 2
    assert (summary["rates"]["colour_confusion"], summary["rates"]["shape_coarsen"]) == (0, 1)
    assert summary["rates"]["drop_small"] == 0
    cfg = json.loads((out / "_recap_config.json").read_text())
    assert (cfg["seed"], cfg["noise"]["shape_coarsen"], cfg["noise"]["drop_small"]) == (3, 1.0, 0.0)
    for text in read_table(out).column("re_caption").to_pylist():
        assert not any(word(s, text) for s in ("ring", "star", "cross"))


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("join_on", ["key", "sha256"])
def test_sidecars_and_datamodule_serve_the_recaptions(world, recap, tmp_path, join_on):
    from datamodules.caption_mix import CaptionMixDataModule
    from experiments.jobs.sidecars import build_sidecars

    out, summary = recap
    sidecars = tmp_path / f"sidecars-{join_on}"
    built = build_sidecars(out, str(world / "web"), sidecars, join_on=join_on, progress=False)
    assert (built["rows_matched"], built["recap_rows_unmatched"]) == (summary["rows"], 0)
    want = {r["key"]: r["re_caption"] for r in read_table(out).to_pylist()}
    dm = CaptionMixDataModule(
        train_shards=str(world / "web"),
        sidecar_dir=str(sidecars),
        p_original=0.0,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=1,
    )
    dm.setup("fit")
    seen = {}
    for batch in dm.train_dataloader():
        for key, caption, source in zip(batch["key"], batch["caption"], batch["caption_source"], strict=True):
            assert source == "recaption"
            seen[key] = caption
    assert len(seen) >= summary["rows"] - 8
    assert all(seen[k] == want[k] for k in seen)
