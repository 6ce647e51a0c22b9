"""The benchmark scripts run and print their tables (figures are read by people, not asserted)."""

from __future__ import annotations

import os
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


def test_similarity_benchmark_prints_memory_speed_and_recall():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "similarity.py"), "--sizes", "2000,5000",
                          "--pairs-size", "2000", "--dim", "64", "--skip", "matmul,bf16", "--sklearn-sizes", "2000"],
                         capture_output=True, text=True, check=True).stdout
    table = out.split("peak RSS\n")[1].splitlines()
    assert [line.split()[0] for line in table[:2]] == ["2000", "5000"]
    assert "(1st of 2 blocks)" in table[1], "the largest size runs its first outer block only"
    assert "float32:" in out and "scikit-learn" in out and "recall@10" in out


def test_dedup_threshold_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dedup_threshold.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--weights" in out


def test_hostile_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hostile.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--side" in out and "Peak RSS" in out


def test_remote_benchmark_prints_local_beside_urls():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remote.py"), "--tiny", "--images", "8",
                          "--concurrency", "1,4", "--latency", "0.01"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "local files" in out and "URLs, 4 reads in flight" in out and "one tar shard over HTTP" in out
    assert out.rstrip().endswith("True")  # the same vectors from URLs as from the files


def test_mat_check_benchmark_prints_first_and_cached_loads():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mat_check.py"), "--tiny", "--repeat", "1"],
                         capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    rows = {line[:40].strip(): float(line[40:]) for line in out[2:]}
    assert list(rows) == ["first load (child check, then read)", "later load (verdict cached)",
                          "the check, first time (the child)", "the check, verdict cached"]
    assert all(seconds > 0 for seconds in rows.values())


def test_serve_load_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--clients" in out and "--precisions" in out and "--grpc" in out and "idle" in out


def test_startup_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--before" in out and "import tensorflow" in out


def test_multi_output_benchmark_has_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_output.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--images" in out and "one pass" in out


def test_int8_agreement_benchmark_plans_one_model_whatever_the_thread_count(tiny16, tmp_path, monkeypatch):
    """Planned on one thread or all of them, with OpenBLAS's AVX2 kernels or its own: the same int8 model, whose
    digest is the one of the model `--precision int8` caches for the same file."""
    import hashlib

    import pytest

    import vggembed
    from vggembed.net.int8 import Int8VGG, cpu_has_int8_dot

    pytest.importorskip("ai_edge_litert")
    if not cpu_has_int8_dot():
        pytest.skip("needs a CPU with VNNI/AMX")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_agreement.py"), "--weights", str(tiny16),
                          "--views", "1", "--variants", "now,one-thread,haswell,tf"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    table, digest = out.split("vs float32\n")[1].split("\n\n")
    rows = {line[:44].strip(): line[44:].split() for line in table.splitlines()}
    assert list(rows) == ["now: LiteRT and numpy, all CPUs", "now, one thread", "now, OpenBLAS's AVX2 (Haswell) kernels",
                          "scheme 2: TensorFlow, oneDNN (AVX-512 here)"]
    assert all(rows[label][1] == "identical" for label in list(rows)[:3])
    assert rows["scheme 2: TensorFlow, oneDNN (AVX-512 here)"][-4] == "identical"  # its own column
    monkeypatch.setenv("VGGEMBED_HOME", str(tmp_path))
    cached = Int8VGG(*vggembed.load_weights(tiny16)).model_bytes((("relu7", None),))
    assert digest.startswith(f"the model planned now: SHA-256 {hashlib.sha256(cached).hexdigest()} (LiteRT ")


