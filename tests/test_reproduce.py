"""``python -m experiments reproduce``: the step list and its overrides, the resumable runner, the claims checker.

The real chain is not run here (minutes even at the quick profile's sizes); these tests use the profile files,
fake steps and synthetic results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments import claims as C
from experiments import reproduce as R
from experiments import runner as X
from experiments import tables as T


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    """The quick profile with recognisable sizes (world, DiT, tiny LLM, CLIP stage 2) and two CLIP p."""
    data = yaml.safe_load((R.PROFILES / "quick.yaml").read_text())
    data["clip"]["ps"] = [0.0, 1.0]
    data["dit"]["recap_clip_p"] = 1.0
    data["dit"]["fit"]["trainer.max_steps"] = 7
    data["tiny_llm"]["steps"] = 123
    data["clip"]["stage2"]["model.init_args.total_samples"] = 1280
    data["world"]["n_web"] = 2100
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_profiles_load_and_cover_the_chain():
    for name in ("quick", "full"):
        profile = R.load_profile(name)
        steps = R.build_steps(profile, f"runs/reproduce/{name}")
        names = [s.name for s in steps]
        for p in profile["clip"]["ps"]:
            assert f"clip_{R.row_id(p)}_stage1" in names
            assert f"clip_{R.row_id(p)}_stage2" in names
        for needed in (
            "world",
            "web_clip",
            "captioner_stage1",
            "captioner_stage2",
            "captioner_caption_tune",
            "recaption_world",
            "analyze",
            "dit_p0.0_eval",
            "dit_p1.0_eval",
            "report_table3",
        ):
            assert needed in names
        # every path the chain writes is under its out folder
        for s in steps:
            assert all(o.startswith(f"runs/reproduce/{name}/") for o in s.outputs + s.clean), s.name
    assert {"0.0", "1.0"} <= {str(float(p)) for p in R.load_profile("full")["dit"]["ps"]}


def test_p1_rows_read_alt_text_only_and_do_not_wait_for_the_captioner():
    profile = R.load_profile("full")
    steps = R.build_steps(profile, "runs/reproduce/full")
    deps = {name: {s.name for s in d} for name, d in X.dependencies(steps).items()}
    by_name = {s.name: s for s in steps}
    for seed_tag in ("", "_seed1"):
        p1 = f"clip_p1.0{seed_tag}_stage1"
        assert deps[p1] == {"world"}, deps[p1]  # starts as soon as the world exists
        assert not any("sidecar" in a and "null" not in a for a in by_name[p1].argv)
        assert '--data.init_args.sources={"original": "txt"}' in by_name[p1].argv
        assert f"clip_p1.0{seed_tag}_stage1" in deps[f"clip_p1.0{seed_tag}_stage2"]
        # every p < 1 row reads the chain's own recaptions, so it waits for them
        p0 = f"clip_p0.0{seed_tag}_stage1"
        assert "recaption_world_sidecars" in deps[p0]
        assert "--data.init_args.sidecar_dir=runs/reproduce/full/recaption/world_sidecars" in by_name[p0].argv


def test_dry_run_lists_steps_with_profile_overrides(profile_path, tmp_path, capsys):
    out = tmp_path / "out"
    R.main(["--profile", str(profile_path), "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    steps = R.build_steps(R.load_profile(str(profile_path)), str(out))
    assert f"{len(steps)} steps" in text
    for i, s in enumerate(steps, 1):
        assert f"[{i}/{len(steps)}] {s.name} (to run)" in text
    dit_line = next(line for line in text.splitlines() if "dit/cached.yaml" in line and "dit/table7/p0.0" in line)
    assert "--trainer.max_steps=7" in dit_line
    assert f"--data.init_args.cache_dir={out}/dit/cache" in dit_line
    clip_line = next(line for line in text.splitlines() if "clip/stage2.yaml" in line and "clip/table3/p1.0" in line)
    assert "--model.init_args.total_samples=1280" in clip_line
    assert f"--model.init_args.init_from={out}/clip/table3/p1.0/stage1/checkpoints/last.ckpt" in clip_line
    assert "--world.n_web=2100" in text
    assert "--steps 123" in text
    assert not out.exists()  # a dry run writes nothing


def test_seeds_flag_adds_reruns_in_seed_folders(profile_path, tmp_path):
    steps = R.build_steps(R.load_profile(str(profile_path)), "o", seeds=2)
    s2 = {s.name: s for s in steps}["clip_p0.0_seed1_stage2"]
    assert "--seed_everything=1" in s2.argv
    assert "--data.init_args.seed=1" in s2.argv
    assert "--model.init_args.init_from=o/seed1/clip/table3/p0.0/stage1/checkpoints/last.ckpt" in s2.argv
    assert s2.outputs[0] == "o/seed1/clip/table3/p0.0/stage2/checkpoints/last.ckpt"
    assert not any(a.startswith("--seed_everything") for a in {s.name: s for s in steps}["clip_p0.0_stage2"].argv)


def test_profile_errors_name_file_and_key(tmp_path):
    data = yaml.safe_load((R.PROFILES / "quick.yaml").read_text())
    bad = dict(data)
    del bad["judge"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(KeyError, match=r"a\.yaml.*judge"):
        R.load_profile(str(tmp_path / "a.yaml"))
    bad = {**data, "dit": {**data["dit"], "recap_clip_p": 0.3}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"b\.yaml: dit\.recap_clip_p"):
        R.load_profile(str(tmp_path / "b.yaml"))
    bad = {**data, "clip": {**data["clip"], "ps": [0.0, 0.25, 0.5]}}  # no Table 3 row p0.25
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"c\.yaml: clip\.ps.*p0\.25"):
        R.load_profile(str(tmp_path / "c.yaml"))
    with pytest.raises(FileNotFoundError, match="known profiles"):
        R.load_profile("nope")


def test_row_id_and_shard_specs():
    assert [R.row_id(p) for p in (0, 0.05, 0.5, 1)] == ["p0.0", "p0.05", "p0.5", "p1.0"]
    assert R.shard_specs({"n_web": 3000, "shard_size": 500}, "w") == (
        "w/web/{00000..00004}.tar",
        "w/web/00005.tar",
        "w/web/*.tar",
    )
    with pytest.raises(ValueError, match="n_web 100"):
        R.shard_specs({"n_web": 100, "shard_size": 50}, "w")


# ---------------------------------------------------------------------------------------------------- the runner
_LAUNCH = X.launch_fresh  # the real one (a test below replaces the module's)


class FakeRunner:
    """Stands in for a step's launch: records what ran, writes the step's outputs, fails the named steps once; the
    process it starts prints ``running <step>`` and exits with the step's code."""

    def __init__(self, steps: list[X.Step], fail_once: set[str] = frozenset()) -> None:
        self.by_cmd = {tuple(s.command()): s for s in steps}
        self.fail_once = set(fail_once)
        self.ran: list[str] = []

    def __call__(self, cmd, env, threads=None):
        step = self.by_cmd[tuple(cmd)]
        self.ran.append(step.name)
        code = 0
        if step.name in self.fail_once:
            self.fail_once.discard(step.name)
            X._abs(step.outputs[0]).parent.mkdir(parents=True, exist_ok=True)
            X._abs(step.outputs[0]).write_text("partial")  # a failed step may leave partial output behind
            code = 3
        else:
            for o in step.outputs:
                X._abs(o).parent.mkdir(parents=True, exist_ok=True)
                X._abs(o).write_text("ok")
        return _LAUNCH([sys.executable, "-c", f"print('running {step.name}'); raise SystemExit({code})"], env)


