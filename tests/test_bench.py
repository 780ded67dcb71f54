"""scripts/bench --quick runs every contender and writes its table (speed itself is never
asserted here: it lives in the benchmark)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_its_table(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    # thumbor comes with the bench extra: small-jobs runs against it where it is installed.
    thumbor = importlib.util.find_spec("thumbor") is not None
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--work",
         str(tmp_path / "work"), "--output", str(output), "--only", "web-resize",
         "small-jobs", "one-small-job",
         # The Dask contender has tests of its own (test_cluster.py); a cluster costs seconds.
         "--contenders", "imgserver-http", "imgserver-drop", "opencv-loop", "pyvips",
         "thumbor"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    assert table.count("| imgserver-http |") == 3
    for contender in ("imgserver-drop", "opencv-loop", "pyvips"):
        assert table.count(f"| {contender} |") == 2, contender
    assert table.count("| thumbor |") == (1 if thumbor else 0)
    assert "## Targets" in table and "HTTP, the queue and the status files add" in table
    assert "the server's own share is" in table
    assert ("thumbor's rate (target ≥ 1.0×" if thumbor else "thumbor not measured") in table
    assert "mean absolute difference" in table and "libjpeg" in table


def test_bench_only_refuses_an_unknown_workload(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--work",
         str(tmp_path / "work"), "--output", str(tmp_path / "out.md"), "--only", "nothing"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no workload named nothing" in result.stderr
