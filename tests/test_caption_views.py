"""Text views (both captions per sample) and partial captions in the caption-mix loader (issue 19)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import img2dataset_key, make_dm, write_shards

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.checks import ConfigError, RunContext
from datamodules.partial_captions import PRESETS, PartialSpec, partial_caption, split_sentences

RECAP = (
    "The image shows a red bus, e.g. a London double-decker. It is about 4.4 m tall! Dr. Who stands beside it. "
    "The sky is blue with approx. three clouds. A sign reads 'No entry.'"
)
SENTENCES = [
    "The image shows a red bus, e.g. a London double-decker.",
    "It is about 4.4 m tall!",
    "Dr. Who stands beside it.",
    "The sky is blue with approx. three clouds.",
    "A sign reads 'No entry.'",
]


def sentence_caption(key: str) -> str:
    return f"First {key} sentence. Second {key} one, e.g. this. Third is 2.5 long. Fourth {key} ends here."


def tokens(caption: str) -> torch.Tensor:
    """A stand-in tokenizer: fixed-length tensors that differ for different captions."""
    codes = [ord(c) for c in caption[:48]]
    return torch.tensor(codes + [0] * (48 - len(codes)))


def pixels(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype="float32"))


@pytest.fixture
def long_shards(tiny_shards):
    """``tiny_shards`` with four-sentence recaptions in the sidecars (the tiny shards' own are one sentence)."""
    for path in sorted(tiny_shards["sidecars"].glob("*.parquet")):
        keys = pq.read_table(path).column("key").to_pylist()
        pq.write_table(pa.table({"key": keys, "re_caption": [sentence_caption(k) for k in keys]}), path)
    return tiny_shards


VIEWS = {"orig": "original", "rec": "recaption", "sub": {"source": "recaption", "partial": "clips"}}


def by_key(batches: list[dict], view: str) -> dict[str, str]:
    return {k: c for b in batches for k, c in zip(b["key"], b["view_captions"][view], strict=True)}


def epoch(dm: CaptionMixDataModule, e: int = 0) -> list[dict]:
    loader = dm.train_dataloader()
    loader.set_epoch(e)
    return list(loader)


# ---------------------------------------------------------------------------------------------- partial captions
def test_sentences_of_a_recaption_keep_abbreviations_and_decimals():
    assert split_sentences(RECAP) == SENTENCES
    assert split_sentences("One sentence without a period") == ["One sentence without a period"]
    assert split_sentences("A cat. a dog.") == ["A cat. a dog."]  # a lowercase word does not start a sentence


def test_first_random_and_block_modes():
    rng = random.Random(0)
    assert PartialSpec("first", k=2).apply(RECAP, rng) == " ".join(SENTENCES[:2])
    assert PartialSpec("first", k=9).apply(RECAP, rng) == " ".join(SENTENCES)
    drawn = set()
    for seed in range(200):
        part = PartialSpec("random", k=2).apply(RECAP, random.Random(seed))
        picked = [s for s in SENTENCES if s in part]
        assert len(picked) == 2
        assert part == " ".join(picked)
        drawn.add(part)
    assert len(drawn) == 10  # every pair of the five sentences comes up
    words = RECAP.split()
    starts = set()
    for seed in range(200):
        part = PartialSpec("block", n=6).apply(RECAP, random.Random(seed)).split()
        assert len(part) == 6
        start = next(i for i in range(len(words)) if words[i : i + 6] == part)
        starts.add(start)
    assert starts == set(range(len(words) - 5))  # every contiguous block of 6 words, from any start


@pytest.mark.parametrize("spec", [PartialSpec("first"), PartialSpec("random"), PartialSpec("block", n=2)])
def test_a_one_sentence_caption_is_its_own_partial_view(spec):
    assert spec.apply("  A red bus parked by the curb at 3.5 pm.  ", random.Random(1)) == (
        "A red bus parked by the curb at 3.5 pm."
    )


def test_partial_draw_depends_on_seed_epoch_key_and_view_only():
    spec = PartialSpec("random", k=1)
    one = [partial_caption(RECAP, spec, 7, 0, f"{i:09d}", "sub") for i in range(300)]
    assert one == [partial_caption(RECAP, spec, 7, 0, f"{i:09d}", "sub") for i in range(300)]
    assert Counter(one).keys() == set(SENTENCES)  # every sentence is drawn for some key
    for other in [(8, 0, "sub"), (7, 1, "sub"), (7, 0, "sub2")]:
        drawn = [partial_caption(RECAP, spec, other[0], other[1], f"{i:09d}", other[2]) for i in range(300)]
        assert 0.1 < sum(a == b for a, b in zip(one, drawn, strict=True)) / 300 < 0.35  # independent: ~1/5 agree


def test_presets_include_clips_and_first1():
    assert PartialSpec.parse("first1", "x") == PartialSpec("first", k=1)
    assert PartialSpec.parse("clips", "x") == PartialSpec(**PRESETS["clips"])
    assert PartialSpec.parse({"mode": "block", "n": 5}, "x") == PartialSpec("block", n=5)


# ------------------------------------------------------------------------------------------------ views in batches
def test_views_carry_each_source_tokenized_beside_the_p_draw(long_shards):
    kw = dict(p_original=0.5, text_transform=tokens, image_transform=pixels)
    batches = epoch(make_dm(long_shards, views=VIEWS, **kw))
    truth = long_shards["truth"]
    for b in batches:
        assert set(b["texts"]) == set(b["view_captions"]) == set(VIEWS)
        for view, captions in b["view_captions"].items():
            assert torch.equal(b["texts"][view], torch.stack([tokens(c) for c in captions]))
        for key, orig, rec, sub in zip(b["key"], *(b["view_captions"][v] for v in VIEWS), strict=True):
            assert orig == truth[key]["original"]
            assert rec == sentence_caption(key)
            assert sub in split_sentences(rec)  # clips: one sentence of the recaption
    subs = [s for b in batches for s in b["view_captions"]["sub"]]
    assert len({s.split()[0] for s in subs}) == 4  # every sentence position is drawn
    # the views leave the p-drawn batch as it was
    plain = epoch(make_dm(long_shards, **kw))
    assert [b["caption"] for b in plain] == [b["caption"] for b in batches]
    for a, b in zip(plain, batches, strict=True):
        assert torch.equal(a["text"], b["text"])
        assert torch.equal(a["image"], b["image"])
    assert "texts" not in plain[0]
    assert "view_captions" not in plain[0]


def test_validation_batches_carry_the_views(long_shards):
    dm = make_dm(long_shards, p_original=0.5, views=VIEWS, val_shards=str(long_shards["web"] / "00003.tar"))
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 12
    assert all(set(b["view_captions"]) == set(VIEWS) for b in batches)


def test_a_missing_view_source_falls_back_and_is_counted(tmp_path):
    missing = {img2dataset_key(0, i) for i in range(6)}
    truth = write_shards(tmp_path / "web", [16, 16], sidecar_dir=tmp_path / "side", missing_recap=missing)
    kw = dict(train_shards=str(tmp_path / "web"), sidecar_dir=str(tmp_path / "side"), batch_size=4, p_original=1.0)
    kw.update(num_workers=0, shuffle_buffer=1, views={"rec": "recaption"})
    batches = epoch(CaptionMixDataModule(**kw))
    rec = by_key(batches, "rec")
    assert missing <= set(rec)
    assert all(rec[k] == truth[k]["original"] for k in missing)
    assert all(rec[k] == truth[k]["recaption"] for k in set(rec) - missing)
    counts = sum((Counter(b["skipped"]["counts"]) for b in batches), Counter())
    assert counts["fallback:rec:recaption->original"] == len(missing)
    strict = epoch(CaptionMixDataModule(**{**kw, "fallback": False, "train_num_samples": 24}))
    assert not set(by_key(strict, "rec")) & missing
    assert sum(Counter(b["skipped"]["counts"])["no_view_caption"] for b in strict) == len(missing)


# ------------------------------------------------------------------------------------- worker counts and resumes
def test_views_and_partial_draws_identical_with_0_1_2_workers(long_shards):
    seen = {}
    for workers in (0, 1, 2):
        dm = make_dm(long_shards, p_original=0.5, views=VIEWS, num_workers=workers, persistent_workers=False)
        seen[workers] = by_key(epoch(dm, 2), "sub")
    common = set(seen[0]) & set(seen[1]) & set(seen[2])
    assert len(common) >= 40
    assert all(seen[0][k] == seen[1][k] == seen[2][k] for k in common)
    assert len(set(seen[0][k].split()[0] for k in common)) == 4  # not one fixed sentence


@pytest.mark.parametrize("workers", [0, 2])
def test_views_resume_mid_epoch_exactly(long_shards, workers):
    def loader():
        return make_dm(long_shards, p_original=0.5, views=VIEWS, num_workers=workers).train_dataloader()

    whole = epoch_from(loader(), 0)
    first = loader()
    first.set_epoch(0)
    seen = list(itertools.islice(iter(first), 5))
    fresh = loader()
    fresh.load_state_dict(first.state_dict())
    resumed = seen + list(fresh)
    assert [b["key"] for b in resumed] == [b["key"] for b in whole]
    assert [b["view_captions"] for b in resumed] == [b["view_captions"] for b in whole]


def epoch_from(loader, e: int) -> list[dict]:
    loader.set_epoch(e)
    return list(loader)


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("views", "key"),
    [
        ({"x": "nothing"}, "views.x"),
        ({"x": {"source": "nothing"}}, "views.x.source"),
        ({"x": {"source": "recaption", "partial": "clipz"}}, "views.x.partial"),
        ({"x": {"source": "recaption", "partial": {"mode": "middle"}}}, "views.x.partial.mode"),
        ({"x": {"source": "recaption", "partial": {"mode": "first", "k": 0}}}, "views.x.partial.k"),
        ({"text": "original"}, "views.text"),
        ([], "views"),
    ],
)
def test_bad_views_are_config_errors_naming_the_key(tiny_shards, views, key):
    args = dict(train_shards=str(tiny_shards["web"]), sidecar_dir=str(tiny_shards["sidecars"]), batch_size=4)
    with pytest.raises(ConfigError) as err:
        CaptionMixDataModule.validate_config({**args, "p_original": 0.5, "views": views}, RunContext())
    assert err.value.key == key
