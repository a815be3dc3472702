"""The suite's one step runner: ``reproduce``, ``clip-table``, sweeps and the Makefile's chains all run through it.

A ``Step`` is one ``python -m experiments <argv>`` subprocess, done when its ``outputs`` exist and
``OUT/logs/<step>.done`` records the same argv: a rerun skips finished steps, and a changed command reruns that step and
every step that reads its outputs (its argv names their folder or outputs). Up to ``jobs`` independent steps run at
once, the head of the longest chain first; logs go to ``OUT/logs/<step>.log``, wall and CPU times to
``OUT/timings.json``. On Linux the steps are forked from a parent that imported the heavy libraries once.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from datamodules.io import atomic_write

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """One subprocess of a chain: ``python -m experiments <argv>``; done when ``outputs`` exist."""

    name: str
    title: str
    argv: list[str]
    outputs: list[str]
    clean: list[str] = field(default_factory=list)  # removed before the step (re)runs: no stale partial output
    always: bool = False  # rerun on every invocation (cheap summaries of everything before: the reports)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "experiments", *self.argv]

    def shown(self) -> str:
        return "python -m experiments " + shlex.join(self.argv)


def _abs(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def _stamp(out: Path, step: Step) -> Path:
    return out / "logs" / f"{step.name}.done"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(out: Path, step: Step, deps: Sequence[Step] = ()) -> bool:
    """Outputs exist, the step's stamp records this exact argv, and no step it reads from finished after it."""
    stamp = _read_json(_stamp(out, step))
    if step.always or not stamp or stamp.get("argv") != step.argv or not all(_abs(p).exists() for p in step.outputs):
        return False
    return all((_read_json(_stamp(out, d)) or {}).get("finished", 0) <= stamp.get("finished", 0) for d in deps)


def dependencies(steps: Sequence[Step]) -> dict[str, list[Step]]:
    """For each step, the earlier steps whose folders or outputs its argv names (a path, or a path inside it); an
    ``always`` step (a report) reads every earlier one."""
    out: dict[str, list[Step]] = {}
    for j, step in enumerate(steps):
        text = "\n".join(step.argv)
        paths = [(s, [re.escape(p) + r"(?![\w.-])" for p in [*s.clean, *s.outputs]]) for s in steps[:j]]
        out[step.name] = [s for s, patterns in paths if step.always or any(re.search(p, text) for p in patterns)]
    return out


def chain_lengths(steps: Sequence[Step], deps: dict[str, list[Step]]) -> dict[str, int]:
    """For each step, the number of steps on the longest chain that starts at it (itself included). Replayed on the
    full profile's timings this ends the run as early as ordering by measured seconds (49.5 vs 49.6 min; 51.8 in
    order), with no cost estimates."""
    children: dict[str, list[str]] = {s.name: [] for s in steps}
    for s in steps:
        for d in deps[s.name]:
            children[d.name].append(s.name)
    length: dict[str, int] = {}
    for s in reversed(steps):  # a step's dependencies come before it, so its children are done first
        length[s.name] = 1 + max((length[c] for c in children[s.name]), default=0)
    return length


def plan(steps: Sequence[Step], out: Path, start_from: str | None = None) -> set[str]:
    """The steps that must run: not done, at or after ``start_from``, or reading from a step that runs."""
    names = [s.name for s in steps]
    force = names.index(start_from) if start_from else len(steps)
    deps, to_run = dependencies(steps), set()
    for i, s in enumerate(steps):
        if i >= force or not is_done(out, s, deps[s.name]) or any(d.name in to_run for d in deps[s.name]):
            to_run.add(s.name)
    return to_run


# ------------------------------------------------------------------------------------------------------ launching
# The modules every training/evaluation step imports: ~10-15 s of CPU per fresh interpreter on the 2-core machine,
# paid once when steps are forked from a parent that imported them, instead of once per step.
PRELOAD = ("torch", "lightning.pytorch", "transformers", "open_clip", "diffusers")
PRELOAD += ("experiments.cli", "experiments.__main__")


