"""The benchmark scripts run and print their tables (figures are read by people, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_benchmark_prints_a_row_per_count():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--counts", "10,30"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split() == ["images", "seconds", "images/s", "peak", "RSS", "MiB"]
    assert [line.split()[0] for line in out[1:]] == ["10", "30"]
    assert all(float(line.split()[-1]) > 0 for line in out[1:])


def test_throughput_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--batch-sizes" in out and "Keras" in out


def test_hostile_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hostile.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--side" in out and "Peak RSS" in out
