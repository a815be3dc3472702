"""Malformed input, fault class by fault class: each is skipped and counted with a reason, or refused with an error
naming the file, key or field; the good samples around it still come through, and nothing crashes a run.

Covers the caption-mix DataModule (sample-, shard- and sidecar-level faults), the sidecar builder's inputs, the
recaption job and the evaluation readers. Older, coarser checks live in test_datamodule.py, test_tar_reader.py,
test_sidecar.py and test_recaption.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import img2dataset_key, jpeg_bytes
from PIL import Image
from torchvision import transforms as T

from datamodules.caption_mix import CaptionMixDataModule

SIDE = 32  # stored side of the test images; the transform's Resize(8) lets JPEGs decode at 1/4 scale (draft)
TRANSFORM = T.Compose([T.Resize(8), T.CenterCrop(8), T.PILToTensor()])


# ----------------------------------------------------------------------------------------------------------- images
def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_jpeg(seed: int) -> bytes:
    return jpeg_bytes(seed, SIDE)


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red


def grey16_png() -> bytes:
    return _save(Image.fromarray(np.full((SIDE, SIDE), 0x8080, np.uint16)), "PNG")  # 50 % grey in 16 bits


def palette_png() -> bytes:
    img = Image.new("P", (SIDE, SIDE), 1)
    img.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(0, (0, 0, SIDE, SIDE // 2))  # top half: index 0 (red), declared transparent
    return _save(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    arr = np.zeros((SIDE, SIDE, 4), np.uint8)
    arr[: SIDE // 2] = (10, 20, 30, 0)  # top half fully transparent (stores a dark colour)
    arr[SIDE // 2 :] = (200, 100, 50, 255)
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def header_bomb_jpeg() -> bytes:
    """A small JPEG whose SOF header claims 40000 x 40000 pixels."""
    data = bytearray(good_jpeg(7))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (40000).to_bytes(2, "big") * 2
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = good_jpeg(8)
    return data[: len(data) * 6 // 10]


def corrupt_header_jpeg() -> bytes:
    data = good_jpeg(9)
    return data[:4] + b"\x00" * 40 + data[44:]


def top_bottom(image: torch.Tensor) -> tuple[list[int], list[int]]:
    """Mean RGB of the top and bottom rows of a uint8 CHW tensor (uniform halves survive the resize)."""
    return image[:, 0].float().mean(1).round().int().tolist(), image[:, -1].float().mean(1).round().int().tolist()


# ------------------------------------------------------------------------------------------------------ shard writing
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


GOOD = [img2dataset_key(0, i) for i in (0, 1, 3, 4)]
BAD = img2dataset_key(0, 2)


def good_members(key: str, seed: int) -> dict[str, bytes]:
    meta = {"key": key, "org_caption": f"json {key}"}
    return {"jpg": good_jpeg(seed), "txt": f"orig {key}".encode(), "json": json.dumps(meta).encode()}


def write_shard(path: Path, bad: list[tuple[str, bytes]]) -> None:
    """good 0, good 1, the bad sample's members (name suffix, bytes), good 3, good 4: img2dataset key order."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(GOOD[:2]):
            for ext, data in good_members(key, i).items():
                _add(tar, f"{key}.{ext}", data)
        for suffix, data in bad:
            _add(tar, f"{BAD}.{suffix}" if not suffix.startswith("/") else suffix[1:], data)
        for i, key in enumerate(GOOD[2:], start=3):
            for ext, data in good_members(key, i).items():
                _add(tar, f"{key}.{ext}", data)


def one_pass(shards: str | list[str], **kw) -> tuple[dict[str, dict], Counter, dict[str, str]]:
    """One evaluation-mode pass of the DataModule: ``{key: sample}``, skip counts and one example per reason."""
    args = dict(
        train_shards=shards,
        test_shards=shards,
        sources={"original": "txt"},
        batch_size=2,
        num_workers=0,
        image_transform=TRANSFORM,
        max_image_pixels=1_000_000,
    )
    args.update(kw)
    dm = CaptionMixDataModule(**args)
    samples, counts, examples = {}, Counter(), {}
    for batch in dm.test_dataloader():
        counts.update(batch["skipped"]["counts"])
        for reason, where in batch["skipped"]["examples"].items():
            examples.setdefault(reason, where)
        for i, key in enumerate(batch["key"]):
            assert key not in samples, f"{key} delivered twice"
            samples[key] = {
                "image": batch["image"][i],
                "caption": batch["caption"][i],
                "source": batch["caption_source"][i],
            }
    return samples, counts, examples


# ------------------------------------------------------------------------------------------- sample-level fault matrix
@dataclass
class Case:
    """A bad sample (its members) and what must happen: ``skips`` counted, delivered or not, extra check."""

    members: list[tuple[str, bytes]]
    skips: dict[str, int]
    delivered: bool = False
    check: Callable[[dict], None] | None = None
    kw: dict = field(default_factory=dict)