def preload(modules: Sequence[str] = PRELOAD) -> None:
    """Import ``modules``; none may start a thread or touch an accelerator (a fork copies only the calling thread,
    and CUDA cannot be used in a forked child)."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def fork_safe() -> str | None:
    """Why forking steps from this process would be unsafe (None when it is safe)."""
    import threading

    if sys.platform != "linux":
        return f"fork start is only used on Linux (this is {sys.platform})"
    if threading.active_count() > 1:
        return f"{threading.active_count()} threads are running in the parent"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the parent"
    return None


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that caps a step's compute threads (OpenMP / MKL / torch intra-op) at ``threads``."""
    n = str(int(threads or 0))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "RECAP_NUM_THREADS": n} if threads else {}


def subprocess_env() -> dict[str, str]:
    defaults = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return {**defaults, **os.environ}


@dataclass
class Launched:
    """A started step: its process id and the read end of its output."""

    pid: int
    fd: int
    popen: subprocess.Popen | None = None

    def close(self) -> None:
        """Close the read end (through Popen's file object when it owns it)."""
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()
        else:
            os.close(self.fd)

    def wait(self) -> tuple[int, float]:
        """(exit code, CPU seconds of the step: user + system of its process and the children it reaped)."""
        _, status, usage = os.wait4(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if self.popen is not None:
            self.popen.returncode = code  # reaped here (wait4 gives its rusage); tell Popen
        return code, usage.ru_utime + usage.ru_stime


Launcher = Callable[[Sequence[str], dict[str, str], "int | None"], Launched]


def launch_fresh(cmd: Sequence[str], env: dict[str, str], threads: int | None = None) -> Launched:
    """Start ``cmd`` in a fresh interpreter (cwd = the repository), stdout + stderr on one pipe."""
    env = {**env, **thread_env(threads)}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    return Launched(proc.pid, proc.stdout.fileno(), proc)


def launch_forked(cmd: Sequence[str], env: dict[str, str], threads: int | None = None) -> Launched:
    """Start ``python -m experiments <argv>`` in a fork of this process, with what a fresh interpreter would have:
    ``env``, the repository as cwd, ``sys.argv``, the thread cap, output on a pipe, atexit and the exit code."""
    if list(cmd[:3]) != [sys.executable, "-m", "experiments"]:
        raise ValueError(f"launch_forked runs `python -m experiments ...` commands, not {list(cmd[:3])}")
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()  # or the child inherits (and prints again) what the parent has buffered
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return Launched(pid, read_fd)
    code = 1  # the child: becomes `python -m experiments <argv>`
    try:
        os.close(read_fd)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        os.chdir(REPO)
        os.environ.clear()
        os.environ.update({**env, **thread_env(threads)})
        if threads and "torch" in sys.modules:  # the parent imported torch: its thread pool size is already set
            sys.modules["torch"].set_num_threads(int(threads))
        # fresh text streams on fds 1 and 2 (the parent's may write elsewhere, e.g. under pytest's capture)
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.argv = [str(REPO / "experiments" / "__main__.py"), *cmd[3:]]
        from experiments.__main__ import main as experiments_main

        try:
            experiments_main(None)
            code = 0
        except SystemExit as e:  # what the interpreter would turn into an exit status
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what a normal interpreter exit runs (loggers, worker pools)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _last_line(pending: bytes, chunk: bytes) -> tuple[str | None, bytes]:
    """The newest complete, non-empty line of ``pending + chunk`` (``\\r`` ends a line too, for tqdm) and the rest."""
    *lines, rest = re.split(rb"[\r\n]", pending + chunk)
    text = lines[-1].decode("utf-8", "replace").strip() if lines else ""
    return text or None, rest


# ---------------------------------------------------------------------------------------------------- the runner
def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_timings(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=1) + "\n")


@dataclass
class _Job:
    step: Step
    head: str
    launched: Launched
    log: Any
    t0: float
    load0: list[float] | None
    last_line: str = ""
    pending: bytes = b""


