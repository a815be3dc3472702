"""Issue 20, the v2 recaption columns: Recap-DataComp-1B files written in the released layout with and without
``re_caption_condition_diverse_topk`` / ``re_condition_length``, joined into sidecars, read as caption sources through
the DataModule and analyzed, with the files of one run mixing both kinds (and a shard inside them)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchvision.transforms as T
from conftest import img2dataset_key, write_shards

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.formats import RECAP_SCHEMA, RECAP_V2_SCHEMA
from datamodules.sidecar import read_sidecar, sidecar_path
from experiments.jobs import analyze
from experiments.jobs.sidecars import build_sidecars

V2, LEN = RECAP_V2_SCHEMA.names
SIZES = [6, 6, 6, 6]
SHARDS = "{00000..00003}.tar"


def in_v2_file(shard: int, i: int) -> bool:
    """Shard 0 is in the v1 file only, shards 1 and 3 in the v2 file, shard 2 is split between the two."""
    return shard in (1, 3) or (shard == 2 and i % 2 == 1)


def v2_caption(shard: int, i: int) -> str | None:
    key = img2dataset_key(shard, i)
    return None if not in_v2_file(shard, i) or (shard, i) == (1, 0) else f"topk {key}" + " more" * (i % 3)


def condition_length(shard: int, i: int) -> int | None:
    return None if not in_v2_file(shard, i) or (shard, i) == (1, 1) else 3 + i % 2


def write_recap(path: Path, cells: list[tuple[int, int]], v2: bool) -> str:
    """A file in the released layout: the paper-era columns in their order, then the v2 ones where it has them."""
    keys = [img2dataset_key(s, i) for s, i in cells]
    data = {
        "url": [f"https://x.invalid/{k}.jpg" for k in keys],
        "re_caption": [f"recap {k}" for k in keys],
        "org_caption": [f"orig {k}" for k in keys],
        "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys],
        "key": keys,
        V2: [v2_caption(*c) for c in cells],
        LEN: [condition_length(*c) for c in cells],
    }
    schema = pa.schema([*RECAP_SCHEMA, *(RECAP_V2_SCHEMA if v2 else [])])
    cols = [pa.array(data.get(f.name, [0] * len(keys)), f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(cols, schema=schema), path)
    return str(path)


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Four web shards; sidecars joined for shards 0-2 from a v1 and a v2 file; shard 3's sidecar is an earlier
    build's, without the v2 columns."""
    web = tmp_path / "web"
    write_shards(web, SIZES)
    cells = [(s, i) for s, n in enumerate(SIZES) for i in range(n)]
    v1 = write_recap(tmp_path / "train-00000-of-00002.parquet", [c for c in cells if not in_v2_file(*c)], v2=False)
    v2 = write_recap(tmp_path / "train-00001-of-00002.parquet", [c for c in cells if in_v2_file(*c)], v2=True)
    side = tmp_path / "sidecars"
    summary = build_sidecars([v1, v2], str(web / "{00000..00002}.tar"), side, progress=False)
    keys = [img2dataset_key(3, i) for i in range(SIZES[3])]
    pq.write_table(pa.table({"key": keys, "re_caption": [f"recap {k}" for k in keys]}), side / "00003.parquet")
    return {"web": web, "sidecars": side, "recap": [v1, v2], "summary": summary, "cells": cells}


def test_the_join_keeps_the_v2_columns_with_one_schema_per_build(world):
    assert world["summary"]["columns"] == ["re_caption", V2, LEN]
    schemas = {str(pq.read_schema(world["sidecars"] / f"{s:05d}.parquet").remove_metadata()) for s in range(3)}
    assert schemas == {str(pa.schema([("key", pa.string()), ("re_caption", pa.string()), *RECAP_V2_SCHEMA]))}
    for s in range(3):
        table = read_sidecar(sidecar_path(world["sidecars"], f"{s:05d}.tar"), ["re_caption", V2, LEN])
        rows = {r["key"]: r for r in table.to_pylist()}
        assert rows == {
            img2dataset_key(s, i): {
                "key": img2dataset_key(s, i),
                "re_caption": f"recap {img2dataset_key(s, i)}",
                V2: v2_caption(s, i),
                LEN: condition_length(s, i),
            }
            for i in range(SIZES[s])
        }
    # the earlier build's sidecar reads its missing v2 columns as nulls (a typed int for the length)
    old = read_sidecar(world["sidecars"] / "00003.parquet", [LEN])
    assert old.schema.field(LEN).type == pa.int64()
    assert old[LEN].null_count == SIZES[3]


def test_v1_files_alone_keep_re_caption_and_an_explicit_v2_column_is_a_typed_null(world, tmp_path):
    shard, v1 = str(world["web"] / "00000.tar"), world["recap"][0]
    assert build_sidecars(v1, shard, tmp_path / "default", progress=False)["columns"] == ["re_caption"]
    build_sidecars(v1, shard, tmp_path / "explicit", columns=["re_caption", LEN], progress=False)
    assert pq.read_schema(tmp_path / "explicit" / "00000.parquet").field(LEN).type == pa.int64()
    assert pq.read_table(tmp_path / "explicit" / "00000.parquet")[LEN].null_count == SIZES[0]


