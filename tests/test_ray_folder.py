"""Reading an --engine ray output folder (no Ray needed): `merge` and search/dedup/cluster go through one checked
reader, so a damaged manifest or part is one line naming the file, and a folder at an S3 URL reads like a local one."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from vggembed.cli import main
from vggembed.store.recipe import Recipe

from .conftest import write_ray_folder

pytest.importorskip("pyarrow")

N, D, PART = 25, 8, 10


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for part in parts:
        assert part in lines[0], result.stderr


def make_folder(folder, seed=0):
    """N rows (row 7 failed) in 3 parts of up to PART inputs."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    errors = [None] * N
    errors[7] = "cannot decode"
    names = [f"img/{i:03d}.jpg" for i in range(N)]
    return write_ray_folder(folder, names, errors, vectors, Recipe(weights_md5="0" * 32), PART), vectors


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "parts")[0]


def every_reader(folder, tmp_path):
    """The commands that read a Ray folder, each run on it."""
    return {"merge": run("merge", folder, "-o", tmp_path / "merged.npy"),
            "dedup": run("dedup", folder),
            "cluster": run("cluster", folder, "-k", 2),
            "search": run("search", folder, "--rows", 0)}


def test_an_intact_folder_reads_alike_through_merge_and_search(folder, tmp_path):
    _, vectors = make_folder(tmp_path / "again")  # the same vectors
    assert run("merge", folder, "-o", tmp_path / "m.npy").exit_code == 0
    ok = [i for i in range(N) if i != 7]
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), vectors[ok])
    hits = list(csv.reader(io.StringIO(run("search", folder, "--rows", 0, "-k", 3).stdout)))
    assert len(hits) == 4 and hits[1][:2] == ["img/000.jpg", "1"]
    assert run("search", tmp_path / "m.npy", "--rows", 0, "-k", 3).stdout == run("search", folder, "--rows", 0,
                                                                                 "-k", 3).stdout


def without(key):
    return lambda m: json.dumps({k: v for k, v in m.items() if k != key})


@pytest.mark.parametrize("damage, message", [
    (lambda m: "{not json", "not a readable manifest (JSONDecodeError: "),
    (lambda m: json.dumps({**m, "version": 2}), "written by an older vggembed"),
    (without("recipe"), "written by an older vggembed"),
    (without("inputs"), "not a vggembed manifest"),
    (without("id"), "not a vggembed manifest"),
    (without("parts"), "not a vggembed manifest"),
    (lambda m: json.dumps({**m, "inputs": N + 1}), "parts hold 25 inputs, the manifest 26"),
], ids=["not-json", "old-version", "no-recipe", "no-inputs", "no-id", "no-parts", "other-count"])
def test_a_damaged_manifest_is_one_line_naming_it(folder, tmp_path, damage, message):
    manifest = folder / "manifest.json"
    manifest.write_text(damage(json.loads(manifest.read_text())))
    for command, result in every_reader(folder, tmp_path).items():
        where = str(folder) if "parts hold" in message else str(manifest)
        one_line_error(result, where, message)
    assert not (tmp_path / "merged.npy").exists()


