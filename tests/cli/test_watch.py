"""The shared `--watch` loop: snapshots of files under the paths, changes, and re-runs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from engine.cli.watch import changes, snapshot, watch


def test_snapshot_lists_files_under_folders_and_skips_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a", encoding="utf-8")
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "e.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_text("x", encoding="utf-8")
    (tmp_path / ".a.yaml.swp").write_text("x", encoding="utf-8")
    single = tmp_path / "single.yaml"
    single.write_text("s", encoding="utf-8")
    seen = snapshot([str(tmp_path / "events"), str(single)])
    assert sorted(seen) == [str(tmp_path / "events" / "e.json"), str(single)]
    everything = snapshot([str(tmp_path)])
    assert sorted(Path(p).name for p in everything) == ["a.yaml", "e.json", "single.yaml"]


def test_changes_are_edits_additions_and_removals(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text("a", encoding="utf-8")
    before = snapshot([str(tmp_path)])
    assert changes(before, snapshot([str(tmp_path)])) == []
    first.write_text("ab", encoding="utf-8")  # same second, another size
    (tmp_path / "b.yaml").write_text("b", encoding="utf-8")
    after = snapshot([str(tmp_path)])
    assert changes(before, after) == [str(first), str(tmp_path / "b.yaml")]
    first.unlink()
    assert changes(after, snapshot([str(tmp_path)])) == [str(first)]
    # An edit that keeps the size is seen by its modification time.
    other = tmp_path / "b.yaml"
    stamp = snapshot([str(tmp_path)])
    other.write_text("c", encoding="utf-8")
    os.utime(other, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert changes(stamp, snapshot([str(tmp_path)])) == [str(other)]


def test_watch_reruns_after_a_save_and_survives_exits(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "rules.yaml"
    target.write_text("1", encoding="utf-8")
    runs: list[float] = []

    def run() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            threading.Timer(0.2, lambda: target.write_text("22", encoding="utf-8")).start()
        raise SystemExit(1)  # a failing run is reported, and the watch goes on

    watch([str(tmp_path)], run, interval=0.05, max_runs=2)
    assert len(runs) == 2
    err = capsys.readouterr().err
    assert "watching 1 file for changes (Ctrl-C stops)" in err
    assert f"changed: {target}" in err
