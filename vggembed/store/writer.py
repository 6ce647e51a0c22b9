"""Write embeddings as they are computed, so that nothing is lost and nothing looks complete too early.

While a run is going, vectors go to `OUT.partial` (an .npy file whose header
is rewritten at the end) and one line per input, in input order, to
`OUT.index.csv.partial` (path, row, error). Each batch's vectors are flushed
before its index lines, so the index never names a row that is not on disk.
At the end the final files are made from those two and renamed into place,
`OUT` last:

- `OUT` (.npy, .csv or .parquet): the vectors, one row per image that worked;
- `OUT.index.csv`: every input in order with its row, or its error;
- `OUT.errors.csv`: path and error of each image that failed;
- the recipe (`recipe.Recipe`) and row counts: `OUT.meta.json` beside `.npy`
  and `.csv`, the Parquet file's schema metadata (key `vggembed`) for `.parquet`.

An interrupted run leaves only `.partial` files; `--resume` truncates them to
the last complete batch and carries on from there (and does nothing, without
error, when `OUT` is already complete).

While it writes, the writer holds the output's `destination.Destination`: one
run at a time per output (`OUT.lock`), and every OSError met on disk (full,
read-only, not a folder, no permission) raised as one `OutputError` line.

Names are written exactly: the CSV files as UTF-8 with surrogateescape (a
name's own bytes, as `find` prints them); Parquet, whose strings must be
valid UTF-8, as `path_columns` describes.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import io
import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import VGGEmbedError, display
from .destination import Destination, replacing
from .recipe import Recipe, meta_json, read_meta

FORMATS = {".npy": "npy", ".csv": "csv", ".parquet": "parquet"}
PARQUET_META_KEY = b"vggembed"  # schema metadata: the same JSON as OUT.meta.json
HEADER_BYTES = 128  # a fixed-size .npy header, so the row count can be rewritten in place
INDEX_FIELDS = ["path", "row", "error"]
TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}  # how CSV files hold names


def output_format(path: Path) -> str:
    if path.is_dir():
        raise VGGEmbedError(f"{path}: is a folder; name an output file (a folder is for --engine ray)")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise VGGEmbedError(f"{path}: unknown output format {path.suffix!r}; use .npy, .csv or .parquet")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise VGGEmbedError(f'{path}: Parquet output needs pyarrow: pip install "vggembed[parquet]"')
    return fmt


def sidecars(out: Path) -> dict[str, Path]:
    return {
        "index": out.with_name(out.name + ".index.csv"),
        "errors": out.with_name(out.name + ".errors.csv"),
        "data_partial": out.with_name(out.name + ".partial"),
        "index_partial": out.with_name(out.name + ".index.csv.partial"),
        "meta": out.with_name(out.name + ".meta.json"),
        "meta_partial": out.with_name(out.name + ".meta.json.partial"),
    }


def npy_header(rows: int, dim: int, dtype) -> bytes:
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (np.dtype(dtype).str, rows, dim)
    d = d.ljust(HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def path_columns(paths) -> dict:
    """The Parquet columns that hold `paths` losslessly: `path` (string) and `path_bytes` (binary).

    `path` is the name for display, exact when it is valid UTF-8, else with its
    other bytes as \\xNN (as our messages show names); `path_bytes` is null then,
    and holds the name's exact bytes otherwise. `table_paths` reads them back.
    """
    import pyarrow as pa

    shown, raw = [], []
    for p in paths:
        shown.append(display(p))
        b = os.fsencode(p)
        try:
            b.decode("utf-8")
            raw.append(None)
        except UnicodeDecodeError:
            raw.append(b)
    return {"path": pa.array(shown, pa.string()), "path_bytes": pa.array(raw, pa.binary())}


def table_paths(table) -> list[str]:
    """The paths of a Parquet table written with `path_columns` (or with only `path`), as os.fsdecode gives them."""
    shown = table["path"].to_pylist()
    if "path_bytes" not in table.column_names:
        return shown
    return [s if b is None else os.fsdecode(b) for s, b in zip(shown, table["path_bytes"].to_pylist())]


def _guarded(method):
    """Run a writer method with OS errors said as one OutputError naming the output."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.dest.writing():
            return method(self, *args, **kwargs)

    return run