def test_measure_counts_the_commands_memory_and_none_of_ours(monkeypatch):
    """Linux starts a child's ru_maxrss at its parent's size: a benchmark holding 400 MB would report 400 MB for
    `vggembed --help`. measure.py's launcher reports the command's own peak, its children's included."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from measure import measure

    ballast = b"x" * (400 << 20)
    plain = subprocess.Popen([sys.executable, "-c", "pass"])
    assert os.wait4(plain.pid, 0)[2].ru_maxrss / 1024 > 400  # the trap measure.py avoids
    small = measure([sys.executable, "-c", "pass"])
    assert small.returncode == 0 and small.peak_mib < 100 and small.wall > 0 and small.cpu > 0
    grandchild = measure([sys.executable, "-c", "import subprocess, sys; "
                          "sys.exit(subprocess.run([sys.executable, '-c', 'b = b\"x\" * (200 << 20)']).returncode)"])
    assert grandchild.returncode == 0 and 200 < grandchild.peak_mib < 350
    assert measure([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]).returncode == -9
    assert measure([sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    del ballast


def test_report_benchmark_prints_page_size_and_paint_times():
    from .browser import CHROMIUM

    if CHROMIUM is None:
        import pytest

        pytest.skip("no chromium: apt-get install chromium (as .ci/run does)")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--sizes", "100,300", "--repeat",
                          "1", "--chromium", CHROMIUM], capture_output=True, text=True, check=True,
                         timeout=300).stdout.splitlines()
    header = out.index(next(line for line in out if line.split()[:1] == ["images"]))
    assert [line.split()[0] for line in out[header + 1:]] == ["100", "300"]
    assert "FCP" in out[header] and "rows ready" in out[header]


def test_audit_benchmark_prints_time_memory_and_recall():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "audit.py"), "--sizes", "600", "--dim", "64",
                          "--classes", "5", "--methods", "knn"], capture_output=True, text=True, check=True,
                         timeout=300).stdout.splitlines()
    assert out[0].split()[:3] == ["vectors", "probabilities", "seconds"] and "recall@planted" in out[0]
    assert out[1].split()[:2] == ["600", "knn"] and 0 <= float(out[1].split()[7]) <= 1


def test_audit_benchmark_digits_part_prints_recall_beside_cleanlab(tiny16):
    """The digits part, on 200 of the images and tiny weights: the audit run as a user runs it, its recall, and
    cleanlab's row (a figure, or a dash where cleanlab is not installed)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "audit.py"), "--part", "digits", "--images", "200",
                          "--weights", str(tiny16)], capture_output=True, text=True, check=True,
                         timeout=300).stdout.splitlines()
    assert out[0].startswith("digits: 200 images of 10 classes, 10 (5%) moved to a wrong class's folder")
    rows = {line[:52].strip(): line[52:].split() for line in out if line.startswith("    ")}
    assert 0 <= float(rows["vggembed audit (self-confidence + neighbours)"][0]) <= 1
    cleanlab = next(v for k, v in rows.items() if k.startswith("cleanlab find_label_issues"))
    assert cleanlab[0] == "-" or 0 <= float(cleanlab[0]) <= 1
    assert out[-1].startswith("vggembed audit's whole run: ")


def test_train_benchmark_prints_vggembed_beside_scikit_learn():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--part", "large", "--rows", "2000",
                          "--dim", "32", "--classes", "4"], capture_output=True, text=True, check=True).stdout
    rows = {line.strip().split("  ")[0]: line for line in out.splitlines()}
    assert out.startswith("(b) 2,000 x 32 float32")
    assert "vggembed train (sweep + 5 folds + head to 1e-5)" in rows
    assert "scikit-learn: one lbfgs fit, tol 0.0001" in out and "scikit-learn: one lbfgs fit, tol 1e-05" in out
    assert "scikit-learn: 5 folds + final, tol 1e-4, no sweep" in out  # the work of vggembed's run
    theirs = float(out.split("scikit-learn's 5 folds (tol 1e-4, no sweep) ")[1].split()[0])
    assert 0.3 < theirs <= 1  # out-of-fold top-1 of 4 seeded classes, above chance (0.25)
    gaps = [float(line.split()[-1]) for line in out.splitlines()
            if line.startswith(("    vggembed train (", "    scikit-learn: one lbfgs fit"))]
    assert len(gaps) == 3 and min(gaps) == 0 and max(gaps) < 1e-3  # one objective, each fit near its minimum
    agree = float(out.split("predicts as scikit-learn's for ")[1].split("%")[0])
    assert agree > 99  # the same objective at the same C
