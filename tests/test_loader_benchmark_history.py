"""benchmarks.loader keeps its results: --record appends the figures beside open_clip's with the goal, commit and
machine; --history prints them as a table (no timing assertions: the figures themselves are not checked)."""

from __future__ import annotations

import json

from conftest import write_shards

from benchmarks.loader import TARGETS, main


def test_record_appends_figures_goal_and_commit_and_history_prints_them(tmp_path, capsys):
    write_shards(tmp_path / "shards", [32, 32], image_size=32)
    history = tmp_path / "loader.jsonl"
    argv = ["--shards", str(tmp_path / "shards" / "{00000..00001}.tar"), "--workers", "0", "--batch-size", "16",
            "--samples", "32", "--repeats", "1", "--image-size", "64", "--record", str(history)]  # fmt: skip
    first = main(argv)
    main(argv)
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert len(lines) == 2  # appended, not overwritten
    entry = lines[0]
    assert entry["ours"]["median"] == round(first["summary"]["ours"]["median"], 3)
    assert entry["open_clip"]["median"] == round(first["summary"]["open_clip"]["median"], 3)
    assert entry["paired_ratios"] == [round(r, 3) for r in first["paired_ratios"]]
    assert entry["target"] == {
        "paired_ratio_median_at_least": TARGETS[64],
        "met": first["paired_ratio_median"] >= TARGETS[64],
    }
    assert entry["image_size"] == 64
    assert entry["stored"] == [32, 32]
    assert len(entry["commit"]) == 12
    assert {"cpus", "torch", "pillow"} <= set(entry["machine"])
    capsys.readouterr()
    main(["--history", str(history)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| date | commit |")
    assert len(table) == 2 + 2
    assert entry["commit"] in table[2]
