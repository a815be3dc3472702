"""Caption attribute scoring: the world's own texts parse back to their ground truth; errors cost what they should."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from datamodules.tiny_world import text
from datamodules.tiny_world.recaption import RecapNoise, perceive
from datamodules.tiny_world.scene import COLOURS, SHADE_TO_COLOUR, SHAPES, Scene, sample_scene
from lightning_modules.evaluation.caption_attributes import (
    GENERIC_SHAPE,
    CaptionObject,
    ParsedBackground,
    chance_scores,
    derangement,
    parse_caption,
    score_captions,
    truth_background,
    truth_objects,
)

TUPLE_METRICS = ("colour", "shape", "pair", "triple", "quad")


def scenes(n: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i])) for i in range(n)]


def describe(scs: list[Scene], seed: int = 0) -> list[str]:
    return [text.detailed_description(s, np.random.default_rng([seed, 1, i])) for i, s in enumerate(scs)]


@pytest.fixture(scope="module")
def world_scenes() -> list[Scene]:
    return scenes(400)


def test_ground_truth_descriptions_score_100(world_scenes):
    caps = describe(world_scenes)
    truths = [s.objects_json() for s in world_scenes]  # the truth parquet's JSON columns
    bgs = [s.background_json() for s in world_scenes]
    r = score_captions(caps, truths, bgs)
    assert {k: v for k, v in r.items() if not k.startswith("n")} == dict.fromkeys(
        [f"{m}_{pr}" for m in TUPLE_METRICS for pr in ("precision", "recall")]
        + [
            "count_acc",
            "exact_objects_acc",
            "main_object_acc",
            "stated_count_acc",
            "background_acc",
            "background_kind_acc",
        ],
        100.0,
    )
    assert r["n"] == 400
    assert r["n_unparsed"] == 0
    assert 0 < r["n_stated_count"] < 400


def test_every_template_parses_exactly():
    """All 5 detailed templates x 1-3 objects x every background phrase, over many seeds: exact objects, count, bg."""
    templates = set()
    for i in range(800):
        rng = np.random.default_rng([7, i])
        scene = sample_scene(rng)
        desc = text.detailed_description(scene, rng)
        templates.add((" ".join(desc.split(" ")[:3]), len(scene.objects)))
        p = parse_caption(desc)
        assert list(p.objects) == truth_objects(scene), desc
        assert p.count in (None, len(scene.objects)), desc
        assert p.background == truth_background(scene.background), desc
    assert len(templates) == 5 * 3  # every template with 1, 2 and 3 objects


def test_recaptioner_mistakes_parse_as_written():
    """The truth recaptioner's perceived scenes (confused colours, "shape" for star/cross, dropped objects)."""
    noise = RecapNoise(colour_confusion=0.5, shape_coarsen=0.5, drop_small=0.3)
    generic = 0
    for i in range(600):
        rng = np.random.default_rng([11, i])
        seen = perceive(sample_scene(rng), noise, rng).scene
        desc = text.detailed_description(seen, rng)
        p = parse_caption(desc)
        assert list(p.objects) == truth_objects(seen), desc
        generic += sum(o.shape == GENERIC_SHAPE for o in p.objects)
    assert generic > 50


def test_position_size_colour_and_shape_vocabulary():
    tables = (text.DETAIL_POSITIONS, text.SHORT_POSITIONS, text.LONG_POSITIONS)
    phrases = {p: pos for t in tables for pos, ps in t.items() for p in ps}
    assert len(phrases) == 30  # text.py's distinct absolute position phrases
    for phrase, pos in phrases.items():
        assert parse_caption(f"A small red star {phrase}.").objects == (CaptionObject("small", "red", "star", pos),)
        assert parse_caption(f"{phrase.capitalize()}, one can see a little red-coloured star.").objects == (
            CaptionObject("small", "red", "star", pos),
        )
    for rel in ("to the left of", "left of", "to the right of", "right of", "above", "over", "below", "under"):
        p = parse_caption(f"a small blue circle {rel} a big red star")
        assert p.objects == (
            CaptionObject("small", "blue", "circle", None),
            CaptionObject("large", "red", "star", None),
        )
    for word, size in {
        **dict.fromkeys((*text.BIG_WORDS, "sizeable"), "large"),
        **dict.fromkeys((*text.SMALL_WORDS, "compact"), "small"),
    }.items():
        assert parse_caption(f"a {word} ring").objects == (CaptionObject(size, None, "ring", None),)
    for word, colour in {**{c: c for c in COLOURS}, **SHADE_TO_COLOUR}.items():
        for shape in SHAPES:
            assert parse_caption(f"{word.upper()} {shape}").objects == (CaptionObject(None, colour, shape, None),)
    # generic "shape": an object only with a colour; counts are not objects
    assert parse_caption("a single shape").objects == ()
    assert parse_caption("two geometric shapes: a large red shape in the middle").objects == (
        CaptionObject("large", "red", GENERIC_SHAPE, "center"),
    )
    assert parse_caption("There are two geometric shapes.").count == 2
    assert parse_caption("A drawing of a single figure over a uniform navy backdrop.").count == 1


