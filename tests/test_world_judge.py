"""The tiny world's pinned attribute judge: training, save/load, accuracy against truths, FID features, input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.scene import COLOURS, SHAPES
from lightning_modules.evaluation.judge import (
    CHANCE_SEED_TAG,
    HEADS,
    JSON_NAME,
    WEIGHTS_NAME,
    AttributeJudge,
    JudgeFeatures,
    derangement,
    heldout_set,
    judge_accuracy,
    load_judge,
    main,
    save_judge,
    train_judge,
    truth_targets,
    web_training_set,
)

REAL_JUDGE = Path(__file__).resolve().parents[1] / "data/world/judge"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig.tiny(seed=3, n_web=480, shard_size=120, n_t2i=96, workers=1))
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("judge") / "j"
    summary = train_judge(world, out, image_size=32, steps=100, batch_size=32, lr=3e-3, seed=0, threads=1)
    return out, summary


@pytest.fixture(scope="module")
def heldout(world) -> tuple[torch.Tensor, list[dict]]:
    return heldout_set(world)


def _relabel_colour(row: dict) -> dict:
    """The same truth with the main object's colour replaced by the next colour (a deliberately wrong prompt)."""
    objects = json.loads(row["objects"])
    objects[row["main_index"]]["colour"] = COLOURS[(COLOURS.index(objects[row["main_index"]]["colour"]) + 1) % 8]
    return {**row, "objects": json.dumps(objects)}


# ------------------------------------------------------------------------------------------- training and saving


def test_short_training_beats_chance_and_saves(trained, world):
    out, summary = trained
    acc = summary["heldout"]
    assert acc["n"] == 96
    # 100 steps on 480 images: far from the real judge, but clearly above a judge that ignores the image.
    assert acc["colour"] > 2 * acc["chance/colour"]
    assert acc["colour"] > 0.6
    meta = json.loads((out / JSON_NAME).read_text())
    assert meta == summary
    assert meta["config"] == {"image_size": 32, "widths": [48, 96, 192], "pool": "avgmax", "num_features": 384}
    assert meta["labels"] == {k: list(v) for k, v in HEADS.items()}
    assert meta["recipe"]["steps"] == 100
    assert meta["recipe"]["batch_size"] == 32
    assert meta["recipe"]["threads"] == 1
    assert meta["world"]["seed"] == 3
    assert meta["world"]["n_train"] == 480
    assert len(meta["world"]["fingerprint"]) == 64
    assert meta["train_seconds"] > 0
    assert not [p.name for p in out.iterdir() if p.name not in (JSON_NAME, WEIGHTS_NAME)]  # no temp files left
    with pytest.raises(FileExistsError):
        train_judge(world, out, steps=1)


def test_loaded_judge_reproduces_recorded_accuracy(trained, heldout):
    out, summary = trained
    judge = load_judge(out)
    assert not judge.training
    assert not any(p.requires_grad for p in judge.parameters())
    images, truths = heldout
    assert judge_accuracy(judge, images, truths) == summary["heldout"]  # weights, BN statistics and mean/std restored
    nn.Sequential(judge).train()  # a parent switching to training must not put the frozen judge's BatchNorm in it
    assert not judge.training
    assert judge_accuracy(judge, images, truths) == summary["heldout"]


def test_save_load_round_trip_identical_logits(tmp_path):
    torch.manual_seed(0)
    judge = AttributeJudge(image_size=16, widths=(8, 16, 24), pool="avg")
    judge.mean.copy_(torch.tensor([0.3, 0.4, 0.5]))
    for m in judge.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    judge.eval()
    save_judge(judge, tmp_path, {"note": "x"})
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == set(judge.state_dict())
    loaded = load_judge(tmp_path)
    assert (
        loaded.config()
        == judge.config()
        == {"image_size": 16, "widths": [8, 16, 24], "pool": "avg", "num_features": 24}
    )
    assert loaded.info["note"] == "x"
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        a, b = judge(x), loaded(x)
    assert a.keys() == b.keys() == HEADS.keys()
    for k in a:
        assert torch.equal(a[k], b[k])


def test_cli_is_seeded_and_registered(world, tmp_path):
    from experiments.__main__ import SUITE_COMMANDS

    argv = ["--world", str(world), "--image-size", "16", "--steps", "3", "--batch-size", "16", "--threads", "1"]
    SUITE_COMMANDS["world-judge"][0]([*argv, "--out", str(tmp_path / "a")])
    main([*argv, "--out", str(tmp_path / "b"), "--log-every", "0"])
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_NAME)), load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / JSON_NAME).read_text())["config"]["image_size"] == 16
    main([*argv, "--out", str(tmp_path / "b"), "--seed", "1", "--overwrite"])
    c = load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_set_matches_truth(world):
    images, targets = web_training_set(world, 32)
    assert images.shape == (480, 3, 32, 32)
    assert images.dtype == torch.uint8
    import pyarrow.parquet as pq

    rows = pq.read_table(world / "truth/web.parquet").to_pylist()
    labels = torch.tensor([r["label"] for r in rows])  # colour_index * 6 + shape_index of the main object
    assert torch.equal(targets[:, 0] * 6 + targets[:, 1], labels)


# ---------------------------------------------------------------------------------------------------- accuracy


class OracleJudge(nn.Module):
    """Reads an image's index from pixel (0, 0) and answers that index's truth: a perfect judge for those truths."""

    def __init__(self, truths: list) -> None:
        super().__init__()
        self.targets = [truth_targets(t) for t in truths]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, labels in HEADS.items():
            logits = torch.zeros(images.shape[0], len(labels))
            for row, i in enumerate(images[:, 0, 0, 0].long().tolist()):
                logits[row, self.targets[i][name]] = 1.0
            out[name] = logits
        return out


