"""The loader benchmark runs end to end on tiny shards and reports both loaders (no timing assertions)."""

from __future__ import annotations

import json

from conftest import write_shards

from benchmarks.loader import format_table, main


def test_loader_benchmark_reports_both_loaders(tmp_path, capsys):
    write_shards(tmp_path / "shards", [64, 64], image_size=32)
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    out_json = tmp_path / "bench.json"
    argv = ["--shards", pattern, "--workers", "0", "--batch-size", "32", "--samples", "128", "--repeats", "1",
            "--image-size", "64", "--json", str(out_json)]  # fmt: skip
    result = main(argv)

    printed = capsys.readouterr().out
    assert "ratio (ours/open_clip):" in printed
    for name in ("ours", "open_clip"):
        assert name in printed
        s = result["summary"][name]
        assert s["median"] > 0
        assert s["min"] <= s["median"] <= s["max"]
        assert s["first_batch_s"] > 0
        (run,) = result["runs"][name]
        assert run["samples"] >= 128
        # same transform and tokenizer on both sides: equal batch shapes
        assert run["shapes"] == {"image": [32, 3, 64, 64], "text": [32, 77]}
    assert result["runs"]["ours"][0]["samples"] == result["runs"]["open_clip"][0]["samples"]
    assert result["ratio"] > 0
    assert format_table(result).splitlines()[0].startswith("loader")
    assert json.loads(out_json.read_text())["ratio"] == result["ratio"]


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