def damage_a_page(path, row_group=0, column=None):
    """Overwrite the header of one data page (of the last column by default) of a Parquet file."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(row_group).column(meta.num_columns - 1 if column is None else column)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset: chunk.data_page_offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_a_part_that_is_not_parquet_is_one_line_naming_it(folder, tmp_path):
    part = folder / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: 200])  # cut short: no footer
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "not a readable part")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"], "a failed merge leaves nothing half-made"
    part.write_bytes(b"")
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "not a readable part")
    damage_a_page(folder / "part-00000.parquet")  # its footer intact
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(folder / "part-00000.parquet"), "not a readable part (OSError: ")


def test_a_parquet_part_without_its_metadata_or_columns_is_one_line(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = folder / "part-00002.parquet"
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({}), part)  # a plain Parquet file: no vggembed metadata
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "not a readable part")
    meta = {b"vggembed": table.schema.metadata[b"vggembed"]}
    pq.write_table(table.drop_columns(["error"]).replace_schema_metadata(meta), part)
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "not a readable part (no error column)")
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"vggembed": b"[1, 2]"}), part)
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "belongs to another run")


def test_a_part_of_another_run_or_place_is_one_line_naming_it(folder, tmp_path):
    other, _ = make_folder(tmp_path / "other", seed=1)
    part = folder / "part-00001.parquet"
    shutil.copy(other / "part-00001.parquet", part)  # same place, another run
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(part), "belongs to another run or place")
    fresh, _ = make_folder(tmp_path / "fresh")
    shutil.copy(fresh / "part-00000.parquet", fresh / "part-00001.parquet")  # this run, another place
    for result in every_reader(fresh, tmp_path).values():
        one_line_error(result, str(fresh / "part-00001.parquet"), "belongs to another run or place (part 0")


def test_a_missing_part_is_one_line(folder, tmp_path):
    (folder / "part-00001.parquet").unlink()
    for result in every_reader(folder, tmp_path).values():
        one_line_error(result, str(folder), "1 of 3 parts missing (first: part-00001.parquet)")


def test_a_parquet_index_damaged_inside_is_one_line_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    out = tmp_path / "feats.parquet"
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(4000 * D).astype(np.float32)), D)
    pq.write_table(pa.table({"path": [f"{i}.jpg" for i in range(4000)], "embedding": emb}), out,
                   compression="none", row_group_size=1000)
    damage_a_page(out, row_group=2, column=1)  # the footer is intact
    pq.ParquetFile(out)  # still opens: the damage shows only when the rows are read
    for result in (run("dedup", out), run("search", out, "--rows", 0), run("cluster", out, "-k", 2)):
        one_line_error(result, str(out), "not a readable Parquet file")


# ------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from .servers import S3Server

    with S3Server() as server:
        yield server


def test_a_ray_folder_in_a_bucket_is_an_index_like_a_local_one(tmp_path, s3):
    local, _ = make_folder(tmp_path / "parts")
    client = s3.client()
    client.create_bucket(Bucket="runs")
    for f in sorted(local.iterdir()):
        client.put_object(Bucket="runs", Key=f"read/{f.name}", Body=f.read_bytes())
    url = "s3://runs/read"
    for args in (["dedup", "{}", "--threshold", "0.2"], ["cluster", "{}", "-k", 3], ["search", "{}", "--rows", "0,5"]):
        at_url = run(*[url if a == "{}" else a for a in args])
        assert at_url.exit_code == 0, at_url.output
        assert at_url.stdout == run(*[local if a == "{}" else a for a in args]).stdout and at_url.stdout
    one_line_error(run("dedup", "s3://runs/none"), "s3://runs/none", "no manifest.json")
    client.put_object(Bucket="runs", Key="read/part-00000.parquet", Body=b"PAR1 cut")
    one_line_error(run("search", url, "--rows", 0), f"{url}/part-00000.parquet", "not a readable part")


def test_sweep_removes_dead_writers_temporary_files_and_nothing_else(tmp_path, s3):
    """What `--engine ray` does on --resume and at the end of every run, in a folder and in a bucket alike."""
    from vggembed.store.runfolder import RunDir, Store

    local, _ = make_folder(tmp_path / "parts")
    client = s3.client()
    client.create_bucket(Bucket="sweep")
    for f in sorted(local.iterdir()):
        client.put_object(Bucket="sweep", Key=f"run/{f.name}", Body=f.read_bytes())
    torn = [".part-00001.parquet.0123456789ab.tmp", ".manifest.json.ba9876543210.tmp"]
    kept = ["manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "notes.tmp"]
    for store in (Store(local), Store("s3://sweep/run")):
        for name in torn + ["notes.tmp"]:
            store.write(name, b"half a part")
        run_dir = RunDir(store, [f"img/{i:03d}.jpg" for i in range(N)], 3, Recipe(weights_md5="0" * 32), PART,
                         resume=True, overwrite=False)  # --resume sweeps before any actor writes
        assert store.list() == sorted(kept), store.where
        assert run_dir.done() == {0, 1, 2}
        store.write(torn[0], b"half a part")
        run_dir.sweep()  # as the end of a run does, once its actors are killed
        assert store.list() == sorted(kept), store.where
