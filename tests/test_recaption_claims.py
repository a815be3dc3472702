"""``recaption run`` claims units on the output folder: any number of processes, started and killed in any way (two
of them given the same rank), finish every unit exactly once; a restart removes the temporary outputs of writers that
are gone and never one that is still being written.

The processes here run this file as a script (``python tests/test_recaption_claims.py run ...``): the job's own
command line with a stand-in captioner that takes ``DELAY`` seconds per image, so the test costs seconds, not a
model's compute. ``RECAP_TEST_SLOW_WRITE`` makes each output write linger, so that a SIGKILL can land mid-write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
DELAY = float(os.environ.get("RECAP_TEST_DELAY", "0.05"))  # seconds per image in the stand-in captioner


class _SlowBackend:
    """HFBackend's interface without a model: ``DELAY`` s per image, a caption made from the image."""

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, images, repetition_penalty=None):
        from experiments.jobs.recaption import Generated

        time.sleep(DELAY * len(images))
        return [Generated(f"an image of {im.size[0]} by {im.size[1]}", 5, False) for im in images]


def _worker_main(argv: list[str]) -> int:
    import pyarrow.parquet as pq_

    import experiments.jobs.recaption as recaption

    recaption.BACKENDS["hf"] = _SlowBackend
    linger = float(os.environ.get("RECAP_TEST_SLOW_WRITE", "0"))
    if linger:
        write = pq_.write_table

        def slow_write(*args, **kwargs):
            write(*args, **kwargs)
            time.sleep(linger)  # the temporary exists, complete, not yet published

        pq_.write_table = slow_write
    recaption.main(argv)
    return 0


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def job(request, tmp_path, monkeypatch) -> dict:
    """Shards (img2dataset layout; 6 of 8 samples, or ``(n, size)`` by indirect parametrization), a llava-hf-looking
    folder, no rank variables. Whole shards, not slices: counting a shard for slicing imports the DataModule
    (lightning), seconds per process on a busy 2-core machine."""
    from conftest import write_shards

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    n, size = getattr(request, "param", (6, 8))
    truth = write_shards(tmp_path / "web", [size] * n)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {
        "tmp": tmp_path,
        "model": str(model),
        "shards": str(tmp_path / "web/*.tar"),
        "out": tmp_path / "out",
        "keys": sorted(truth),
    }


