"""``recaption merge`` and keys that occur in more than one shard (a shard downloaded twice, or partly copied into
another): refused by default with the way forward; ``--on-duplicate first`` keeps each key's first row (shard order,
then row order) and lists every dropped row."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes

from experiments.jobs import recaption
from experiments.jobs.recaption import Generated, main, merge, run


class _EchoBackend:
    """HFBackend's interface without a model: every caption is the same text."""

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, images, repetition_penalty=None):
        return [Generated("a small square", 3, False) for _ in images]


def _shard(path: Path, keys: list[str]) -> None:
    """A shard whose samples' alt-text names the shard, so a row tells which copy of a key it came from."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in (("jpg", jpeg_bytes(i)), ("txt", f"{key} from {path.stem}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


SHARDS = {  # 00001 re-downloaded k1 and k2; 00002 has k2 a third time
    "00000": ["k0", "k1", "k2"],
    "00001": ["k3", "k1", "k4", "k2"],
    "00002": ["k2", "k5"],
}


@pytest.fixture
def done(tmp_path, monkeypatch) -> dict:
    """The three shards recaptioned (fake captioner); shard 00001 in slices of 2, so order spans slices too."""
    monkeypatch.setitem(recaption.BACKENDS, "hf", _EchoBackend)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "web").mkdir()
    for stem, keys in SHARDS.items():
        _shard(tmp_path / f"web/{stem}.tar", keys)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    kw = dict(batch_size=2, progress=False, rank=0, world_size=1)
    run(str(model), str(tmp_path / "web/00001.tar"), out, slice_size=2, **kw)
    run(str(model), str(tmp_path / "web/*.tar"), out, **kw)
    assert sorted(p.stem for p in out.glob("*.parquet")) == [
        "00000",
        "00001.part00000-of-00002",
        "00001.part00001-of-00002",
        "00002",
    ]
    return {"out": out, "web": tmp_path / "web", "spec": str(tmp_path / "web/*.tar")}


def duplicates_report_path(dest: Path) -> Path:
    """Where the dropped rows are listed, as docs/recaption.md says: ``<dest stem>.duplicates.csv`` beside ``dest``."""
    return dest.with_name(f"{dest.stem}.duplicates.csv")


def _report(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_merge_refuses_duplicates_by_default_naming_both_rows_and_the_way_forward(done):
    with pytest.raises(ValueError, match="more than one row") as exc:
        merge(done["out"], shards=done["spec"])
    msg = str(exc.value)
    assert "2 keys occur in more than one row (3 extra rows)" in msg
    assert "'k1' in units 00000 (row 1) and 00001.part00000-of-00002 (row 1)" in msg
    assert "--on-duplicate first" in msg
    assert not (done["out"] / "merged/recap.parquet").exists()


def test_merge_first_keeps_the_first_row_in_shard_order_and_lists_every_dropped_row(done, capsys):
    dest = merge(done["out"], shards=done["spec"], on_duplicate="first")
    rows = {r["key"]: r for r in pq.read_table(dest).to_pylist()}
    assert len(rows) == pq.read_table(dest).num_rows == 6  # every key exactly once
    assert {k: r["org_caption"] for k, r in rows.items()} == {
        "k0": "k0 from 00000",
        "k1": "k1 from 00000",
        "k2": "k2 from 00000",
        "k3": "k3 from 00001",
        "k4": "k4 from 00001",
        "k5": "k5 from 00002",
    }
    report = _report(duplicates_report_path(dest))
    assert report == [
        {
            "key": "k1",
            "dropped_unit": "00001.part00000-of-00002",
            "dropped_row": "1",
            "kept_unit": "00000",
            "kept_row": "1",
        },
        {
            "key": "k2",
            "dropped_unit": "00001.part00001-of-00002",
            "dropped_row": "1",
            "kept_unit": "00000",
            "kept_row": "2",
        },
        {"key": "k2", "dropped_unit": "00002", "dropped_row": "0", "kept_unit": "00000", "kept_row": "2"},
    ]
    assert "merge: 3 duplicate rows dropped" in capsys.readouterr().out


def test_first_follows_the_order_the_shards_are_given_in(done):
    spec = "::".join(str(done["web"] / f"{s}.tar") for s in ("00002", "00001", "00000"))
    dest = merge(done["out"], shards=spec, on_duplicate="first")
    rows = {r["key"]: r["org_caption"] for r in pq.read_table(dest).to_pylist()}
    assert (rows["k1"], rows["k2"]) == ("k1 from 00001", "k2 from 00002")
    assert [(r["key"], r["dropped_unit"], r["kept_unit"]) for r in _report(duplicates_report_path(dest))] == [
        ("k2", "00001.part00001-of-00002", "00002"),
        ("k1", "00000", "00001.part00000-of-00002"),
        ("k2", "00000", "00002"),
    ]


def test_merge_cli_takes_on_duplicate_and_a_clean_merge_leaves_an_empty_list(done, capsys, tmp_path):
    with pytest.raises(ValueError, match="--on-duplicate first"):
        main(["merge", "--out", str(done["out"])])
    path = main(["merge", "--out", str(done["out"]), "--shards", done["spec"], "--on-duplicate", "first"])
    assert "3 duplicate rows dropped" in capsys.readouterr().out
    assert len(_report(duplicates_report_path(path))) == 3
    with pytest.raises(SystemExit):
        main(["merge", "--out", str(done["out"]), "--on-duplicate", "last"])
    # without duplicates, `first` changes nothing and its list is empty (no stale list from an earlier merge)
    (done["out"] / "00001.part00000-of-00002.parquet").unlink()
    (done["out"] / "00001.part00001-of-00002.parquet").unlink()
    (done["out"] / "00002.parquet").unlink()
    path = merge(done["out"], on_duplicate="first")
    assert pq.read_table(path).column("key").to_pylist() == ["k0", "k1", "k2"]
    assert _report(duplicates_report_path(path)) == []
