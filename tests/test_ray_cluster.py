"""--engine ray on a real multi-node Ray runtime on this machine (ray.cluster_utils.Cluster): a worker node
killed mid-run, and a driver killed mid-run then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from vggembed.net import synthetic

from .conftest import env_without_tf_noise
from .test_ray import assert_same_outputs, run

ray = pytest.importorskip("ray")


@pytest.fixture
def cluster():
    """A head node without CPUs (the driver's) and two worker nodes of one CPU each: one model actor fits on
    either worker node, so it has somewhere to go when its node dies. One cluster per test, so that nothing
    of one test's run (a restarted actor) is still there in the next."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("clusterimgs")
    paths = synthetic.photo_crops(photos[1], root, 80, size=(40, 30), suffix=".jpg")
    paths[13].write_bytes(b"not an image")
    return root


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _actor_processes(node) -> list[str]:
    """The model actors' processes under a node's raylet."""
    found = []
    for pid in _children(node.all_processes["raylet"][0].process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"ray::PartWorker" in cmdline:
            found.append(f"{pid} {cmdline[:80]!r}")
    return found


def _has_model_actor(node) -> bool:
    return bool(_actor_processes(node))


def _wait_for_parts(parts: Path, n: int, alive, timeout=180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and alive() and len(list(parts.glob("part-*.parquet"))) < n:
        time.sleep(0.02)


def _local(tmp_path, folder, tiny16):
    out = tmp_path / "local.npy"
    assert run("embed", folder, "-o", out, "--weights", tiny16, "--batch-size", 4).exit_code == 3
    return out


def test_a_worker_node_killed_mid_run_loses_nothing(tmp_path, cluster, folder, tiny16):
    from vggembed.engines import ray as ray_engine
    from vggembed.images.inputs import expand
    from vggembed.store.recipe import Recipe
    from vggembed.engines.local import Options

    parts = tmp_path / "parts"
    result = {}

    def job():
        result["counts"] = ray_engine.embed(list(expand([str(folder)])), parts, Recipe(weights=str(tiny16)),
                                             Options(batch_size=4, workers=1), part_size=8, log=lambda line: None)

    thread = threading.Thread(target=job)
    thread.start()
    _wait_for_parts(parts, 1, thread.is_alive)
    hosting = [node for node in cluster.worker_nodes if _has_model_actor(node)]
    assert len(hosting) == 1, "the model actor runs on one worker node"
    before = len(list(parts.glob("part-*.parquet")))
    cluster.remove_node(hosting[0], allow_graceful=False)  # its raylet, object store and workers die
    thread.join(timeout=300)
    assert 1 <= before < 10, "the node died part way through the run"
    assert not thread.is_alive() and "counts" in result
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-{k:05d}.parquet" for k in range(10)]
    assert (result["counts"].images, result["counts"].failed) == (80, 1)
    assert not list(parts.glob(".*.tmp"))
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, _local(tmp_path, folder, tiny16))


def _no_model_actor_left(cluster, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_has_model_actor(node) for node in cluster.worker_nodes):
        time.sleep(0.1)
    left = [_actor_processes(node) for node in cluster.worker_nodes]
    assert not any(left), f"model actors still running after {timeout}s: {left}"


def test_a_driver_killed_mid_run_resumes_redoing_only_the_missing_parts(tmp_path, cluster, folder, tiny16):
    parts = tmp_path / "parts"
    args = [sys.executable, "-m", "vggembed", "embed", str(folder), "-o", str(parts), "--engine", "ray",
            "--address", cluster.address, "--weights", str(tiny16), "--batch-size", "4", "--part-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_without_tf_noise())
    _wait_for_parts(parts, 2, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _no_model_actor_left(cluster)  # the cluster ends a dead driver's actors; none may write during the re-run
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*.parquet")}
    assert 2 <= len(kept) < 10, "killed part way"

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300,
                             env=env_without_tf_noise())
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert f"; {len(kept)} of 10 parts already done" in resumed.stderr
    # Nothing of Ray's own (INFO lines, warnings, worker output) reaches the user without -v.
    assert all(line.startswith("vggembed: ") for line in resumed.stderr.splitlines()), resumed.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*.parquet")}
    assert sorted(after) == [f"part-{k:05d}.parquet" for k in range(10)]
    assert {name: after[name] for name in kept} == kept, "finished parts were left alone"
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, _local(tmp_path, folder, tiny16))
