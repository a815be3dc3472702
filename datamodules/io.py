"""One atomic file writer for every output a later step trusts (metrics, exports, tiny-world tables, judges).

``atomic_write`` writes to a temporary file in the target's own folder (so the final ``os.replace`` is a rename on
one file system, atomic on POSIX), flushes it to disk, renames it over the target and syncs the folder: a reader sees
the old file or the complete new one, never a torn one, also after a crash. Hand-written because neither Lightning's
``_atomic_save`` (``torch.save`` only) nor fsspec's transactions (no fsync, no same-folder guarantee) cover arbitrary
writers such as ``safetensors.save_file`` or ``pyarrow.parquet.write_table``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # in every temporary name (``.<name>.tmp-<pid>-<hex>``), so writers can clean leftovers up


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems (and Windows) cannot open a folder; the rename is still atomic
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return ``path``.

    ``data`` is bytes, text (UTF-8) or a callable that writes the file at the temporary path it is given (e.g.
    ``lambda p: save_file(tensors, str(p))``). The folder must exist. On any error the temporary file is removed and
    an existing ``path`` is left untouched. The new file gets the usual permissions (``0o666`` minus the umask).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if callable(data):
            data(tmp)
            if not tmp.is_file():
                raise FileNotFoundError(f"the writer for {path} did not create {tmp}")
            _fsync_path(tmp)
        else:
            payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def latest_metrics_file(folder: str | os.PathLike) -> Path | None:
    """The newest in-loop metrics file in a run's ``metrics`` folder: the ``step<N>.json`` with the largest N (CLIP
    pads N, the captioner does not, so the order is numeric), or None when there is none."""
    ranked = []
    for f in Path(folder).glob("step*.json"):
        digits = re.search(r"\d+", f.stem)
        if digits:
            ranked.append((int(digits.group()), f.name, f))
    return max(ranked)[2] if ranked else None