class EmbeddingWriter:
    """Stage vectors and the row index; finish into the requested format.

    Args:
        out: the final output path; its extension picks the format.
        resume: continue the `.partial` files of an interrupted run.
        overwrite: replace an existing output (and discard partial files).

    The output is claimed (locked against other runs) and its state checked
    at once, before a model is loaded; `complete` is then True when `resume`
    finds a finished output, with nothing left to do. The staged files are
    opened by `begin(recipe)`, which refuses to resume a run made with another
    recipe. `close()` (or leaving a `with` block) releases the output.
    """

    def __init__(self, out, *, resume=False, overwrite=False):
        self.out = Path(out)
        self.format = output_format(self.out)
        self.paths = sidecars(self.out)
        self.dest = Destination(self.out, resumable=True)
        self.recipe: Recipe | None = None
        self.dtype = np.dtype("float32")
        self.dim: int | None = None
        self.rows = 0  # vectors on disk
        self.done = 0  # inputs accounted for (rows + failures)
        self.failed = 0
        self.resumed_sources: list[str] = []  # inputs an interrupted run finished, in order
        self._data = self._index = None
        self._resuming = self.complete = False
        self.dest.claim()
        try:
            self._check(resume, overwrite)
        except BaseException:
            self.dest.release()
            raise

    @_guarded
    def _check(self, resume, overwrite) -> None:
        staged = ("data_partial", "index_partial", "meta_partial")
        partial = any(self.paths[key].exists() for key in staged)
        if overwrite:
            for key in staged:
                self.paths[key].unlink(missing_ok=True)
        elif resume and partial:
            self._resuming = True
        elif resume:
            self.complete = self.out.exists()
        elif partial:
            raise VGGEmbedError(f"{self.paths['index_partial']}: an interrupted run left this; pass "
                                "--resume to continue it or --overwrite to start over")
        elif self.out.exists():
            raise VGGEmbedError(f"{self.out}: exists; pass --overwrite to replace it")

    def __enter__(self) -> "EmbeddingWriter":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @_guarded
    def begin(self, recipe: Recipe) -> None:
        """Open the staged files for vectors made by `recipe` (continuing them with --resume)."""
        self.recipe = recipe
        self.dtype = np.dtype(recipe.dtype)
        meta = self.paths["meta_partial"]
        if self._resuming:
            if meta.exists():
                recipe.check_same(Recipe.from_dict(read_meta(meta)["recipe"]), f"{self.out}: the interrupted run",
                                  "resume with the same options, or pass --overwrite")
            self._reopen()
        _atomic_write(meta, meta_json(recipe))

    # -------------------------------------------------------------- resume
    def _reopen(self) -> None:
        """Keep the complete prefix of an interrupted run; position both files after it."""
        index = self.paths["index_partial"]
        data = self.paths["data_partial"]
        raw = index.read_bytes() if index.exists() else b""
        keep = raw[: raw.rfind(b"\n") + 1]  # a line cut by the kill is dropped
        lines = list(csv.reader(io.StringIO(keep.decode("utf-8", "surrogateescape"), newline="")))
        if lines and lines[0] == INDEX_FIELDS:
            lines = lines[1:]
        header_ok = data.exists() and data.stat().st_size >= HEADER_BYTES
        if header_ok:
            with open(data, "rb") as f:
                f.seek(8)
                (hlen,) = struct.unpack("<H", f.read(2))
                header = f.read(hlen).decode("latin1")
            descr = header.split("'descr': '")[1].split("'")[0]
            if np.dtype(descr) != self.dtype:
                raise VGGEmbedError(f"{data}: holds {np.dtype(descr)} vectors; resume with --dtype {np.dtype(descr)}")
            self.dim = int(header.split("'shape': (")[1].split(")")[0].split(",")[1])
            on_disk = (data.stat().st_size - HEADER_BYTES) // (self.dim * self.dtype.itemsize)
        else:
            on_disk = 0
        # Keep the index only up to the first row that did not reach the disk
        # (flushed writes make this rare, but a truncated file must never shift rows).
        lines = lines[: next((i for i, line in enumerate(lines) if line[1] and int(line[1]) >= on_disk),
                             len(lines))]
        self.done = len(lines)
        self.rows = sum(1 for line in lines if line[1])
        self.failed = self.done - self.rows
        self.resumed_sources = [line[0] for line in lines]
        with open(index, "w", **TEXT) as f:
            w = csv.writer(f)
            w.writerow(INDEX_FIELDS)
            w.writerows(lines)
        if header_ok:
            with open(data, "r+b") as f:
                f.truncate(HEADER_BYTES + self.rows * self.dim * self.dtype.itemsize)
            self._data = open(data, "r+b")
            self._data.seek(0, os.SEEK_END)
        self._index = open(index, "a", **TEXT)

    # --------------------------------------------------------------- write
    @_guarded
    def write(self, chunk, vectors: np.ndarray | None) -> None:
        """Append one chunk: `vectors` holds a row per item of `chunk` without an error."""
        if vectors is not None and len(vectors):
            vectors = np.ascontiguousarray(vectors, dtype=self.dtype)
            if self._data is None:
                self.dim = vectors.shape[1]
                self._data = open(self.paths["data_partial"], "w+b")
                self._data.write(npy_header(0, self.dim, self.dtype))
            elif vectors.shape[1] != self.dim:
                raise VGGEmbedError(f"{self.out}: vectors of width {vectors.shape[1]} cannot join rows of width "
                                    f"{self.dim} (resumed with other options?)")
            self._data.write(vectors.tobytes())
            self._data.flush()
        if self._index is None:
            self._index = open(self.paths["index_partial"], "w", **TEXT)
            csv.writer(self._index).writerow(INDEX_FIELDS)
        w = csv.writer(self._index)
        for item in chunk:
            if item.error is None:
                w.writerow([item.source, self.rows, ""])
                self.rows += 1
            else:
                w.writerow([item.source, "", item.error])
                self.failed += 1
        self._index.flush()
        self.done += len(chunk)

    def _close_files(self) -> None:
        for f in (self._data, self._index):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass  # after a failed write (disk full): --resume keeps only whole rows anyway

    def close(self) -> None:
        """Flush and close the partial files, leaving them resumable, and release the output."""
        self._close_files()
        self.dest.release()

    def discard(self) -> None:
        """Remove the staged files and release the output, for a run that is redone rather than resumed
        (`merge`)."""
        self._close_files()
        for key in ("data_partial", "index_partial", "meta_partial"):
            with contextlib.suppress(OSError):
                self.paths[key].unlink()
        self.dest.release()

    @_guarded
    def finish(self) -> None:
        """Turn the partial files into the final outputs, `OUT` renamed last."""
        if self._index is None:  # no input at all
            self._index = open(self.paths["index_partial"], "w", **TEXT)
            csv.writer(self._index).writerow(INDEX_FIELDS)
        if self._data is None:
            self.dim = self.dim or 0
            self._data = open(self.paths["data_partial"], "w+b")
            self._data.write(npy_header(0, self.dim, self.dtype))
        self._data.seek(0)
        self._data.write(npy_header(self.rows, self.dim, self.dtype))
        self._data.flush()
        os.fsync(self._data.fileno())
        for f in (self._data, self._index):
            f.close()

        self._write_errors()
        _copy_into_place(self.paths["index_partial"], self.paths["index"])
        meta = meta_json(self.recipe, rows=self.rows, inputs=self.done, failed=self.failed)
        if self.format != "parquet":
            _atomic_write(self.paths["meta"], meta)
        data = self.paths["data_partial"]
        if self.format == "npy":
            os.replace(data, self.out)
        else:
            with replacing(self.out) as tmp:
                vectors = np.load(data, mmap_mode="r")
                sources = self._row_sources()
                if self.format == "csv":
                    _write_csv(tmp, sources, vectors)
                else:
                    _write_parquet(tmp, sources, vectors, meta)
                del vectors
            data.unlink()
        self.paths["index_partial"].unlink()
        self.paths["meta_partial"].unlink(missing_ok=True)

    def _rows(self):
        with open(self.paths["index_partial"], **TEXT) as f:
            reader = csv.reader(f)
            next(reader)
            yield from reader

    def _row_sources(self) -> list[str]:
        return [path for path, row, _ in self._rows() if row]

    def _write_errors(self) -> None:
        with replacing(self.paths["errors"]) as tmp, open(tmp, "w", **TEXT) as f:
            w = csv.writer(f)
            w.writerow(["path", "error"])
            w.writerows([path, error] for path, row, error in self._rows() if not row)


