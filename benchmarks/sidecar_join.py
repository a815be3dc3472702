"""The sidecar join on DuckDB against the hand-written one it replaced (commit 5a28597's, read from git history).

    nice python -m benchmarks.sidecar_join --record    # 20 M recap rows onto 2,000 shards x 10,000 samples

A synthetic Recap table (url, key, sha256, re_caption of 60-200 characters) in files of 350 k rows: 97 % of the shard
samples have a row, 1 % a later duplicate that must lose, 2 % of the rows match no sample. Both joins run on sha256,
each in its own process: rows/s, CPU seconds and peak RSS of both, and whether their sidecars are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "5a28597"  # the last commit with the hand-written join in datamodules/sidecar.py
HISTORY = ROOT / "benchmarks" / "history" / "sidecar_join.jsonl"
_WORDS = "a photo of the red brown small wooden old dog cat car house tree of fruit on table woman man at night"


def _mix(x: np.ndarray) -> np.ndarray:
    """A stable pseudo-random 64-bit value per id (splitmix64's finaliser)."""
    z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    return (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)


def _sha256(ids: np.ndarray) -> pa.Array:
    """A 64-hex-digit string per id (a stand-in for the image's sha256)."""
    hexed = np.stack([_mix(ids * 4 + i) for i in range(4)], axis=1).tobytes().hex().encode()
    offsets = np.arange(0, 64 * len(ids) + 1, 64, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(ids), [None, pa.py_buffer(offsets), pa.py_buffer(hexed)])


def _columns(ids: np.ndarray) -> dict[str, pa.Array]:
    key = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 9, "0")
    url = pc.binary_join_element_wise("https://img.example.com/", key, ".jpg", "")
    return {"url": url, "key": key, "sha256": _sha256(ids)}


def make_world(root: Path, rows: int, per_shard: int, seed: int = 0) -> str:
    """Write ``root/recap/*.parquet`` (``rows`` rows) and ``root/shards/NNNNN.parquet``; return the shard spec."""
    rng = np.random.default_rng(seed)
    n_shards = max(1, -(-rows // per_shard))
    n = n_shards * per_shard  # shard samples
    (root / "shards").mkdir(parents=True)
    for s in range(n_shards):
        table = pa.table(_columns(np.arange(s * per_shard, (s + 1) * per_shard)) | {"status": ["success"] * per_shard})
        pq.write_table(table, root / f"shards/{s:05d}.parquet")
    have, dups, unknown = round(0.97 * n), round(0.01 * n), max(0, rows - round(0.98 * n))
    ids = np.concatenate([rng.permutation(n)[:have], np.arange(n, n + unknown)])
    ids = np.concatenate([ids, ids[:dups]])  # later duplicates of the first 1 %
    is_dup = np.arange(len(ids)) >= have + unknown
    order = rng.permutation(len(ids))
    ids, is_dup = ids[order], is_dup[order]
    pool = pa.array([" ".join(rng.choice(_WORDS.split(), rng.integers(9, 33))) for _ in range(4096)])
    (root / "recap").mkdir()
    for f, lo in enumerate(range(0, len(ids), 350_000)):
        part, dup = ids[lo : lo + 350_000], is_dup[lo : lo + 350_000]
        cols = _columns(part)
        first = pool.take(pa.array(_mix(part) % np.uint64(len(pool))))
        text = pc.if_else(pa.array(dup), pc.binary_join_element_wise("duplicate", first, " "), first)
        cols["re_caption"] = pc.binary_join_element_wise(text, cols["key"], " #")
        pq.write_table(pa.table(cols), root / f"recap/train-{f:05d}.parquet", row_group_size=50_000)
    return f"{root}/shards/{{00000..{n_shards - 1:05d}}}.tar"


def run_join(path: Path, recap: Path, shards: str, out: Path, join_on: str) -> dict:
    """One join (the module at ``path``) in a fresh process: its seconds, rows/s, CPU seconds and peak RSS."""
    code = "import sys; from benchmarks.sidecar_join import _child; _child(*sys.argv[1:])"
    argv = [sys.executable, "-c", code, *map(str, (path, recap, shards, out, join_on))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(path: str, recap: str, shards: str, out: str, join_on: str) -> None:
    spec = importlib.util.spec_from_file_location("sidecar_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    t0 = time.perf_counter()
    s = job.build_sidecars(recap, shards, out, join_on=join_on, progress=False)
    dt, use = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = int(next(ln for ln in status if ln.startswith("VmHWM")).split()[1])
    figures = {"seconds": round(dt, 2), "rows_per_s": round(s["recap_rows"] / dt), "peak_mib": peak_kib // 1024}
    keys = ("recap_rows", "rows_matched", "recap_duplicates", "recap_rows_unmatched", "shard_samples")
    print(json.dumps(figures | {"cpu_s": round(use.ru_utime + use.ru_stime, 1)} | {k: s[k] for k in keys}))


def digest(out: Path) -> dict:
    """Rows and a sha256 over every sidecar (by name), each sorted by key, so identical outputs hash the same."""
    h, paths, rows = hashlib.sha256(), sorted(out.glob("[!_]*.parquet")), 0
    for path in paths:  # one at a time: the parent's RSS when it starts the next join is not that join's
        table = pq.read_table(path).sort_by("key")
        rows += table.num_rows
        h.update(f"{path.name}{table.to_pydict()}".encode())
    return {"sidecars": len(paths), "rows": rows, "sha256": h.hexdigest()[:16]}


def compare(rows: int, per_shard: int, workdir: Path, join_on: str = "sha256") -> dict:
    """Build the world, run both joins, return the figures (``match``: identical sidecars)."""
    shards = make_world(workdir, rows, per_shard)
    old = workdir / "old_sidecar.py"
    git = ["git", "show", f"{OLD_COMMIT}:datamodules/sidecar.py"]
    old.write_text(subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    result = {"rows": rows, "shards": len(list((workdir / "shards").glob("*.parquet"))), "join_on": join_on}
    for name, module in (("old", old), ("new", ROOT / "experiments" / "jobs" / "sidecars.py")):
        result[name] = run_join(module, workdir / "recap", shards, workdir / f"out_{name}", join_on)
        result[name]["output"] = digest(workdir / f"out_{name}")
    result["match"] = result["old"]["output"] == result["new"]["output"]
    result["speedup"] = round(result["new"]["rows_per_s"] / result["old"]["rows_per_s"], 2)
    result["memory_ratio"] = round(result["new"]["peak_mib"] / result["old"]["peak_mib"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--rows", type=int, default=20_000_000, help="recap rows (default 20 M)")
    add("--per-shard", type=int, default=10_000, help="samples per shard")
    add("--join-on", default="sha256", choices=("key", "sha256", "url"))
    add("--workdir", type=Path, default=None, help="where the temporary data goes (default: the system's temp dir)")
    add("--record", action="store_true", help=f"append the result to {HISTORY.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidecar_join_", dir=args.workdir) as tmp:
        result = compare(args.rows, args.per_shard, Path(tmp), args.join_on)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    machine = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
    line = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit.stdout.strip(), **result, "machine": machine}
    print(json.dumps(line))
    if args.record:
        with HISTORY.open("a") as f:
            f.write(json.dumps(line) + "\n")
    return 0 if result["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
