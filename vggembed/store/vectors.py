"""Open any embedding output as one thing: a float matrix on disk, the path of each row, and its recipe.

Every format vggembed writes can be an INDEX for search, dedup and cluster:

- `OUT.npy` with `OUT.npy.index.csv` (the rows are the index lines whose
  `row` column is filled, in that order) -- read in place;
- `OUT.npz` with `OUT.npz.index.csv` (one array per output);
- `OUT.parquet` (`path`, a fixed-size-list column per output);
- `OUT.csv` (`path`, `NAME_0` .. `NAME_{D-1}` per output);
- an `--engine ray` folder, a local path or an object-store URL
  (`manifest.json` and `part-NNNNN.parquet` with `path`, `path_bytes`,
  `status`, `error` and a column per output; failed rows are skipped), read
  through the checks `vggembed merge` makes (`runfolder.FinishedRun`).

A file of several outputs (`embed --layer fc2 --layer pool5:avg`) is opened
at one of them: `layer=NAME`, or by default the first. Files written before
several outputs existed (one `embedding` column, CSV columns `d0` ..) read
as their one output.

NPZ, Parquet, CSV and Ray outputs are converted once, a bounded batch at a time,
into a temporary `.npy` that is removed on `close()`. Rows are read back in
blocks with plain file reads into one reused buffer, not through a memory
map whose touched pages would all count as resident memory: scanning 300k
4096-d vectors (4.9 GB) then costs one block of memory, not the file's size.

The recipe (how the vectors were made) comes from `OUT.meta.json` beside
`.npy`/`.csv` files, the Parquet schema metadata key `vggembed`, or the Ray
manifest's `recipe`; outputs written before recipes existed give None.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import VGGEmbedError, display, reason
from ..images.sources import is_url
from .recipe import Recipe


class Vectors:
    """An embedding output opened for reading. Use as a context manager, or call `close()`.

    Attributes:
        source: the INDEX the user named (a str for a URL).
        paths: the image path of each row (str as os.fsdecode gives it).
        recipe: the recorded `Recipe` of the opened output alone (`Recipe.select`), or None for outputs
            written before recipes were recorded.
        name: the opened output's name (None without a recipe); names: every output's name in the file.
        rows, dim, dtype: the matrix's shape and stored type (float32 or float16).
        failed: how many inputs the output records as failed, so without a row (index lines without one, a
            Ray run's rows whose status is not ok).
    """

    name: str | None = None
    names: tuple = ()
    failed: int = 0

    def __init__(self, source: Path | str, npy: Path, paths: list[str], recipe: Recipe | None, *, temporary: bool):
        self.source = source
        self.npy = npy
        self.paths = paths
        self.recipe = recipe
        self._temporary = temporary
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if len(shape) != 2 or fortran or np.dtype(dtype).kind != "f":
            raise VGGEmbedError(f"{source}: holds a {dtype} array of shape {shape}; expected rows of float vectors")
        self.rows, self.dim = shape
        self.dtype = np.dtype(dtype)
        if len(paths) != self.rows:
            raise VGGEmbedError(f"{source}: {self.rows} vectors but {len(paths)} paths in its index; "
                                "the files do not belong together")
        self._file = open(npy, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.rows

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._temporary:
            self.npy.unlink(missing_ok=True)

    def matrix(self) -> np.ndarray:
        """The whole matrix, memory-mapped read-only (stored dtype)."""
        return np.load(self.npy, mmap_mode="r")

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as float32, read with one file read (into `out` when given)."""
        n = stop - start
        raw = np.empty((n, self.dim), self.dtype)
        self._file.seek(self._offset + start * self.dim * self.dtype.itemsize)
        got = self._file.readinto(memoryview(raw).cast("B"))
        if got != raw.nbytes:
            raise VGGEmbedError(f"{self.npy}: ends before row {stop} (truncated?)")
        if self.dtype == np.float32 and out is None:
            return raw
        if out is None:
            return raw.astype(np.float32)
        out = out[:n]
        out[...] = raw
        return out

    def take(self, rows) -> np.ndarray:
        """Some rows, in the given order, as float32 (touches only their pages)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            bad = rows[(rows < 0) | (rows >= self.rows)][0]
            raise VGGEmbedError(f"{self.source}: has rows 0..{self.rows - 1}; row {bad} does not exist")
        return np.asarray(self.matrix()[rows], dtype=np.float32)


def open_vectors(index, *, layer: str | None = None, tmp_dir=None) -> Vectors:
    """Open an embedding output (`.npy`, `.npz`, `.parquet`, `.csv`, or a Ray output folder).

    Args:
        index: the output's path.
        layer: which output of a file of several (its name: `fc2`, `pool5_avg`); default the only one, or
            the first.
        tmp_dir: where NPZ, Parquet, CSV and Ray outputs are converted (default: the system's temp folder).

    Raises:
        VGGEmbedError: the path is missing or not an embedding output, or has no output `layer` (the message
            lists the ones it has).
    """
    index = os.fsdecode(index)
    if is_url(index) and not index.startswith("file://"):
        return _open_ray(index.rstrip("/"), tmp_dir, layer)  # other outputs are read from local files
    index = Path(index.removeprefix("file://"))
    if index.is_dir():
        return _open_ray(index, tmp_dir, layer)
    if not index.exists():
        raise VGGEmbedError(f"{index}: no such file or folder")
    suffix = index.suffix.lower()
    opener = {".npy": _open_npy, ".npz": _open_npz, ".parquet": _open_parquet, ".csv": _open_csv}.get(suffix)
    if opener is None:
        raise VGGEmbedError(f"{index}: not an embedding output; give a .npy, .npz, .parquet or .csv file, "
                            "or a folder written by --engine ray")
    return opener(index, tmp_dir, layer)


# ------------------------------------------------------------------ recipe
def _selected(recipe: Recipe | None, layer: str | None, where) -> tuple[Recipe | None, str | None]:
    """(the recipe of the output `layer` alone, its name); (None, None) for a file without a recipe."""
    if recipe is None:
        if layer is not None:
            raise VGGEmbedError(f"{where}: records no recipe (written before vggembed recorded one), so its one "
                                "set of vectors has no name; leave out --layer")
        return None, None
    chosen = recipe.select(layer, str(where))
    return chosen, chosen.outputs[0].name


def _named(vectors: Vectors, recipe: Recipe | None, chosen: Recipe | None) -> Vectors:
    vectors.recipe = chosen
    if chosen is not None:
        vectors.name, vectors.names = chosen.outputs[0].name, tuple(o.name for o in recipe.outputs)
    return vectors


def _recorded_meta(out: Path) -> dict | None:
    from .writer import recorded_meta

    try:
        return recorded_meta(out)
    except VGGEmbedError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged Parquet footer or JSON: one line naming the file
        raise VGGEmbedError(f"{out}: its recorded recipe is unreadable ({reason(e)})") from None


def _recipe_of(out: Path) -> tuple[Recipe | None, int | None]:
    """The recipe recorded with a finished output (None before recipes were recorded) and its row count."""
    meta = _recorded_meta(out)
    if meta is None:
        return None, None
    return Recipe.from_dict(meta["recipe"]), meta.get("rows")


def _check_rows(out: Path, recorded: int | None, rows: int) -> None:
    if recorded is not None and recorded != rows:
        raise VGGEmbedError(f"{out}: its recipe records {recorded} rows but it holds {rows}; the files do not "
                            "belong together")


def _index_paths(out: Path, required: bool = True) -> tuple[list[str], int]:
    """The paths of the rows, from OUT.index.csv (the lines whose `row` is filled, in order), and how many
    lines record a failed input (no row). Without `required`, a missing index is no paths and no failures."""
    index = out.with_name(out.name + ".index.csv")
    if not index.exists():
        if not required:
            return [], 0
        raise VGGEmbedError(f"{out}: no {index.name} beside it, so its rows have no paths; keep the index that "
                            "`vggembed embed` wrote with it")
    paths, failed = [], 0
    with open(index, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[:2] != ["path", "row"]:
            raise VGGEmbedError(f"{index}: not a vggembed index (expected columns path,row,error)")
        for line in reader:
            if len(line) > 1 and line[1] != "":
                if int(line[1]) != len(paths):
                    raise VGGEmbedError(f"{index}: row {line[1]} where row {len(paths)} was expected")
                paths.append(line[0])
            elif len(line) > 1:
                failed += 1
    return paths, failed


# --------------------------------------------------------------------- npy
def _open_npy(out: Path, tmp_dir, layer) -> Vectors:
    paths, failed = _index_paths(out)
    recipe, recorded = _recipe_of(out)
    chosen, _ = _selected(recipe, layer, out)
    vectors = Vectors(out, out, paths, None, temporary=False)
    vectors.failed = failed
    _check_rows(out, recorded, vectors.rows)
    return _named(vectors, recipe, chosen)


def _open_npz(out: Path, tmp_dir, layer) -> Vectors:
    """One array of an .npz, copied out of the zip into a temporary .npy (a bounded buffer at a time)."""
    import zipfile

    paths, failed = _index_paths(out)
    recipe, recorded = _recipe_of(out)
    chosen, name = _selected(recipe, layer, out)
    try:
        with zipfile.ZipFile(out) as zf:
            members = [m.removesuffix(".npy") for m in zf.namelist()]
            if name is None:
                vectors_in = [m for m in members if not m.startswith("top_")]
                if len(vectors_in) != 1:
                    raise VGGEmbedError(f"{out}: records no recipe and holds {', '.join(members)}; not one set "
                                        "of vectors")
                name = vectors_in[0]
            if name not in members:
                raise VGGEmbedError(f"{out}: no array {name!r} in it (it holds {', '.join(members)})")
            fd, tmp = tempfile.mkstemp(prefix="vggembed-vectors-", suffix=".npy", dir=tmp_dir)
            with os.fdopen(fd, "wb") as f, zf.open(f"{name}.npy") as member:
                while chunk := member.read(1 << 20):
                    f.write(chunk)
    except (OSError, zipfile.BadZipFile) as e:
        raise VGGEmbedError(f"{out}: not a readable .npz file ({reason(e)})") from None
    try:
        vectors = Vectors(out, Path(tmp), paths, None, temporary=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    vectors.failed = failed
    _check_rows(out, recorded, vectors.rows)
    return _named(vectors, recipe, chosen)


# ------------------------------------------------- conversion into a .npy
class _NpyBuilder:
    """Append float32 rows to a temporary .npy, then fix its header."""

    def __init__(self, source: Path, tmp_dir):
        fd, name = tempfile.mkstemp(prefix="vggembed-vectors-", suffix=".npy", dir=tmp_dir)
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        self.source = source
        self.dim: int | None = None
        self.rows = 0
        self.paths: list[str] = []
        self.failed = 0  # rows left out as failed inputs

    def add(self, paths: list[str], block: np.ndarray) -> None:
        from .writer import npy_header

        if self.dim is None:
            self.dim = block.shape[1]
            self.file.write(npy_header(0, self.dim, np.float32))
        elif block.shape[1] != self.dim:
            raise VGGEmbedError(f"{self.source}: rows of width {block.shape[1]} after rows of width {self.dim}")
        self.file.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        self.rows += len(block)
        self.paths += paths

    def done(self, recipe: Recipe | None) -> Vectors:
        from .writer import npy_header

        self.file.seek(0)
        self.file.write(npy_header(self.rows, self.dim or 0, np.float32))
        self.file.close()
        vectors = Vectors(self.source, self.path, self.paths, recipe, temporary=True)
        vectors.failed = self.failed
        return vectors

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _convert(source: Path, tmp_dir, fill, recipe) -> Vectors:
    builder = _NpyBuilder(source, tmp_dir)
    try:
        fill(builder)
        return builder.done(recipe)
    except BaseException:
        builder.discard()
        raise


def vector_column(names, name: str | None) -> str:
    """The column that holds the output `name`: its own, or `embedding` in files written before several
    outputs existed (and in files without a recipe)."""
    return name if name is not None and name in names else "embedding"


def _arrow_rows(batch, where: Path, column: str) -> tuple[list[str], np.ndarray]:
    """(paths, float32 matrix) of a record batch's `column`, rows with a null vector left out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    if "path" not in names or column not in names:
        raise VGGEmbedError(f"{where}: no path and {column} columns; not a vggembed Parquet output")
    emb = batch.column(column)
    if not pa.types.is_fixed_size_list(emb.type):
        raise VGGEmbedError(f"{where}: {column} column is {emb.type}, not a fixed-size list")
    ok = pc.is_valid(emb)
    if "status" in names:
        ok = pc.and_(ok, pc.equal(batch.column("status"), "ok"))
    exact = batch.column("path_bytes").to_pylist() if "path_bytes" in names else None  # names not UTF-8
    paths = [os.fsdecode(b) if exact and b is not None else p
             for p, b in zip(batch.column("path").to_pylist(), exact or [None] * batch.num_rows)]
    if not pc.all(ok).as_py():
        emb = emb.filter(ok)
        paths = [p for p, good in zip(paths, ok.to_pylist()) if good]
    dim = emb.type.list_size
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    return paths, flat.reshape(len(paths), dim)


def _need_pyarrow(where: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise VGGEmbedError(f'{where}: reading Parquet needs pyarrow: pip install "vggembed[parquet]"') from None
    return pq


def _open_parquet(path: Path, tmp_dir, layer, batch_rows: int = 4096) -> Vectors:
    pq = _need_pyarrow(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors have no common base worth naming
        raise VGGEmbedError(f"{path}: not a readable Parquet file ({reason(e)})") from None
    recipe, recorded = _recipe_of(path)
    chosen, name = _selected(recipe, layer, path)
    column = vector_column(pf.schema_arrow.names, name)

    def fill(builder):
        wanted = [c for c in ("path", "path_bytes", column) if c in pf.schema_arrow.names]
        batches = pf.iter_batches(batch_size=batch_rows, columns=wanted)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # noqa: BLE001 - a damaged page deep in the file (pyarrow's or Thrift's errors)
                raise VGGEmbedError(f"{path}: not a readable Parquet file ({reason(e)})") from None
            if batch is None:
                break
            builder.add(*_arrow_rows(batch, path, column))

    vectors = _convert(path, tmp_dir, fill, None)
    vectors.failed = _index_paths(path, required=False)[1]
    _check_rows(path, recorded, vectors.rows)
    return _named(vectors, recipe, chosen)


def _open_ray(where, tmp_dir, layer, batch_rows: int = 4096) -> Vectors:
    """A finished --engine ray folder (a path or an object-store URL), read part by part through the checks
    `vggembed merge` makes (`runfolder.FinishedRun`)."""
    from .runfolder import FinishedRun

    _need_pyarrow(where)
    run = FinishedRun(where)
    chosen, name = _selected(run.recipe, layer, display(str(where)))

    def fill(builder):
        for part, table in run.parts():
            column = vector_column(table.column_names, name)
            for batch in table.to_batches(max_chunksize=batch_rows):
                paths, block = _arrow_rows(batch, run.name(part), column)
                builder.add(paths, block)
                builder.failed += batch.num_rows - len(paths)

    return _named(_convert(where, tmp_dir, fill, None), run.recipe, chosen)


def _open_csv(path: Path, tmp_dir, layer, batch_rows: int = 1024) -> Vectors:
    recipe, recorded = _recipe_of(path)
    chosen, name = _selected(recipe, layer, path)

    def fill(builder):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[0] != "path":
                raise VGGEmbedError(f"{path}: not a vggembed CSV output (expected columns path,NAME_0,NAME_1,...)")
            # NAME_0 .. NAME_{D-1}; d0 .. in files written before several outputs existed
            prefix = "d" if name is None or header[1:2] == ["d0"] else f"{name}_"
            first = header.index(f"{prefix}0") if f"{prefix}0" in header else None
            if first is None:
                raise VGGEmbedError(f"{path}: not a vggembed CSV output (no column {prefix}0)")
            dim = 0
            while first + dim < len(header) and header[first + dim] == f"{prefix}{dim}":
                dim += 1
            paths, rows = [], []
            for lineno, line in enumerate(reader, start=2):
                if len(line) != len(header):
                    raise VGGEmbedError(f"{path}: line {lineno} has {len(line)} fields, the header {len(header)}")
                try:
                    rows.append(np.array(line[first: first + dim], dtype=np.float32))
                except ValueError:
                    raise VGGEmbedError(f"{path}: line {lineno} holds a value that is not a number") from None
                paths.append(line[0])
                if len(rows) == batch_rows:
                    builder.add(paths, np.stack(rows))
                    paths, rows = [], []
            if rows or builder.dim is None:
                builder.add(paths, np.stack(rows) if rows else np.zeros((0, dim), np.float32))

    vectors = _convert(path, tmp_dir, fill, None)
    vectors.failed = _index_paths(path, required=False)[1]
    _check_rows(path, recorded, vectors.rows)
    return _named(vectors, recipe, chosen)
