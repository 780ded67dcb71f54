"""scripts/bench --quick runs every contender and writes its table (speed itself is never
asserted here: it lives in the benchmark)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_its_table(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--work",
         str(tmp_path / "work"), "--output", str(output), "--only", "web-resize", "latency",
         # The Dask contender has tests of its own (test_cluster.py); a cluster costs seconds.
         "--contenders", "imgserver-http", "imgserver-drop", "opencv-loop", "pyvips"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    for contender in ("imgserver-http", "imgserver-drop", "opencv-loop", "pyvips"):
        assert table.count(f"| {contender} |") == 2, contender
    assert "## Targets" in table and "HTTP, the queue and the status files add" in table
    assert "mean absolute difference" in table and "libjpeg" in table
