"""`vggembed embed --engine ray`: the same embed job across a Ray cluster, the driver out of the data path.

Flow:

1. The driver lists the inputs exactly as the local engine does and cuts
   them into parts (`plan_parts`): runs of up to `part_size` inputs, in
   order. A part is the unit of work and of `--resume`.
2. A fixed pool of model actors (`PartWorker`: weights loaded once per actor
   from the weight file's path, `num_gpus` per actor) takes one part per
   task: it reads and decodes the part's images in threads beside the model
   (the local engine's own `runner.batches`, so rows are computed exactly as
   locally, failed images as rows with their error), runs the model, and
   writes the whole part straight into OUT as `part-NNNNN.parquet`,
   atomically. It returns only a small status: counts and the first errors.
3. The driver only plans parts, schedules them, and commits
   `manifest.json` (the inputs' digest, the parts, the run's `Recipe`), so
   its memory and traffic do not grow with the images' pixels or vectors.
   `vggembed merge` gathers the parts into the local engine's outputs.

OUT is a local (or shared) folder or an object-store URL (`s3://`, `gs://`,
... any fsspec protocol): see `Store`. Parts are atomic there too: a local
part is written under a hidden temporary name and renamed; an object is one
PUT of the final name, visible only once complete. A reader or `merge`
never sees half a part.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import VGGEmbedError, display, reason
from .inputs import is_unopened_shard, open_shards
from .output import path_columns, table_paths
from .recipe import Recipe
from .sources import Source, is_url, name_of

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
PART_META_KEY = b"vggembed"
RESTART_WAIT = 300.0  # seconds without any live model actor before the run gives up (parts are kept)
MAX_DEATHS = 3  # a part whose actor dies this often is given up (an image that kills the decoder, say)
ERRORS_RETURNED = 20  # per part, in the status sent back to the driver (all of them are in the part)
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


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


# ------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Part:
    """One unit of work: the planned inputs `first` .. `first + len(sources) - 1`, in order (`sources.Source`s;
    a tar shard among them stands for its members)."""

    index: int
    first: int
    sources: tuple


def plan_parts(units: list, part_size: int) -> list[Part]:
    """Parts in input order: each tar shard is a part of its own (its members are known only by reading
    it), and the inputs between shards make parts of up to `part_size`.

    Every part is planned from the listing alone, before anything is read, so
    a part's name always means the same inputs and a re-run knows exactly
    which parts are missing: with shards, which shards.
    """
    parts: list[Part] = []
    run: list = []

    def cut(first):
        for start in range(0, len(run), part_size):
            parts.append(Part(len(parts), first + start, tuple(run[start: start + part_size])))
        run.clear()

    for i, unit in enumerate(units):
        if is_unopened_shard(unit):
            cut(i - len(run))
            parts.append(Part(len(parts), i, (unit,)))
        else:
            run.append(unit)
    cut(len(units) - len(run))
    return parts


def _digest(names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------- part files
def part_bytes(names: list[str], errors: list[str | None], vectors: np.ndarray, meta: dict) -> bytes:
    """A part as Parquet: `path`, `path_bytes`, `status`, `error`, `embedding` (null where the image failed),
    with `meta` (the part's number, its inputs, the recipe) in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = np.array([e is None for e in errors], dtype=bool)
    dtype = np.dtype(meta["recipe"]["dtype"])
    value_type = pa.float32() if dtype == np.float32 else pa.float16()
    full = np.zeros((len(names), vectors.shape[1]), dtype)
    full[ok] = vectors
    column = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), type=value_type), vectors.shape[1],
                                               mask=pa.array(~ok))
    table = pa.table({
        **path_columns(names),
        "status": pa.array(["ok" if o else "error" for o in ok], pa.string()),
        "error": pa.array([None if e is None else display(e) for e in errors], pa.string()),
        "embedding": column,
    })
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------- cluster side
class PartWorker:
    """A model actor: loads the network once, then embeds and writes whole parts.

    Its constructor takes only small values (the recipe names the weight file
    by path), so Ray can restart it anywhere without objects from the store.
    Errors while loading are kept and reported by `info()` instead of
    killing the actor, so the driver can show them as one line.
    """

    def __init__(self, recipe: dict, store: str, options: dict, device: str):
        from .model import load_recipe
        from .runner import Options

        self.store = Store(store)
        self.error = None
        try:
            recipe = Recipe(**recipe)
            self.model = load_recipe(recipe, device=device)
            self.name = self.model.embedding_layer(recipe.layer, recipe.pool)
            self.recipe = recipe.bind(self.model.spec, self.name)
            # Decoding threads beside the model, as many as the local engine's default on this node.
            self.opts = Options(**{**options, "workers": min(8, os.cpu_count() or 2), "progress": False})
            self.width = self._width()
        except VGGEmbedError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - anything else still reaches the user as one line
            self.error = f"{type(e).__name__}: {e}"

    def _width(self) -> int:
        w, h = self.model.spec.input_size
        shape = self.model.output_shape(self.name, h, w)
        if len(shape) == 1:
            return shape[0]
        return shape[2] if self.recipe.pool in ("avg", "max") else int(np.prod(shape))

    def info(self) -> dict:
        """The bound recipe (or the loading error) and where this actor runs."""
        import socket

        return {"error": self.error, "host": socket.gethostname(),
                "recipe": None if self.error else self.recipe.to_dict()}

    def run(self, part: Part, run_id: str, pad: int) -> dict:
        """Decode, embed and write one part, every batch padded to `pad` images as the local engine pads
        the same run's; return the part's counts and first errors."""
        from .runner import Summary, batches

        if self.error:
            raise VGGEmbedError(self.error)
        start = time.perf_counter()
        names: list[str] = []
        errors: list[str | None] = []
        blocks = []
        summary = Summary()
        for chunk, batch, _ in batches(self.model, open_shards(part.sources), self.recipe, self.opts, summary):
            names += [item.source for item in chunk]
            errors += [item.error for item in chunk]
            if batch is not None:
                blocks.append(self.model.embed_batch(batch, self.name, self.recipe.pool, self.recipe.l2_normalize,
                                                     pad))
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, self.width), np.float32)
        write_part(self.store, run_id, part, names, errors, vectors, self.recipe)
        failed = [(n, e) for n, e in zip(names, errors) if e is not None]
        return {"part": part.index, "rows": len(names), "failed": len(failed), "errors": failed[:ERRORS_RETURNED],
                "seconds": time.perf_counter() - start}


