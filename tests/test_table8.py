"""Table 8 ("beyond the paper"): every tiny row trains (``fast_dev_run``) on a tiny world with its objective in place,
``--print_config`` composes a row's objective configs, the Table 8 claims give a verdict only beyond seed noise, and
the ``table8`` reproduce profile reuses a finished full run's upstream steps and writes its own report beside it.
(Every row at both scales and stages composes and validates: tests/test_configs.py.)"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from test_clip_world import SMALL, make_world

from experiments import claims as C
from experiments import reproduce as R
from experiments import runner as X
from experiments.cli import cli_main
from experiments.paper_tables import TABLES

TABLES_ROWS = {r.id: r for r in TABLES["table8"].rows}
ROWS = list(TABLES_ROWS)
REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "experiments" / "sweeps"


@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("table8world")
    make_world(root)
    return root


def _print_config(args: list[str]) -> dict:
    buf = io.StringIO()
    with pytest.raises(SystemExit) as exc, redirect_stdout(buf):
        cli_main([*args, "--print_config"])
    assert exc.value.code in (None, 0)
    return yaml.safe_load(buf.getvalue())


def test_print_config_layers_the_objectives_over_the_row():
    printed = _print_config(["fit", "--row", "table8/both-partial-decoder", "--stage", "2", "--scale", "paper"])
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert model["model"] == "recap-clip:B-16:base"
    assert model["text_views"] == {"original": 0.5, "recaption": 0.5}
    assert model["caption_decoder"]["target"] == "recaption_full"
    assert data["views"]["recaption"] == {"source": "recaption", "partial": "clips"}
    assert data["views"]["recaption_full"] == "recaption"
    assert model["init_from"] == "runs/clip/table8/both-partial-decoder/stage1/checkpoints/last.ckpt"
    # the p schedule spans stage 1; stage 2 holds its end point
    stage1 = _print_config(["fit", "--row", "table8/p-schedule"])["data"]["init_args"]
    stage2 = _print_config(["fit", "--row", "table8/p-schedule", "--stage", "2"])["data"]["init_args"]
    assert stage1["p_schedule"]["kind"] == "linear"
    assert (stage1["p_schedule"]["start"], stage1["p_schedule"]["end"]) == (1.0, 0.5)
    assert not stage2.get("p_schedule")
    assert stage2["p_original"] == stage1["p_schedule"]["end"]


# What each row's objective logs in training (INTERFACE19.md): the per-view losses, the decoder's, the schedule's p.
LOGGED = {
    "p0.8": set(),
    "both": {"train/loss_original", "train/loss_recaption"},
    "both-partial": {"train/loss_original", "train/loss_recaption"},
    "both-partial-decoder": {"train/loss_original", "train/loss_recaption", "train/loss_decoder"},
    "siglip": set(),
    "p-schedule": {"train/p_target"},
}


@pytest.mark.parametrize("row", ROWS)
def test_every_tiny_row_trains(world_root, monkeypatch, row):
    """fast_dev_run of the row's stage 1 on the tiny world: its objective's modules and views are built and trained."""
    monkeypatch.chdir(world_root)
    args = ["fit", "--row", f"table8/{row}", *SMALL, "--trainer.fast_dev_run=2", "--model.init_args.evaluation=[]"]
    cli = cli_main(args)
    assert cli.trainer.global_step == 2
    logged = set(cli.trainer.callback_metrics)
    assert {"train/loss", *LOGGED[row]} <= logged, sorted(logged)
    assert cli.model.hparams.loss == ("siglip" if row == "siglip" else "clip")
    if row == "siglip":  # SigLIP's initial bias, from the objective's YAML (two small steps move it a little)
        assert cli.model.model.logit_bias.item() == pytest.approx(-10.0, abs=0.1)
    assert (cli.model.decoder is not None) == (row == "both-partial-decoder")


def test_the_decoder_row_trains_at_stage_2(world_root, monkeypatch):
    """Stage 2 doubles the image side: the caption decoder attends to 4x the image tokens."""
    monkeypatch.chdir(world_root)
    args = ["fit", "--row", "table8/both-partial-decoder", "--stage", "2", *SMALL, "--trainer.fast_dev_run=2"]
    cli = cli_main([*args, "--model.init_args.evaluation=[]", "--model.init_args.init_from=null"])
    assert "train/loss_decoder" in cli.trainer.callback_metrics


# ------------------------------------------------------------------------------------------------------ claims
def _m(short: float, long: float, cls: float) -> dict[str, float]:
    return {
        "retrieval/image_to_text_R@1": short,
        "retrieval/text_to_image_R@1": short,
        "long_retrieval/image_to_text_R@1": long,
        "long_retrieval/text_to_image_R@1": long,
        "classify/top1": cls,
    }


def _seeds(*values: tuple[float, float, float]) -> dict[str, dict]:
    return {f"seed{i}": _m(*v) for i, v in enumerate(values)}


def test_table8_claims_win_lose_and_noise():
    base = _seeds((10, 10, 20), (11, 11, 21), (9, 9, 19))
    results = {
        "table8": {
            "p0.8": base,
            "both": _seeds((20, 25, 30), (21, 26, 31), (19, 24, 29)),  # clearly better everywhere
            "siglip": _seeds((2, 1, 10), (3, 2, 11), (1, 0, 9)),  # clearly worse everywhere
            "p-schedule": _seeds((10.5, 11, 19.5), (11.5, 10, 20.5), (9.5, 10, 21)),  # within seed noise
            "both-partial": {"seed0": {"classify/top1": 50.0}},  # measured no retrieval
        }
    }
    claims = {c.id: c for c in C.check_table8(results, C.Margins(z=2.0, clip_seed_sd=1.5))}
    tasks = ("short_retrieval", "long_retrieval", "classification")
    assert {claims[f"table8_both_{t}"].verdict for t in tasks} == {C.HOLDS}
    assert {claims[f"table8_siglip_{t}"].verdict for t in tasks} == {C.FAILS}
    assert {claims[f"table8_p-schedule_{t}"].verdict for t in tasks} == {C.NOISE}
    assert claims["table8_both-partial_short_retrieval"].verdict == C.MISSING
    assert claims["table8_both-partial_classification"].verdict == C.HOLDS  # one seed, but +30 is beyond 2 se
    assert not any(cid.startswith("table8_p0.8") for cid in claims)  # the baseline is not checked against itself
    # the margin is seed_se over the seeds: +10 with the 1.5-point prior over 3 + 3 seeds is 2 se = 2.4
    assert (
        "both 20.0 ± 1.0 vs p0.8 10.0 ± 1.0 (difference +10.0, 2 se = 2.4)"
        in claims["table8_both_short_retrieval"].evidence
    )
    # no baseline run: nothing is decided
    del results["table8"]["p0.8"]
    assert {c.verdict for c in C.check_table8(results)} == {C.MISSING}


# ----------------------------------------------------------------------------------------------------- profile
def _finish(out: Path, steps: list[X.Step]) -> None:
    """Mark ``steps`` done as the runner would: their outputs exist and their stamps record their argv."""
    for s in steps:
        for o in s.outputs:
            path = Path(o)
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
        stamp = out / "logs" / f"{s.name}.done"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"argv": s.argv, "finished": time.time()}))


def test_table8_profile_over_a_finished_full_run_runs_only_its_clip_rows(tmp_path):
    out = tmp_path / "full"
    full = R.build_steps(R.load_profile("full"), str(out))
    _finish(out, full)
    profile = R.load_profile("table8")
    steps = R.build_steps(profile, str(out), seeds=3)
    to_run = X.plan(steps, out)
    assert to_run == {s.name for s in steps if s.name.startswith("table8_")} | {"report_table8"}
    assert len([n for n in to_run if n.endswith("_stage2")]) == 6 * 3  # 18 CLIP runs
    # the upstream steps are the full run's own (same commands), so its stamps mark them done
    by_name = {s.name: s for s in full}
    assert all(s.argv == by_name[s.name].argv for s in steps if s.name not in to_run)
    assert not any(s.name.startswith(("clip_", "dit", "judge", "analyze")) for s in steps)
    # with the full profile's CLIP recipe and data, at each seed, in the report's layout
    stage1 = {s.name: s for s in steps}["table8_p-schedule_seed2_stage1"]
    assert "--model.init_args.total_samples=83200" in stage1.argv
    assert f"--data.init_args.sidecar_dir={out}/recaption/world_sidecars" in stage1.argv
    assert "--seed_everything=2" in stage1.argv
    schedule = yaml.safe_load(
        next(a for a in stage1.argv if a.startswith("--data.init_args.p_schedule=")).split("=")[1]
    )
    assert schedule["total_samples"] == profile["clip"]["stage1"]["model.init_args.total_samples"]
    assert stage1.outputs[0] == f"{out}/seed2/clip/table8/p-schedule/stage1/checkpoints/last.ckpt"
    # a row's overrides name this run's files: the decoder's shortlist is the words of this world's captioner data
    decoder = {s.name: s for s in steps}["table8_both-partial-decoder_stage2"]
    vocab = next(a for a in decoder.argv if a.startswith("--model.init_args.caption_decoder.vocab="))
    assert json.loads(vocab.split("=", 1)[1]) == [
        f"{out}/world/caption_pretrain/chat.json",
        f"{out}/world/instruct/llava_instruct.json",
    ]
    # on a fresh folder the upstream chain runs first
    assert "recaption_world" in X.plan(steps, tmp_path / "fresh")
    # its records (and its report's table) go beside the full run's, not over them
    assert R.results_dir(out, profile) == out / "table8"
    assert {s.name: s for s in steps}["report_table8"].outputs == [f"{out}/table8/reports/table8_tiny.md"]
    assert R.results_dir(out, R.load_profile("full")) == out


def test_table8_report_reads_the_run_layout(tmp_path):
    out = tmp_path / "out"
    for seed, (short, cls) in enumerate(((10, 20), (11, 21), (9, 19))):
        root = R.seed_root(str(out), seed)
        for row, gain in (("p0.8", 0), ("both", 10)):
            metrics = Path(root) / "clip" / "table8" / row / "stage2" / "metrics" / "step00000300.json"
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"metrics": _m(short + gain, short, cls - gain)}))
    R.main(["--profile", "table8", "--out", str(out), "--report-only"])  # the report of finished steps
    text = (out / "table8" / "report.md").read_text()
    verdicts = {line.split("|")[1].strip(): line for line in text.splitlines() if "beats the paper's" in line}
    assert "**holds**" in verdicts["both beats the paper's p0.8 on short retrieval (Table 8)"]
    assert "**inconclusive" in verdicts["both beats the paper's p0.8 on long retrieval (Table 8)"]
    assert "**does not hold**" in verdicts["both beats the paper's p0.8 on classification (Table 8)"]
    assert "**not measured**" in verdicts["siglip beats the paper's p0.8 on short retrieval (Table 8)"]
    assert "## Table 8, beyond the paper" in text
    assert "What the miniature reproduces" not in text  # no Table 3 rows, no paper claims
    results = json.loads((out / "table8" / "results.json").read_text())
    assert results["results"]["table8"]["both"]["seed1"]["classify/top1"] == 11
    assert not (out / "report.md").exists()


# ------------------------------------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("scale", ["paper", "tiny"])
def test_one_sweep_spec_per_row_runs_the_rows_objectives_at_both_stages(scale, tmp_path):
    """Each row's spec names exactly the row's objective configs, stage 2 gets their stage-2 twins (the p schedule's
    hold) and the evaluation builds the objective's model; the tiny twins sweep the same grid."""
    from experiments import sweep
    from experiments.paper_tables import row_args

    folder = SWEEPS / ("tiny" if scale == "tiny" else "") / "table8_beyond"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(ROWS)
    for row in ROWS:
        spec = sweep.load_spec(folder / f"{row}.yaml")
        if scale == "tiny":
            assert spec["parameters"] == {
                k: v
                for k, v in sweep.load_spec(SWEEPS / "table8_beyond" / f"{row}.yaml")["parameters"].items()
                if k != "model.init_args.model"  # the tiny recipe's own B/16 + base
            }
        point = sweep.points(spec, tmp_path, row)[-1]
        assert point.params["seed_everything"] == 2
        steps = sweep.row_steps(sweep.lightning_args(spec, point.params), point.run_dir)
        argv = {s.name: s.argv for s in steps}
        for stage, name in ((1, "stage1"), (2, "stage2"), (2, "eval")):
            configs = [a for i, a in enumerate(argv[name]) if i and argv[name][i - 1] == "--config"]
            expected = row_args("table8", row, stage, scale)
            objectives = [
                a for i, a in enumerate(expected) if i and expected[i - 1] == "--config" and "objectives" in a
            ]
            assert [c for c in configs if "objectives" in c] == [str(Path(o).relative_to(REPO)) for o in objectives]
        if row != "p-schedule":  # the row's p (the recipe's own, restated)
            assert spec["parameters"]["data.init_args.p_original"]["value"] == TABLES_ROWS[row].p
        elif scale == "tiny":  # the schedule in stage 1, its end held in stage 2, as `--row` composes them
            for stage, name in ((1, "stage1"), (2, "stage2")):
                swept = _print_config(argv[name])["data"]["init_args"]
                composed = _print_config(["fit", "--row", f"table8/{row}", "--stage", str(stage)])["data"]["init_args"]
                assert {k: swept.get(k) for k in ("p_original", "p_schedule")} == {
                    k: composed.get(k) for k in ("p_original", "p_schedule")
                }
