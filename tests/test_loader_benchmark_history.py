"""benchmarks.loader keeps its results: --record appends the figures beside open_clip's with the goal, commit and
machine; --history prints them as a table (no timing assertions: the figures themselves are not checked)."""

from __future__ import annotations

import json

from conftest import write_shards

from benchmarks.loader import TARGETS, main


def test_record_appends_figures_goal_and_commit_and_history_prints_them(tmp_path, capsys):
    write_shards(tmp_path / "shards", [32, 32], image_size=32)
    history = tmp_path / "loader.jsonl"
    shards = str(tmp_path / "shards" / "{00000..00001}.tar")
    argv = ["--shards", shards, "--workers", "0", "--batch-size", "16", "--samples", "32", "--repeats", "1"]
    argv += ["--image-size", "64", "--record", str(history)]
    first = main(argv)
    main(argv)
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert len(lines) == 2  # appended, not overwritten
    entry, at64, first64 = lines[0], lines[0]["sizes"]["64"], first["sizes"][64]
    for name in ("ours", "ours_wds_tar", "open_clip"):
        assert at64[name]["median"] == round(first64["summary"][name]["median"], 3)
    assert at64["paired_ratios"] == [round(r, 3) for r in first64["paired_ratios"]]
    assert at64["target"] == {
        "paired_ratio_median_at_least": TARGETS[64],
        "met": first64["paired_ratio_median"] >= TARGETS[64],
    }
    assert entry["stored"] == [32, 32]
    assert len(entry["commit"]) == 12
    assert {"cpus", "torch", "pillow"} <= set(entry["machine"])
    capsys.readouterr()
    main(["--history", str(history)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| date ")
    assert "| commit " in table[0]
    assert len(table) == 2 + 2
    assert entry["commit"] in table[2]
