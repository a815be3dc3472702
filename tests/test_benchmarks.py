"""The benchmarks run end to end on tiny inputs (no timing assertions): the loader and CLIP-step comparisons, and the
GPU checks' code path on tiny shapes on CPU."""

from __future__ import annotations

import json
import re

import pytest
from conftest import write_shards

from benchmarks.loader import format_table, main


def test_loader_benchmark_reports_every_loader_at_every_size(tmp_path, capsys):
    write_shards(tmp_path / "shards", [64, 64], image_size=32)
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    out_json = tmp_path / "bench.json"
    argv = ["--shards", pattern, "--workers", "0", "--batch-size", "32", "--samples", "128", "--repeats", "1"]
    result = main([*argv, "--image-size", "64", "32", "--json", str(out_json)])

    printed = capsys.readouterr().out
    assert "ratio (ours/open_clip):" in printed
    assert "own tar reader vs webdataset's" in printed
    for size in (64, 32):
        r = result["sizes"][size]
        for name in ("ours", "ours_wds_tar", "open_clip"):
            assert name in printed
            s = r["summary"][name]
            assert s["median"] > 0
            assert s["min"] <= s["median"] <= s["max"]
            assert s["first_batch_s"] > 0
            (run,) = r["runs"][name]
            assert run["samples"] >= 128
            # same transform and tokenizer on every side: equal batch shapes
            assert run["shapes"] == {"image": [32, 3, size, size], "text": [32, 77]}
            assert run["samples"] == r["runs"]["open_clip"][0]["samples"]
        assert r["ratio"] > 0
    assert format_table(result).splitlines()[0].startswith("|   px | loader")
    assert json.loads(out_json.read_text())["sizes"]["64"]["ratio"] == result["sizes"][64]["ratio"]


def test_clip_step_benchmark_reports_ratio(tmp_path, capsys):
    """``benchmarks.clip_step``: both training loops run on the same batches, do the same work and give a ratio."""
    import torch

    from benchmarks import clip_step

    threads = torch.get_num_threads()
    out_json = tmp_path / "clip_step.json"
    result = clip_step.main(["--steps", "3", "--batch-size", "8", "--repeats", "1", "--json", str(out_json)])

    printed = capsys.readouterr().out
    assert "ratio (ours/open_clip):" in printed
    assert isinstance(result["ratio"], float)
    assert result["ratio"] > 0
    for name in clip_step.IMPLS:
        (run,) = result["runs"][name]
        assert run["steps"] == 3
        assert run["timed_steps"] == 2  # default skip: min(10, steps // 3) = 1
        assert run["ms_per_step"] > 0
        assert run["threads_in_step"] == 1
        assert run["forward_ms"] > 0
        assert run["backward_ms"] > 0
        assert run["update_ms"] > 0
    # same model, batches, optimizer and schedule: the two loops end on (numerically) the same weights
    assert result["weight_diffs"][0] < 1e-5 < result["weights_moved"][0]
    assert json.loads(out_json.read_text())["ratio"] == result["ratio"]
    assert torch.get_num_threads() == threads  # restored after the run


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory) -> str:
    from benchmarks.gpu_checks import tokenizer_folder

    return tokenizer_folder(tmp_path_factory.mktemp("gpu_checks"), None)


def test_gpu_checks_run_on_tiny_shapes_and_append_to_the_doc(tmp_path, world_tokenizer):
    """``benchmarks/gpu_checks.sh``'s entry point, on tiny shapes on CPU: every check runs through the same code as on
    a GPU (random llava-hf checkpoint + the recaption job's hf backend, ClipModule and DiTModule under a Trainer in
    bf16-mixed), vLLM is reported as not importable, and the section lands at the end of the given doc."""
    from benchmarks.gpu_checks import main

    doc = tmp_path / "gpu.md"
    doc.write_text("# GPU figures\n\nwhat was here stays.\n")
    out = tmp_path / "out"
    report = main(["--tiny", "--out", str(out), "--doc", str(doc), "--tokenizer", world_tokenizer, "--isolate", "no"])
    checks = report["checks"]
    assert checks["recaption_hf"]["images_per_s"] > 0
    assert checks["recaption_hf"]["mean_new_tokens"] > 0
    assert checks["clip"]["ms_per_step"] > 0
    assert checks["clip"]["timed_steps"] == 2
    assert checks["dit"]["ms_per_step"] > 0
    assert checks["recaption_vllm"] == {"skipped": "vllm does not import here"}  # not installed in CI
    text = doc.read_text()
    assert text.startswith("# GPU figures\n\nwhat was here stays.\n\n### ")
    section = text.split("\n\n### ", 1)[1]
    assert report["card"]["name"] in section.splitlines()[0]
    assert "tiny shapes" in section.splitlines()[0]
    assert re.search(r"\| recaption, `hf` +\|", section)  # a Markdown table row
    assert "images/s per GPU" in section
    assert re.search(r"\| recaption, `vllm` +\|", section)
    assert "not run: vllm does not import here" in section
    assert section.count("ms/step") == 2
    assert json.loads((out / "gpu_checks.json").read_text())["checks"]["clip"]["ms_per_step"] > 0
    assert (out / "gpu_checks.md").read_text() in text


def test_gpu_checks_isolate_each_check_in_a_process_with_a_time_limit(tmp_path, world_tokenizer):
    """On a GPU every check runs in its own process (its memory freed, a hang killed): the same path on CPU."""
    import argparse

    from benchmarks.gpu_checks import _run_isolated, main

    report = main(
        [
            "--tiny",
            "--out",
            str(tmp_path / "out"),
            "--no-doc",
            "--tokenizer",
            world_tokenizer,
            "--isolate",
            "yes",
            "--checks",
            "clip",
        ]
    )
    assert report["isolated"] is True
    assert report["checks"]["clip"]["ms_per_step"] > 0
    args = argparse.Namespace(tiny=True)
    slow = _run_isolated("dit", args, tmp_path, world_tokenizer, limit=0.5)
    assert slow["error"].startswith("timed out after")
