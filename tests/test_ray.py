"""--engine ray on a real local Ray runtime: identical to the local engine, bad images as rows, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from vggembed.net import synthetic
from vggembed.cli import main

from .conftest import HANG, env_without_tf_noise, interruptible, part_workers, wait_held, wait_until_gone
from .servers import FileServer

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_runtime():
    """A runtime of 2 CPUs, whatever the machine: in-process runs on it pass --workers 2 (or fewer), since the
    default (one actor per core, up to 8) would not fit on a bigger machine."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def local_reference(tmp_path, inputs, weights):
    out = tmp_path / "local.npy"
    result = run("embed", *inputs, "-o", out, "--weights", weights, "--batch-size", 8)
    assert result.exit_code == 3
    return out


@pytest.fixture
def gated(folder, photos):
    """The folder's 240 images with, as input 20 (the first of part 1 with parts of 20), a URL that the
    loopback server holds until the test releases it: when the server sees that request, a run's single
    model actor has written part 0 and no other, whatever the machine's load."""
    images = [str(p) for p in sorted(folder.iterdir())]
    with FileServer({"/gate.jpg": photos[3].read_bytes()}) as server:
        yield server, images[:20] + [server.url("/hold/gate.jpg")] + images[20:]
        server.release.set()


def assert_same_outputs(merged: Path, local: Path):
    np.testing.assert_array_equal(np.load(merged), np.load(local))
    assert read_csv(f"{merged}.index.csv") == read_csv(f"{local}.index.csv")
    assert read_csv(f"{merged}.errors.csv") == read_csv(f"{local}.errors.csv")


def test_ray_engine_equals_local_engine(tmp_path, ray_runtime, folder, tiny16):
    parts = tmp_path / "parts"
    result = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8,
                 "--part-size", 50, "--workers", 2)
    assert result.exit_code == 3, result.output  # two bad images: completed with failures
    assert "embedded 238 of 240 images on Ray" in result.stderr
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["inputs"] == 240 and manifest["parts"] == 5
    assert manifest["recipe"]["weights"] == tiny16.name and manifest["recipe"]["outputs"] == [
        {"name": "fc2", "layer": "relu7", "pool": None}]
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json"] + [f"part-0000{k}.parquet" for k in range(5)]

    import pyarrow.parquet as pq

    shard = pq.read_table(parts / "part-00000.parquet")
    assert shard.column_names == ["path", "path_bytes", "status", "error", "fc2"]
    assert shard["path"].to_pylist() == [str(p) for p in sorted(folder.iterdir())[:50]]
    assert shard["status"][5].as_py() == "error" and shard["error"][5].as_py() == "empty file (0 bytes)"
    assert shard["fc2"][5].as_py() is None
    meta = json.loads(shard.schema.metadata[b"vggembed"])
    assert (meta["part"], meta["first"], meta["inputs"], meta["failed"]) == (0, 0, 50, 1)
    assert meta["recipe"] == manifest["recipe"] and meta["run"] == manifest["id"]

    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, [folder], tiny16))

    again = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8,
                "--workers", 2)
    assert again.exit_code == 1 and "pass --resume" in again.stderr