def _copy_into_place(src: Path, dst: Path) -> None:
    with replacing(dst) as tmp, open(src, "rb") as a, open(tmp, "wb") as b:
        while chunk := a.read(1 << 20):
            b.write(chunk)


def _write_csv(path: Path, sources, vectors, chunk=4096) -> None:
    fmt = "%.9g" if vectors.dtype == np.float32 else "%.5g"  # enough digits to round-trip
    with open(path, "w", **TEXT) as f:
        w = csv.writer(f)
        w.writerow(["path"] + [f"d{i}" for i in range(vectors.shape[1])])
        for start in range(0, len(sources), chunk):
            block = vectors[start: start + chunk]
            for src, vec in zip(sources[start: start + chunk], block):
                w.writerow([src] + [fmt % v for v in vec])


def _write_parquet(path: Path, sources, vectors, meta: bytes, chunk=8192) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    value_type = pa.float32() if vectors.dtype == np.float32 else pa.float16()
    schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()),
                        ("embedding", pa.list_(value_type, dim))], metadata={PARQUET_META_KEY: meta})
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, max(len(sources), 1), chunk):
            block = np.ascontiguousarray(vectors[start: start + chunk])
            flat = pa.array(block.reshape(-1), type=value_type)
            column = pa.FixedSizeListArray.from_arrays(flat, dim)
            writer.write_table(pa.table({**path_columns(sources[start: start + chunk]), "embedding": column},
                                        schema=schema))


def _atomic_write(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def recorded_meta(out) -> dict | None:
    """The recipe and counts recorded with a finished output, or None for outputs made before they were."""
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        raw = (pq.read_schema(out).metadata or {}).get(PARQUET_META_KEY)
        return None if raw is None else json.loads(raw)
    meta = sidecars(out)["meta"]
    return read_meta(meta) if meta.exists() else None