def _one_pass(world: dict, sources: dict[str, str]) -> tuple[dict[str, tuple[str, str]], Counter]:
    dm = CaptionMixDataModule(
        train_shards=str(world["web"] / SHARDS),
        test_shards=str(world["web"] / SHARDS),
        sources=sources,
        p_original=0.0,
        sidecar_dir=str(world["sidecars"]),
        batch_size=3,
        num_workers=0,
        image_transform=T.Compose([T.Resize(8), T.CenterCrop(8), T.PILToTensor()]),
    )
    captions, counts = {}, Counter()
    for batch in dm.test_dataloader():
        counts.update(batch["skipped"]["counts"])
        for key, caption, source in zip(batch["key"], batch["caption"], batch["caption_source"], strict=True):
            captions[key] = (caption, source)
    return captions, counts


def test_the_v2_recaption_is_a_caption_source_and_a_null_or_missing_one_falls_back(world):
    captions, counts = _one_pass(world, {"original": "txt", "v2": f"sidecar:{V2}"})
    expected = {}
    for s, i in world["cells"]:
        key, text = img2dataset_key(s, i), v2_caption(s, i) if s < 3 else None  # shard 3: an earlier build's sidecar
        expected[key] = (text, "v2") if text is not None else (f"orig {key}", "original")
    assert captions == expected
    n_fallback = sum(source == "original" for _, source in expected.values())
    assert n_fallback == 6 + 1 + 3 + 6  # shard 0, the null one, shard 2's v1 half, shard 3
    assert counts["fallback:v2->original"] == n_fallback


def test_the_condition_length_is_no_caption_source(world):
    with pytest.raises(ValueError, match=r"'re_condition_length' is int64, not text"):
        _one_pass(world, {"original": "txt", "recaption": f"sidecar:{LEN}"})


def _v2_words_and_lengths(cells) -> tuple[list[int], Counter]:
    words = [len(t.split()) for t in (v2_caption(*c) for c in cells) if t is not None]
    return words, Counter(n for n in (condition_length(*c) for c in cells) if n is not None)


def test_analyze_reports_the_v2_columns_of_mixed_files(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    s = analyze.main(["--recap", *world["recap"], "--out", str(tmp_path / "out")])["inputs"]["parquet"]
    cells = [c for c in world["cells"] if not in_v2_file(*c)] + [c for c in world["cells"] if in_v2_file(*c)]
    words, lengths = _v2_words_and_lengths(cells)
    assert s["n_rows"] == len(cells) == 24
    assert s["missing_caption"] == {"original": 0, "recaption": 0, "recaption_v2": 24 - len(words)}
    assert s["length_words"]["recaption_v2"]["mean"] == pytest.approx(sum(words) / len(words))
    assert s["length_words"]["recaption_v2"]["max"] == 4
    assert s["length_words"]["recaption"]["mean"] == 2  # the paper's pair is unchanged by the v2 column
    v = s["vocabulary"]
    n_orig = 2 * 24  # "orig KEY"
    assert v["tokens"]["recaption_v2"] == sum(words)
    assert v["token_share_pct"]["recaption_v2"] == pytest.approx(100 * sum(words) / (n_orig + sum(words)))
    assert v["token_share_pct"]["recaption"] == pytest.approx(50.0)
    # V_orig = {orig} + 24 keys; V_v2 = {topk, more} + its keys: coverage against the original's union
    n_v2_keys = len(words)
    assert v["coverage_pct"]["recaption_v2"] == pytest.approx(100 * (2 + n_v2_keys) / (1 + 24 + 2))
    c = s["condition_length"]
    assert c["distribution"] == {str(k): n for k, n in sorted(lengths.items())}
    assert (c["n"], c["missing"]) == (sum(lengths.values()), 24 - sum(lengths.values()))
    md = (tmp_path / "out" / "summary.md").read_text()
    header = md.splitlines()[md.splitlines().index("## parquet: 24 rows") + 2]
    assert [c.strip() for c in header.strip("|").split("|")][1:4] == ["original", "recaption", "recaption_v2"]
    assert f"{LEN} (v2): {sum(lengths.values())} rows" in md

    alone = analyze.main(["--recap", world["recap"][0], "--out", str(tmp_path / "v1")])["inputs"]["parquet"]
    assert list(alone["length_words"]) == ["original", "recaption"]
    assert "condition_length" not in alone


def test_analyze_reads_the_v2_columns_from_the_sidecars(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    sources = ["recaption=sidecar:re_caption", f"recaption_v2=sidecar:{V2}", "original=txt"]
    args = ["--shards", str(world["web"] / SHARDS), "--sidecar-dir", str(world["sidecars"]), "--sources", *sources]
    s = analyze.main([*args, "--out", str(tmp_path / "out")])["inputs"]["shards"]
    joined = [c for c in world["cells"] if c[0] < 3]  # shard 3's sidecar has neither v2 column
    words, lengths = _v2_words_and_lengths(joined)
    assert list(s["length_words"]) == ["original", "recaption", "recaption_v2"]
    assert s["missing_caption"] == {"original": 0, "recaption": 0, "recaption_v2": 24 - len(words)}
    assert s["length_words"]["recaption_v2"]["mean"] == pytest.approx(sum(words) / len(words))
    assert s["condition_length"]["distribution"] == {str(k): n for k, n in sorted(lengths.items())}
    assert s["condition_length"]["missing"] == 24 - sum(lengths.values())