def test_interrupted_ray_run_resumes_to_the_same_result(tmp_path, ray_runtime, gated, tiny16):
    server, inputs = gated
    parts = tmp_path / "parts"
    args = [sys.executable, "-m", "vggembed", "embed", *inputs, "-o", str(parts), "--engine", "ray",
            "--weights", str(tiny16), "--batch-size", "8", "--workers", "1", "--part-size", "20"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)
    wait_held(server, lambda: proc.poll() is None)  # its actor is inside part 1, part 0 is written
    actors = part_workers(proc.pid)  # of the runtime this run started, and no other
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=HANG)
    wait_until_gone(actors)  # none may write during what follows
    server.release.set()
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == ["part-00000.parquet"], "interrupted part way"

    merged = tmp_path / "early.npy"
    early = run("merge", parts, "-o", merged)
    assert early.exit_code == 1 and "parts missing" in early.stderr and "--resume" in early.stderr

    # What a writer killed mid-part leaves: a hidden temporary file, never a part under its final name.
    torn = parts / ".part-00011.parquet.0123456789ab.tmp"
    torn.write_bytes((parts / "part-00000.parquet").read_bytes()[:500])
    assert "parts missing" in run("merge", parts, "-o", merged).stderr

    resumed = run("embed", *inputs, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 8,
                  "--workers", 1, "--part-size", 20, "--resume")
    assert resumed.exit_code == 3, resumed.output
    assert "; 1 of 13 parts already done" in resumed.stderr
    assert not torn.exists() and not list(parts.glob(".*"))
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, inputs, tiny16))


def test_more_actors_than_cpus_is_refused_not_hung(tmp_path, ray_runtime, folder, tiny16):
    result = run("embed", folder, "-o", tmp_path / "p", "--engine", "ray", "--weights", tiny16, "--workers", 3)
    assert result.exit_code == 1
    assert "the Ray cluster has 2 CPUs and each model actor needs 1: use --workers 2" in result.stderr


def test_an_output_that_is_a_file_is_one_line_before_ray_starts(tmp_path, folder, tiny16):
    out = tmp_path / "feats.npy"
    out.write_bytes(b"x")
    result = run("embed", folder, "-o", out, "--engine", "ray", "--weights", tiny16)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: not a folder; --engine ray writes a folder of parts (name a new one)\n"
    assert out.read_bytes() == b"x"


def test_resume_with_other_options_is_refused(tmp_path, ray_runtime, folder, tiny16):
    parts = tmp_path / "parts"
    files = sorted(folder.iterdir())[:10]
    assert run("embed", *files, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 4,
               "--workers", 2).exit_code == 3
    other = run("embed", *files, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 4,
                "--layer", "fc1", "--resume", "--workers", 2)
    assert other.exit_code == 1
    assert f"{parts}: the earlier run was made with another recipe (outputs: fc1 (relu6) vs fc2 (relu7))" in other.stderr


def test_a_model_actor_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path, ray_runtime, gated, tiny16):
    import threading

    from vggembed.engines import ray as ray_engine
    from vggembed.engines.local import Options
    from vggembed.store.recipe import Recipe

    server, inputs = gated
    parts = tmp_path / "parts"
    result = {}

    def job():
        result["counts"] = ray_engine.embed(inputs, parts, Recipe(weights=str(tiny16)),
                                             Options(batch_size=8, workers=1), part_size=20, log=lambda line: None)

    thread = threading.Thread(target=job)
    thread.start()
    wait_held(server, thread.is_alive)  # the actor is inside part 1, part 0 is written
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    actors = part_workers(raylet)  # this runtime's, and no other process on the machine
    assert len(actors) == 1
    os.kill(actors[0], signal.SIGKILL)
    wait_until_gone(actors)
    server.release.set()
    thread.join(timeout=HANG)
    assert not thread.is_alive() and "counts" in result
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-{k:05d}.parquet" for k in range(13)]
    assert (result["counts"].images, result["counts"].failed) == (241, 2)
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert_same_outputs(merged, local_reference(tmp_path, inputs, tiny16))