def run_steps(
    steps: Sequence[Step],
    out: Path,
    start_from: str | None = None,
    stream: TextIO = sys.stdout,
    jobs: int = 1,
    launcher: Launcher | None = None,
    cpus: int | None = None,
    timings: Path | None = None,
) -> dict[str, Any]:
    """Run the steps that are not done (``plan``), up to ``jobs`` at once, each when the steps it reads from have
    finished. With ``jobs`` > 1 a step gets ``cpus // jobs`` threads, all ``cpus`` when it is the only one that can
    run (on 2 cores two 1-thread steps beat one 2-thread step). After a failure no new step starts. Progress: a tqdm
    bar on a terminal, plain lines elsewhere (CI, ``| tee``)."""
    names = [s.name for s in steps]
    if start_from is not None and start_from not in names:
        raise ValueError(f"--from {start_from!r}: no such step; steps: {names}")
    launcher = launcher or launch_forked
    cpus = cpus or os.cpu_count() or 1
    deps = dependencies(steps)
    chain = chain_lengths(steps, deps)
    to_run = plan(steps, out, start_from)
    timings_path = timings or out / "timings.json"  # elsewhere when OUT holds another run's (reproduce's table8)
    try:  # earlier timings only order the steps: a file of the wrong shape is ignored, not fatal
        previous = {s["name"]: s for s in (_read_json(timings_path) or {}).get("steps", [])}
    except (KeyError, TypeError, AttributeError):
        previous = {}
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": cpus, "jobs": jobs}
    record.update(commit=git_head(), steps=[])
    heads = {s.name: f"[{i + 1}/{len(steps)}] {s.title}" for i, s in enumerate(steps)}
    entries: dict[str, dict[str, Any]] = {}
    tty = stream.isatty()
    tqdm.monitor_interval = 0  # no monitor thread: the steps are forked from this process (fork_safe)
    bar = tqdm(total=len(to_run), file=stream, disable=not tty, unit="step", leave=False, dynamic_ncols=True)

    def say(text: str) -> None:
        tqdm.write(text, file=stream)
        stream.flush()

    def entry(step: Step, **values: Any) -> dict[str, Any]:
        e = entries.setdefault(step.name, {"name": step.name, "title": step.title, "command": step.shown()})
        e.update(values)
        return e

    def save() -> None:
        record["steps"] = [entries[n] for n in ("preload", *names) if n in entries]
        write_timings(timings_path, record)

    ok: set[str] = set()
    for step in steps:
        if step.name not in to_run:
            old = previous.get(step.name, {})
            entry(step, status="skipped (done)", **{k: old.get(k) for k in ("seconds", "cpu_seconds", "load")})
            took = f" (took {fmt_seconds(old['seconds'])})" if old.get("seconds") is not None else ""
            say(f"{heads[step.name]} ... done earlier{took}")
            ok.add(step.name)
    pending = [s for s in steps if s.name in to_run]
    env = subprocess_env()
    if pending and launcher is launch_forked:
        t0, cpu0 = time.perf_counter(), time.process_time()
        os.environ.update(env)  # read at import time by some libraries (HF_HUB_OFFLINE, OMP_WAIT_POLICY)
        preload()
        why = fork_safe()
        seconds = time.perf_counter() - t0
        title, cpu = "import the libraries once (steps are forked)", round(time.process_time() - cpu0, 1)
        imports = {"name": "preload", "title": title, "command": "import " + ", ".join(PRELOAD), "status": "ran"}
        entries["preload"] = {**imports, "seconds": round(seconds, 1), "cpu_seconds": cpu}
        say(f"[0/{len(steps)}] import the libraries once ... {fmt_seconds(seconds)}")
        if why:
            say(f"    not forking steps: {why}; each step starts a fresh interpreter")
            launcher = launch_fresh

    sel = selectors.DefaultSelector()
    running: dict[str, _Job] = {}
    failed: str | None = None
    t_run = last_progress = time.perf_counter()
    try:
        while pending or running:
            while failed is None and len(running) < jobs:
                ready = [s for s in pending if all(d.name in ok for d in deps[s.name] if d.name in to_run)]
                if not ready:
                    break
                step = max(ready, key=lambda s: chain[s.name])  # the first of the longest chains
                pending.remove(step)
                threads = None if jobs == 1 else cpus if not running and len(ready) == 1 else max(1, cpus // jobs)
                for p in map(_abs, step.clean):
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
                _stamp(out, step).unlink(missing_ok=True)
                log = out / "logs" / f"{step.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                load0 = _load()
                launched = launcher(step.command(), env, threads)
                job = _Job(step, heads[step.name], launched, open(log, "wb"), time.perf_counter(), load0)  # noqa: SIM115
                running[step.name] = job
                sel.register(launched.fd, selectors.EVENT_READ, job)
                entry(step, status="running", started_at=round(job.t0 - t_run, 1), threads=threads, log=str(log))
                say(f"{job.head} ... started" + (f" ({threads} thread{'s' * (threads > 1)})" if threads else ""))
            if not running:
                break
            for key, _ in sel.select(timeout=1.0):
                job = key.data
                chunk = os.read(job.launched.fd, 65536)
                if chunk:
                    job.log.write(chunk)
                    job.log.flush()
                    line, job.pending = _last_line(job.pending, chunk)
                    job.last_line = line or job.last_line
                    continue
                sel.unregister(job.launched.fd)
                job.launched.close()
                job.log.close()
                code, cpu = job.launched.wait()
                seconds = time.perf_counter() - job.t0
                del running[job.step.name]
                load = {"start": job.load0, "end": _load()}
                e = entry(job.step, seconds=round(seconds, 1), cpu_seconds=round(cpu, 1), load=load)
                missing = [p for p in job.step.outputs if not _abs(p).exists()]
                bar.update(1)
                if code == 0 and not missing:
                    stamp = {"argv": job.step.argv, "seconds": round(seconds, 1), "finished": time.time()}
                    _stamp(out, job.step).write_text(json.dumps(stamp) + "\n")
                    e["status"] = "ran"
                    ok.add(job.step.name)
                    say(f"{job.head} ... {fmt_seconds(seconds)}")
                else:
                    why = f"exit {code}" if code else f"outputs missing: {missing}"
                    e["status"] = f"failed ({why})"
                    say(f"{job.head} ... FAILED after {fmt_seconds(seconds)} ({why}); log: {e['log']}")
                    tail = Path(e["log"]).read_text(errors="replace").splitlines()[-25:]
                    say("".join(f"    | {t}\n" for t in tail).rstrip("\n"))
                    failed = failed or job.step.name
                save()
            if running and tty:
                bar.set_postfix_str("; ".join(f"{n}: {j.last_line}" for n, j in running.items()), refresh=True)
            elif running and time.perf_counter() - last_progress >= 30:
                for n, j in running.items():
                    say(f"    {n} ({fmt_seconds(time.perf_counter() - j.t0)}): {j.last_line[:160]}")
                last_progress = time.perf_counter()
    except KeyboardInterrupt:
        for job in running.values():
            os.kill(job.launched.pid, signal.SIGTERM)
            job.launched.wait()
        raise
    finally:
        sel.close()
        bar.close()
    for step in pending:  # not started after a failure
        entry(step, status="not run (an earlier step failed)")
    record.update(failed=failed, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    save()
    if jobs > 1:
        preload_s = entries.get("preload", {}).get("seconds") or 0
        record["wall_seconds"] = round(time.perf_counter() - t_run + preload_s, 1)
    record["total_seconds"] = round(sum(s.get("seconds") or 0 for s in record["steps"]), 1)
    record["total_cpu_seconds"] = round(sum(s.get("cpu_seconds") or 0 for s in record["steps"]), 1)
    write_timings(timings_path, record)
    return record


def summary_table(record: dict) -> str:
    """The steps of a record (``run_steps``) as a Markdown table with their times and load."""
    from experiments.tables import markdown

    rows = []
    for i, s in enumerate(record["steps"], 1):
        load = s.get("load") or {}
        la = f"{(load.get('start') or ['-'])[0]} → {(load.get('end') or ['-'])[0]}" if load else "-"
        times = [fmt_seconds(s[k]) if s.get(k) is not None else "-" for k in ("seconds", "cpu_seconds")]
        rows.append([i, f"{s['title']} (`{s['name']}`)", s["status"], *times, la])
    cpu, total = record.get("total_cpu_seconds"), fmt_seconds(record.get("total_seconds") or 0)
    cpu = "-" if cpu is None else f"**{fmt_seconds(cpu)}**"
    rows.append(["", "**total** (sum of the steps)", "", f"**{total}**", cpu, ""])
    if record.get("wall_seconds") is not None:
        run = f"**run** ({record.get('jobs', 1)} steps at a time)"
        rows.append(["", run, "", f"**{fmt_seconds(record['wall_seconds'])}**", "", ""])
    return markdown(rows, ["#", "step", "status", "wall time", "CPU time", "load avg (start → end)"])