def test_short_and_long_captions_state_only_true_things(world_scenes):
    """Short captions say less, but everything they say is true; long captions say everything, in reading order."""
    bgs = [s.background for s in world_scenes]
    for k in range(3):
        caps = [text.short_captions(s, np.random.default_rng([3, k, i]), 1)[0] for i, s in enumerate(world_scenes)]
        r = score_captions(caps, world_scenes, bgs)
        assert all(r[f"{m}_precision"] == 100.0 for m in TUPLE_METRICS), r
        assert r["n_unparsed"] == 0
        assert r["pair_recall"] > 60
        assert r["main_object_acc"] > 80
        for cap, s in zip(caps, world_scenes, strict=True):
            p = parse_caption(cap)
            if p.background is not None:  # what is said of the background is true
                assert p.background.kind in (s.background.kind, "stripes" if "stripes" in s.background.kind else "")
                assert p.background.colours in ((), s.background.colours[: len(p.background.colours)])
    longs = [text.long_caption(s, np.random.default_rng([4, i])) for i, s in enumerate(world_scenes)]
    r = score_captions(longs, world_scenes, bgs)
    assert all(v == 100.0 for k, v in r.items() if k.endswith(("precision", "recall", "_acc")) and "main" not in k)
    assert 40 < r["main_object_acc"] < 100  # reading order, not main first


def test_alt_texts_parse_without_crashing(world_scenes):
    alts = [text.alt_text(s, np.random.default_rng([5, i])).text for i, s in enumerate(world_scenes)]
    r = score_captions(alts, world_scenes)
    assert 0 < r["n_unparsed"] < len(alts)  # junk alt-texts name nothing
    assert r["pair_precision"] < 100  # "wrong" alt-texts name a wrong colour or shape
    for s in ("", "!!", "IMG_2031.jpg", "#crimsonstarclipart", "the the the", "shape shapes", "a red"):
        parse_caption(s)
    assert parse_caption(None).objects == ()


def test_one_swapped_shape_costs_exactly_one_object(world_scenes):
    caps = describe(world_scenes)
    n_objects = sum(len(s.objects) for s in world_scenes)
    k = next(i for i, s in enumerate(world_scenes) if len(s.objects) >= 2)
    s = world_scenes[k]
    present = {o.shape for o in s.objects}
    new_shape = next(sh for sh in SHAPES if sh not in present)
    swapped = dataclasses.replace(
        s, objects=(s.objects[0], dataclasses.replace(s.objects[1], shape=new_shape), *s.objects[2:])
    )
    caps[k] = describe([swapped], seed=99)[0]
    r = score_captions(caps, world_scenes, [x.background for x in world_scenes])
    expected = 100.0 * (n_objects - 1) / n_objects
    for m in ("shape", "pair", "triple", "quad"):
        assert r[f"{m}_precision"] == pytest.approx(expected)
        assert r[f"{m}_recall"] == pytest.approx(expected)
    assert r["colour_precision"] == r["colour_recall"] == 100.0
    assert r["exact_objects_acc"] == pytest.approx(100.0 * 399 / 400)
    assert r["count_acc"] == r["main_object_acc"] == r["background_acc"] == 100.0
    # the main object's shape swapped instead: main-object accuracy drops by one caption
    swapped_main = dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], shape=new_shape), *s.objects[1:]))
    caps[k] = describe([swapped_main], seed=99)[0]
    assert score_captions(caps, world_scenes)["main_object_acc"] == pytest.approx(100.0 * 399 / 400)


def test_omissions_cost_recall_not_precision(world_scenes):
    caps = []
    for s in world_scenes:  # the main object only, without position: "a large red star."
        m = s.objects[0]
        caps.append(f"{text.fix_articles(f'A {m.size} {m.colour} {m.shape}')}.")
    r = score_captions(caps, world_scenes)
    n_objects = sum(len(s.objects) for s in world_scenes)
    assert r["pair_precision"] == 100.0
    assert r["pair_recall"] == pytest.approx(100.0 * 400 / n_objects)
    assert r["triple_precision"] == 0.0
    assert r["triple_recall"] == 0.0
    assert r["main_object_acc"] == 100.0
    assert r["n_stated_count"] == 0


def test_chance_is_far_below_truth(world_scenes):
    caps = describe(world_scenes)
    bgs = [s.background_json() for s in world_scenes]
    r = chance_scores(caps, [s.objects_json() for s in world_scenes], seed=0, backgrounds=bgs)
    assert r["pair_precision"] < 15
    assert r["triple_precision"] < 5
    assert r["exact_objects_acc"] < 3
    assert r["main_object_acc"] < 10
    assert r["background_acc"] < 15
    assert chance_scores(caps, world_scenes, seed=0) == {k: v for k, v in r.items() if "background" not in k}
    perm = derangement(50, seed=3)
    assert sorted(perm.tolist()) == list(range(50))
    assert not (perm == np.arange(50)).any()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_truth_helpers_and_argument_checks(world_scenes):
    s = world_scenes[0]
    assert truth_objects(s.objects_json()) == truth_objects(s) == truth_objects(list(s.objects))
    assert truth_background(s.background_json()) == ParsedBackground(s.background.kind, s.background.colours)
    with pytest.raises(ValueError, match="truths"):
        score_captions(["a red star"], [])
    assert score_captions(["a red star"], [s], main_index=[0])["n"] == 1.0
