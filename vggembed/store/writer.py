"""Write a run's outputs as they are computed, so that nothing is lost and nothing looks complete too early.

While a run is going, each array it makes (each `Output` of the recipe, and
`top_index`/`top_prob` with --top) goes to `OUT.NAME.partial` (an .npy file
whose header is rewritten at the end), and one line per input, in input
order, to `OUT.index.csv.partial` (path, row, error). Each batch's rows are
flushed before its index lines, so the index never names a row that is not
on disk. At the end the final files are made from those and renamed into
place, `OUT` last:

- `OUT`, one row per image that worked, in input order:
  - `.npy`: the one array (a run with one output only);
  - `.npz`: numpy's container, one array per name (`np.load(OUT)["fc2"]`),
    `top_label` as a unicode array; written whole at the end;
  - `.parquet`: `path`, `path_bytes`, a fixed-size-list column per name;
  - `.csv`: `path`, then `NAME_0 .. NAME_{D-1}` per output, then
    `top_index_1 .. top_index_K`, `top_prob_1 ..`, `top_label_1 ..` (by rank);
- `OUT.index.csv`: every input in order with its row, or its error;
- `OUT.errors.csv`: path and error of each image that failed;
- the recipe (`recipe.Recipe`) and row counts: `OUT.meta.json` beside `.npy`,
  `.npz` and `.csv`, the Parquet file's schema metadata (key `vggembed`).

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
import glob
import importlib.util
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import VGGEmbedError, display, reason
from .destination import Destination, replacing
from .recipe import TOP_COLUMNS, Recipe, meta_json, read_meta

FORMATS = {".npy": "npy", ".npz": "npz", ".csv": "csv", ".parquet": "parquet"}
PARQUET_META_KEY = b"vggembed"  # schema metadata: the same JSON as OUT.meta.json
HEADER_BYTES = 128  # a fixed-size .npy header, so the row count can be rewritten in place
INDEX_FIELDS = ["path", "row", "error"]
TEXT = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}  # how CSV files hold names


def output_format(path: Path) -> str:
    if path.is_dir():
        raise VGGEmbedError(f"{path}: is a folder; name an output file (a folder is for --engine ray)")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise VGGEmbedError(f"{path}: unknown output format {path.suffix!r}; use .npy, .npz, .csv or .parquet")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise VGGEmbedError(f'{path}: Parquet output needs pyarrow: pip install "vggembed[parquet]"')
    return fmt


def sidecars(out: Path) -> dict[str, Path]:
    return {
        "index": out.with_name(out.name + ".index.csv"),
        "errors": out.with_name(out.name + ".errors.csv"),
        "data_partial": out.with_name(out.name + ".partial"),  # where vggembed 0.1 staged its one array
        "index_partial": out.with_name(out.name + ".index.csv.partial"),
        "meta": out.with_name(out.name + ".meta.json"),
        "meta_partial": out.with_name(out.name + ".meta.json.partial"),
    }


def check_format(out, recipe: Recipe) -> None:
    """Refuse an output format that cannot hold what `recipe` makes (before any weights are loaded)."""
    if Path(out).suffix.lower() == ".npy" and len(recipe.names) > 1:
        raise VGGEmbedError(f"{out}: .npy holds one array and this run makes {len(recipe.names)} "
                            f"({', '.join(recipe.names)}); write .npz or .parquet")


def staged_path(out: Path, name: str) -> Path:
    """Where the array `name` is staged while a run goes."""
    return out.with_name(f"{out.name}.{name}.partial")


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


class _Staged:
    """One array staged as an .npy file with a fixed-size header: rows appended, the header rewritten at the end."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.width: int | None = None
        self.file = None

    def reopen(self, rows: int) -> int:
        """Open an interrupted run's file, cut to at most `rows` rows; return the rows it really holds."""
        if not self.path.exists() or self.path.stat().st_size < HEADER_BYTES:
            return 0
        with open(self.path, "rb") as f:
            f.seek(8)
            (hlen,) = struct.unpack("<H", f.read(2))
            header = f.read(hlen).decode("latin1")
        descr = header.split("'descr': '")[1].split("'")[0]
        if np.dtype(descr) != self.dtype:
            raise VGGEmbedError(f"{self.path}: holds {np.dtype(descr)} values; resume with --dtype {np.dtype(descr)}")
        self.width = int(header.split("'shape': (")[1].split(")")[0].split(",")[1])
        row_bytes = max(1, self.width * self.dtype.itemsize)
        on_disk = (self.path.stat().st_size - HEADER_BYTES) // row_bytes
        self.file = open(self.path, "r+b")
        self.file.truncate(HEADER_BYTES + min(rows, on_disk) * self.width * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        return on_disk if self.width else rows

    def append(self, block: np.ndarray, where) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype).reshape(len(block), -1)
        if self.file is None:
            self.width = block.shape[1]
            self.file = open(self.path, "w+b")
            self.file.write(npy_header(0, self.width, self.dtype))
        elif block.shape[1] != self.width:
            raise VGGEmbedError(f"{where}: rows of width {block.shape[1]} cannot join rows of width {self.width} "
                                "(resumed with other options?)")
        self.file.write(block.tobytes())
        self.file.flush()

    def truncate(self, rows: int) -> None:
        if self.file is not None:
            self.file.truncate(HEADER_BYTES + rows * self.width * self.dtype.itemsize)
            self.file.seek(0, os.SEEK_END)

    def seal(self, rows: int, width: int) -> None:
        """Write the final header (creating an empty array of `width` when no row came)."""
        if self.file is None:
            self.width = self.width or width
            self.file = open(self.path, "w+b")
        self.file.seek(0)
        self.file.write(npy_header(rows, self.width, self.dtype))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass  # after a failed write (disk full): --resume keeps only whole rows anyway

    def blocks(self, rows: int, step: int):
        """The sealed array's rows, `step` at a time, by plain reads (no memory map whose pages would stay
        resident): a finish costs one block of memory, whatever the number of rows."""
        row_bytes = self.width * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(HEADER_BYTES)
            for start in range(0, rows, step):
                n = min(step, rows - start)
                raw = f.read(n * row_bytes)
                if len(raw) != n * row_bytes:
                    raise VGGEmbedError(f"{self.path}: ends before row {start + n} (truncated?)")
                yield np.frombuffer(raw, self.dtype).reshape(n, self.width)