def _is_red(s: dict) -> None:
    r, g, b = s["image"].float().mean((1, 2)).tolist()
    assert r > 200  # CMYK (0, 255, 255, 0) is red
    assert max(g, b) < 60


def _is_mid_grey(s: dict) -> None:
    assert s["image"].min() >= 126
    assert s["image"].max() <= 130


def _palette_on_white(s: dict) -> None:
    top, bottom = top_bottom(s["image"])
    assert top == [255, 255, 255]  # the transparent index is composited on white, not shown as red
    assert bottom == [0, 200, 0]


def _rgba_on_white(s: dict) -> None:
    top, bottom = top_bottom(s["image"])
    assert top == [255, 255, 255]  # not the stored (10, 20, 30) under alpha 0
    assert bottom == [200, 100, 50]


def _long_text_caption(s: dict) -> None:
    assert len(s["caption"]) == 5_000


CAPTION = ("txt", b"a caption")
CASES = {
    # images
    "truncated_jpeg": Case([("jpg", truncated_jpeg()), CAPTION], {"bad_image": 1}),
    "corrupt_jpeg_header": Case([("jpg", corrupt_header_jpeg()), CAPTION], {"bad_image": 1}),
    "not_an_image": Case([("jpg", b"<html>404 not found</html>"), CAPTION], {"bad_image": 1}),
    "empty_image_member": Case([("jpg", b""), CAPTION], {"bad_image": 1}),
    "cmyk_jpeg": Case([("jpg", cmyk_jpeg()), CAPTION], {}, True, _is_red),
    "grey_16bit_png": Case([("png", grey16_png()), CAPTION], {}, True, _is_mid_grey),
    "palette_png_transparency": Case([("png", palette_png()), CAPTION], {}, True, _palette_on_white),
    "rgba_png": Case([("png", rgba_png()), CAPTION], {}, True, _rgba_on_white),
    "1x1_image": Case([("png", _save(Image.new("RGB", (1, 1)), "PNG")), CAPTION], {"tiny_image": 1}),
    "pixel_bomb_png": Case([("png", _save(Image.new("L", (1500, 1500)), "PNG")), CAPTION], {"oversized_image": 1}),
    "jpeg_header_bomb": Case([("jpg", header_bomb_jpeg()), CAPTION], {"oversized_image": 1}),
    # captions
    "empty_caption": Case([("jpg", good_jpeg(20)), ("txt", b"")], {"no_caption": 1}),
    "blank_caption": Case([("jpg", good_jpeg(21)), ("txt", b" \n\t ")], {"no_caption": 1}),
    "very_long_caption": Case(
        [("jpg", good_jpeg(22)), ("txt", b"x" * 20_001)], {"caption_too_long": 1, "no_caption": 1}
    ),
    "long_but_allowed_caption": Case([("jpg", good_jpeg(23)), ("txt", b"y" * 5_000)], {}, True, _long_text_caption),
    "non_utf8_caption": Case(
        [("jpg", good_jpeg(24)), ("txt", "café".encode("latin-1"))], {"caption_not_utf8": 1, "no_caption": 1}
    ),
    # members and keys
    "missing_image_member": Case([CAPTION], {"missing_image": 1}),
    "missing_caption_member": Case([("jpg", good_jpeg(25))], {"no_caption": 1}),
    "duplicate_key": Case(
        [("/" + f"{GOOD[0]}.jpg", good_jpeg(26)), ("/" + f"{GOOD[0]}.txt", b"dup")], {"duplicate_key": 1}
    ),
    # json fields (source json:org_caption)
    "json_unparsable": Case(
        [("jpg", good_jpeg(27)), ("json", b"{not json")],
        {"bad_json": 1, "no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
    "json_not_utf8": Case(
        [("jpg", good_jpeg(28)), ("json", b'{"org_caption": "caf\xe9"}')],
        {"bad_json": 1, "no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
    "json_not_an_object": Case(
        [("jpg", good_jpeg(29)), ("json", b'["org_caption"]')],
        {"no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
    "json_field_missing": Case(
        [("jpg", good_jpeg(30)), ("json", b'{"caption": "x"}')],
        {"no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
    "json_field_not_text": Case(
        [("jpg", good_jpeg(31)), ("json", b'{"org_caption": 12}')],
        {"caption_not_text": 1, "no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
    "json_absurd_nesting": Case(
        [("jpg", good_jpeg(32)), ("json", b"[" * 100_000)],
        {"bad_json": 1, "no_caption": 1},
        kw={"sources": {"original": "json:org_caption"}},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sample_fault_is_counted_and_neighbours_come_through(name, tmp_path):
    case = CASES[name]
    write_shard(tmp_path / "00000.tar", case.members)
    samples, counts, examples = one_pass(str(tmp_path / "00000.tar"), **case.kw)
    want = set(GOOD) | ({BAD} if case.delivered else set())
    assert set(samples) == want
    assert dict(counts) == case.skips
    for reason in case.skips:  # the example of each reason names the shard and the key
        assert "00000.tar" in examples[reason]
        assert BAD in examples[reason] or GOOD[0] in examples[reason]
    for key in GOOD:  # the neighbours are intact: their own image and caption
        source = case.kw.get("sources", {"original": "txt"})["original"]
        assert samples[key]["caption"] == (f"json {key}" if source.startswith("json") else f"orig {key}")
        assert samples[key]["image"].shape == (3, 8, 8)
    if case.check is not None:
        case.check(samples[BAD])


def test_too_long_or_undecodable_caption_falls_back_to_the_other_source(tmp_path):
    """A caption problem makes only that source missing: the sample falls back and is counted twice (why, and the
    fallback), instead of being dropped."""
    meta = json.dumps({"org_caption": "the json caption"}).encode()
    write_shard(tmp_path / "00000.tar", [("jpg", good_jpeg(40)), ("txt", b"\xff\xfe bad"), ("json", meta)])
    samples, counts, _ = one_pass(
        str(tmp_path / "00000.tar"), sources={"original": "txt", "alt": "json:org_caption"}, p_original=1.0
    )
    assert samples[BAD]["caption"] == "the json caption"
    assert samples[BAD]["source"] == "alt"
    assert dict(counts) == {"caption_not_utf8": 1, "fallback:original->alt": 1}


def test_a_transform_that_fails_on_one_image_skips_it(tmp_path):
    write_shard(tmp_path / "00000.tar", [("jpg", good_jpeg(41)), CAPTION])
    bad_size = Image.open(io.BytesIO(good_jpeg(41))).size

    class Picky:
        def __call__(self, img):
            if img.size == bad_size and np.asarray(img)[0, 0].tolist() == self.pixel:
                raise RuntimeError("cannot handle this one")
            return TRANSFORM(img)

    picky = Picky()
    picky.pixel = np.asarray(Image.open(io.BytesIO(good_jpeg(41))).convert("RGB"))[0, 0].tolist()
    samples, counts, examples = one_pass(str(tmp_path / "00000.tar"), image_transform=picky)
    assert set(samples) == set(GOOD)
    assert dict(counts) == {"transform_error": 1}
    assert BAD in examples["transform_error"]
    assert "cannot handle this one" in examples["transform_error"]


# -------------------------------------------------------------------------------------------- shard-level faults
def _clean_shard(path: Path, keys: list[str], seed: int = 0) -> None:
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in good_members(key, seed + i).items():
                _add(tar, f"{key}.{ext}", data)


SECOND = [img2dataset_key(1, i) for i in range(3)]  # a healthy second shard


def _member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _truncate_mid_member(path: Path) -> list[str]:
    members = _member_offsets(path)
    cut = members[6].offset_data + 10  # in the image of the third sample (3 members per sample)
    path.write_bytes(path.read_bytes()[:cut])
    return GOOD[:2]


def _truncate_at_header(path: Path) -> list[str]:
    members = _member_offsets(path)
    cut = members[6].offset + 100  # inside the header of the third sample's first member
    path.write_bytes(path.read_bytes()[:cut])
    return GOOD[:2]


def _truncate_in_second_member(path: Path) -> list[str]:
    members = _member_offsets(path)
    cut = members[7].offset_data + 10  # in the third sample's txt: its image was read, its caption never comes
    path.write_bytes(path.read_bytes()[:cut])
    return GOOD[:2]


def _truncate_after_sample(path: Path) -> list[str]:
    members = _member_offsets(path)
    cut = members[9].offset_data + 10  # in the fourth sample's first member: the third sample is complete
    path.write_bytes(path.read_bytes()[:cut])
    return [*GOOD[:2], BAD]


def _corrupt_header(path: Path) -> list[str]:
    members = _member_offsets(path)
    raw = bytearray(path.read_bytes())
    raw[members[6].offset + 3] ^= 0x55  # a name byte of the third sample's header: checksum mismatch
    path.write_bytes(bytes(raw))
    return GOOD[:2]


def _zero_bytes(path: Path) -> list[str]:
    path.write_bytes(b"")
    return []


def _not_a_tar(path: Path) -> list[str]:
    path.write_bytes(b"PK\x03\x04 a zip file, say" * 100)
    return []


SHARD_FAULTS = {
    "truncated_mid_member": (_truncate_mid_member, "tar_error:TarFormatError"),
    "truncated_in_header": (_truncate_at_header, "tar_error:TarFormatError"),
    "truncated_in_a_later_member": (_truncate_in_second_member, "tar_error:TarFormatError"),
    "truncated_after_a_complete_sample": (_truncate_after_sample, "tar_error:TarFormatError"),
    "corrupt_header_checksum": (_corrupt_header, "tar_error:TarFormatError"),
    "zero_byte_shard": (_zero_bytes, "tar_error:TarFormatError"),
    "not_a_tar": (_not_a_tar, "tar_error:TarFormatError"),
}


@pytest.mark.parametrize("name", list(SHARD_FAULTS))
def test_damaged_shard_keeps_what_was_read_and_the_next_shard(name, tmp_path):
    damage, reason = SHARD_FAULTS[name]
    first, second = tmp_path / "00000.tar", tmp_path / "00001.tar"
    _clean_shard(first, [GOOD[0], GOOD[1], BAD, GOOD[2], GOOD[3]])
    _clean_shard(second, SECOND, seed=50)
    kept = damage(first)
    samples, counts, examples = one_pass([str(first), str(second)])
    assert set(samples) == set(kept) | set(SECOND)
    partial = {"no_caption": 1} if damage is _truncate_in_second_member else {}  # the image came, the caption not
    assert dict(counts) == {reason: 1, **partial}
    assert "00000.tar" in examples[reason]


def test_missing_shard_and_failing_pipe_are_counted_not_fatal(tmp_path):
    """A shard that does not exist, and a ``pipe:`` whose command fails (it used to crash the loader at close)."""
    good = tmp_path / "00001.tar"
    _clean_shard(good, SECOND, seed=50)
    shards = [str(tmp_path / "00000.tar"), f"pipe:cat {good}", "pipe:echo oops >&2; exit 3"]
    samples, counts, examples = one_pass(shards)
    assert set(samples) == set(SECOND)
    assert counts["tar_error:FileNotFoundError"] == 1
    assert counts["tar_error:OSError"] == 1  # the pipe's exit status 3, reported when the stream closes
    assert counts["tar_error:TarFormatError"] == 1  # it printed nothing: an empty tar stream
    assert sum(counts.values()) == 3
    assert "exit 3" in examples["tar_error:OSError"]


def test_pipe_that_fails_after_its_data_keeps_every_sample(tmp_path):
    good = tmp_path / "00000.tar"
    _clean_shard(good, SECOND, seed=50)
    samples, counts, _ = one_pass([f"pipe:cat {good}; exit 5"])
    assert set(samples) == set(SECOND)
    assert dict(counts) == {"tar_error:OSError": 1}


# ---------------------------------------------------------------------------------------------------- sidecar faults
RELEASED_LATER = {  # Recap-DataComp-1B's later update added these (PAPER.md §7); `datasets` fails on them
    "re_caption_condition_diverse_topk": pa.string(),
    "re_condition_length": pa.int64(),
}


def _sidecar_shard(tmp_path: Path) -> tuple[str, Path]:
    web, side = tmp_path / "web", tmp_path / "side"
    web.mkdir()
    side.mkdir()
    _clean_shard(web / "00000.tar", [GOOD[0], GOOD[1], BAD, GOOD[2]])
    return str(web / "00000.tar"), side / "00000.parquet"


def _sidecar_pass(shard: str, side: Path, **kw) -> tuple[dict, Counter, dict]:
    args = dict(
        sources={"original": "txt", "recaption": "sidecar:re_caption"}, p_original=0.0, sidecar_dir=str(side.parent)
    )
    args.update(kw)
    return one_pass(shard, **args)


def test_sidecar_with_the_released_later_columns_is_read(tmp_path):
    shard, side = _sidecar_shard(tmp_path)
    keys = [GOOD[0], GOOD[1], BAD, GOOD[2]]
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "re_caption": [f"recap {k}" for k in keys],
                "re_caption_condition_diverse_topk": [f"topk {k}" for k in keys],
                "re_condition_length": [3, 4, 5, 6],
                "url": [None] * 4,
            }
        ),
        side,
    )
    samples, counts, _ = _sidecar_pass(shard, side)
    assert {k: s["caption"] for k, s in samples.items()} == {k: f"recap {k}" for k in keys}
    assert not counts
    # the later column as a source works too; the numeric one is no caption: refused naming it (issue 20)
    samples, counts, _ = _sidecar_pass(
        shard, side, sources={"original": "txt", "recaption": "sidecar:re_caption_condition_diverse_topk"}
    )
    assert samples[BAD]["caption"] == f"topk {BAD}"
    with pytest.raises(ValueError, match=r"'re_condition_length' is int64, not text"):
        _sidecar_pass(shard, side, sources={"original": "txt", "recaption": "sidecar:re_condition_length"})


def test_sidecar_missing_the_requested_column_is_refused_naming_file_and_column(tmp_path):
    shard, side = _sidecar_shard(tmp_path)
    pq.write_table(pa.table({"key": [GOOD[0]], "re_caption_condition_diverse_topk": ["x"]}), side)
    with pytest.raises(ValueError, match=r"00000\.parquet has no column 're_caption'"):
        _sidecar_pass(shard, side)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zero_bytes"])
def test_unreadable_sidecar_falls_back_and_is_counted(damage, tmp_path):
    shard, side = _sidecar_shard(tmp_path)
    pq.write_table(pa.table({"key": [GOOD[0]], "re_caption": ["x"]}), side)
    raw = side.read_bytes()
    side.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"not parquet" * 20, "zero_bytes": b""}[damage])
    samples, counts, examples = _sidecar_pass(shard, side)
    assert set(samples) == {GOOD[0], GOOD[1], BAD, GOOD[2]}
    assert {s["source"] for s in samples.values()} == {"original"}
    assert counts["sidecar_unreadable"] == 1
    assert counts["fallback:recaption->original"] == 4
    assert "00000.parquet" in examples["sidecar_unreadable"]


def test_sidecar_null_and_blank_values_fall_back(tmp_path):
    shard, side = _sidecar_shard(tmp_path)
    pq.write_table(pa.table({"key": [GOOD[0], GOOD[1], BAD, GOOD[2]], "re_caption": ["r0", None, "  ", "r2"]}), side)
    samples, counts, _ = _sidecar_pass(shard, side)
    assert {k: s["caption"] for k, s in samples.items()} == {
        GOOD[0]: "r0",
        GOOD[1]: f"orig {GOOD[1]}",
        BAD: f"orig {BAD}",
        GOOD[2]: "r2",
    }
    assert dict(counts) == {"fallback:recaption->original": 2}


# -------------------------------------------------------------------------------------------- sidecar builder inputs
def _recap_rows(keys: list[str]) -> pa.Table:
    return pa.table({"key": keys, "re_caption": [f"recap {k}" for k in keys], "sha256": ["0" * 64] * len(keys)})


def test_build_sidecars_refuses_a_corrupt_recap_parquet_naming_it(tmp_path):
    from experiments.jobs.sidecars import build_sidecars

    shard, _ = _sidecar_shard(tmp_path)
    recap = tmp_path / "recap"
    recap.mkdir()
    pq.write_table(_recap_rows([GOOD[0]]), recap / "train-00000.parquet")
    (recap / "train-00001.parquet").write_bytes(b"PAR1 interrupted download")
    with pytest.raises(ValueError, match=r"train-00001\.parquet is not a readable parquet file"):
        build_sidecars(str(recap), shard, tmp_path / "out", progress=False)


def test_build_sidecars_reads_the_later_released_schema_and_a_damaged_index(tmp_path):
    """Later columns are ignored unless requested; a damaged img2dataset ``<stem>.parquet`` index is replaced by a
    scan of the tar (nothing lost); a damaged tar in that scan is refused naming the shard."""
    from datamodules.sidecar import load_sidecar
    from experiments.jobs.sidecars import build_sidecars

    shard, _ = _sidecar_shard(tmp_path)
    keys = [GOOD[0], GOOD[1], BAD, GOOD[2]]
    table = _recap_rows(keys)
    for name, typ in RELEASED_LATER.items():
        table = table.append_column(name, pa.array([None] * len(keys), typ))
    pq.write_table(table, tmp_path / "recap.parquet")
    Path(shard).with_suffix(".parquet").write_bytes(b"damaged index")
    summary = build_sidecars(str(tmp_path / "recap.parquet"), shard, tmp_path / "out", progress=False)
    assert summary["shards_from_tar_scan"] == 1
    assert summary["rows_matched"] == 4
    got = load_sidecar(tmp_path / "out" / "00000.parquet", ["re_caption"])
    assert {k: v["re_caption"] for k, v in got.items()} == {k: f"recap {k}" for k in keys}

    raw = Path(shard).read_bytes()
    Path(shard).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"shard .*00000\.tar is damaged"):
        build_sidecars(str(tmp_path / "recap.parquet"), shard, tmp_path / "out2", progress=False)


# ------------------------------------------------------------------------------------------------ the recaption job
class FakeBackend:
    """Stands in for the captioner: records the images it is given and captions each with its mean colour."""

    name = "fake"

    def __init__(self, *args, **kwargs):
        self.images: list[Image.Image] = []

    def generate(self, images, repetition_penalty=None):
        from lightning_modules.components.llava import Generated

        self.images += list(images)
        return [Generated(f"mean {np.asarray(im).mean():.0f}", 2, False) for im in images]


def _recaption_shard(path: Path, bad: list[tuple[str, bytes]]) -> None:
    write_shard(path, bad)


@pytest.fixture(scope="module")
def recaption():
    import experiments.jobs.recaption as recaption

    return recaption


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["key"]: r for r in table.to_pylist()}


RECAPTION_IMAGE_CASES = {
    "truncated_jpeg": ([("jpg", truncated_jpeg())], "error", "truncated"),
    "not_an_image": ([("jpg", b"GIF89a nope")], "error", "cannot identify"),
    "1x1_image": ([("png", _save(Image.new("RGB", (1, 1)), "PNG"))], "error", "tiny_image"),
    "pixel_bomb": ([("jpg", header_bomb_jpeg())], "error", "oversized_image"),
    "missing_image": ([("txt", b"caption only")], "error", "no image member"),
    "bad_json": ([("jpg", good_jpeg(60)), ("json", b"{oops")], "error", "metadata"),
    "json_not_an_object": ([("jpg", good_jpeg(61)), ("json", b"[1, 2]")], "error", "metadata"),
    "non_utf8_caption": ([("jpg", good_jpeg(62)), ("txt", b"caf\xe9")], "ok", None),
    "cmyk_jpeg": ([("jpg", cmyk_jpeg())], "ok", None),
    "grey_16bit_png": ([("png", grey16_png())], "ok", None),
    "rgba_png": ([("png", rgba_png())], "ok", None),
}


@pytest.mark.parametrize("name", list(RECAPTION_IMAGE_CASES))
def test_recaption_gives_every_key_one_row(name, recaption, tmp_path):
    members, status, why = RECAPTION_IMAGE_CASES[name]
    _recaption_shard(tmp_path / "00000.tar", members)
    backend = FakeBackend()
    table = recaption.recaption_unit(str(tmp_path / "00000.tar"), backend, 2, {})
    rows = _rows(table)
    assert sorted(rows) == sorted([*GOOD, BAD])
    assert all(rows[k]["status"] == "ok" for k in GOOD)
    assert rows[BAD]["status"] == status
    if why is not None:
        assert why in rows[BAD]["error"]
    if name == "grey_16bit_png":
        assert rows[BAD]["re_caption"] == "mean 128"  # scaled from 16 bits, not clipped to 255
    if name == "rgba_png":
        assert rows[BAD]["re_caption"] == f"mean {(255 * 3 + 200 + 100 + 50) / 6:.0f}"  # transparent half is white
    if name == "non_utf8_caption":
        assert rows[BAD]["org_caption"] == "caf\ufffd"  # kept as metadata, the bad byte marked


def test_recaption_duplicate_key_and_truncated_tar_are_recorded_and_merge_still_works(recaption, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", [("/" + f"{GOOD[0]}.jpg", good_jpeg(70)), ("/" + f"{GOOD[0]}.txt", b"dup")])
    _clean_shard(shards / "00001.tar", SECOND, seed=50)
    _truncate_mid_member(shards / "00001.tar")  # only SECOND[0], SECOND[1] survive (third sample's image cut)
    monkeypatch.setitem(recaption.BACKENDS, "hf", FakeBackend)
    model = tmp_path / "model"  # run() checks for a llava-hf folder before anything else; the fake backend loads none
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    totals = recaption.run(str(model), str(shards / "*.tar"), out, batch_size=2, rank=0, world_size=1, progress=False)
    assert totals["units"] == 2
    records = {r["unit"]: r for r in map(json.loads, (out / recaption.MANIFEST).read_text().splitlines())}
    assert any("duplicate key" in e and GOOD[0] in e for e in records["00000"]["input_errors"])
    assert any("truncated tar member" in e for e in records["00001"]["input_errors"])
    assert recaption.input_errors(pq.read_table(out / "00001.parquet"))
    merged = pq.read_table(recaption.merge(out))
    assert sorted(merged.column("key").to_pylist()) == sorted([*GOOD, *SECOND[:2]])
    assert _rows(merged)[GOOD[0]]["org_caption"] == f"orig {GOOD[0]}"  # the first copy wins


# ------------------------------------------------------------------ the recaption job end to end: `run` takes them all
METADATA_FAULTS = {  # KEY.json that cannot be read, or whose fields a row takes are not text (beside a good KEY.txt)
    "json_unparsable": b"{not json",
    "json_not_utf8": b'{"url": "http://caf\xe9"}',
    "json_not_an_object": b'["url"]',
    "json_absurd_nesting": b"[" * 100_000,
    "json_url_not_text": b'{"url": 12, "sha256": "ab"}',
    "json_sha256_not_text": b'{"url": "http://x", "sha256": ["ab"]}',
}
RUN_SAMPLE_FAULTS = {
    **{name: case.members for name, case in CASES.items()},  # every sample fault the loader handles
    **{f"metadata_{n}": [("jpg", good_jpeg(90)), ("txt", b"alt"), ("json", raw)] for n, raw in METADATA_FAULTS.items()},
    "metadata_json_caption_not_text": [("jpg", good_jpeg(91)), ("json", b'{"caption": {"text": "x"}}')],  # no txt
}


def _run_job(recaption, monkeypatch, tmp_path: Path, shards: str, **kw) -> tuple[Path, dict, list[dict]]:
    """``recaption.run`` over ``shards`` with the fake backend: the output folder, the totals and the manifest."""
    monkeypatch.setitem(recaption.BACKENDS, "hf", FakeBackend)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    kw = {"batch_size": 2, "rank": 0, "world_size": 1, "progress": False, **kw}
    totals = recaption.run(str(model), shards, out, **kw)
    return out, totals, [json.loads(line) for line in (out / recaption.MANIFEST).read_text().splitlines()]


def _check_units_logged(recaption, out: Path, totals: dict, records: list[dict]) -> dict[str, dict]:
    """Every unit output has exactly one manifest line that agrees with it, and the totals are their sums; returns
    the rows of all units by key."""
    outputs = sorted(p.stem for p in out.glob("*.parquet"))
    assert sorted(r["unit"] for r in records) == outputs  # no output without its line (the crash lost it)
    rows = {}
    for r in records:
        table = pq.read_table(out / f"{r['unit']}.parquet")
        statuses = table.column("status").to_pylist()
        assert r["rows"] == table.num_rows
        assert r["errors"] == sum(s != "ok" for s in statuses)
        assert r["tokens"] == sum(table.column("n_generated_tokens").to_pylist())
        rows.update(_rows(table))
    assert totals["units"] == len(records)
    assert (totals["rows"], totals["errors"]) == (sum(r["rows"] for r in records), sum(r["errors"] for r in records))
    return rows


@pytest.mark.parametrize("name", list(RUN_SAMPLE_FAULTS))
def test_recaption_run_takes_every_sample_fault_without_losing_work(name, recaption, tmp_path, monkeypatch):
    """Each fault class through `recaption run` (not only `recaption_unit`): no crash, the bad sample one complete
    row (error rows name the member), its neighbours and the next shard captioned, every unit logged once."""
    members = RUN_SAMPLE_FAULTS[name]
    (tmp_path / "web").mkdir()
    write_shard(tmp_path / "web/00000.tar", members)
    _clean_shard(tmp_path / "web/00001.tar", SECOND, seed=50)
    out, totals, records = _run_job(recaption, monkeypatch, tmp_path, str(tmp_path / "web/*.tar"))
    rows = _check_units_logged(recaption, out, totals, records)
    has_bad = any(not suffix.startswith("/") for suffix, _ in members)  # else the members belong to GOOD[0]
    assert sorted(rows) == sorted([*GOOD, *SECOND, *([BAD] if has_bad else [])])
    assert all(rows[k]["status"] == "ok" and rows[k]["re_caption"].startswith("mean") for k in [*GOOD, *SECOND])
    if name.startswith("metadata_"):
        bad = rows[BAD]
        assert bad["status"] == "error"
        assert bad["error"].startswith(f"metadata: {BAD}.json ")  # names the member
        assert (bad["re_caption"], bad["n_generated_tokens"], bad["hit_token_limit"], bad["retried"]) == (
            None,
            0,
            False,
            False,
        )
        assert bad["org_caption"] == ("alt" if name != "metadata_json_caption_not_text" else None)
        assert (bad["url"], bad["sha256"]) == (None, None)
    if name == "duplicate_key":
        assert any("duplicate key" in e for e in records[0]["input_errors"])
    merged = pq.read_table(recaption.merge(out, shards=str(tmp_path / "web/*.tar")))
    assert sorted(merged.column("key").to_pylist()) == sorted(rows)


@pytest.mark.parametrize("slice_size", [None, 2])
@pytest.mark.parametrize("name", [*SHARD_FAULTS, "stats_successes_null", "stats_not_json"])
def test_recaption_run_takes_every_shard_fault(name, slice_size, recaption, tmp_path, monkeypatch):
    """Damaged shards and malformed img2dataset stats files (read for the progress total and for slicing): the
    samples before the damage are captioned, the damage is in the manifest, the next shard is done."""
    (tmp_path / "web").mkdir()
    first, second = tmp_path / "web/00000.tar", tmp_path / "web/00001.tar"
    _clean_shard(first, [GOOD[0], GOOD[1], BAD, GOOD[2], GOOD[3]])
    _clean_shard(second, SECOND, seed=50)
    if name in SHARD_FAULTS:
        damage = SHARD_FAULTS[name][0]
        kept = damage(first) + ([BAD] if damage is _truncate_in_second_member else [])  # its image was read
    else:
        stats = '{"successes": null}' if name == "stats_successes_null" else "{truncated"
        (tmp_path / "web/00000_stats.json").write_text(stats)
        kept = [GOOD[0], GOOD[1], BAD, GOOD[2], GOOD[3]]
    out, totals, records = _run_job(
        recaption, monkeypatch, tmp_path, str(tmp_path / "web/*.tar"), slice_size=slice_size, progress=True
    )
    rows = _check_units_logged(recaption, out, totals, records)
    assert sorted(rows) == sorted([*kept, *SECOND])
    assert all(r["status"] == "ok" for r in rows.values())
    if name in SHARD_FAULTS:
        damaged = [e for r in records if r["url"].endswith("00000.tar") for e in r.get("input_errors", [])]
        assert damaged, records
    merged = pq.read_table(recaption.merge(out, shards=str(tmp_path / "web/*.tar")))
    assert sorted(merged.column("key").to_pylist()) == sorted(rows)


# -------------------------------------------------------------------------------------------------- evaluation readers
def _identity(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy())


def test_eval_images_in_odd_modes_read_as_the_loader_reads_them(tmp_path):
    from lightning_modules.evaluation.tasks import LongRetrieval

    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    images = {"0": cmyk_jpeg(), "1": grey16_png(), "2": rgba_png(), "3": palette_png()}
    for stem, data in images.items():
        (tmp_path / "image" / f"{stem}.{'jpg' if stem == '0' else 'png'}").write_bytes(data)
        (tmp_path / "caption" / f"{stem}.txt").write_text(f"caption {stem}")
    ds = LongRetrieval(tmp_path).image_dataset(_identity)
    got = [ds[i][0] for i in range(4)]
    assert got[0][..., 0].float().mean() > 200
    assert got[0][..., 1].float().mean() < 60
    assert int(got[1].float().mean().round()) == 128  # 16-bit grey scaled, not clipped
    assert got[2][0].tolist() == [[255, 255, 255]] * SIDE
    assert got[2][-1, 0].tolist() == [200, 100, 50]
    assert got[3][0, 0].tolist() == [255, 255, 255]
    assert got[3][-1, 0].tolist() == [0, 200, 0]


@pytest.mark.parametrize("data", [truncated_jpeg(), b"", b"not an image"], ids=["truncated", "empty", "garbage"])
def test_unreadable_eval_image_is_refused_naming_the_file(data, tmp_path):
    from lightning_modules.evaluation.generation import load_reference_images
    from lightning_modules.evaluation.tasks import LongRetrieval

    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    for stem in ("0", "1"):
        (tmp_path / "image" / f"{stem}.jpg").write_bytes(good_jpeg(80) if stem == "0" else data)
        (tmp_path / "caption" / f"{stem}.txt").write_text("a caption")
    ds = LongRetrieval(tmp_path).image_dataset(_identity)
    assert ds[0][0].shape == (SIDE, SIDE, 3)
    with pytest.raises(ValueError, match=r"cannot read evaluation image .*1\.jpg"):
        ds[1]
    with pytest.raises(ValueError, match=r"cannot read reference image .*1\.jpg"):
        load_reference_images([tmp_path / "image" / "0.jpg", tmp_path / "image" / "1.jpg"], (8, 8))


def test_eval_text_faults_are_refused_naming_file_and_field(tmp_path):
    from lightning_modules.evaluation.tasks import LongRetrieval, Retrieval

    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    (tmp_path / "image" / "0.jpg").write_bytes(good_jpeg(81))
    (tmp_path / "caption" / "0.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption .*0\.txt is not UTF-8"):
        LongRetrieval(tmp_path)

    karpathy = tmp_path / "karpathy.json"
    karpathy.write_bytes(b'{"images": [{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(ValueError, match=r"karpathy\.json: malformed JSON"):
        Retrieval(karpathy, tmp_path)
    entry = {"filename": "0.jpg", "split": "test", "sentences": [{"raw": "fine"}, {"raw": None}]}
    karpathy.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(ValueError, match=r"images\[0\] \(0\.jpg\) sentences\[1\]\.raw is empty or not a string"):
        Retrieval(karpathy, tmp_path)
    entry["sentences"][1] = {}
    karpathy.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks field 'raw'"):
        Retrieval(karpathy, tmp_path)


def test_prompt_set_with_extra_columns_and_a_corrupt_file(tmp_path):
    from datamodules.prompts import read_prompt_set

    path = tmp_path / "recap_coco.parquet"
    pq.write_table(
        pa.table(
            {
                "image_id": [1, 2],
                "caption": ["a", "b"],
                "recaption": ["ra", "rb"],
                "re_condition_length": [3, 4],
                "image": [b"\xff\xd8", b"\xff\xd8"],
            }
        ),
        path,
    )
    prompts = read_prompt_set(path, column="recaption")
    assert [r.prompt for r in prompts] == ["ra", "rb"]
    assert prompts[0].row["re_condition_length"] == 3
    assert "image" not in prompts[0].row
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"recap_coco\.parquet: not a readable parquet file"):
        read_prompt_set(path)


@pytest.mark.parametrize("stats", ['{"successes": null}', "[1, 2]", "not json", '{"failed": 3}'])
def test_counting_samples_falls_back_to_the_parquet_when_the_stats_file_is_malformed(tmp_path, stats):
    """A malformed img2dataset ``_stats.json`` never stops the count: the shard's parquet (status column) is used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.caption_mix import count_samples

    (tmp_path / "00000_stats.json").write_text(stats)
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "status": ["success", "failed_to_download", "success"]}),
        tmp_path / "00000.parquet",
    )
    assert count_samples([str(tmp_path / "00000.tar")]) == 2
    (tmp_path / "00000.parquet").unlink()
    with pytest.raises(ValueError, match=r"00000\.tar.*_stats\.json.*parquet"):
        count_samples([str(tmp_path / "00000.tar")])
