"""The p schedule (issue 19): its shape, its draw at each batch's global training index in the loader (the same
under any worker count and after a resume), the monitor's per-step fractions, and its config errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import make_dm, write_shards

from datamodules.caption_mix import POSITION_KEY, CaptionMixDataModule
from datamodules.checks import ConfigError, RunContext
from datamodules.monitor import CaptionMixMonitor
from datamodules.p_schedule import PSchedule
from datamodules.wds_stages import uniform_from_key

LINEAR = {"kind": "linear", "start": 1.0, "end": 0.5, "total_samples": 1000}


# ------------------------------------------------------------------------------------------------------ its shape
def test_linear_from_1_to_half():
    s = PSchedule.parse(LINEAR)
    assert [s(0), s(250), s(500), s(1000), s(5000)] == [1.0, 0.875, 0.75, 0.5, 0.5]


def test_cosine_constant_and_step():
    cos = PSchedule.parse({**LINEAR, "kind": "cosine"})
    assert cos(0) == 1.0
    assert cos(1000) == 0.5
    assert cos(500) == pytest.approx(0.75)
    assert cos(250) == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)  # slow at first, unlike linear
    assert PSchedule.parse({"kind": "constant", "start": 0.8})(10**9) == 0.8
    step = PSchedule.parse({"kind": "step", "start": 1.0, "milestones": [100, 300], "values": [0.8, 0.5]})
    assert [step(0), step(99), step(100), step(299), step(300), step(10**6)] == [1.0, 1.0, 0.8, 0.8, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------- the loader
def scheduled(shards, **kw):
    """72 samples, batch 4: 18 batches per epoch; p from 1 to 0 over the first epoch's 72 samples."""
    schedule = {"kind": "linear", "start": 1.0, "end": 0.0, "total_samples": 72}
    return make_dm(shards, p_schedule=schedule, **kw)


def run(dm: CaptionMixDataModule, epochs=(0,)) -> list[dict]:
    loader = dm.train_dataloader()
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out += list(loader)
    return out


def check_draws(batches: list[dict], per_epoch: int, first_epoch: int = 0, world: int = 1) -> None:
    """Batch ``i`` of the run (counted over epochs) has p = schedule(i x 4 x world) and every sample's source is
    the key's draw against that p."""
    schedule = PSchedule.parse({"kind": "linear", "start": 1.0, "end": 0.0, "total_samples": 72})
    for i, b in enumerate(batches):
        epoch = first_epoch + i // per_epoch
        index = first_epoch * per_epoch + i
        assert b["p_target"] == schedule(index * 4 * world)
        for key, source in zip(b["key"], b["caption_source"], strict=True):
            assert source == ("original" if uniform_from_key(7, epoch, key) < b["p_target"] else "recaption")


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_p_follows_the_global_batch_index_with_any_worker_count(tiny_shards, workers):
    batches = run(scheduled(tiny_shards, num_workers=workers, persistent_workers=False), epochs=(0, 1))
    assert len(batches) == 36
    check_draws(batches, per_epoch=18)
    assert batches[0]["p_target"] == 1.0
    assert batches[18]["p_target"] == 0.0


def test_two_ranks_draw_at_the_global_index(tiny_shards):
    for rank in (0, 1):
        batches = run(scheduled(tiny_shards, num_workers=2, rank=rank, world_size=2), epochs=(0,))
        assert len(batches) == 9
        check_draws(batches, per_epoch=9, world=2)


def test_a_constant_schedule_gives_the_batches_of_p_original(tiny_shards):
    def pixels(img):
        return torch.from_numpy(np.asarray(img, dtype="float32"))

    a = run(make_dm(tiny_shards, p_original=0.3, image_transform=pixels))
    b = run(make_dm(tiny_shards, p_schedule={"kind": "constant", "start": 0.3}, image_transform=pixels))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert "p_target" not in a[0]
    assert {x["p_target"] for x in b} == {0.3}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("positions", [True, False], ids=["fast-replay", "decode-replay"])
