"""One atomic file writer for every output a later step trusts (metrics, exports, tiny-world tables, judges).

``atomic_write`` writes to a temporary file in the target's own folder (so the final ``os.replace`` is a rename on
one file system, atomic on POSIX), flushes it to disk, renames it over the target and syncs the folder: a reader sees
the old file or the complete new one, never a torn one, also after a crash. Hand-written because neither Lightning's
``_atomic_save`` (``torch.save`` only) nor fsspec's transactions (no fsync, no same-folder guarantee) cover arbitrary
writers such as ``safetensors.save_file`` or ``pyarrow.parquet.write_table``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

TMP_MARK = ".tmp-"  # in every temporary name (``.<name>.tmp-<node>-<pid>-<start>-<hex>``), so leftovers can be found
# The writer of a temporary file is in its name: the node (host + kernel boot + pid namespace, see ``node_id``), the
# pid and the process start time (clock ticks since boot, 0 where unknown), so a cleaner can tell a temporary whose
# writer is gone (same node, pid dead or reused) from one still being written. Names of the older form
# ``.<name>.tmp-<pid>-<hex>`` parse with an unknown node.
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<node>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_OLD_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


class TempOwner(NamedTuple):
    """Who wrote a temporary file: ``target`` (the name it becomes), ``node`` (None: an old-style name), ``pid``,
    ``start`` (the writer's start time in clock ticks since boot; 0 = unknown)."""

    target: str
    node: str | None
    pid: int
    start: int


@functools.cache
def node_id() -> str:
    """This machine and pid namespace, as one token: the host name (up to 24 characters of ``[A-Za-z0-9.]``) and 6 hex
    of a hash over the host name, the kernel's boot id and the pid namespace. Two processes with the same node id see
    each other's pids (same kernel boot, same pid namespace); a node id of another container, machine or boot is
    another node, whose pids mean nothing here."""
    host = socket.gethostname() or "localhost"
    parts = [host]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("-")
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9.]', '_', host)[:24]}.{digest}"


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), None when there is no
    such live process (none, or a zombie that has exited) or no ``/proc``. With the pid it names one process: a
    reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it writes nothing any more
        return None
    return int(fields[19])  # field 22 of the line; fields[0] is field 3 (state)


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path`` that names this process as its writer (``parse_temp_name``)."""
    path = Path(path)
    start = process_start(os.getpid()) or 0
    return path.with_name(f".{path.name}{TMP_MARK}{node_id()}-{os.getpid()}-{start}-{uuid.uuid4().hex[:8]}")


def parse_temp_name(name: str) -> TempOwner | None:
    """The writer of a temporary file named by ``temp_path`` (or by the older ``.<name>.tmp-<pid>-<hex>`` form, with
    ``node`` None), or None when ``name`` is not such a name."""
    m = _TMP_NAME.match(name)
    if m:
        return TempOwner(m["target"], m["node"], int(m["pid"]), int(m["start"]))
    m = _OLD_TMP_NAME.match(name)
    return TempOwner(m["target"], None, int(m["pid"]), 0) if m else None


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems (and Windows) cannot open or sync a folder; the rename is still atomic
        if not directory:
            raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return ``path``.

    ``data`` is bytes, text (UTF-8) or a callable that writes the file at the temporary path it is given (e.g.
    ``lambda p: save_file(tensors, str(p))``). The folder must exist. On any error the temporary file is removed and
    an existing ``path`` is left untouched. The new file gets the usual permissions (``0o666`` minus the umask).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
            if not tmp.is_file():
                raise FileNotFoundError(f"the writer for {path} did not create {tmp}")
        else:
            with open(tmp, "xb") as f:  # exclusive create, 0o666 minus the umask
                f.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def latest_metrics_file(folder: str | os.PathLike) -> Path | None:
    """The newest in-loop metrics file in a run's ``metrics`` folder: the ``step<N>.json`` with the largest N (CLIP
    pads N, the captioner does not, so the order is numeric), or None when there is none."""
    ranked = [(int(m.group()), f.name, f) for f in Path(folder).glob("step*.json") if (m := re.search(r"\d+", f.stem))]
    return max(ranked)[2] if ranked else None
