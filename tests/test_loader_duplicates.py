"""Duplicate keys across shards (issue 17.4): a re-downloaded shard and a partly copied one hold keys that other
shards hold too. The loader counts every copy it drops as ``duplicate_key``; ``dedupe: worker`` (default) drops
copies one loader worker reads, ``dedupe: global`` drops every copy outside the key's first shard on every worker
and rank (a shared index), ``dedupe: off`` reads copies as samples."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from conftest import write_shards

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.checks import ConfigError
from datamodules.wds_stages import build_duplicate_index, read_duplicate_index, uniform_from_key


@pytest.fixture
def copied(tmp_path: Path) -> dict:
    """Shards 0-2 (8 samples each), 00003 = a re-downloaded copy of 00001, 00004 = the first 5 samples of 00002."""
    web = tmp_path / "web"
    truth = write_shards(web, [8, 8, 8])
    for ext in (".tar", "_stats.json", ".parquet"):
        shutil.copy(web / f"00001{ext}", web / f"00003{ext}")
    with wds.TarWriter(str(web / "00004.tar")) as sink:
        for i, sample in enumerate(wds.WebDataset(str(web / "00002.tar"), shardshuffle=False)):
            if i < 5:
                sink.write({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
    (web / "00004_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    urls = [str(web / f"{i:05d}.tar") for i in range(5)]
    return {"web": web, "urls": urls, "keys": set(truth), "copies": 8 + 5, "truth": truth, "tmp": tmp_path}


def dm(shards, **kw) -> CaptionMixDataModule:
    args = dict(
        train_shards=shards,
        test_shards=shards,
        sources={"original": "txt", "recaption": "json:org_caption"},
        p_original=0.5,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        shuffle_initial=4,
        seed=3,
    )
    args.update(kw)
    return CaptionMixDataModule(**args)


def read(loader, epoch: int | None = None) -> tuple[Counter, Counter, list[tuple[str, str]]]:
    """(key counts, skip counts, (key, url) pairs) of one pass / epoch."""
    if epoch is not None:
        loader.set_epoch(epoch)
    keys, skips, pairs = Counter(), Counter(), []
    for batch in loader:
        keys.update(batch["key"])
        skips.update(batch["skipped"]["counts"])
        pairs += list(zip(batch["key"], batch["url"], strict=True))
    return keys, skips, pairs


# ---------------------------------------------------------------------------------------------- one worker (default)
def test_an_evaluation_pass_reads_each_key_once_and_counts_the_copies(copied):
    keys, skips, _ = read(dm(copied["urls"]).test_dataloader())
    assert set(keys) == copied["keys"]
    assert max(keys.values()) == 1  # used to be 2 for the 13 copied keys
    assert skips["duplicate_key"] == copied["copies"]


def test_a_training_epoch_reads_each_key_once(copied):
    """24 unique keys, 37 samples on disk: an epoch of 24 samples (6 batches) is every key exactly once. (Without a
    shuffle buffer: a buffer's tail at the end of an epoch may hold back keys while the cycling schedule's next round
    fills it, with or without copies.)"""
    loader = dm(copied["urls"], train_num_samples=24, shuffle_buffer=1).train_dataloader()
    keys, skips, _ = read(loader, epoch=1)
    assert keys == Counter({k: 1 for k in copied["keys"]})
    assert skips["duplicate_key"] >= 1


def test_the_caption_draw_of_a_kept_copy_is_still_the_key_hash(copied):
    loader = dm(copied["urls"], train_num_samples=24).train_dataloader()
    loader.set_epoch(2)
    for batch in loader:
        for key, caption, source in zip(batch["key"], batch["caption"], batch["caption_source"], strict=True):
            assert source == ("original" if uniform_from_key(3, 2, key) < 0.5 else "recaption")
            assert caption == copied["truth"][key][source if source == "original" else "json"]


def test_dedupe_off_reads_copies_as_samples(copied):
    keys, skips, _ = read(dm(copied["urls"], dedupe="off").test_dataloader())
    assert sum(keys.values()) == 24 + copied["copies"]
    assert "duplicate_key" not in skips


def test_the_worker_window_is_bounded_and_says_when_it_is_full(copied):
    """With room for 10 keys, a worker catches copies of those 10 only, and says once that the window is full."""
    keys, skips, _ = read(dm(copied["urls"], dedupe_max_keys=10).test_dataloader())
    assert skips["dedupe_window_full"] == 1
    assert 0 < skips["duplicate_key"] < copied["copies"]
    assert sum(keys.values()) == 24 + copied["copies"] - skips["duplicate_key"]


def test_worker_mode_does_not_see_copies_in_another_workers_shards(copied):
    """The documented limit: worker 0 reads 00000 and 00002, worker 1 reads 00001 and 00004 (the partial copy of
    00002), so those 5 copies are kept; "global" drops them (below)."""
    urls = [u for u in copied["urls"] if not u.endswith("00003.tar")]
    keys, skips, _ = read(dm(urls, num_workers=2).test_dataloader())
    assert sum(keys.values()) == 24 + 5
    assert "duplicate_key" not in skips


# ------------------------------------------------------------------------------------------------------- global index
@pytest.mark.parametrize("workers", [0, 2])
def test_global_reads_each_key_once_from_its_first_shard_over_workers(copied, workers):
    d = dm(
        copied["urls"],
        dedupe="global",
        dedupe_dir=str(copied["tmp"] / "idx"),
        num_workers=workers,
        persistent_workers=False,
    )
    d.prepare_data()
    keys, skips, pairs = read(d.test_dataloader())
    assert keys == Counter({k: 1 for k in copied["keys"]})
    assert skips["duplicate_key"] == copied["copies"]
    owner = {k: f"{int(k[:5]):05d}.tar" for k in copied["keys"]}  # the first shard in the list holding the key
    assert all(url.endswith(owner[key]) for key, url in pairs)


def test_global_over_two_ranks_and_two_workers_reads_each_key_once(copied):
    seen: Counter = Counter()
    for rank in (0, 1):
        d = dm(
            copied["urls"],
            dedupe="global",
            dedupe_dir=str(copied["tmp"] / "idx"),
            num_workers=2,
            rank=rank,
            world_size=2,
            persistent_workers=False,
        )
        keys, _, _ = read(d.test_dataloader())
        seen.update(keys)
    assert seen == Counter({k: 1 for k in copied["keys"]})


def test_global_training_epoch_is_the_unique_count_and_reads_each_key_once(copied):
    d = dm(copied["urls"], dedupe="global", dedupe_dir=str(copied["tmp"] / "idx"), shuffle_buffer=1)
    loader = d.train_dataloader()
    assert len(loader) == 24 // 4  # 37 samples in the shards' stats minus 13 copies
    keys, skips, _ = read(loader, epoch=0)
    assert keys == Counter({k: 1 for k in copied["keys"]})
    assert skips["duplicate_key"] >= 1


def test_the_index_is_the_same_with_any_memory_budget_and_lists_every_copy(copied):
    small = build_duplicate_index(copied["urls"], str(copied["tmp"] / "small.json"), max_keys=3)
    large = build_duplicate_index(copied["urls"], str(copied["tmp"] / "large.json"), max_keys=10**6)
    assert small == large
    assert small["copies"] == copied["copies"] == small["duplicated_keys"]
    a, b = (
        read_duplicate_index(str(copied["tmp"] / "small.json")),
        read_duplicate_index(str(copied["tmp"] / "large.json")),
    )
    assert a["drop"] == b["drop"]
    assert set(a["drop"]) == {copied["urls"][3], copied["urls"][4]}
    assert all(owner == 1 for owner in a["drop"][copied["urls"][3]].values())
    assert not list((copied["tmp"]).glob(".dedupe-*"))  # the buckets are gone


def test_the_index_is_rebuilt_when_a_shard_changes(copied):
    idx = copied["tmp"] / "idx"
    d = dm(copied["urls"], dedupe="global", dedupe_dir=str(idx))
    d.prepare_data()
    [path] = list(idx.glob("*.json"))
    assert read_duplicate_index(str(path))["copies"] == copied["copies"]
    shutil.copy(copied["web"] / "00000.tar", copied["web"] / "00004.tar")  # the partial copy replaced: now of 00000
    d.prepare_data()
    index = read_duplicate_index(str(path))
    assert index["copies"] == 8 + 8
    assert all(owner == 0 for owner in index["drop"][copied["urls"][4]].values())


# ---------------------------------------------------------------------------------------------------- settings
def test_bad_dedupe_settings_are_refused_naming_the_key(copied):
    with pytest.raises(ConfigError, match="dedupe must be one of"):
        dm(copied["urls"], dedupe="first")
    with pytest.raises(ConfigError, match="dedupe_max_keys must be an integer >= 1"):
        dm(copied["urls"], dedupe_max_keys=0)


def test_a_loader_state_records_the_dedupe_mode(copied):
    d = dm(copied["urls"], train_num_samples=24)
    loader = d.train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["dedupe"] == "worker"
    with pytest.raises(ValueError, match="dedupe: checkpoint 'worker', now 'off'"):
        dm(copied["urls"], train_num_samples=24, dedupe="off").train_dataloader().load_state_dict(state)
    older = {k: v for k, v in state.items() if k not in ("dedupe", "dedupe_max_keys")}
    dm(copied["urls"], train_num_samples=24).train_dataloader().load_state_dict(older)  # not recorded then: accepted