def write_part(store: Store, run_id: str, part: Part, names: list[str], errors: list[str | None],
               vectors: np.ndarray, recipe: Recipe) -> None:
    """Write one finished part: a row per name (its vector, or its error), with what `merge` checks
    (the run, the part's number and first input) in its metadata."""
    meta = {"version": FORMAT_VERSION, "run": run_id, "part": part.index, "first": part.first,
            "inputs": len(part.sources), "rows": len(names), "failed": sum(e is not None for e in errors),
            "recipe": recipe.to_dict()}
    store.write(part_name(part.index), part_bytes(names, errors, vectors, meta))


# -------------------------------------------------------------- driver side
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
            for key in ("inputs_sha256", "part_size"):
                if old.get(key) != self.manifest[key]:
                    raise VGGEmbedError(f"{store.where}: --resume with other {key.replace('_sha256', '')} than "
                                        "the earlier run; use the same command, or --overwrite")
            recipe.check_same(Recipe.from_dict(old.get("recipe") or {}), f"{store.where}: the earlier run",
                              "resume with the same options, or pass --overwrite")
            self.manifest["id"] = old.get("id") or uuid.uuid4().hex
            for f in listing:  # temporary files of writers killed mid-part
                if f.startswith(".part-") and f.endswith(".tmp"):
                    store.remove(f)
        else:
            if listing:
                raise VGGEmbedError(f"{store.where}: not empty and not a vggembed run folder")
            self.manifest["id"] = uuid.uuid4().hex
        store.write(MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

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


@dataclass
class Counts:
    images: int = 0
    failed: int = 0
    planned: int = 0  # parts
    skipped: int = 0  # parts an earlier run finished
    parts: int = 0  # parts written by this run
    seconds: float = 0.0


def _start_ray(ray, address, verbose: bool) -> bool:
    """Join `address` (or start a runtime here) unless Ray already runs; True when started here.
    Without -v, Ray's own INFO lines, warnings and worker output stay in its log files."""
    if ray.is_initialized():
        return False
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    # "local": without --address, a runtime of our own, never a cluster someone else started on this machine
    ray.init(address=address or "local", log_to_driver=verbose, include_dashboard=False,
             logging_level=logging.INFO if verbose else logging.ERROR, configure_logging=True)
    return True


def embed(sources: list, out, recipe: Recipe, opts, *, gpus_per_worker=0.0, address=None, part_size=1000,
          resume=False, overwrite=False, log: Callable[[str], None] = print, verbose: bool | None = None) -> Counts:
    """Embed `sources` on Ray into OUT's parts, as `recipe` says.

    Args:
        sources: the inputs in order, as `inputs.plan` lists them (`sources.Source`s, tar shards left whole;
            plain paths or URLs are taken as Sources).
        out: the run folder: a local path or an object-store URL.
        opts: a `runner.Options`; `opts.workers` is the number of model actors.
        log: gets one line per failed image (the first `ERRORS_RETURNED` of each part).
    """
    try:
        import ray
    except ImportError:
        raise VGGEmbedError('--engine ray needs Ray: pip install "vggembed[ray]"') from None

    if recipe.resize == "none":
        raise VGGEmbedError("--engine ray needs a fixed input size: use --resize squash or center-crop")
    recipe = recipe.locate()
    if recipe.precision == "int8":
        from .int8 import check_available

        check_available()  # LiteRT and a VNNI/AMX CPU: say so here rather than in every actor's traceback
    weights = os.path.abspath(recipe.weights)
    if address is None and not os.path.isfile(weights):  # a runtime started here: fail before starting it
        raise VGGEmbedError(f"{weights}: no such weight file")
    recipe = recipe.replace(weights=weights)
    from .runner import pad_to

    store = Store(out)
    store.list()  # reachable (and a folder, if local) before anything starts
    units = [u if isinstance(u, Source) else Source(name_of(u)) for u in sources]
    if not units:
        raise VGGEmbedError("no images in the inputs: nothing to embed")
    names = [u.name for u in units]
    parts = plan_parts(units, part_size)
    if verbose is None:
        verbose = bool(os.environ.get("VGGEMBED_VERBOSE"))

    started_here = _start_ray(ray, address, verbose)
    counts = Counts()
    start = time.perf_counter()
    pool: list = []
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < opts.workers:
            raise VGGEmbedError(f"the Ray cluster has {cpus:g} CPUs and each model actor needs 1: use --workers "
                                f"{max(1, int(cpus))} or a bigger cluster")
        actor = ray.remote(PartWorker).options(num_cpus=1, num_gpus=gpus_per_worker or None, max_restarts=-1)
        pool += [actor.remote(dataclasses.asdict(recipe), store.where, dataclasses.asdict(opts),
                              "gpu" if gpus_per_worker else "cpu") for _ in range(opts.workers)]
        infos = ray.get([a.info.remote() for a in pool])
        for info in infos:
            if info["error"]:
                raise VGGEmbedError(f"a model actor on {info['host']} could not load the network: {info['error']}")
        bound = Recipe.from_dict(infos[0]["recipe"])
        for info in infos[1:]:
            bound.check_same(Recipe.from_dict(info["recipe"]), f"{weights} on {info['host']}",
                             "every node needs the same weight file under the same path")
        run = RunDir(store, names, len(parts), bound, part_size, resume=resume, overwrite=overwrite)
        done = run.done()
        todo = [p for p in parts if p.index not in done]
        counts.planned, counts.skipped = len(parts), len(done)
        # The local engine's pad for the same inputs (unknown with shards until they are read: the batch size).
        count = None if any(is_unopened_shard(u) for u in units) else len(units)
        _schedule(ray, pool, todo, (run.manifest["id"], pad_to(recipe, opts, count)), counts, log)
    finally:
        counts.seconds = time.perf_counter() - start
        for actor in pool:  # at once, restarted ones included, even where a caller's session lives on
            ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()
    return counts


def _schedule(ray, pool, todo: list[Part], args: tuple, counts: Counts, log) -> None:
    """Keep every actor busy with one part and the next one queued; account for each finished part.

    When an actor dies (its process, or its node), the parts it held go back
    to the queue for the other actors, and the actor rejoins once Ray has
    restarted it (on any node with room). Writing a part again writes the
    same bytes, atomically, so a part finished just before its actor died
    costs only time."""
    queue = collections.deque(todo)
    tasks: dict = {}  # a part's task -> (actor, part)
    waiting: dict = {}  # an info() call -> the actor being restarted
    deaths: collections.Counter = collections.Counter()

    def feed(actor):
        while queue and sum(a is actor for a, _ in tasks.values()) < 2:
            part = queue.popleft()
            tasks[actor.run.remote(part, *args)] = (actor, part)

    for actor in pool:
        feed(actor)
    while tasks or (queue and waiting):
        ready, _ = ray.wait(list(tasks) + list(waiting), num_returns=1, timeout=None if tasks else RESTART_WAIT)
        if not ready:
            raise VGGEmbedError(f"no model actor came back within {RESTART_WAIT:.0f}s after failures; finished "
                                "parts are kept: run the same command again with --resume")
        ref = ready[0]
        if ref in waiting:
            actor = waiting.pop(ref)
            try:
                ray.get(ref)
                feed(actor)
            except ray.exceptions.RayActorError:
                waiting[actor.info.remote()] = actor
            continue
        actor, part = tasks.pop(ref)
        try:
            status = ray.get(ref)
        except ray.exceptions.RayActorError:
            deaths[part.index] += 1
            if deaths[part.index] >= MAX_DEATHS:
                raise VGGEmbedError(f"{part_name(part.index)}: its model actor died {MAX_DEATHS} times while on it "
                                    "(out of memory?); finished parts are kept: run again with --resume") from None
            queue.appendleft(part)
            if actor not in waiting.values():
                waiting[actor.info.remote()] = actor
            for other in pool:
                if other not in waiting.values():
                    feed(other)
            continue
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            raise VGGEmbedError(str(cause) if isinstance(cause, VGGEmbedError)
                                else f"{part_name(part.index)}: {type(cause).__name__}: {cause}") from None
        counts.parts += 1
        counts.images += status["rows"]
        counts.failed += status["failed"]
        for name, error in status["errors"]:
            log(f"vggembed: {display(name)}: {error}")
        if status["failed"] > len(status["errors"]):
            log(f"vggembed: ... and {status['failed'] - len(status['errors'])} more failed images in "
                f"{part_name(part.index)} (all listed in OUT.errors.csv after merge)")
        feed(actor)


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
        if manifest.get("version", 0) < FORMAT_VERSION or "recipe" not in manifest:
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
            lacking = [c for c in ("path", "status", "error", "embedding") if c not in columns]
            if lacking or not pa.types.is_fixed_size_list(table.schema.field("embedding").type):
                what = f"no {', '.join(lacking)} column" if lacking else "an embedding column of another type"
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

    from .output import EmbeddingWriter
    from .pipeline import Item

    run = FinishedRun(out)
    writer = EmbeddingWriter(output, overwrite=overwrite)
    try:
        writer.begin(run.recipe)
        for _, table in run.parts():
            errors = table["error"].to_pylist()
            chunk = [Item(i, p, error=e) for i, (p, e) in enumerate(zip(table_paths(table), errors))]
            ok = np.array([e is None for e in errors], dtype=bool)
            vectors = None
            if ok.any():
                emb = table["embedding"].combine_chunks().filter(pa.array(ok))
                vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(int(ok.sum()), -1)
            writer.write(chunk, vectors)
        writer.finish()
    except BaseException:
        writer.discard()  # nothing half-merged is left: the parts are kept, and merge is simply run again
        raise
    finally:
        writer.close()
    return writer.rows, writer.failed
