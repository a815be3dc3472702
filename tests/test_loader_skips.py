"""Skip accounting of the caption-mix loader (issue 17.7): every skip is reported, also after an evaluation pass's
last full batch, and each skipped key is written with its reason, shard and split to the run's skip log."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import cpu_trainer, img2dataset_key, jpeg_bytes
from torchvision import transforms as T

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.wds_stages import SkipStats

TRANSFORM = T.Compose([T.Resize(8), T.CenterCrop(8), T.PILToTensor()])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, shard: int, n: int, bad: dict[int, dict[str, bytes]] | None = None) -> list[str]:
    """``n`` samples (jpg + txt); sample i's members are replaced by ``bad[i]`` when given. Returns the keys."""
    keys = [img2dataset_key(shard, i) for i in range(n)]
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            members = (bad or {}).get(i, {"jpg": jpeg_bytes(shard * 100 + i, 16), "txt": f"orig {key}".encode()})
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    return keys


def truncate_last_member(path: Path, extra: bytes) -> None:
    """Append one member and cut the file inside its data (a shard whose copy was interrupted)."""
    with tarfile.open(path, "a") as tar:
        _add(tar, "000019999.jpg", extra)
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + len(extra) // 2])


def dm_for(shards: list[str], **kw) -> CaptionMixDataModule:
    args = dict(
        train_shards=shards,
        test_shards=shards,
        sources={"original": "txt"},
        batch_size=2,
        num_workers=0,
        image_transform=TRANSFORM,
    )
    args.update(kw)
    return CaptionMixDataModule(**args)


def counted(batches: list[dict]) -> Counter:
    total: Counter = Counter()
    for b in batches:
        total.update(b["skipped"]["counts"])
    return total


# ------------------------------------------------------------------------------------- skips after the last batch
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_pass_reports_a_tar_error_after_its_last_full_batch(workers, tmp_path):
    """4 + 2 good samples fill exactly 3 batches of 2; the second shard then ends in a truncated member."""
    write_tar(tmp_path / "00000.tar", 0, 4)
    write_tar(tmp_path / "00001.tar", 1, 2)
    truncate_last_member(tmp_path / "00001.tar", jpeg_bytes(99, 32))
    dm = dm_for([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], num_workers=workers)
    loader = dm.test_dataloader()
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 6
    assert all(len(b["key"]) > 0 for b in batches)  # the skips-only item never reaches the model
    assert counted(batches) == {"tar_error:TarFormatError": 1}
    assert loader.skip_counts == {"tar_error:TarFormatError": 1}


def test_eval_worker_whose_shard_is_all_broken_still_reports_its_skips(tmp_path):
    """Worker 1 reads only a zero-byte shard and never makes a batch; its tar error used to vanish."""
    write_tar(tmp_path / "00000.tar", 0, 4)
    (tmp_path / "00001.tar").write_bytes(b"")
    dm = dm_for([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], num_workers=2)
    batches = list(dm.test_dataloader())
    assert sum(len(b["key"]) for b in batches) == 4
    assert counted(batches) == {"tar_error:TarFormatError": 1}