def _fake_steps(out: Path) -> list[X.Step]:
    return [X.Step(n, f"step {n}", [n, "--x"], [str(out / n / "done.txt")], [str(out / n)]) for n in "abcd"]


def test_runner_skips_finished_steps_and_resumes_after_a_failure(tmp_path):
    import io

    out = tmp_path / "out"
    steps = _fake_steps(out)
    fake = FakeRunner(steps, fail_once={"c"})
    log = io.StringIO()
    rec = X.run_steps(steps, out, stream=log, launcher=fake)
    assert fake.ran == ["a", "b", "c"]
    assert rec["failed"] == "c"
    assert "[3/4] step c ... FAILED" in log.getvalue()
    assert "running c" in log.getvalue()
    timings = json.loads((out / "timings.json").read_text())
    assert [s["status"] for s in timings["steps"]] == [
        "ran",
        "ran",
        "failed (exit 3)",
        "not run (an earlier step failed)",
    ]
    assert not (out / "logs" / "c.done").exists()  # partial output alone does not mark c done

    fake.ran.clear()
    rec = X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["c", "d"]
    assert rec["failed"] is None
    assert [s["status"] for s in rec["steps"]] == ["skipped (done)", "skipped (done)", "ran", "ran"]
    assert rec["steps"][0]["seconds"] is not None  # the earlier run's wall time is kept for skipped steps

    fake.ran.clear()
    X.run_steps(steps, out, start_from="b", stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["b", "c", "d"]

    fake.ran.clear()
    changed = [*steps[:3], X.Step("d", "step d", ["d", "--y"], steps[3].outputs, steps[3].clean)]
    fake.by_cmd[tuple(changed[3].command())] = changed[3]
    X.run_steps(changed, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["d"]  # a changed command reruns that step only

    (out / "a" / "done.txt").unlink()  # a deleted output reruns its step
    fake.ran.clear()
    X.run_steps(changed, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["a"]
    with pytest.raises(ValueError, match="no such step"):
        X.run_steps(steps, out, start_from="zz", stream=io.StringIO(), launcher=fake)


def test_a_rerun_step_reruns_the_steps_that_read_its_outputs(tmp_path, capsys):
    import io

    out = tmp_path / "out"
    a, b, c = (str(out / n) for n in "abc")
    steps = [
        X.Step("a", "step a", ["a"], [f"{a}/x.txt"], [a]),
        X.Step("b", "step b", ["b", "--in", f"{a}/x.txt"], [f"{b}/y.txt"], [b]),  # reads a's output
        X.Step("c", "step c", ["c", "--in", f"{a}_other"], [f"{c}/z.txt"], [c]),  # a similar name is not a's
        X.Step("r", "report", ["report"], [str(out / "r.md")], always=True),
    ]
    assert [d.name for d in X.dependencies(steps)["b"]] == ["a"]
    assert X.dependencies(steps)["c"] == []
    fake = FakeRunner(steps)
    X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["a", "b", "c", "r"]
    fake.ran.clear()
    X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["r"]  # only the always-step
    (out / "a" / "x.txt").unlink()
    fake.ran.clear()
    X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)
    assert fake.ran == ["a", "b", "r"]


def test_runner_records_each_steps_cpu_time(tmp_path):
    """cpu_seconds counts the step's own subprocess (user + system), not the wall clock: a step that sleeps 0.4 s
    uses almost no CPU, one that spins 0.4 s of CPU uses about that much."""
    import io

    out = tmp_path / "out"
    spin = "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    steps = [_py_step(out, "a", _writes(out, "a", spin)), _py_step(out, "b", _writes(out, "b", "time.sleep(0.4)"))]
    rec = X.run_steps(steps, out, stream=io.StringIO(), launcher=_py_launcher)
    cpu = {s["name"]: s["cpu_seconds"] for s in rec["steps"]}
    assert cpu["a"] >= 0.35
    assert cpu["b"] < 0.3
    assert rec["steps"][1]["seconds"] >= 0.4
    assert rec["total_cpu_seconds"] == pytest.approx(cpu["a"] + cpu["b"], abs=0.11)
    assert "CPU time" in X.summary_table(rec)


def run_logged(cmd, log: Path, on_line, env: dict[str, str], launcher=X.launch_fresh) -> int:
    """Run one step with the runner's launcher and line reader (``X._last_line``), its stdout + stderr copied to
    ``log`` as it comes; ``on_line`` sees the newest line of each chunk, then any unterminated last line."""
    launched = launcher(cmd, env, None)
    pending = b""
    try:
        with open(log, "wb") as f:
            while chunk := os.read(launched.fd, 65536):
                f.write(chunk)
                line, pending = X._last_line(pending, chunk)
                if line is not None:
                    on_line(line)
    finally:
        launched.close()
    if pending:
        on_line(pending.decode("utf-8", "replace"))
    return launched.wait()[0]


def run_forked(cmd, log: Path, on_line, env: dict[str, str]) -> int:
    return run_logged(cmd, log, on_line, env, X.launch_forked)


def test_run_logged_tees_output_and_reports_lines(tmp_path):
    lines: list[str] = []
    code = run_logged(
        [sys.executable, "-c", "import sys; print('one'); sys.stdout.write('bar 50%\\rbar 100%\\n'); sys.exit(2)"],
        tmp_path / "l.log",
        lines.append,
        X.subprocess_env(),
    )
    assert code == 2
    assert (tmp_path / "l.log").read_bytes() == b"one\nbar 50%\rbar 100%\n"  # the log is byte-exact
    assert lines
    assert lines[-1] == "bar 100%"


# ---------------------------------------------------------------------------------------------------- the claims
def _clip(cls, short, long):
    return {
        "classify/top1": cls,
        "retrieval/image_to_text_R@1": short,
        "retrieval/text_to_image_R@1": short,
        "long_retrieval/image_to_text_R@1": long,
        "long_retrieval/text_to_image_R@1": long,
    }


def _results(clip: dict, dit: dict | None = None) -> dict:
    return {
        "analysis": {
            "length_words": {"original": {"mean": 6.0}, "recaption": {"mean": 24.0}},
            "vocabulary": {"coverage_pct": {"recaption": 4.0}, "token_share_pct": {"recaption": 40.0}},
        },
        "captioner": {"caption_tune": {"pair_precision": 20.0, "chance_pair_precision": 5.0}},
        "clip": clip,
        "dit": dit or {},
    }


def md_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in ``text``, as stripped cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|:") and "---|" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def verdicts(results: dict, **margins) -> dict[str, str]:
    return {c.id: c.verdict for c in C.check_claims(results, C.Margins(**margins))}


def test_claims_paper_pattern_holds():
    # one seed each: a CLIP difference counts at >= 2 * 1.5 * sqrt(2) = 4.24 points (the default margins)
    clip = {
        "0.0": {"seed0": _clip(10, 4, 9)},
        "0.5": {"seed0": _clip(19, 9, 8)},
        "0.8": {"seed0": _clip(24, 9, 7)},
        "1.0": {"seed0": _clip(25, 4, 2)},
    }
    dit = {
        "0.0": {
            "recaption/clip_score/web_clip": 35.0,
            "recaption/clip_score/web_clip/se": 1.0,
            "recaption/fid": 200.0,
            "caption/fid": 150.0,
            "recaption/attributes/colour": 0.5,
            "recaption/attributes/n": 100.0,
        },
        "1.0": {
            "recaption/clip_score/web_clip": 21.0,
            "recaption/clip_score/web_clip/se": 1.0,
            "recaption/fid": 250.0,
            "caption/fid": 100.0,
            "recaption/attributes/colour": 0.3,
            "recaption/attributes/n": 100.0,
        },
    }
    v = verdicts(_results(clip, dit))
    assert v["recaptions_longer"] == C.HOLDS
    assert v["recaption_word_share"] == C.FAILS  # 40% of the words is not "most"
    assert v["captioner_grounded"] == C.HOLDS
    for cid in (
        "clip_retrieval_intermediate_p",
        "clip_classification_p0",
        "clip_balance_p0.8",
        "clip_long_retrieval",
        "dit_recap_clip_score",
        "dit_recap_fid",
        "dit_raw_fid",
        "dit_recap_judge",
    ):
        assert v[cid] == C.HOLDS, cid


def test_claims_that_fail_and_that_are_not_measured():
    # retrieval best at an end (p = 1), classification better at p = 0, p = 0.8 loses 10 points of classification
    clip = {
        "0.0": {"seed0": _clip(30, 4, 2)},
        "0.5": {"seed0": _clip(22, 5, 3)},
        "0.8": {"seed0": _clip(15, 9, 2)},
        "1.0": {"seed0": _clip(25, 15, 9)},
    }
    dit = {"0.0": {"recaption/fid": 300.0, "caption/fid": 90.0}, "1.0": {"recaption/fid": 250.0, "caption/fid": 100.0}}
    v = verdicts(_results(clip, dit))
    assert v["clip_retrieval_intermediate_p"] == C.FAILS
    assert v["clip_classification_p0"] == C.FAILS
    assert v["clip_balance_p0.8"] == C.FAILS  # retrieval worse than p = 1, and 10 points of classification lost
    assert v["clip_long_retrieval"] == C.FAILS
    assert v["dit_recap_fid"] == C.FAILS
    assert v["dit_raw_fid"] == C.FAILS  # 10 FID points: above 5% of 100
    assert v["dit_recap_clip_score"] == C.MISSING
    assert v["dit_recap_judge"] == C.MISSING
    empty = verdicts({"clip": {}, "dit": {}})
    assert set(empty.values()) == {C.MISSING}


def test_claims_within_seed_noise():
    # p = 0.5 beats both ends on the mean, by less than the seed sd (pooled over this run's seeds: 3.2)
    clip = {
        "0.0": {"seed0": _clip(10, 4, 9), "seed1": _clip(12, 6, 9)},
        "0.5": {"seed0": _clip(19, 3, 8), "seed1": _clip(19, 9, 8)},
        "1.0": {"seed0": _clip(25, 4, 2), "seed1": _clip(26, 5, 2)},
    }
    v = verdicts(_results(clip))
    assert v["clip_retrieval_intermediate_p"] == C.NOISE
    assert v["clip_classification_p0"] == C.HOLDS
    assert v["clip_balance_p0.8"] == C.MISSING  # no p = 0.8 in this run


def test_claims_need_a_margin_beyond_noise():
    """Small differences in the claim's direction are inconclusive, not verdicts; the margins come from the profile."""
    one_seed = {"0.0": {"seed0": _clip(10, 4, 9)}, "1.0": {"seed0": _clip(13, 4, 2)}}  # cls +3 < 4.24
    assert verdicts(_results(one_seed))["clip_classification_p0"] == C.NOISE
    assert verdicts(_results(one_seed), clip_seed_sd=0.5)["clip_classification_p0"] == C.HOLDS  # 3 >= 1.41
    assert verdicts(_results(one_seed), clip_seed_sd=0.5)["clip_long_retrieval"] == C.HOLDS  # 9 at p = 0 vs 2
    # the pooled sd of this run's seeds raises the margin above the prior when seeds disagree
    noisy = {
        "0.0": {"seed0": _clip(6, 4, 9), "seed1": _clip(14, 4, 9)},
        "1.0": {"seed0": _clip(20, 4, 2), "seed1": _clip(12, 4, 2)},
    }
    assert verdicts(_results(noisy), clip_seed_sd=0.5)["clip_classification_p0"] == C.NOISE  # +6 vs 2 se = 11.3
    dit = {
        p: {
            "recaption/fid": fid,
            "caption/fid": 100.0,
            "recaption/attributes/colour": acc,
            "recaption/attributes/n": 100.0,
            "recaption/clip_score/web_clip": cs,
            "recaption/clip_score/web_clip/se": 1.5,
        }
        for p, fid, acc, cs in (("0.0", 200.0, 0.50, 30.0), ("1.0", 205.0, 0.42, 25.0))
    }
    v = verdicts(_results({}, dit))
    assert v["dit_recap_fid"] == C.NOISE  # 5 < 5% of 205
    assert v["dit_raw_fid"] == C.NOISE  # equal
    assert v["dit_recap_judge"] == C.NOISE  # 8 points on 100 prompts: 2 se = 14
    assert v["dit_recap_clip_score"] == C.HOLDS  # 5 >= 2 * hypot(1.5, 1.5) = 4.24
    with pytest.raises(KeyError, match="clip_seed_sdd"):
        C.Margins.from_profile({"clip_seed_sdd": 1.0})


def test_results_are_read_from_the_run_layout(tmp_path, profile_path):
    """collect_results reads the folders the steps write, and the report says which claims hold."""
    out = tmp_path / "out"
    profile = R.load_profile(str(profile_path))

    def put(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    cap = "eval/caption_attributes/"
    put(
        out / "captioner/caption_tune/metrics/step9.json",
        {"metrics": {f"{cap}pair_precision": 1.0, f"{cap}chance_pair_precision": 2.0}},
    )
    put(
        out / "captioner/caption_tune/metrics/step10.json",  # the last evaluation by step number, not by name
        {"metrics": {f"{cap}pair_precision": 30.0, f"{cap}chance_pair_precision": 4.0}},
    )
    put(out / "analysis/summary.json", {"inputs": {"shards": _results({})["analysis"]}})
    put(out / "clip/table3/p0.0/stage2/metrics/step40.json", {"metrics": _clip(10, 4, 9)})
    put(out / "clip/table3/p1.0/stage2/metrics/step40.json", {"metrics": _clip(25, 5, 2)})
    put(out / "seed1/clip/table3/p1.0/stage2/metrics/step40.json", {"metrics": _clip(27, 5, 2)})
    for p, fid in (("p0.0", 200.0), ("p1.0", 250.0)):
        put(out / f"dit/eval/{p}/recaption/metrics.json", {"metrics": {"fid": fid}})
    res = R.collect_results(out, profile, seeds=2)
    assert res["captioner"]["caption_tune"]["pair_precision"] == 30.0
    assert res["clip"]["1.0"] == {"seed0": _clip(25, 5, 2), "seed1": _clip(27, 5, 2)}
    assert res["dit"]["0.0"] == {"recaption/fid": 200.0}
    record = {"steps": [{"name": "a", "title": "step a", "status": "ran", "seconds": 3.0}], "total_seconds": 3.0}
    report = R.write_report(out, profile, 2, record, "python -m experiments reproduce").read_text()
    assert "## What the miniature reproduces" in report
    rows = {r[0]: r for r in md_rows(report)}
    assert rows["caption_tune"][4] == "30.0"  # (colour, shape) precision of the last evaluation, chance below it
    assert rows["chance (last stage)"][4] == "4.0"
    line = next(x for x in report.splitlines() if "Zero-shot classification drops at p = 0" in x)
    assert "**holds**" in line
    assert "p=1: 26.0 ± 1.4" in line
    assert "**holds**" in next(x for x in report.splitlines() if "Recap FID 27.8" in x)
    assert "git rev-parse" not in report
    assert f"Commit: `{X.git_head()}`" in report
    # the commit the steps ran at (recorded by run_steps) is kept when the report is rewritten at a later commit
    record["commit"] = "0123abc"
    report = R.write_report(out, profile, 2, record, "python -m experiments reproduce").read_text()
    assert f"Steps run at commit `0123abc`, report written at `{X.git_head()}`" in report
    # a parallel run states its own wall time first (what the budget is about), the steps' sum beside it
    assert "run wall time" not in report
    assert "total step wall time 3 s" in report
    record.update(wall_seconds=2.0, jobs=2, total_seconds=3.5)
    report = R.write_report(out, profile, 2, record, "python -m experiments reproduce").read_text()
    assert "**run wall time 2 s** (2 steps at a time; the steps' wall times add up to 4 s)" in report


# ------------------------------------------------------------------------------------------------- forked steps
def test_forked_step_behaves_like_a_fresh_interpreter(tmp_path, monkeypatch):
    """run_forked gives the step what `python -m experiments <argv>` would: its argv, the repository as cwd, the env
    it is given, stdout + stderr in the log and the live lines, and the exit code of SystemExit / an exception."""
    import experiments.__main__ as entry

    def probe(argv):
        import os as _os

        print(f"argv={argv} cwd={_os.getcwd()} env={_os.environ.get('PROBE')} sys.argv1={sys.argv[1]}")
        print("to stderr", file=sys.stderr)
        if argv and argv[0] == "boom":
            raise RuntimeError("step failed")
        raise SystemExit(int(argv[0]) if argv else 0)

    monkeypatch.setitem(entry.SUITE_COMMANDS, "probe", (probe, "test"))
    monkeypatch.chdir(tmp_path)
    env = {**X.subprocess_env(), "PROBE": "yes"}
    cmd = [sys.executable, "-m", "experiments", "probe"]
    for args, code in (([], 0), (["3"], 3), (["boom"], 1)):
        lines: list[str] = []
        log = tmp_path / f"{code}.log"
        assert run_forked([*cmd, *args], log, lines.append, env) == code
        text = log.read_text()
        assert f"argv={args} cwd={X.REPO} env=yes sys.argv1=probe" in text
        assert "to stderr" in text
        assert lines
    assert "RuntimeError: step failed" in (tmp_path / "1.log").read_text()
    assert "PROBE" not in os.environ  # the parent's environment is untouched


def test_forked_and_fresh_runs_write_the_same_log(tmp_path):
    env = X.subprocess_env()
    for name, runner in (("fresh", run_logged), ("forked", run_forked)):
        assert runner([sys.executable, "-m", "experiments", "--help"], tmp_path / f"{name}.log", print, env) == 0
    assert (tmp_path / "fresh.log").read_bytes() == (tmp_path / "forked.log").read_bytes()
    with pytest.raises(ValueError, match="python -m experiments"):
        run_forked(["ls"], tmp_path / "x.log", print, env)


def test_runner_preloads_once_before_the_first_step_that_runs(tmp_path, monkeypatch):
    import io

    out = tmp_path / "out"
    steps = _fake_steps(out)
    fake = FakeRunner(steps)
    imported: list[tuple[str, ...]] = []
    monkeypatch.setattr(X, "preload", lambda modules=X.PRELOAD: imported.append(tuple(modules)))
    monkeypatch.setattr(X, "launch_forked", fake)  # the identity run_steps checks for
    monkeypatch.setattr(X, "fork_safe", lambda: None)
    rec = X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)
    assert imported == [X.PRELOAD]
    assert [s["name"] for s in rec["steps"]] == ["preload", "a", "b", "c", "d"]
    assert fake.ran == ["a", "b", "c", "d"]
    rec = X.run_steps(steps, out, stream=io.StringIO(), launcher=fake)  # all done: nothing to import
    assert imported == [X.PRELOAD]
    assert "preload" not in [s["name"] for s in rec["steps"]]

    # where forking is unsafe, the steps fall back to fresh interpreters (launch_fresh)
    monkeypatch.setattr(X, "fork_safe", lambda: "2 threads are running in the parent")
    used = []
    monkeypatch.setattr(X, "launch_fresh", lambda *a: used.append("fresh") or fake(*a))
    log = io.StringIO()
    X.run_steps(steps, out, start_from="c", stream=log, launcher=fake)
    assert used == ["fresh", "fresh"]
    assert "not forking steps: 2 threads" in log.getvalue()


# ------------------------------------------------------------------------------------------ parallel steps
def _py_step(out: Path, name: str, code: str, reads: str = "") -> X.Step:
    """A step whose command is `python -c CODE` (run by _py_launcher); it reads ``reads`` (a folder of another step)."""
    return X.Step(
        name,
        f"step {name}",
        [name, code, *([reads] if reads else [])],
        [str(out / name / "done.txt")],
        [str(out / name)],
    )


def _py_launcher(cmd, env, threads):
    # cmd = python -m experiments NAME CODE [READS]: run CODE with the thread count it was given in its env
    return X.launch_fresh([sys.executable, "-c", cmd[4]], env, threads)


def _writes(out: Path, name: str, body: str = "") -> str:
    target = out / name / "done.txt"
    return (
        f"import os, time, pathlib\n{body}\np = pathlib.Path({str(target)!r})\np.parent.mkdir(parents=True, "
        f"exist_ok=True)\np.write_text(os.environ.get('OMP_NUM_THREADS', '-') + ' ' + str(time.time()))"
    )


def test_parallel_steps_overlap_respect_dependencies_and_resume(tmp_path):
    import io

    out = tmp_path / "out"
    a_dir = str(out / "a")
    steps = [
        _py_step(out, "a", _writes(out, "a", "time.sleep(0.6)")),
        _py_step(out, "b", _writes(out, "b", "time.sleep(0.6)")),  # independent of a: runs beside it
        _py_step(out, "c", _writes(out, "c", f"assert pathlib.Path({a_dir!r}, 'done.txt').is_file()"), reads=a_dir),
        X.Step("r", "report", ["r", _writes(out, "r")], [str(out / "r" / "done.txt")], always=True),
    ]
    assert [d.name for d in X.dependencies(steps)["c"]] == ["a"]
    t0 = time.perf_counter()
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    wall = time.perf_counter() - t0
    assert rec["failed"] is None
    assert [s["status"] for s in rec["steps"]] == ["ran"] * 4
    started = {s["name"]: s["started_at"] for s in rec["steps"]}
    finished = {n: float((out / n / "done.txt").read_text().split()[1]) for n in "abcr"}
    assert abs(started["a"] - started["b"]) < 0.5  # a and b ran side by side
    assert finished["c"] > finished["a"]  # c waited for a (it asserts a's output exists)
    assert finished["r"] >= max(finished[n] for n in "abc")  # the report step waits for everything before it
    assert wall < 0.6 * 2 + 3.0
    # two ready steps share the cores; a step that runs alone gets them all
    threads = {s["name"]: s["threads"] for s in rec["steps"]}
    cpus = os.cpu_count()
    assert threads["a"] == threads["b"] == max(1, cpus // 2)
    assert threads["r"] == cpus
    assert (out / "a" / "done.txt").read_text().split()[0] == str(threads["a"])  # the step saw its thread cap
    assert rec["wall_seconds"] <= rec["total_seconds"]

    # resume: all done -> only the always-step runs; a deleted output reruns its step and what reads it
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    assert [s["status"] for s in rec["steps"]] == ["skipped (done)"] * 3 + ["ran"]
    (out / "a" / "done.txt").unlink()
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    assert {s["name"]: s["status"] for s in rec["steps"]} == {"a": "ran", "b": "skipped (done)", "c": "ran", "r": "ran"}


def test_parallel_runner_starts_the_longest_chain_first(tmp_path):
    import io

    out = tmp_path / "out"
    steps = [
        _py_step(out, "x", _writes(out, "x", "time.sleep(0.6)")),  # short branches, listed first
        _py_step(out, "y", _writes(out, "y", "time.sleep(0.2)")),
        _py_step(out, "a", _writes(out, "a", "time.sleep(0.2)")),  # the head of a -> b -> c, listed last
        _py_step(out, "b", _writes(out, "b"), reads=str(out / "a")),
        _py_step(out, "c", _writes(out, "c"), reads=str(out / "b")),
    ]
    deps = X.dependencies(steps)
    assert X.chain_lengths(steps, deps) == {"x": 1, "y": 1, "a": 3, "b": 2, "c": 1}
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    assert rec["failed"] is None
    started = {s["name"]: s["started_at"] for s in rec["steps"]}
    # a (longest chain) and x (first of the ties) start together; y waits for a free core, b and c for a
    assert max(started["a"], started["x"]) < min(started["y"], started["b"])
    assert started["b"] < started["c"]


def test_parallel_failure_stops_new_steps_but_lets_running_ones_finish(tmp_path):
    import io

    out = tmp_path / "out"
    a_dir = str(out / "a")
    steps = [
        _py_step(out, "a", "import sys; print('boom'); sys.exit(4)"),
        _py_step(out, "b", _writes(out, "b", "time.sleep(0.5)")),
        _py_step(out, "c", _writes(out, "c"), reads=a_dir),
    ]
    log = io.StringIO()
    rec = X.run_steps(steps, out, stream=log, jobs=2, launcher=_py_launcher)
    status = {s["name"]: s["status"] for s in rec["steps"]}
    assert rec["failed"] == "a"
    assert status == {"a": "failed (exit 4)", "b": "ran", "c": "not run (an earlier step failed)"}
    assert "| boom" in log.getvalue()  # the failed step's log tail is shown
    assert (out / "logs" / "b.done").is_file()
    assert not (out / "logs" / "a.done").exists()
    steps[0] = _py_step(out, "a", _writes(out, "a"))
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    assert {s["name"]: s["status"] for s in rec["steps"]} == {"a": "ran", "b": "skipped (done)", "c": "ran"}


def test_parallel_cpu_time_is_per_step(tmp_path):
    import io

    out = tmp_path / "out"
    spin = "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    steps = [_py_step(out, "a", _writes(out, "a", spin)), _py_step(out, "b", _writes(out, "b", "time.sleep(0.4)"))]
    rec = X.run_steps(steps, out, stream=io.StringIO(), jobs=2, launcher=_py_launcher)
    cpu = {s["name"]: s["cpu_seconds"] for s in rec["steps"]}
    assert cpu["a"] >= 0.35
    assert cpu["b"] < 0.3


def test_forked_step_gets_its_thread_cap(tmp_path, monkeypatch):
    """A forked step runs with the compute threads the scheduler gave it (torch's pool and the env its own
    subprocesses inherit), whatever the parent's own setting."""
    import torch

    import experiments.__main__ as entry

    def probe(argv):
        import os as _os

        print(f"torch={torch.get_num_threads()} omp={_os.environ.get('OMP_NUM_THREADS')}")

    monkeypatch.setitem(entry.SUITE_COMMANDS, "probe", (probe, "test"))
    launched = X.launch_forked([sys.executable, "-m", "experiments", "probe"], X.subprocess_env(), 1)
    with os.fdopen(launched.fd, "rb") as pipe:
        text = pipe.read().decode()
    assert launched.wait()[0] == 0
    assert "torch=1 omp=1" in text


# ------------------------------------------------------------------------------------------------ realised p
def _metrics_csv(folder: Path, rows: list[dict]) -> None:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with (folder / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_realised_p_is_read_from_the_runs_own_logs(tmp_path):
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _metrics_csv(
        s1,
        [
            {"step": 9, "train/caption_source/original": 0.9, "train/caption_source/recaption": 0.1},
            {"step": 10, "train/loss": 2.0},
            {
                "step": 19,
                "train/caption_source/original": 0.52,
                "train/caption_source/recaption": 0.48,
                "train/caption_source_samples": 3000,
            },
        ],
    )
    _metrics_csv(s2, [{"step": 5, "train/caption_source/recaption": 1.0, "train/caption_source_samples": 1000}])
    assert T.realised_p(s1) == pytest.approx(0.52)  # the last row that logged it: the run's exact totals
    assert T.realised_p(s2) == 0.0  # a source never drawn has no column
    assert T.realised_p(s1, s2) == pytest.approx((0.52 * 3000 + 0.0 * 1000) / 4000)  # weighted by samples
    assert T.realised_p(tmp_path / "missing") is None


def test_claims_use_the_realised_p(tmp_path):
    clip = {
        "0.0": {"seed0": _clip(10, 4, 9)},
        "0.5": {"seed0": _clip(19, 9, 8)},
        "0.8": {"seed0": _clip(24, 9, 7)},
        "1.0": {"seed0": _clip(25, 4, 2)},
    }
    results = _results(clip)
    results["clip_p"] = {"0.0": {"seed0": 0.01}, "0.5": {"seed0": 0.5}, "0.8": {"seed0": 0.79}, "1.0": {"seed0": 1.0}}
    claims = {c.id: c for c in C.check_claims(results)}
    assert claims["clip_classification_p0"].verdict == C.HOLDS
    assert "p=0 (realised 0.01)" in claims["clip_classification_p0"].evidence
    # a "p = 0" row that trained on 30% alt-text (say recaptions missing, fallen back) is not p = 0
    results["clip_p"]["0.0"] = {"seed0": 0.3}
    claims = {c.id: c for c in C.check_claims(results)}
    assert claims["clip_classification_p0"].verdict == C.MISSING
    assert "no run trained at p = 0" in claims["clip_classification_p0"].evidence
    assert claims["clip_long_retrieval"].verdict == C.HOLDS  # compares the largest realised p < 1 with p = 1
    results["clip_p"]["0.8"] = {"seed0": 0.6}
    assert {c.id: c.verdict for c in C.check_claims(results)}["clip_balance_p0.8"] == C.MISSING
    dit = {
        p: {"recaption/clip_score/web_clip": v, "recaption/clip_score/web_clip/se": 0.5}
        for p, v in (("0.0", 30.0), ("1.0", 20.0))
    }
    results = _results({}, dit)
    results["dit_p"] = {"0.0": 0.0, "1.0": 1.0}
    claims = {c.id: c for c in C.check_claims(results)}
    assert claims["dit_recap_clip_score"].verdict == C.HOLDS
    assert "realised 1.00" in claims["dit_recap_clip_score"].evidence
    results["dit_p"]["1.0"] = 0.5
    assert {c.id: c.verdict for c in C.check_claims(results)}["dit_recap_clip_score"] == C.MISSING


def test_analysis_table_shows_the_word_share_and_the_clip_share():
    a = {
        "length_words": {"original": {"mean": 2.5}, "recaption": {"mean": 19.0}},
        "vocabulary": {
            "size": {"original": 600, "recaption": 30},
            "coverage_pct": {"recaption": 4.9},
            "token_share_pct": {"original": 12.8, "recaption": 87.2},
        },
        "clip_share": {"share_pct": {"original": 73.0, "recaption": 27.0}},
    }
    rows = {r[0]: r[1:] for r in md_rows(R._analysis_table(a))}
    assert rows["share of the word tokens of both sets"][:2] == ["12.8%", "87.2%"]
    assert rows["CLIP-score share, web CLIP (INFERRED definition)"][:2] == ["73.0", "27.0"]  # not the word share


# ------------------------------------------------------------------------------------------------ make chains
def test_make_chains_run_the_makefiles_commands_through_the_runner(tmp_path):
    dit = {s.name: s for s in R.make_chain("tiny-dit", "w", "dw", ["p0.0"])}
    assert dit["dit_world"].argv == ["world", "--out", "dw", "--overwrite", "--config", R.DIT_WORLD_CONFIG]
    assert "--limit" in dit["dit_p0.0_eval"].argv
    assert "web_clip=runs/tiny/captioner/web_clip/export" in dit["dit_p0.0_eval"].argv
    assert "world_truth_recaptions" not in dit  # tiny-dit needs the default world's web CLIP, not its recaptions
    cap = [s.name for s in R.make_chain("tiny-captioner", "w")]
    assert cap[:3] == ["world", "web_clip", "web_clip_export"]
    assert cap[-1] == "captioner_export"
    recap = R.make_chain("tiny-recaption", "w")
    assert [s.name for s in recap][-3:] == ["recaption", "recaption_merge", "recaption_sidecars"]
    assert all(s.always for s in recap[-3:])  # make ran them every time (the recaption job resumes by itself)

    # a step whose outputs exist is skipped, as make would; the rest run in order
    world = tmp_path / "w"
    (world / "recap").mkdir(parents=True)
    (world / "world.json").write_text("{}")
    fake = FakeRunner(R.make_chain("world-recap", str(world)))
    R.run_chain("world-recap", str(world), "dw", [], out=tmp_path / "chain", launcher=fake)
    assert fake.ran == ["world_sidecars"]


def test_only_runs_a_subset_of_the_steps(profile_path, tmp_path, capsys):
    R.main(["--profile", str(profile_path), "--out", str(tmp_path / "o"), "--dry-run", "--only", "world", "clip_p0.0"])
    names = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert names == ["world", "clip_p0.0_stage1", "clip_p0.0_stage2"]
    with pytest.raises(SystemExit):
        R.main(["--profile", str(profile_path), "--out", str(tmp_path / "o"), "--dry-run", "--only", "nope"])


def test_progress_on_a_terminal_is_a_tqdm_bar_and_starts_no_thread(tmp_path):
    """On a terminal the steps' progress is a tqdm bar (the running steps' last lines beside it); the runner starts no
    thread (tqdm's monitor included), so its steps can still be forked."""
    import io
    import threading

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = tmp_path / "out"
    steps = [_py_step(out, "a", _writes(out, "a", "print('working', flush=True)\ntime.sleep(1.5)"))]
    stream = Terminal()
    before = {t.name for t in threading.enumerate()}  # an earlier test's tqdm may have left its monitor running
    rec = X.run_steps(steps, out, stream=stream, launcher=_py_launcher)
    assert rec["failed"] is None
    assert "[1/1] step a ... started" in stream.getvalue()
    assert "a: working" in stream.getvalue()  # the bar's postfix: the running step's last line
    assert {t.name for t in threading.enumerate()} <= before