def _spawn(
    job: dict, rank: int, world: int, *extra: str, slow_write: float = 0.0, delay: float = DELAY
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "run",
        "--model",
        job["model"],
        "--shards",
        job["shards"],
        "--out",
        str(job["out"]),
        "--batch-size",
        "2",
        "--rank",
        str(rank),
        "--world-size",
        str(world),
        "--no-progress",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RECAP_TEST_SLOW_WRITE=str(slow_write), RECAP_TEST_DELAY=str(delay)
    )
    log = open(job["tmp"] / f"worker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    log.close()
    return proc


def _outputs(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.parquet")) if out.exists() else []


def _manifest_units(out: Path) -> list[str]:
    path = out / "_manifest.jsonl"
    return [json.loads(line)["unit"] for line in path.read_text().splitlines()] if path.exists() else []


def _tail(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-3000:]


def _check_exactly_once(job: dict, n_units: int) -> None:
    """Every unit output once and logged at most once, no leftovers, every input key exactly once in the merge."""
    out = job["out"]
    assert len(_outputs(out)) == n_units

    from experiments.jobs.recaption import CLAIMS, merge

    logged = _manifest_units(out)
    assert len(logged) == len(set(logged)), f"a unit logged twice: {sorted(logged)}"
    assert set(logged) <= set(_outputs(out))
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left"
    assert not list((out / CLAIMS).glob("*.claim")), "claims left"
    merged = pq.read_table(merge(out, shards=job["shards"], log=None))
    assert sorted(merged.column("key").to_pylist()) == job["keys"]  # every input key exactly once


# -------------------------------------------------------------------------------------------- temp-file naming
def test_temporary_names_record_their_writer(tmp_path):
    from datamodules.io import TMP_MARK, atomic_write, node_id, parse_temp_name, process_start, temp_path

    tmp = temp_path(tmp_path / "00001.part00000-of-00002.parquet")
    owner = parse_temp_name(tmp.name)
    assert TMP_MARK in tmp.name
    assert owner == ("00001.part00000-of-00002.parquet", node_id(), os.getpid(), process_start(os.getpid()) or 0)
    assert parse_temp_name(".a.parquet.tmp-123-0badcafe") == ("a.parquet", None, 123, 0)  # the older form
    assert parse_temp_name("00001.parquet") is None
    seen = []
    atomic_write(tmp_path / "x.txt", lambda p: (seen.append(parse_temp_name(p.name)), p.write_text("x")))
    assert seen[0].pid == os.getpid()  # every atomic_write caller gets the same names


# --------------------------------------------------------------------------------- item 5: stale temporaries
def _child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_restart_removes_temporaries_whose_writer_is_gone_and_keeps_live_ones(job, monkeypatch):
    from datamodules.io import node_id, process_start
    from experiments.jobs import recaption

    monkeypatch.setitem(recaption.BACKENDS, "hf", _SlowBackend)
    out, ttl = job["out"], 600.0
    (out / recaption.CLAIMS).mkdir(parents=True)
    dead, live = _child(), _child()
    try:
        time.sleep(0.2)
        dead_start, live_start = process_start(dead.pid), process_start(live.pid)
        assert dead_start
        assert live_start
        dead.kill()
        dead.wait()
        me, here = os.getpid(), node_id()
        old = time.time() - 2 * ttl

        def temp(name: str, mtime: float | None = None) -> Path:
            p = out / name
            p.write_bytes(b"PAR1 half written")
            if mtime is not None:
                os.utime(p, (mtime, mtime))
            return p

        gone = [
            temp(f".00000.parquet.tmp-{here}-{dead.pid}-{dead_start}-0000000a"),  # killed writer on this node
            temp(f".00001.parquet.tmp-{here}-{live.pid}-{live_start + 1}-0000000b"),  # its pid now names another
            temp(".00002.parquet.tmp-elsewhere.abcdef-4242-77-0000000c", old),  # other node, no claim, old
            temp(".00003.parquet.tmp-4242-0000000d", old),  # the older name form (no node), old
        ]
        kept = [
            temp(f".00004.parquet.tmp-{here}-{live.pid}-{live_start}-0000000e", old),  # live writer on this node
            temp(f".00005.parquet.tmp-{here}-{me}-{process_start(me) or 0}-0000000f", old),  # this very process
            temp(".00002.parquet.tmp-elsewhere.abcdef-4243-77-00000010"),  # other node, written just now
            temp(".99999.parquet.tmp-elsewhere.abcdef-4244-77-00000011", old),  # other node, holds a live claim
            temp(".00003.parquet.tmp-4245-00000012"),  # older form, just now
        ]
        claim = out / recaption.CLAIMS / "99999.claim"
        claim.write_text(json.dumps({"node": "elsewhere.abcdef", "pid": 4244, "start": 77, "token": "t"}))
        (out / ".not-a-temporary").write_text("x")
        totals = recaption.run(job["model"], job["shards"], out, batch_size=4, progress=False, claim_ttl=ttl)
        assert totals["units"] == 6  # the job itself went on
        assert [p.name for p in gone if p.exists()] == []
        assert [p.name for p in kept if not p.exists()] == []
        assert (out / ".not-a-temporary").exists()
        assert claim.exists()  # another node's live claim (on a unit not in this job) is left alone
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------- item 6: claims
@pytest.mark.parametrize("job", [(12, 4)], indirect=True, ids=["12x4"])
def test_two_processes_given_the_same_rank_finish_every_unit_once(job):
    """Both processes say rank 0 of 2 (an operator error): before claims, both did rank 0's share and rank 1's
    stayed undone."""
    procs = [_spawn(job, 0, 2) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, _tail(p)
    _check_exactly_once(job, 12)
    assert sorted(_manifest_units(job["out"])) == _outputs(job["out"])  # nobody was killed: every unit logged


def test_a_live_claim_is_waited_for_and_an_expired_or_dead_one_taken_over(job, monkeypatch):
    from datamodules.io import node_id
    from experiments.jobs import recaption

    monkeypatch.setitem(recaption.BACKENDS, "hf", _SlowBackend)
    out, ttl = job["out"], 1.0
    claims = out / recaption.CLAIMS
    claims.mkdir(parents=True)
    dead = _child()
    dead.kill()
    dead.wait()
    owner = {"host": "elsewhere", "node": "elsewhere.abcdef", "pid": 4242, "start": 77, "token": "theirs"}
    (claims / "00000.claim").write_text(json.dumps(owner))  # another node's, kept alive by the thread below
    (claims / "00001.claim").write_text(json.dumps(owner | {"token": "old"}))  # another node's, heartbeat long ago
    stale = time.time() - 100
    os.utime(claims / "00001.claim", (stale, stale))
    (claims / "00002.claim").write_text(json.dumps(owner | {"node": node_id(), "pid": dead.pid, "token": "dead"}))
    stop = threading.Event()
    stopped = []

    def heartbeat():
        t_end = time.time() + 2.5
        while time.time() < t_end:
            os.utime(claims / "00000.claim")
            time.sleep(0.1)
        stopped.append(time.time())
        stop.set()

    beat = threading.Thread(target=heartbeat)
    beat.start()
    t0 = time.time()
    try:
        totals = recaption.run(job["model"], job["shards"], out, batch_size=4, progress=False, claim_ttl=ttl)
    finally:
        beat.join()
    assert totals["units"] == 6
    logged = _manifest_units(out)
    assert logged[-1] == "00000"  # waited for while its owner's heartbeat went on
    assert os.stat(out / "00000.parquet").st_mtime >= stopped[0] + ttl - 0.05  # taken only once expired
    assert os.stat(out / "00001.parquet").st_mtime < stopped[0]  # expired: taken over at once
    assert os.stat(out / "00002.parquet").st_mtime < t0 + 2.0  # owner on this node is dead: at once, not after ttl
    _check_exactly_once(job, 6)


@pytest.mark.parametrize("job", [(24, 2)], indirect=True, ids=["24x2"])
def test_random_sigkills_with_two_processes_sharing_a_rank_then_restarts_finish_every_unit_exactly_once(job):
    """Three processes (two given the same rank) are all SIGKILLed at random moments once work is under way, some
    while an output is being written; a restart with three others (world size 3, two sharing a rank) loses two of them
    to SIGKILL at random and the third runs to the end; a last restart of two processes with the same rank finds
    nothing left and cleans up. Every key is then in the merge exactly once, no unit is logged twice, and no
    temporary file or claim is left. The seed is printed on failure (``RECAP_TEST_SEED`` replays its choices)."""
    seed = int(os.environ.get("RECAP_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    out, n_units = job["out"], 24  # 24 shards of 2 samples
    args = ()  # the default claim ttl (300 s): every takeover here is of a dead pid's claim, at once
    rounds = [([0, 0, 1], 2, 3), ([1, 1, 0], 3, 2)]  # (ranks, world size, how many are killed); the rest run on
    for n, (ranks, world, n_kill) in enumerate(rounds):
        before = len(_outputs(out))
        procs = [_spawn(job, r, world, *args, slow_write=0.15, delay=0.15) for r in ranks]
        t_end = time.time() + 60
        while len(_outputs(out)) == before and time.time() < t_end and any(p.poll() is None for p in procs):
            time.sleep(0.02)  # until this round has published something
        for p in rng.sample(procs, n_kill):
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                pytest.fail(f"seed {seed}: a worker hung:\n{_tail(p)}")
            assert p.returncode in (0, -signal.SIGKILL), f"seed {seed}:\n{_tail(p)}"
        if n == 0:
            assert len(_outputs(out)) < n_units, f"seed {seed}: the kills came too late to test anything"
    last = [_spawn(job, 1, 2, *args) for _ in range(2)]  # a restart after the last kill: nothing left, clean up
    for p in last:
        assert p.wait(timeout=120) == 0, f"seed {seed}:\n{_tail(p)}"
    _check_exactly_once(job, n_units)
    logs = "".join(p.read_text(errors="replace") for p in job["tmp"].glob("worker-*.log"))
    assert "took over the expired claim" in logs, f"seed {seed}: no kill left a claim behind"  # the kills mattered


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
