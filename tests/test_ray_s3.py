"""--engine ray writing its parts into an S3 bucket (moto's S3-compatible server on 127.0.0.1), merged back
from the bucket's URL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from vggembed.net import synthetic

from .conftest import HANG, env_without_tf_noise
from .test_ray import read_csv, run

pytest.importorskip("ray")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "vggembed-test"


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint on loopback with fake credentials; the environment that points clients at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_a_ray_run_from_a_bucket_into_a_bucket_merges_from_its_url(tmp_path, s3, photos, tiny16):
    """Images listed by the driver and read by the actors from S3, parts written into S3, merged from S3:
    the vectors of the same images as local files."""
    import numpy as np
    import s3fs

    folder = tmp_path / "imgs"
    paths = synthetic.photo_crops(photos[3], folder, 20, size=(40, 30), suffix=".jpg")
    paths[-1].write_bytes(b"")
    fs = s3fs.S3FileSystem()
    fs.put([str(p) for p in paths], f"{BUCKET}/imgs/")
    url = f"s3://{BUCKET}/runs/first"
    proc = subprocess.run([sys.executable, "-m", "vggembed", "embed", f"s3://{BUCKET}/imgs/", "-o", url,
                           "--engine", "ray", "--weights", str(tiny16), "--batch-size", "4", "--part-size", "8"],
                          capture_output=True, text=True, timeout=HANG, env={**env_without_tf_noise(), **s3},
                          check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "embedded 19 of 20 images on Ray" in proc.stderr
    assert all(line.startswith("vggembed: ") for line in proc.stderr.splitlines()), proc.stderr  # no Ray noise

    fs.invalidate_cache()
    assert sorted(fs.ls(f"{BUCKET}/runs/first", detail=False)) == [
        f"{BUCKET}/runs/first/{n}" for n in ("manifest.json", "part-00000.parquet", "part-00001.parquet",
                                             "part-00002.parquet")]
    merged = tmp_path / "merged.npy"
    result = run("merge", url, "-o", merged)
    assert result.exit_code == 0, result.output
    local = tmp_path / "local.npy"
    assert run("embed", folder, "-o", local, "--weights", tiny16, "--batch-size", 4).exit_code == 3
    np.testing.assert_array_equal(np.load(merged), np.load(local))
    assert [row[0] for row in read_csv(f"{merged}.index.csv")[1:]] == [f"s3://{BUCKET}/imgs/{p.name}" for p in paths]
    assert [row[1:] for row in read_csv(f"{merged}.index.csv")] == [row[1:] for row in read_csv(f"{local}.index.csv")]

    nothing = run("merge", f"s3://{BUCKET}/runs/none", "-o", tmp_path / "x.npy")
    assert nothing.exit_code == 1
    assert f"s3://{BUCKET}/runs/none: no manifest.json; not an --engine ray output folder" in nothing.stderr