def test_judge_accuracy_exact_with_an_oracle(heldout):
    _, truths = heldout
    n = len(truths)
    images = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    oracle = OracleJudge(truths)
    acc = judge_accuracy(oracle, images, truths, seed=5, batch_size=7)
    assert acc["n"] == n
    assert all(acc[k] == 1.0 for k in (*HEADS, "both"))
    perm = derangement(n, (CHANCE_SEED_TAG, 5))  # the seed judge_accuracy derives from seed=5
    colours = np.array([truth_targets(t)["colour"] for t in truths])
    shapes = np.array([truth_targets(t)["shape"] for t in truths])
    assert acc["chance/colour"] == pytest.approx(float((colours == colours[perm]).mean()))
    assert acc["chance/both"] == pytest.approx(float(((colours == colours[perm]) & (shapes == shapes[perm])).mean()))
    assert acc["chance/colour"] < 0.4
    assert acc["chance/both"] < 0.15
    wrong = judge_accuracy(oracle, images, [_relabel_colour(t) for t in truths], seed=5)
    assert wrong["colour"] == 0.0
    assert wrong["both"] == 0.0
    assert wrong["shape"] == 1.0
    # the prompts' objects json alone: colour, shape, position and count are scored; background is not known
    only_objects = judge_accuracy(oracle, images, [t["objects"] for t in truths])
    assert "background" not in only_objects
    assert only_objects["count"] == 1.0
    assert only_objects["both"] == 1.0
    flat = judge_accuracy(oracle, images[:3], [{"colour": COLOURS[truth_targets(t)["colour"]]} for t in truths[:3]])
    assert set(flat) == {"colour", "chance/colour", "n"}
    assert flat["colour"] == 1.0


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 97):
        p = derangement(n, 0)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == np.arange(n)).any()
    assert np.array_equal(derangement(50, 1), derangement(50, 1))
    assert not np.array_equal(derangement(50, 1), derangement(50, 2))


def test_trained_judge_own_truths_beat_deranged_and_wrong(trained, heldout):
    judge = load_judge(trained[0])
    images, truths = heldout
    own = judge_accuracy(judge, images, truths)
    assert own["colour"] > own["chance/colour"] + 0.4
    wrong = judge_accuracy(judge, images, [_relabel_colour(t) for t in truths])
    assert wrong["colour"] < own["colour"] - 0.4
    assert wrong["shape"] == own["shape"]


@pytest.mark.skipif(not (REAL_JUDGE / JSON_NAME).is_file(), reason="no trained judge in data/world/judge")
def test_real_judge_on_real_heldout_images():
    judge = load_judge(REAL_JUDGE)
    images, truths = heldout_set(REAL_JUDGE.parent)
    idx = list(range(0, len(truths), 4))  # 500 of the 2,000 held-out images keep this under a few seconds
    images, truths = images[idx], [truths[i] for i in idx]
    own = judge_accuracy(judge, images, truths)
    assert own["both"] >= 0.97
    assert own["colour"] >= 0.98
    assert own["chance/both"] < 0.1
    wrong = judge_accuracy(judge, images, [_relabel_colour(t) for t in truths])
    assert wrong["colour"] < 0.05
    assert wrong["both"] < 0.05


# --------------------------------------------------------------------------------------------- features and sizes


def test_fid_with_judge_features(trained, world):
    from torchmetrics.image.fid import FrechetInceptionDistance

    judge = load_judge(trained[0])
    feats = JudgeFeatures(judge)
    assert feats.num_features == judge.num_features == 384
    fid = FrechetInceptionDistance(feature=feats, reset_real_features=False)
    fid.train()  # a Lightning module's .train() reaches the metric; the judge must stay in eval mode
    assert not judge.training
    images, _ = web_training_set(world, 64)  # uint8, as FID's update passes it on unchanged
    real, other = images[:240], images[240:]
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update(other, real=False)
    fresh = float(fid.compute())
    fid.reset()
    fid.update(real[:, [2, 0, 1]], real=False)  # channels rotated: every colour wrong
    rotated = float(fid.compute())
    assert abs(same) < 1e-3 * rotated
    assert fresh < rotated / 3  # another sample of the same world is much closer than a recoloured one


@pytest.mark.parametrize("side", [16, 24, 32, 64])
def test_input_sizes_and_dtypes(trained, side):
    judge = load_judge(trained[0])
    x = torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8)
    with torch.no_grad():
        out = judge(x)
        as_float = judge(x.float() / 255)
        feats = judge.features(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (4, len(v)) for k, v in HEADS.items()}
    assert feats.shape == (4, 384)
    for k in out:
        torch.testing.assert_close(out[k], as_float[k])


def test_64px_input_is_the_2x2_average_the_judge_trained_on(trained):
    judge = load_judge(trained[0])
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a = judge(x)
        b = judge(torch.nn.functional.avg_pool2d(x, 2))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="square"):
        judge(torch.rand(1, 3, 32, 16))


def test_truth_targets_forms():
    row = {
        "objects": json.dumps(
            [
                {"shape": "star", "colour": "cyan", "position": "left"},
                {"shape": "ring", "colour": "red", "position": "top"},
            ]
        ),
        "background": '{"kind":"checker","colours":["gray","navy"]}',
        "main_index": 0,
    }
    want = {"colour": 7, "shape": SHAPES.index("star"), "position": 0, "count": 1, "background": 3}
    assert truth_targets(row) == want
    assert truth_targets(row["objects"]) == {**want, "background": None}
    assert truth_targets({"colour": "cyan", "shape": "star", "count": 2, "background": "checker"}) == {
        **want,
        "position": None,
    }