def test_batches_and_parts_where_every_image_failed_are_rows_like_any_other(tmp_path, photos, tiny16):
    """Good images, then broken ones: whole batches and a whole part fail. Ray started by the CLI itself,
    with -v, to see that no actor keeps its constructor arguments in the object store (restarts need them)."""
    folder = tmp_path / "imgs"
    paths = synthetic.photo_crops(photos[0], folder, 30, size=(40, 30), suffix=".jpg")
    for p in paths[20:]:
        p.write_bytes(b"\xff\xd8 broken")
    parts = tmp_path / "parts"
    proc = subprocess.run([sys.executable, "-m", "vggembed", "-v", "embed", str(folder), "-o", str(parts), "--engine",
                           "ray", "--weights", str(tiny16), "--batch-size", "4", "--part-size", "8"],
                          capture_output=True, text=True, timeout=HANG, env=env_without_tf_noise())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "embedded 20 of 30 images on Ray" in proc.stderr and "; 10 failed" in proc.stderr
    assert "constructor arguments in the object store" not in proc.stderr

    import pyarrow.parquet as pq

    last = pq.read_table(parts / "part-00003.parquet")  # inputs 24..29: all broken
    assert last["status"].to_pylist() == ["error"] * 6 and last["fc2"].null_count == 6
    assert last.schema.field("fc2").type.list_size == 32  # the layer's width even without a vector
    merged = tmp_path / "merged.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    local = tmp_path / "local.npy"
    assert run("embed", folder, "-o", local, "--weights", tiny16, "--batch-size", 4).exit_code == 3
    assert_same_outputs(merged, local)
    assert len(read_csv(f"{merged}.errors.csv")) == 11


def _shard(path: Path, files: list[Path], cut: int | None = None) -> Path:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            tar.add(f, arcname=f"x/{f.name}")
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)
    return path


def test_parts_follow_tar_shards_and_resume_redoes_only_the_missing_shard(tmp_path, ray_runtime, folder, tiny16):
    files = sorted(folder.iterdir())
    a = _shard(tmp_path / "a.tar", files[:10])
    b = _shard(tmp_path / "b.tar", files[98:106])  # holds the "not an image" file
    c = _shard(tmp_path / "c.tar", files[20:26], cut=4000)  # truncated inside its members
    inputs = [a, *files[10:15], b, c]
    parts = tmp_path / "parts"
    args = ["embed", *inputs, "-o", parts, "--engine", "ray", "--weights", tiny16, "--batch-size", 4,
            "--part-size", 4, "--workers", 2]
    first = run(*args)
    assert first.exit_code == 3, first.output
    names = [f"part-0000{k}.parquet" for k in range(5)]  # a.tar | 4 files | 1 file | b.tar | c.tar
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == names

    import pyarrow.parquet as pq

    assert pq.read_table(parts / names[0])["path"].to_pylist() == [f"{a}/x/{f.name}" for f in files[:10]]
    assert pq.read_table(parts / names[3]).num_rows == 8
    merged, local = tmp_path / "merged.npy", tmp_path / "local.npy"
    assert run("merge", parts, "-o", merged).exit_code == 0
    assert run("embed", *inputs, "-o", local, "--weights", tiny16, "--batch-size", 4).exit_code == 3
    assert_same_outputs(merged, local)

    kept = {n: ((parts / n).stat().st_ino, (parts / n).stat().st_mtime_ns) for n in names if n != names[3]}
    (parts / names[3]).unlink()
    again = run(*args, "--resume")
    assert again.exit_code == 3 and "; 4 of 5 parts already done" in again.stderr
    assert "embedded 7 of 8 images on Ray" in again.stderr  # b.tar only
    assert {n: ((parts / n).stat().st_ino, (parts / n).stat().st_mtime_ns) for n in kept} == kept
    assert run("merge", parts, "-o", merged, "--overwrite").exit_code == 0
    assert_same_outputs(merged, local)


