"""--engine ray on a real multi-node Ray runtime on this machine (ray.cluster_utils.Cluster): a worker node
killed mid-run, and a driver killed mid-run then resumed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import pytest
from vggembed.net import synthetic

from .conftest import HANG, env_without_tf_noise, part_workers, wait_held, wait_until_gone
from .servers import FileServer
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


def _raylet(node) -> int:
    return node.all_processes["raylet"][0].process.pid


@pytest.fixture
def gated(folder, photos):
    """The run's inputs: the 80 images with, as input 16 (the first of part 2 with parts of 8), a URL that the
    loopback server holds until the test releases it. A run's single model actor has written parts 0 and 1,
    and no other, when the server sees that request: the test acts at a known point, whatever the load."""
    images = [str(p) for p in sorted(folder.iterdir())]
    with FileServer({"/gate.jpg": photos[3].read_bytes()}) as server:
        yield server, images[:16] + [server.url("/hold/gate.jpg")] + images[16:]
        server.release.set()


def _local(tmp_path, inputs, tiny16):
    out = tmp_path / "local.npy"
    assert run("embed", *inputs, "-o", out, "--weights", tiny16, "--batch-size", 4).exit_code == 3
    return out


PARTS = [f"part-{k:05d}.parquet" for k in range(11)]  # 81 inputs in parts of 8


def test_a_worker_node_killed_mid_run_loses_nothing(tmp_path, cluster, gated, tiny16):
    from vggembed.engines import ray as ray_engine
    from vggembed.engines.local import Options
    from vggembed.store.recipe import Recipe

    server, inputs = gated
    parts = tmp_path / "parts"
    result = {}

    def job():
        result["counts"] = ray_engine.embed(inputs, parts, Recipe(weights=str(tiny16)),
                                             Options(batch_size=4, workers=1), part_size=8, log=lambda line: None)

    thread = threading.Thread(target=job)
    thread.start()
    wait_held(server, thread.is_alive)  # the actor is inside part 2, parts 0 and 1 are written
    hosting = [node for node in cluster.worker_nodes if part_workers(_raylet(node))]
    assert len(hosting) == 1, "the model actor runs on one worker node"
    doomed = part_workers(_raylet(hosting[0]))
    cluster.remove_node(hosting[0], allow_graceful=False)  # its raylet, object store and workers die
    for pid in doomed:  # at once, as when a machine dies: its actor never gets to answer
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until_gone(doomed)
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == PARTS[:2], "the node died part way through"
    # What a writer killed mid-part leaves (the held actor was killed before writing, so put it there): an
    # ordinary run, not only --resume, must clear it once its parts are committed.
    torn = parts / ".part-00002.parquet.0123456789ab.tmp"
    torn.write_bytes((parts / "part-00000.parquet").read_bytes()[:500])
    server.release.set()
    thread.join(timeout=HANG)
    assert not thread.is_alive() and "counts" in result
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == PARTS
    assert (result["counts"].images, result["counts"].failed) == (81, 1)
    assert not list(parts.glob(".*.tmp"))
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, _local(tmp_path, inputs, tiny16))


def _no_model_actor_left(cluster) -> None:
    """Wait until the cluster has ended every model actor (a dead driver's are ended by Ray)."""
    for node in cluster.worker_nodes:
        wait_until_gone(part_workers(_raylet(node)))
    left = [part_workers(_raylet(node)) for node in cluster.worker_nodes]
    assert not any(left), f"model actors started again: {left}"


def test_a_driver_killed_mid_run_resumes_redoing_only_the_missing_parts(tmp_path, cluster, gated, tiny16):
    server, inputs = gated
    parts = tmp_path / "parts"
    args = [sys.executable, "-m", "vggembed", "embed", *inputs, "-o", str(parts), "--engine", "ray", "--address",
            cluster.address, "--weights", str(tiny16), "--batch-size", "4", "--part-size", "8", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_without_tf_noise())
    wait_held(server, lambda: proc.poll() is None)  # the actor is inside part 2, parts 0 and 1 are written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG)
    _no_model_actor_left(cluster)  # the cluster ends a dead driver's actors; none may write during the re-run
    server.release.set()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*.parquet")}
    assert sorted(kept) == PARTS[:2], "killed part way"

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=HANG,
                             env=env_without_tf_noise())
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert "; 2 of 11 parts already done" in resumed.stderr
    # Nothing of Ray's own (INFO lines, warnings, worker output) reaches the user without -v.
    assert all(line.startswith("vggembed: ") for line in resumed.stderr.splitlines()), resumed.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*.parquet")}
    assert sorted(after) == PARTS
    assert {name: after[name] for name in kept} == kept, "finished parts were left alone"
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, _local(tmp_path, inputs, tiny16))
