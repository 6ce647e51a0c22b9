"""The Ray run folder: what `--engine ray` writes, and the one checked reader of it.

A run folder (a local path or an fsspec URL, see `Store`) holds
`manifest.json` (the inputs' digest, the number of parts, the run's
`Recipe`) and `part-NNNNN.parquet` files, each a run of inputs in order:
`path`, `path_bytes`, `status`, `error`, then a fixed-size-list column per
array of the recipe (`fc2`, `pool5_avg`, ..., and `top_index`, `top_prob`,
`top_label` with --top; null where the image failed), with the part's place
and the recipe in its schema metadata. Folders of format 3 (one `embedding`
column) are still read. Parts are atomic: a local part is
written under a hidden temporary name and renamed; an object is one PUT of
the final name. A reader never sees half a part.

The Ray engine (`engines/ray.py`) writes parts through `write_part` and
commits the manifest through `RunDir`; `FinishedRun` reads a finished folder
back for `merge` and for search/dedup/cluster (`store/vectors.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import VGGEmbedError, display, reason
from ..images.sources import is_url
from .recipe import Recipe
from .writer import fixed_lists, path_columns, table_paths

MANIFEST = "manifest.json"
FORMAT_VERSION = 4  # 4: a column per output; 3: one `embedding` column (read, not resumed)
READABLE_VERSIONS = (3, 4)
PART_META_KEY = b"vggembed"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
# What `Store.write` leaves when its writer dies between creating and renaming the file.
_TEMPORARY = re.compile(r"^\.(part-\d{5,}\.parquet|manifest\.json)\.[0-9a-f]{12}\.tmp$")


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


# ------------------------------------------------------------------- storage
class Store:
    """A run folder: a local path, or a URL of any fsspec protocol (object stores included).

    Picklable (only the location travels; the file system is opened where it
    is used), so the driver and every actor open the same place.
    """

    def __init__(self, where):
        self.where = os.fsdecode(where).rstrip("/") or "/"
        self.remote = is_url(self.where) and not self.where.startswith("file://")
        self._fs = None
        self.root = self.where.removeprefix("file://")

    def __getstate__(self):
        return {"where": self.where}

    def __setstate__(self, state):
        self.__init__(state["where"])

    @property
    def fs(self):
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise VGGEmbedError(f'{self.where}: writing to a URL needs fsspec and the protocol\'s package: '
                                    'pip install "vggembed[remote]"') from None
            try:
                self._fs, self.root = fsspec.core.url_to_fs(self.where)
            except (ImportError, ValueError) as e:
                raise VGGEmbedError(f"{self.where}: cannot open this location ({e})") from None
        return self._fs

    def name(self, rel: str) -> str:
        return f"{self.where}/{rel}" if rel else self.where

    def _path(self, rel: str) -> str:
        if self.remote:
            self.fs  # noqa: B018 - sets self.root
        return f"{self.root}/{rel}"

    # Every failure of the file system (fsspec backends raise their own kinds too) becomes one line.
    def _fail(self, rel: str, what: str, e: Exception) -> VGGEmbedError:
        if isinstance(e, VGGEmbedError):
            return e
        why = e.strerror if isinstance(e, OSError) and e.strerror else reason(e)
        return VGGEmbedError(f"{display(self.name(rel))}: cannot {what} ({why})")

    def list(self) -> list[str]:
        """The names directly in the folder (none when it does not exist)."""
        try:
            if not self.remote:
                if os.path.lexists(self.root) and not os.path.isdir(self.root):
                    raise VGGEmbedError(f"{display(self.where)}: not a folder; --engine ray writes a folder of parts "
                                        "(name a new one)")
                return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
            self.fs.invalidate_cache()
            if not self.fs.exists(self.root):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except Exception as e:  # noqa: BLE001
            raise self._fail("", "list it", e) from None

    def read(self, rel: str) -> bytes:
        try:
            if not self.remote:
                with open(self._path(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self._path(rel))
        except Exception as e:  # noqa: BLE001
            raise self._fail(rel, "read it", e) from None

    def write(self, rel: str, data: bytes) -> None:
        """Write all of `data` under `rel` so that no reader ever sees a part of it."""
        try:
            if self.remote:
                self.fs.pipe_file(self._path(rel), data)  # one PUT: the object appears whole or not at all
                return
            os.makedirs(self.root, exist_ok=True)
            tmp = self._path(f".{rel}.{uuid.uuid4().hex[:12]}.tmp")  # hidden from readers and part listings
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(rel))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as e:  # noqa: BLE001
            raise self._fail(rel, "write it", e) from None

    def remove(self, rel: str) -> None:
        try:
            if self.remote:
                self.fs.rm_file(self._path(rel))
            else:
                os.unlink(self._path(rel))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._fail(rel, "remove it", e) from None


@dataclass(frozen=True)
class Part:
    """One unit of work: the planned inputs `first` .. `first + len(sources) - 1`, in order (`sources.Source`s;
    a tar shard among them stands for its members)."""

    index: int
    first: int
    sources: tuple



def _digest(names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------- part files
def part_bytes(names: list[str], errors: list[str | None], arrays: dict, widths: dict, meta: dict,
               label=str) -> bytes:
    """A part as Parquet: `path`, `path_bytes`, `status`, `error`, and a column per array of the recipe
    (`arrays`: {name: a row per name whose error is None}; `widths`: each array's width; `label(i)` names
    class i for `top_label`), null where the image failed; `meta` (the part's number, its inputs, the recipe)
    in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = np.array([e is None for e in errors], dtype=bool)
    mask = pa.array(~ok)
    columns = {
        **path_columns(names),
        "status": pa.array(["ok" if o else "error" for o in ok], pa.string()),
        "error": pa.array([None if e is None else display(e) for e in errors], pa.string()),
    }
    recipe = Recipe.from_dict(meta["recipe"])
    dtypes = {**{o.name: np.dtype(recipe.dtype) for o in recipe.outputs},
              "top_index": np.dtype(np.int32), "top_prob": np.dtype(np.float32)}
    for name, dtype in dtypes.items():
        if name not in widths:
            continue
        full = np.zeros((len(names), widths[name]), dtype)
        full[ok] = arrays[name]
        value_type = {np.dtype(np.float32): pa.float32(), np.dtype(np.float16): pa.float16(),
                      np.dtype(np.int32): pa.int32()}[dtype]
        columns[name] = fixed_lists(full, pa.list_(value_type, widths[name]), mask)
        if name == "top_index":
            labels = np.array([[label(int(i)) for i in row] for row in full.tolist()], dtype=object)
            columns["top_label"] = fixed_lists(labels.reshape(len(names), widths[name]),
                                               pa.list_(pa.string(), widths[name]), mask)
    order = ["path", "path_bytes", "status", "error", *recipe.names]
    table = pa.table({c: columns[c] for c in order})
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_part(store: Store, run_id: str, part: Part, names: list[str], errors: list[str | None],
               arrays, recipe: Recipe, widths: dict | None = None, label=str) -> None:
    """Write one finished part: a row per name (its arrays, or its error), with what `merge` checks
    (the run, the part's number and first input) in its metadata. `arrays` may be a bare matrix for a
    recipe with one output and no --top."""
    if isinstance(arrays, np.ndarray):
        arrays, widths = {recipe.outputs[0].name: arrays}, {recipe.outputs[0].name: arrays.shape[1]}
    meta = {"version": FORMAT_VERSION, "run": run_id, "part": part.index, "first": part.first,
            "inputs": len(part.sources), "rows": len(names), "failed": sum(e is not None for e in errors),
            "recipe": recipe.to_dict()}
    store.write(part_name(part.index), part_bytes(names, errors, arrays, widths, meta, label))



# ------------------------------------------------------------ the run's folder
class RunDir:
    """OUT: the manifest and the finished parts."""

    def __init__(self, store: Store, names: list[str], parts: int, recipe: Recipe, part_size: int, *,
                 resume: bool, overwrite: bool):
        self.store, self.parts = store, parts
        self.manifest = {"version": FORMAT_VERSION, "inputs": len(names), "inputs_sha256": _digest(names),
                         "part_size": part_size, "parts": parts, "recipe": recipe.to_dict()}
        listing = store.list()
        if overwrite:
            for f in listing:
                if _PART.match(f) or f == MANIFEST or f.endswith(".tmp"):
                    store.remove(f)
            listing = []
        if MANIFEST in listing:
            old = read_manifest(store)
            if not resume:
                raise VGGEmbedError(f"{store.where}: holds an earlier run; pass --resume to continue it or "
                                    "--overwrite to start over")
            if old.get("version") != FORMAT_VERSION:
                raise VGGEmbedError(f"{store.where}: an older vggembed wrote this run, whose parts --resume "
                                    "cannot continue; pass --overwrite to start over")
            for key in ("inputs_sha256", "part_size"):
                if old.get(key) != self.manifest[key]:
                    raise VGGEmbedError(f"{store.where}: --resume with other {key.replace('_sha256', '')} than "
                                        "the earlier run; use the same command, or --overwrite")
            recipe.check_same(Recipe.from_dict(old.get("recipe") or {}), f"{store.where}: the earlier run",
                              "resume with the same options, or pass --overwrite")
            self.manifest["id"] = old.get("id") or uuid.uuid4().hex
            self.sweep()
        else:
            if listing:
                raise VGGEmbedError(f"{store.where}: not empty and not a vggembed run folder")
            self.manifest["id"] = uuid.uuid4().hex
        store.write(MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def sweep(self) -> None:
        """Remove the temporary files of writers that died mid-part (a killed actor, a lost node).

        Call it only when no writer of this folder is alive: on --resume before
        any actor writes, and at the end of a run once its actors are killed.
        A local part is written under a hidden temporary name and renamed;
        an object store has none (one PUT), so there this finds nothing."""
        for f in self.store.list():
            if _TEMPORARY.match(f):
                self.store.remove(f)

    def done(self) -> set[int]:
        return {int(m.group(1)) for m in map(_PART.match, self.store.list()) if m and int(m.group(1)) < self.parts}


def read_manifest(store: Store) -> dict:
    try:
        doc = json.loads(store.read(MANIFEST))
    except ValueError as e:
        raise VGGEmbedError(f"{display(store.name(MANIFEST))}: not a readable manifest ({reason(e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("parts"), int):
        raise VGGEmbedError(f"{display(store.name(MANIFEST))}: not a vggembed manifest")
    return doc


# ------------------------------------------------------- reading a run
class FinishedRun:
    """A finished run folder (a path or URL) opened for reading: its checked manifest, then its parts one at a
    time (`parts()`), each checked against the manifest. The one reader behind `merge` and behind
    search/dedup/cluster on a Ray folder; any damage is a `VGGEmbedError` of one line naming the file.

    Attributes:
        store: the folder's `Store`.
        manifest: the manifest, with its keys checked.
        recipe: the run's `Recipe`.
    """

    def __init__(self, out):
        self.store = store = Store(out)
        listing = store.list()
        if MANIFEST not in listing:
            raise VGGEmbedError(f"{display(store.where)}: no {MANIFEST}; not an --engine ray output folder")
        manifest = read_manifest(store)
        where = display(store.name(MANIFEST))
        if manifest.get("version", 0) not in READABLE_VERSIONS or "recipe" not in manifest:
            raise VGGEmbedError(f"{where}: written by an older vggembed; run the embedding again")
        if (not isinstance(manifest.get("inputs"), int) or not isinstance(manifest.get("id"), str)
                or not isinstance(manifest["recipe"], dict)):
            raise VGGEmbedError(f"{where}: not a vggembed manifest (its inputs, id or recipe is missing)")
        missing = [part_name(k) for k in range(manifest["parts"]) if part_name(k) not in listing]
        if missing:
            raise VGGEmbedError(f"{display(store.where)}: {len(missing)} of {manifest['parts']} parts missing "
                                f"(first: {missing[0]}); finish the run with --resume first")
        self.manifest = manifest
        self.recipe = Recipe.from_dict(manifest["recipe"])

    def name(self, rel: str) -> str:
        """A file of the run as messages show it."""
        return display(self.store.name(rel))

    def arrays(self) -> list[str]:
        """The columns of the parts that hold the recipe's arrays (`embedding` in format 3)."""
        return self.recipe.names if self.manifest["version"] >= 4 else ["embedding"]

    def parts(self):
        """(file name, pyarrow Table) of each part in order, one in memory at a time; every part is checked
        to belong to this run at its place, and the parts together to hold the manifest's inputs."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        first = 0
        for k in range(self.manifest["parts"]):
            name = part_name(k)
            try:
                table = pq.read_table(pa.BufferReader(self.store.read(name)))
                meta = json.loads((table.schema.metadata or {})[PART_META_KEY])
            except (pa.ArrowException, OSError, KeyError, ValueError) as e:  # a damaged page is an OSError
                raise VGGEmbedError(f"{self.name(name)}: not a readable part ({reason(e)})") from None
            if not isinstance(meta, dict) or meta.get("run") != self.manifest["id"] or meta.get("part") != k \
                    or meta.get("first") != first or not isinstance(meta.get("inputs"), int):
                got = meta if isinstance(meta, dict) else {}
                raise VGGEmbedError(f"{self.name(name)}: belongs to another run or place (part {got.get('part')}, "
                                    f"first input {got.get('first')}); run again with --overwrite")
            columns = table.schema.names
            arrays = self.arrays()
            lacking = [c for c in ("path", "status", "error", *arrays) if c not in columns]
            if lacking or not all(pa.types.is_fixed_size_list(table.schema.field(c).type) for c in arrays):
                what = f"no {', '.join(lacking)} column" if lacking else "a column of another type"
                raise VGGEmbedError(f"{self.name(name)}: not a readable part ({what})")
            first += meta["inputs"]
            yield name, table
            del table  # the reader holds no part past its turn
        if first != self.manifest["inputs"]:
            raise VGGEmbedError(f"{display(self.store.where)}: parts hold {first} inputs, the manifest "
                                f"{self.manifest['inputs']}")


# -------------------------------------------------------------------- merge
def merge(out, output, *, overwrite=False) -> tuple[int, int]:
    """Gather OUT's parts (a folder or URL) into the local engine's outputs (OUT, OUT.index.csv, OUT.errors.csv),
    carrying the run's recipe; one part in memory at a time."""
    import pyarrow as pa

    from ..images.pipeline import Item
    from .writer import EmbeddingWriter

    run = FinishedRun(out)
    writer = EmbeddingWriter(output, overwrite=overwrite)
    labels: dict[int, str] = {}  # the class names the parts hold, for the writer's top_label
    try:
        writer.begin(run.recipe, label=labels.__getitem__)
        columns = dict(zip(run.arrays(), run.recipe.names if run.manifest["version"] >= 4 else
                           [run.recipe.outputs[0].name]))
        for _, table in run.parts():
            errors = table["error"].to_pylist()
            chunk = [Item(i, p, error=e) for i, (p, e) in enumerate(zip(table_paths(table), errors))]
            ok = np.array([e is None for e in errors], dtype=bool)
            arrays = None
            if ok.any():
                good = table.filter(pa.array(ok))
                arrays = {name: _matrix(good[column]) for column, name in columns.items() if name != "top_label"}
                if run.recipe.top:
                    labels.update(zip(arrays["top_index"].ravel().tolist(),
                                      _matrix(good["top_label"]).ravel().tolist()))
            writer.write(chunk, arrays)
        writer.finish()
    except BaseException:
        writer.discard()  # nothing half-merged is left: the parts are kept, and merge is simply run again
        raise
    finally:
        writer.close()
    return writer.rows, writer.failed


def _matrix(column) -> np.ndarray:
    """A fixed-size-list column without nulls as a (rows, width) array."""
    lists = column.combine_chunks()
    return lists.flatten().to_numpy(zero_copy_only=False).reshape(len(lists), lists.type.list_size)