def test_scheduled_draws_resume_mid_epoch_exactly(tmp_path, workers, positions):
    from test_resume import break_images

    shards = {"web": tmp_path / "web", "sidecars": tmp_path / "side"}
    write_shards(shards["web"], [24, 16, 20, 12], sidecar_dir=shards["sidecars"])
    break_images(shards["web"], {3, 7})  # images dropped at decode shift the batches of the later samples

    def loader():
        return scheduled(shards, num_workers=workers, train_num_samples=60).train_dataloader()

    whole = run(scheduled(shards, num_workers=workers, train_num_samples=60), epochs=(0, 1))
    per_epoch = 15
    first = loader()
    first.set_epoch(0)
    seen = list(itertools.islice(iter(first), 5))
    state = first.state_dict()
    if not positions:  # another rank's view: no recorded positions, the replayed images are decoded again
        state["positions"] = {}
    fresh = loader()
    fresh.load_state_dict(state)
    rest = list(fresh)
    fresh.set_epoch(1)
    rest += list(fresh)
    resumed = seen + rest
    assert [b["key"] for b in resumed] == [b["key"] for b in whole]
    assert [b["caption_source"] for b in resumed] == [b["caption_source"] for b in whole]
    assert [b["p_target"] for b in resumed] == [b["p_target"] for b in whole]
    assert not any(POSITION_KEY in b for b in rest)
    check_draws(whole, per_epoch=per_epoch)


def test_validation_draws_with_the_value_at_zero(tiny_shards):
    schedule = {"kind": "linear", "start": 0.0, "end": 1.0, "total_samples": 10}
    dm = make_dm(tiny_shards, p_schedule=schedule, val_shards=str(tiny_shards["web"] / "00000.tar"))
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert {s for b in batches for s in b["caption_source"]} == {"recaption"}
    assert "p_target" not in batches[0]


def test_the_realised_step_fraction_follows_the_schedule(tmp_path):
    write_shards(tmp_path / "web", [200, 200], sidecar_dir=tmp_path / "side")
    dm = CaptionMixDataModule(
        train_shards=str(tmp_path / "web"),
        sidecar_dir=str(tmp_path / "side"),
        batch_size=40,
        num_workers=0,
        shuffle_buffer=50,
        p_schedule={"kind": "linear", "start": 1.0, "end": 0.2, "total_samples": 400},
    )
    monitor = CaptionMixMonitor()
    gaps = []
    for batch in run(dm):
        monitor.sources.update(batch["caption_source"])
        step = monitor.step_metrics(batch)
        assert step["train/p_target"] == batch["p_target"]
        fractions = [v for k, v in step.items() if k.startswith("train/caption_source_step/")]
        assert sum(fractions) == pytest.approx(1.0)
        gaps.append(step["train/caption_source_step/original"] - batch["p_target"])
    assert len(gaps) == 10
    assert gaps[0] == 0.0  # p = 1 at the start: every sample original
    assert abs(np.mean(gaps)) < 0.06
    assert max(abs(g) for g in gaps) < 0.25


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"p_schedule": {"kind": "linear", "start": 1.0, "end": 0.5}}, "p_schedule.total_samples"),
        ({"p_schedule": {**LINEAR, "end": 1.5}}, "p_schedule.end"),
        ({"p_schedule": {**LINEAR, "start": -0.1}}, "p_schedule.start"),
        ({"p_schedule": {"kind": "step", "milestones": [10], "values": [2]}}, "p_schedule.values[0]"),
        ({"p_schedule": {"kind": "step", "milestones": [10, 5], "values": [0.5, 0.4]}}, "p_schedule.milestones"),
        ({"p_schedule": {"kind": "exponential"}}, "p_schedule.kind"),
        ({"p_schedule": {**LINEAR, "totl_samples": 3}}, "p_schedule"),
        ({"p_schedule": LINEAR, "p_original": 0.5}, "p_schedule"),
        ({"p_schedule": LINEAR, "source_weights": {"original": 1.0}}, "p_schedule"),
        ({"p_schedule": LINEAR, "sources": {"original": "txt", "a": "json:x", "b": "json:y"}}, "p_schedule"),
    ],
)
def test_bad_schedules_are_config_errors_naming_the_key(tiny_shards, extra, key):
    args = dict(train_shards=str(tiny_shards["web"]), sidecar_dir=str(tiny_shards["sidecars"]), batch_size=4)
    with pytest.raises(ConfigError) as err:
        CaptionMixDataModule.validate_config({**args, **extra}, RunContext())
    assert err.value.key == key
