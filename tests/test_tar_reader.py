"""The loader's streaming tar reader agrees with tarfile on every tar flavour and refuses damaged streams."""

from __future__ import annotations

import io
import tarfile

import pytest

from datamodules.wds_stages import TarFormatError, iter_tar_members

NAMES = [
    "000000001.jpg",
    "000000001.txt",
    "a/b/000000002.json",
    "d" * 120 + "/000000003.jpg",  # needs a long-name record (GNU/pax) or the ustar prefix
    "x" * 150 + ".txt",  # a basename too long for any prefix split
]


def make_tar(fmt: int, names=NAMES, with_dir=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if with_dir:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_agrees_with_tarfile(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else NAMES[:4]  # ustar cannot store the last name
    raw = make_tar(fmt, names)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    got = list(iter_tar_members(io.BytesIO(raw), "t.tar"))
    assert got == want
    assert [n for n, _ in got] == names


def test_truncated_and_corrupt_streams_raise_after_the_good_members():
    raw = make_tar(tarfile.GNU_FORMAT, NAMES[:3], with_dir=False)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        third = tar.getmembers()[2]
    truncated = raw[: third.offset_data + 10]
    members = iter_tar_members(io.BytesIO(truncated), "t.tar")
    assert [next(members)[0], next(members)[0]] == NAMES[:2]
    with pytest.raises(TarFormatError, match="truncated tar member in t.tar"):
        next(members)
    corrupt = bytearray(raw)
    corrupt[third.offset + 10] ^= 0xFF  # flip a byte of the third header's name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(corrupt)), "t.tar"))
    with pytest.raises(TarFormatError, match="truncated tar header"):
        list(iter_tar_members(io.BytesIO(raw[: third.offset + 100]), "t.tar"))
