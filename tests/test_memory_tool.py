"""`python -m benchmarks.memory` (benchmarks/README.md, "Where a connection's memory
goes") works: a small run, for real, prints its per-connection report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_memory_tool_reports_per_connection() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--connections", "20", "--top", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("20 connections (ws, history, in-process broker)"), lines
    assert any(line.startswith("Python heap (tracemalloc): ") for line in lines), lines
    assert "bytes/conn" in done.stdout