class EmbeddingWriter:
    """Stage a run's arrays and the row index; finish into the requested format.

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
        self.arrays: dict[str, _Staged] = {}
        self.label: Callable[[int], str] = str
        self.rows = 0  # rows on disk
        self.done = 0  # inputs accounted for (rows + failures)
        self.failed = 0
        self.resumed_sources: list[str] = []  # inputs an interrupted run finished, in order
        self._index = None
        self._resuming = self.complete = False
        self.dest.claim()
        try:
            self._check(resume, overwrite)
        except BaseException:
            self.dest.release()
            raise

    def _staged_files(self) -> list[Path]:
        return [self.paths["data_partial"], *map(Path, glob.glob(glob.escape(str(self.out)) + ".*.partial"))]

    @_guarded
    def _check(self, resume, overwrite) -> None:
        partial = any(p.exists() for p in self._staged_files())
        if overwrite:
            for p in self._staged_files():
                p.unlink(missing_ok=True)
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

    @property
    def dim(self) -> int | None:
        """The width of the first array (the vectors of a one-output run)."""
        first = next(iter(self.arrays.values()), None)
        return None if first is None else first.width

    def describe(self) -> str:
        """What the output holds, for the summary line: `12 x 4096 float32`, or each array's width."""
        if len(self.arrays) == 1:
            return f"{self.rows} x {self.dim} {self.recipe.dtype}"
        widths = ", ".join(f"{name} {a.width or 0}" for name, a in self.arrays.items() if name != "top_prob")
        return f"{self.rows} rows: {widths.replace('top_index', 'top')}"

    @_guarded
    def begin(self, recipe: Recipe, label: Callable[[int], str] | None = None) -> None:
        """Open the staged files for what `recipe` makes (continuing them with --resume).

        `label(i)` names class i for the `top_label` column (with --top)."""
        check_format(self.out, recipe)
        self.recipe = recipe
        self.label = label or (lambda i: f"class {i}")
        self.arrays = {o.name: _Staged(staged_path(self.out, o.name), recipe.dtype) for o in recipe.outputs}
        if recipe.top:
            self.arrays["top_index"] = _Staged(staged_path(self.out, "top_index"), np.int32)
            self.arrays["top_prob"] = _Staged(staged_path(self.out, "top_prob"), np.float32)
        meta = self.paths["meta_partial"]
        if self._resuming:
            if self.paths["data_partial"].exists():
                raise VGGEmbedError(f"{self.paths['data_partial']}: an interrupted run of an older vggembed left "
                                    "this, which --resume cannot continue; pass --overwrite to start over")
            if meta.exists():
                recipe.check_same(Recipe.from_dict(read_meta(meta)["recipe"]), f"{self.out}: the interrupted run",
                                  "resume with the same options, or pass --overwrite")
            self._reopen()
        _atomic_write(meta, meta_json(recipe))

    # -------------------------------------------------------------- resume
    def recorded(self) -> tuple[Recipe | None, list[str]]:
        """A complete output's recorded recipe (None for an output made before recipes were recorded) and the
        inputs it accounts for (rows and failures), in order: what `--resume` checks before it calls it done."""
        try:
            meta = recorded_meta(self.out)
        except VGGEmbedError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged Parquet footer or JSON: one line naming the file
            raise VGGEmbedError(f"{self.out}: its recorded recipe is unreadable ({reason(e)}); pass --overwrite to "
                                "embed again") from None
        recipe = None if meta is None else Recipe.from_dict(meta["recipe"])
        try:
            raw = self.paths["index"].read_bytes()
        except OSError as e:
            raise VGGEmbedError(f"{self.paths['index']}: cannot be read ({e.strerror}); pass --overwrite to embed "
                                "again") from None
        return recipe, [line[0] for line in _index_lines(raw) if line]

    def _reopen(self) -> None:
        """Keep the complete prefix of an interrupted run; position every file after it."""
        index = self.paths["index_partial"]
        raw = index.read_bytes() if index.exists() else b""
        lines = _index_lines(raw[: raw.rfind(b"\n") + 1])  # a line cut by the kill is dropped
        claimed = sum(1 for line in lines if line[1])
        on_disk = min((a.reopen(claimed) for a in self.arrays.values()), default=claimed)
        # Keep the index only up to the first row that did not reach the disk in every array
        # (flushed writes make this rare, but a truncated file must never shift rows).
        lines = lines[: next((i for i, line in enumerate(lines) if line[1] and int(line[1]) >= on_disk),
                             len(lines))]
        self.done = len(lines)
        self.rows = sum(1 for line in lines if line[1])
        self.failed = self.done - self.rows
        self.resumed_sources = [line[0] for line in lines]
        for a in self.arrays.values():
            a.truncate(self.rows)
        with open(index, "w", **TEXT) as f:
            w = csv.writer(f)
            w.writerow(INDEX_FIELDS)
            w.writerows(lines)
        self._index = open(index, "a", **TEXT)

    # --------------------------------------------------------------- write
    @_guarded
    def write(self, chunk, arrays) -> None:
        """Append one chunk: `arrays` maps each name to a row per item of `chunk` without an error
        (None when no item worked; a bare array for a recipe with one output)."""
        if isinstance(arrays, np.ndarray):
            (name,) = self.arrays
            arrays = {name: arrays}
        ok = sum(item.error is None for item in chunk)
        if arrays is not None and ok:
            for name, staged in self.arrays.items():
                block = arrays[name]
                if len(block) != ok:
                    raise VGGEmbedError(f"{self.out}: {len(block)} rows of {name} for {ok} images")
                staged.append(block, self.out)
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
        for a in self.arrays.values():
            a.close()
        if self._index is not None and not self._index.closed:
            try:
                self._index.close()
            except OSError:
                pass

    def close(self) -> None:
        """Flush and close the partial files, leaving them resumable, and release the output."""
        self._close_files()
        self.dest.release()

    def discard(self) -> None:
        """Remove the staged files and release the output, for a run that is redone rather than resumed
        (`merge`)."""
        self._close_files()
        for p in self._staged_files():
            with contextlib.suppress(OSError):
                p.unlink()
        self.dest.release()

    @_guarded
    def finish(self) -> None:
        """Turn the partial files into the final outputs, `OUT` renamed last."""
        if self._index is None:  # no input at all
            self._index = open(self.paths["index_partial"], "w", **TEXT)
            csv.writer(self._index).writerow(INDEX_FIELDS)
        for name, a in self.arrays.items():
            a.seal(self.rows, self.recipe.top if name.startswith("top_") else 0)
        self._index.close()

        self._write_errors()
        _copy_into_place(self.paths["index_partial"], self.paths["index"])
        meta = meta_json(self.recipe, rows=self.rows, inputs=self.done, failed=self.failed)
        if self.format != "parquet":
            _atomic_write(self.paths["meta"], meta)
        if self.format == "npy":
            os.replace(next(iter(self.arrays.values())).path, self.out)
        else:
            with replacing(self.out) as tmp:
                sources = self._row_sources()
                if self.format == "npz":
                    self._write_npz(tmp)
                elif self.format == "csv":
                    self._write_csv(tmp, sources)
                else:
                    self._write_parquet(tmp, sources, meta)
            for a in self.arrays.values():
                a.path.unlink()
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

    # ------------------------------------------------------------ formats
    def _step(self) -> int:
        """Rows per block when the final file is made: about 32 MB of them, whatever their width."""
        row_bytes = sum(a.width * a.dtype.itemsize for a in self.arrays.values()) or 1
        return max(1, (32 << 20) // row_bytes)

    def _blocks(self):
        """{name: block} of the staged arrays, `_step()` rows at a time, `top_label` added with --top."""
        step = self._step()
        readers = {name: a.blocks(self.rows, step) for name, a in self.arrays.items()}
        for start in range(0, self.rows, step):
            block = {name: next(r) for name, r in readers.items()}
            if self.recipe.top:
                block["top_label"] = self._labels(block["top_index"])
            yield start, block

    def _labels(self, index: np.ndarray) -> np.ndarray:
        names = {i: self.label(i) for i in np.unique(index).tolist()}
        return np.array([[names[i] for i in row] for row in index.tolist()], dtype=object).reshape(index.shape)

    def _write_npz(self, path: Path) -> None:
        """np.savez's layout (a zip of NAME.npy members, uncompressed), streamed from the staged files."""
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in self.arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member, open(a.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        member.write(chunk)
            if self.recipe.top:
                step = self._step()
                index = self.arrays["top_index"]
                width = max([1] + [len(self.label(i)) for block in index.blocks(self.rows, step)
                                   for i in np.unique(block).tolist()])
                dtype = np.dtype(f"<U{width}")
                with zf.open("top_label.npy", "w", force_zip64=True) as member:
                    member.write(npy_header(self.rows, self.recipe.top, dtype))
                    for block in index.blocks(self.rows, step):
                        member.write(np.ascontiguousarray(self._labels(block).astype(dtype)).tobytes())

    def _csv_header(self) -> list[str]:
        header = ["path"]
        for o in self.recipe.outputs:
            header += [f"{o.name}_{i}" for i in range(self.arrays[o.name].width)]
        for name in TOP_COLUMNS if self.recipe.top else ():
            header += [f"{name}_{rank}" for rank in range(1, self.recipe.top + 1)]
        return header

    def _write_csv(self, path: Path, sources) -> None:
        formats = {name: "%.9g" if a.dtype == np.float32 else "%.5g" if a.dtype == np.float16 else "%d"
                   for name, a in self.arrays.items()}  # enough digits to round-trip
        with open(path, "w", **TEXT) as f:
            w = csv.writer(f)
            w.writerow(self._csv_header())
            for start, block in self._blocks():
                for r, src in enumerate(sources[start: start + len(next(iter(block.values())))]):
                    line = [src]
                    for name in self.recipe.names:
                        fmt = formats.get(name)
                        line += [fmt % v for v in block[name][r]] if fmt else list(block[name][r])
                    w.writerow(line)

    def _write_parquet(self, path: Path, sources, meta: bytes) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary())]
                           + [(name, pa.list_(_arrow_type(a.dtype), a.width)) for name, a in self.arrays.items()
                              if name != "top_prob"]
                           + ([("top_prob", pa.list_(pa.float32(), self.recipe.top)),
                               ("top_label", pa.list_(pa.string(), self.recipe.top))] if self.recipe.top else []),
                           metadata={PARQUET_META_KEY: meta})
        with pq.ParquetWriter(path, schema) as writer:
            if not self.rows:
                writer.write_table(schema.empty_table())
            for start, block in self._blocks():
                n = len(block["top_index"] if self.recipe.top else block[self.recipe.outputs[0].name])
                columns = {**path_columns(sources[start: start + n])}
                for field in schema:
                    if field.name in block:
                        columns[field.name] = fixed_lists(block[field.name], field.type)
                writer.write_table(pa.table(columns, schema=schema))


def _arrow_type(dtype):
    import pyarrow as pa

    return {np.dtype(np.float32): pa.float32(), np.dtype(np.float16): pa.float16(),
            np.dtype(np.int32): pa.int32()}[np.dtype(dtype)]


def fixed_lists(block: np.ndarray, list_type, mask=None):
    """A (rows, width) array as an Arrow fixed-size-list array of `list_type` (nulls where `mask`)."""
    import pyarrow as pa

    flat = np.ascontiguousarray(block).reshape(-1)
    values = pa.array(flat.tolist() if flat.dtype == object else flat, type=list_type.value_type)
    return pa.FixedSizeListArray.from_arrays(values, list_type.list_size, mask=mask)


def _copy_into_place(src: Path, dst: Path) -> None:
    with replacing(dst) as tmp, open(src, "rb") as a, open(tmp, "wb") as b:
        while chunk := a.read(1 << 20):
            b.write(chunk)


def _index_lines(raw: bytes) -> list[list[str]]:
    """The lines of an OUT.index.csv (path, row, error), without its header."""
    lines = list(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline="")))
    return lines[1:] if lines and lines[0] == INDEX_FIELDS else lines


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