def test_eval_pass_with_no_usable_sample_warns_and_keeps_the_counts(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    log = tmp_path / "skips.jsonl"
    loader = dm_for([str(tmp_path / "00000.tar")], skip_log=str(log)).test_dataloader()
    with pytest.warns(UserWarning, match="no usable sample"):
        assert list(loader) == []
    assert loader.skip_counts == {"tar_error:TarFormatError": 1}
    [line] = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["reason"] == "tar_error:TarFormatError"
    assert line["shard"].endswith("00000.tar")
    assert line["split"] == "test"


# ------------------------------------------------------------------------------------------ every key, in the log
def bad_shard(path: Path, shard: int = 0) -> tuple[list[str], dict[str, str]]:
    """8 samples: 1, 2 and 5 have undecodable images, 6 has no image member; returns keys and the skipped ones."""
    bad = {
        1: {"jpg": b"<html>404</html>", "txt": b"x"},
        2: {"jpg": b"not a jpeg either", "txt": b"y"},
        5: {"jpg": b"\xff\xd8 truncated", "txt": b"z"},
        6: {"txt": b"only a caption"},
    }
    keys = write_tar(path, shard, 8, bad)
    return keys, {keys[1]: "bad_image", keys[2]: "bad_image", keys[5]: "bad_image", keys[6]: "missing_image"}


def test_every_skipped_key_is_reported_not_one_example_per_reason(tmp_path):
    _, skipped = bad_shard(tmp_path / "00000.tar")
    batches = list(dm_for([str(tmp_path / "00000.tar")], batch_size=4).test_dataloader())
    records = [r for b in batches for r in b["skipped"]["records"]]
    assert {r["key"]: r["reason"] for r in records} == skipped
    assert all(r["shard"].endswith("00000.tar") for r in records)
    assert counted(batches) == {"bad_image": 3, "missing_image": 1}


def test_skip_log_has_one_line_per_skipped_sample_with_reason_shard_and_split(tmp_path):
    keys, skipped = bad_shard(tmp_path / "00000.tar")
    write_tar(tmp_path / "00001.tar", 1, 8)
    log = tmp_path / "run" / "skipped.jsonl"
    dm = dm_for(
        [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")],
        skip_log=str(log),
        batch_size=4,
        train_num_samples=12,
        shuffle_buffer=1,
    )
    list(dm.test_dataloader())
    loader = dm.train_dataloader()
    loader.set_epoch(3)
    list(loader)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    for split in ("test", "train"):
        mine = [x for x in lines if x["split"] == split]
        assert {x["key"]: x["reason"] for x in mine} == skipped
        assert len(mine) == len(skipped)  # one line per skipped sample (the training epoch read shard 0 once)
        assert {x["shard"] for x in mine} == {str(tmp_path / "00000.tar")}
        assert all(x["detail"] for x in mine if x["reason"] == "bad_image")  # PIL's error, for the audit
    assert {x["epoch"] for x in lines if x["split"] == "train"} == {3}
    assert {x["rank"] for x in lines} == {0}


def test_skip_log_goes_to_the_trainers_log_dir_one_file_per_rank(tmp_path):
    _, skipped0 = bad_shard(tmp_path / "00000.tar")
    _, skipped1 = bad_shard(tmp_path / "00001.tar", shard=1)
    shards = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    trainer = cpu_trainer(default_root_dir=tmp_path / "run", enable_checkpointing=True)
    for rank, name, skipped in ((0, "skipped.jsonl", skipped0), (1, "skipped.rank1.jsonl", skipped1)):
        dm = dm_for(shards, skip_log=True, rank=rank, world_size=2)  # True is the default: the run's log dir
        dm.trainer = trainer
        dm.setup("test")
        list(dm.test_dataloader())  # each rank reads one shard
        lines = [json.loads(x) for x in (tmp_path / "run" / name).read_text().splitlines()]
        assert {x["key"]: x["reason"] for x in lines} == skipped
        assert {x["rank"] for x in lines} == {rank}


def test_a_fallback_is_counted_but_only_samples_without_any_caption_are_logged(tmp_path):
    log = tmp_path / "skipped.jsonl"
    keys = write_tar(
        tmp_path / "00000.tar",
        0,
        4,
        {1: {"jpg": jpeg_bytes(1, 16), "json": b'{"org_caption": "from json"}'}, 2: {"jpg": jpeg_bytes(2, 16)}},
    )
    dm = dm_for(
        [str(tmp_path / "00000.tar")],
        sources={"original": "txt", "json": "json:org_caption"},
        source_weights={"original": 1.0, "json": 0.0},
        skip_log=str(log),
    )
    batches = list(dm.test_dataloader())
    assert counted(batches) == {"fallback:original->json": 1, "no_caption": 1}
    assert sorted(k for b in batches for k in b["key"]) == [keys[0], keys[1], keys[3]]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["key"], x["reason"]) for x in lines] == [(keys[2], "no_caption")]


def test_records_beyond_the_cap_are_counted_and_reported_lost():
    stats = SkipStats(record=True, max_records=2, max_consecutive_drops=None)
    for i in range(5):
        stats.skip("bad_image", f"u:{i}", key=str(i), shard="u")
    out = stats.drain()
    assert out["counts"] == {"bad_image": 5}
    assert [r["key"] for r in out["records"]] == ["0", "1"]
    assert out["records_lost"] == 3
    assert not stats.pending()