def test_several_outputs_and_classify_on_ray_equal_the_local_engine(tmp_path, ray_runtime, folder, tiny16):
    outputs = ["--layer", "fc2,pool5:avg", "--top", 3, "--batch-size", 8]
    parts = tmp_path / "parts"
    result = run("embed", folder, "-o", parts, "--engine", "ray", "--weights", tiny16, *outputs, "--part-size", 100)
    assert result.exit_code == 3, result.output

    import pyarrow.parquet as pq

    shard = pq.read_table(parts / "part-00000.parquet")
    assert shard.column_names == ["path", "path_bytes", "status", "error", "fc2", "pool5_avg", "top_index",
                                  "top_prob", "top_label"]
    assert shard["top_label"][5].as_py() is None and shard["top_label"][0].as_py()[0].startswith("class ")

    local = tmp_path / "local.npz"
    assert run("embed", folder, "-o", local, "--weights", tiny16, *outputs).exit_code == 3
    merged = tmp_path / "merged.npz"
    assert run("merge", parts, "-o", merged).exit_code == 0
    with np.load(merged) as got, np.load(local) as want:
        assert got.files == want.files == ["fc2", "pool5_avg", "top_index", "top_prob", "top_label"]
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert read_csv(f"{merged}.index.csv") == read_csv(f"{local}.index.csv")
    assert read_csv(f"{merged}.errors.csv") == read_csv(f"{local}.errors.csv")

    # classify --engine ray: the same predictions, merged into Parquet
    preds = tmp_path / "preds"
    assert run("classify", folder, "-o", preds, "--engine", "ray", "--weights", tiny16, "--top", 3,
               "--batch-size", 8, "--part-size", 120).exit_code == 3
    assert run("merge", preds, "-o", tmp_path / "preds.parquet").exit_code == 0
    table = pq.read_table(tmp_path / "preds.parquet")
    assert table.column_names == ["path", "path_bytes", "top_index", "top_prob", "top_label"]
    with np.load(local) as want:
        for name in ("top_index", "top_prob", "top_label"):
            np.testing.assert_array_equal(np.array(table[name].to_pylist()), want[name], err_msg=name)


def test_classify_with_a_head_on_ray_equals_the_local_engine_after_merge(tmp_path, ray_runtime, folder, tiny16):
    images = sorted(str(p) for p in folder.iterdir())
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows((p, "early" if i < 120 else "late") for i, p in enumerate(images))
    head = tmp_path / "head.npz"  # trained on Ray too: the features are a run folder, read back as vectors
    result = run("train", folder, "--labels", labels, "-o", head, "--weights", tiny16, "--C", 1, "--engine", "ray",
                 "--part-size", 100)
    assert result.exit_code == 3, result.output
    assert (tmp_path / "head.features" / "manifest.json").is_file()
    assert json.loads((tmp_path / "head.metrics.json").read_text())["trained"] == 238  # 2 of 240 failed
    # audit embeds on Ray the same way, into OUT/features, and audits the 238 that were read
    audited = run("audit", folder, "--labels", labels, "-o", tmp_path / "audit", "--weights", tiny16, "--engine",
                  "ray", "--part-size", 100)
    assert audited.exit_code == 3, audited.output
    assert "note: 2 images failed when embedded and are not audited" in audited.stderr
    assert (tmp_path / "audit" / "features" / "manifest.json").is_file()
    with np.load(tmp_path / "audit" / "probabilities.npz") as z:
        assert len(z["paths"]) == 238 and set(z["paths"].tolist()) <= set(images)
    assert (tmp_path / "audit" / "report" / "index.html").is_file()
    local = tmp_path / "local.npz"
    assert run("classify", folder, "--head", head, "-o", local, "--weights", tiny16, "--batch-size", 8).exit_code == 3
    parts = tmp_path / "parts"
    result = run("classify", folder, "--head", head, "-o", parts, "--engine", "ray", "--weights", tiny16,
                 "--batch-size", 8, "--part-size", 120)
    assert result.exit_code == 3, result.output
    merged = tmp_path / "merged.npz"
    assert run("merge", parts, "-o", merged).exit_code == 0
    with np.load(merged) as got, np.load(local) as want:
        assert set(want["top_label"].ravel()) == {"early", "late"}
        for name in ("top_index", "top_prob", "top_label"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert read_csv(f"{merged}.index.csv") == read_csv(f"{local}.index.csv")
