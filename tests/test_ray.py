"""--engine ray on a real local Ray runtime: identical to the local engine, bad images as rows, resume."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from vggembed import synthetic
from vggembed.cli import main

from .conftest import interruptible

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """240 small real-photo crops with bad images among them."""
    root = tmp_path_factory.mktemp("rayimgs")
    paths = synthetic.photo_crops(photos[2], root, 240, size=(40, 30), suffix=".jpg")
    paths[5].write_bytes(b"")
    paths[100].write_text("not an image")
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def local_reference(tmp_path, folder, weights):
    out = tmp_path / "local.npy"
    result = run("embed", folder, "-o", out, "--weights", weights, "--batch-size", 8)
    assert result.exit_code == 3
    return out


def assert_same_outputs(merged: Path, local: Path):
    np.testing.assert_array_equal(np.load(merged), np.load(local))
    assert read_csv(f"{merged}.index.csv") == read_csv(f"{local}.index.csv")
    assert read_csv(f"{merged}.errors.csv") == read_csv(f"{local}.errors.csv")


def test_ray_engine_equals_local_engine(tmp_path, ray_runtime, folder, tiny16):
    parts = tmp_path / "parts"
    result = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8,
                 "--part-size", 50)
    assert result.exit_code == 3, result.output  # two bad images: completed with failures
    assert "embedded 238 of 240 images on Ray" in result.stderr
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["inputs"] == 240 and manifest["parts"] == 5
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-0000{k}.parquet" for k in range(5)]

    import pyarrow.parquet as pq

    shard = pq.read_table(parts / "part-00000.parquet")
    assert shard.column_names == ["id", "path", "status", "error", "embedding"]
    assert shard["id"].to_pylist() == list(range(50))
    assert shard["status"][5].as_py() == "error" and shard["error"][5].as_py() == "empty file (0 bytes)"
    assert shard["embedding"][5].as_py() is None

    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, folder, tiny16))

    again = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8)
    assert again.exit_code == 1 and "pass --resume" in again.stderr


def test_interrupted_ray_run_resumes_to_the_same_result(tmp_path, ray_runtime, folder, tiny16):
    parts = tmp_path / "parts"
    args = [sys.executable, "-m", "vggembed", "embed", str(folder), "-o", str(parts), "--engine", "ray",
            "--weights", str(tiny16), "--batch-size", "8", "--workers", "1", "--part-size", "20"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)
    deadline = time.time() + 180
    while time.time() < deadline and not list(parts.glob("part-*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    done_before = len(list(parts.glob("part-*.parquet")))
    assert 1 <= done_before < 12, "interrupted part way"

    merged = tmp_path / "early.npy"
    early = run("merge", parts, "-o", merged)
    assert early.exit_code == 1 and "parts missing" in early.stderr and "--resume" in early.stderr

    resumed = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8,
                  "--workers", 1, "--part-size", 20, "--resume")
    assert resumed.exit_code == 3, resumed.output
    assert f"{done_before * 20} already done" in resumed.stderr
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, folder, tiny16))


def test_more_actors_than_cpus_is_refused_not_hung(tmp_path, ray_runtime, folder, tiny16):
    result = run("embed", folder, "-o", tmp_path / "p", "--engine", "ray", "--weights", tiny16, "--workers", 2)
    assert result.exit_code == 1
    assert "the Ray cluster has 2 CPUs: 2 model actors (1 CPU each) leave none for decoding; use --workers 1" \
        in result.stderr


def test_resume_with_other_options_is_refused(tmp_path, ray_runtime, folder, tiny16):
    parts = tmp_path / "parts"
    files = sorted(folder.iterdir())[:10]
    assert run("embed", *files, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 4
               ).exit_code == 3
    other = run("embed", *files, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 4,
                "--layer", "fc1", "--resume")
    assert other.exit_code == 1
    assert f"{parts}: the earlier run was made with another recipe (layer: 'relu6' vs 'relu7')" in other.stderr


def test_a_model_actor_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path, ray_runtime, folder, tiny16):
    import os
    import threading

    from vggembed import distributed
    from vggembed.inputs import expand
    from vggembed.recipe import Recipe
    from vggembed.runner import Options

    parts = tmp_path / "parts"
    paths = [source.name for source in expand([str(folder)])]
    result = {}

    def job():
        result["counts"] = distributed.embed(paths, parts, Recipe(weights=str(tiny16)), Options(batch_size=8, workers=1),
                                             part_size=20, log=lambda line: None)

    thread = threading.Thread(target=job)
    thread.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and thread.is_alive():
        if list(parts.glob("part-*.parquet")):
            pids = subprocess.run(["pgrep", "-f", r"MapBatches\(Embedder\)"], capture_output=True, text=True)
            if pids.stdout.split():
                killed = int(pids.stdout.split()[0])
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed is not None and len(list(parts.glob("part-*.parquet"))) == 12
    assert result["counts"]["failed"] == 2
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, folder, tiny16))
