"""analyze: lengths, vocabulary coverage and the CLIP-score share computed by hand on toy inputs; shards through the
loader's stages, parquet by record batches; the output files."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from experiments.jobs import analyze

ORIG = ["a red star", "Blue CIRCLE!", "photo.jpg"]
RECAP = ["The image shows a red star.", "A blue circle on the left.", "A green square"]


@pytest.fixture(autouse=True)
def _mpl(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def test_three_caption_toy_by_hand():
    stats = analyze.CaptionStats(max_length=8)
    for o, r in zip(ORIG, RECAP, strict=True):
        stats.add_captions({"original": o, "recaption": r})
    stats.add_captions({"original": "  ", "recaption": None})  # missing on both sides: counted, not measured
    s = stats.summary()
    assert s["length_words"]["original"]["mean"] == pytest.approx((3 + 2 + 1) / 3)
    assert s["length_words"]["recaption"]["mean"] == pytest.approx((6 + 6 + 3) / 3)
    assert s["length_words"]["recaption"]["median"] == 6
    assert s["missing_caption"] == {"original": 1, "recaption": 1}
    # V_orig = {a red star blue circle photo jpg} (7); V_recap = {the image shows a red star blue circle on left green
    # square} (12); union 14 -> recaption coverage 12/14
    v = s["vocabulary"]
    assert v["size"] == {"original": 7, "recaption": 12, "union": 14, "both": 5}
    assert v["coverage_pct"]["recaption"] == pytest.approx(100 * 12 / 14)
    assert v["coverage_pct"]["original"] == pytest.approx(100 * 7 / 14)
    assert v["top_words"]["recaption"][0] == ["a", 3]
    # word tokens ([a-z0-9]+ runs: "photo.jpg" is two): the paper's 82.86% is this share (49.43 / (49.43 + 10.22))
    n_orig = sum(len(analyze.words(t)) for t in ORIG)
    n_recap = sum(len(analyze.words(t)) for t in RECAP)
    assert v["tokens"] == {"original": n_orig, "recaption": n_recap}
    assert v["token_share_pct"]["recaption"] == pytest.approx(100 * n_recap / (n_orig + n_recap))
    assert n_orig != sum(len(t.split()) for t in ORIG)  # counted in words of the vocabulary, not whitespace words


def test_histogram_median_and_overflow():
    h = analyze.LengthHistogram(max_length=5)
    for n in (1, 2, 3, 10):
        h.add(n)
    assert h.median() == 2.5
    assert h.mean() == 4.0
    assert h.max_seen == 10
    assert h.counts[-1] == 1
    assert h.summary()["n_over_max_length"] == 1
    h.add(11)
    h.add(12)
    assert h.median() is None  # the middle lies in the overflow bin: not known exactly


def test_vocabulary_cap_is_a_memory_bound():
    v = analyze.Vocabulary(max_size=3)
    v.add(0, ["a", "b", "c", "d", "e", "a"])
    assert len(v.counts) == 3
    assert v.oov_tokens == 2
    assert v.counts["a"] == [2, 0]
    assert v.summary()["truncated"]


def test_clip_share_is_the_two_way_softmax():
    o, r = np.array([0.20, 0.30, 0.10]) * 100, np.array([0.25, 0.30, -0.50]) * 100
    expected = torch.softmax(torch.tensor(np.stack([o, r], 1)), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(analyze.clip_share(o, r), expected, rtol=1e-12)
    assert analyze.clip_share(np.array([0.0]), np.array([1e5]))[0] == 1.0  # no overflow
    share = analyze.ShareStats()
    share.add(o, r, cos=(o / 100, r / 100))
    out = share.summary()
    assert out["share_pct"]["recaption"] == pytest.approx(100 * expected.mean())
    assert out["share_pct"]["original"] + out["share_pct"]["recaption"] == pytest.approx(100)
    assert out["recaption_wins_pct"] == pytest.approx(100 / 3)
    assert out["ties"] == 1
    assert out["mean_clip_score"]["recaption"] == pytest.approx((25 + 30 + 0) / 3)  # 100 * max(cos, 0)


def _parquet(path, n=5, scores=True):
    cols = {
        "org_caption": [f"orig {i}" for i in range(n)],
        "re_caption": [" ".join(["w"] * (i + 3)) for i in range(n)],
        "key": [f"{i:08d}" for i in range(n)],
    }
    if scores:
        cols["org_clip_score"] = [30.0] * n
        cols["re_clip_score"] = [30.0 + i for i in range(n)]
    pq.write_table(pa.table(cols), path, row_group_size=2)


def test_parquet_cli_streams_batches_and_writes_outputs(tmp_path):
    _parquet(tmp_path / "a.parquet")
    out = tmp_path / "out"
    summary = analyze.main(["--recap", str(tmp_path / "*.parquet"), "--out", str(out)])
    s = summary["inputs"]["parquet"]
    assert s["n_rows"] == 5
    assert s["length_words"]["original"]["mean"] == 2
    assert s["length_words"]["recaption"]["mean"] == pytest.approx((3 + 4 + 5 + 6 + 7) / 5)
    # scores 30 vs 30 + i: share = mean of sigmoid(i)
    share = np.mean([1 / (1 + math.exp(-i)) for i in range(5)])
    assert s["clip_share"]["share_pct"]["recaption"] == pytest.approx(100 * share)
    assert "parquet" in s["clip_share_source"]
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["inputs"]["parquet"]["n_rows"] == 5
    md = (out / "summary.md").read_text()
    assert re.search(r"\| mean length \(words\) +\| 2\.00 +\| 5\.00 +\| 10\.22 / 49\.43", md)  # a Markdown table
    assert re.search(rf"\| {100 * (1 - share):.2f} +\| {100 * share:.2f} +\|", md)
    # --limit stops inside a record batch
    limited = analyze.main(["--recap", str(tmp_path / "a.parquet"), "--out", str(out), "--limit", "3"])
    assert limited["inputs"]["parquet"]["n_rows"] == 3


def test_parquet_without_scores_or_caption_columns(tmp_path):
    _parquet(tmp_path / "a.parquet", scores=False)
    s = analyze.main(["--recap", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o")])["inputs"]["parquet"]
    assert s["clip_share"] is None
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: no column\(s\) \['org_caption', 're_caption'\]"):
        analyze.main(["--recap", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")])


def _shard(path, n=4):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(buf, format="PNG")
            sample = {"__key__": f"{i:08d}", "png": buf.getvalue(), "txt": f"red {i}"}
            if i != 3:  # the last sample has no recaption
                sample["recap.txt"] = "a red square " * (i + 1)
            sink.write(sample)


class _FakeClip:
    """Image features = [red, 1 - red]; text features: original captions [1, 0], recaptions [0, 1]."""

    def encode_image(self, images):
        red = images[:, 0].mean(dim=(1, 2))
        return torch.stack([red, 1 - red], dim=1)

    def encode_text(self, texts):
        return torch.tensor([[0.0, 1.0] if t.startswith("a red") else [1.0, 0.0] for t in texts])


def test_shards_through_the_loader_stages_with_a_clip(tmp_path, monkeypatch):
    _shard(tmp_path / "00000.tar")
    monkeypatch.setattr(analyze, "load_scorer", lambda folder: _FakeClip())
    summary = analyze.main(
        [
            "--shards",
            str(tmp_path / "00000.tar"),
            "--sources",
            "original=txt",
            "recaption=recap.txt",
            "--clip",
            "fake",
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "2",
        ]
    )
    s = summary["inputs"]["shards"]
    assert s["n_rows"] == 4
    assert s["missing_caption"] == {"original": 0, "recaption": 1}
    assert s["length_words"]["recaption"]["mean"] == pytest.approx((3 + 6 + 9) / 3)
    # three pairs with both captions; red = 40 i / 255 (i = 0, 1, 2); cos with [1, 0] / [0, 1] after normalising
    cos_o, cos_r = [], []
    for i in range(3):
        f = np.array([40 * i / 255, 1 - 40 * i / 255])
        f = f / np.linalg.norm(f)
        cos_o.append(f[0])
        cos_r.append(f[1])
    expected = analyze.clip_share(100 * np.array(cos_o), 100 * np.array(cos_r)).mean()
    assert s["clip_share"]["n_pairs"] == 3
    assert s["clip_share"]["share_pct"]["recaption"] == pytest.approx(100 * expected)
    assert s["clip_share"]["mean_clip_score"]["original"] == pytest.approx(100 * np.mean(cos_o))


def test_sources_must_name_both_sides(tmp_path):
    _shard(tmp_path / "00000.tar")
    with pytest.raises(ValueError, match="must name exactly"):
        analyze.main(["--shards", str(tmp_path / "00000.tar"), "--sources", "original=txt", "--out", str(tmp_path)])


def test_attribute_rater_answers_in_the_judge_format():
    from lightning_modules.evaluation.generation import JUDGE_PROMPT, parse_rating

    rater = analyze.AttributeRater.__new__(analyze.AttributeRater)  # no judge weights: predictions are given below
    rater.prefix, _, rater.suffix = JUDGE_PROMPT.partition("{caption}")
    rater.predict = lambda image: {
        "colour": "red",
        "shape": "star",
        "position": "left",
        "count": "1",
        "background": "plain",
    }
    ask = lambda caption: parse_rating(rater(None, JUDGE_PROMPT.format(caption=caption)))  # noqa: E731
    assert ask("a red star") == 5  # colour and shape right
    assert ask("a blue star") == 3  # 1 + round(4 * 1/2)
    assert ask("photo_0012.jpg") == 1  # states nothing checkable
    with pytest.raises(ValueError, match="rating prompt"):
        rater(None, "Rate this: a red star")
