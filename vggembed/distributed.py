"""`vggembed embed --engine ray`: the same embed job across a Ray cluster, with Ray Data.

Flow (driver -> cluster -> driver):

1. The driver lists and sorts the inputs exactly as the local engine does and
   gives each image a stable id (its position). Ids are grouped into parts of
   `part_size`; a part is the unit of resume.
2. Ray Data decodes in CPU tasks that never raise: each row comes back with
   its image or its error. (The bytes are read inside these tasks rather
   than with `read_binary_files`, which fails the whole job on a path that
   vanished or cannot be read; here that is one row with its error.)
3. A fixed-size actor pool runs the model: weights loaded once per actor in
   its constructor, `num_gpus` per actor, batches padded to the batch size
   so every row is computed as the local engine computes it.
4. The driver receives rows in order and writes each finished part as
   `OUT_DIR/part-NNNNN.parquet` (id, path, status, error, embedding),
   atomically; `manifest.json` records the inputs and the recipe, so a re-run
   with `--resume` skips finished parts. `vggembed merge` gathers the parts
   into the local engine's outputs.

Shards are written by the driver, so OUT_DIR needs no shared file system;
the weight file's path must be readable on every node.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .errors import VGGEmbedError
from .images import prepare
from .pipeline import decode_one
from .recipe import Recipe

MANIFEST = "manifest.json"
DECODE_CPUS = 0.5  # per decoding task: Pillow work is light beside the model's


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------- cluster side
def decode_batch(batch: dict, resize: str, size, max_pixels: int, fast_decode: bool) -> dict:
    """Ray Data task: decode a batch of paths; never raises (errors become values)."""
    fn = functools.partial(prepare, resize_mode=resize, size=tuple(size), max_pixels=max_pixels,
                           fast_decode=fast_decode)
    blank = np.zeros((size[1], size[0], 3), np.uint8)
    images, errors = [], []
    for path in batch["path"]:
        array, error = decode_one(fn, str(path))
        images.append(blank if error else array)
        errors.append(error or "")
    return {"id": batch["id"], "path": batch["path"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


class Embedder:
    """Ray Data actor: one loaded model per actor, reused for every batch."""

    def __init__(self, recipe: dict, batch_size: int, device: str):
        from .model import load_recipe

        self.recipe = Recipe(**recipe)
        self.model = load_recipe(self.recipe, device=device)
        self.name = self.model.embedding_layer(self.recipe.layer, self.recipe.pool)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        vectors = None
        if ok.any():
            images = batch["image"][ok].astype(np.float32)
            vectors = self.model.embed_batch(images, self.name, self.recipe.pool, self.recipe.l2_normalize,
                                             pad_to=self.batch_size)
        dim = vectors.shape[1] if vectors is not None else 0
        out = np.zeros((len(ok), dim), np.float32)
        if vectors is not None:
            out[ok] = vectors
        return {"id": batch["id"], "path": batch["path"], "error": batch["error"], "embedding": out}


# -------------------------------------------------------------- driver side
class RunDir:
    """OUT_DIR: the manifest and the finished part files."""

    def __init__(self, out_dir, paths: list[str], recipe: Recipe, part_size: int, *, resume: bool,
                 overwrite: bool):
        self.dir = Path(out_dir)
        self.paths, self.part_size = paths, part_size
        self.parts = -(-len(paths) // part_size)
        manifest = {"version": 2, "inputs": len(paths), "inputs_sha256": _digest(paths), "part_size": part_size,
                    "parts": self.parts, "recipe": recipe.to_dict()}
        existing = self.dir / MANIFEST
        if existing.exists() and overwrite:
            for f in self.dir.glob("part-*.parquet"):
                f.unlink()
            existing.unlink()
        if existing.exists():
            old = json.loads(existing.read_text())
            if not resume:
                raise VGGEmbedError(f"{self.dir}: holds an earlier run; pass --resume to continue it or "
                                    "--overwrite to start over")
            for key in ("inputs_sha256", "part_size"):
                if old.get(key) != manifest[key]:
                    raise VGGEmbedError(f"{self.dir}: --resume with other {key.replace('_sha256', '')} than the "
                                        "earlier run; use the same command, or --overwrite")
            recipe.check_same(Recipe.from_dict(old.get("recipe") or {}), f"{self.dir}: the earlier run",
                              "resume with the same options, or pass --overwrite")
        elif self.dir.exists() and any(self.dir.iterdir()) and not overwrite:
            raise VGGEmbedError(f"{self.dir}: not empty and not a vggembed run folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(existing, json.dumps(manifest, indent=1).encode())

    def done(self) -> set[int]:
        return {k for k in range(self.parts) if (self.dir / part_name(k)).exists()}

    def write_part(self, k: int, rows: dict, dtype) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        order = np.argsort(rows["id"], kind="stable")
        emb = np.asarray(rows["embedding"])[order].astype(dtype)
        errors = [str(e) for e in np.asarray(rows["error"], dtype=object)[order]]
        ok = np.array([e == "" for e in errors])
        value_type = pa.float32() if np.dtype(dtype) == np.float32 else pa.float16()
        flat = pa.array(emb.reshape(-1), type=value_type)
        column = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1], mask=pa.array(~ok))
        table = pa.table({
            "id": pa.array(np.asarray(rows["id"])[order], pa.int64()),
            "path": pa.array([str(p) for p in np.asarray(rows["path"], dtype=object)[order]], pa.string()),
            "status": pa.array(["ok" if o else "error" for o in ok], pa.string()),
            "error": pa.array([e or None for e in errors], pa.string()),
            "embedding": column,
        })
        tmp = self.dir / (part_name(k) + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / part_name(k))


def embed(paths: list[str], out_dir, recipe: Recipe, opts, *, gpus_per_worker=0.0, address=None, part_size=1000,
          resume=False, overwrite=False, log=print) -> dict:
    """Embed `paths` on Ray into OUT_DIR part files, as `recipe` says (`opts`: a `runner.Options`;
    `opts.workers` is the number of model actors). Returns counts for the summary line."""
    try:
        import ray
    except ImportError:
        raise VGGEmbedError('--engine ray needs Ray: pip install "vggembed[ray]"') from None
    from .weights import load_weights

    if recipe.resize == "none":
        raise VGGEmbedError("--engine ray needs a fixed input size: use --resize squash or center-crop")
    recipe = recipe.locate()
    _, spec = load_weights(recipe.weights)  # fail fast on the driver, with the file's own message
    from . import arch as arch_mod

    recipe = recipe.bind(spec, arch_mod.resolve(spec.arch, recipe.layer, embedding=True))
    recipe = recipe.replace(weights=str(Path(recipe.weights).resolve()))
    batch_size, workers = opts.batch_size, opts.workers
    run = RunDir(out_dir, paths, recipe, part_size, resume=resume, overwrite=overwrite)
    done = run.done()
    todo = [{"id": i, "path": p} for i, p in enumerate(paths) if i // part_size not in done]
    counts = {"images": len(todo), "skipped": len(paths) - len(todo), "failed": 0, "seconds": 0.0}
    if not todo:
        return counts

    started_here = not ray.is_initialized()
    if started_here:
        quiet = not os.environ.get("VGGEMBED_VERBOSE")
        if quiet:
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
            logging.getLogger("ray").setLevel(logging.ERROR)
        ray.init(address=address, log_to_driver=not quiet, include_dashboard=False,
                 logging_level=logging.ERROR if quiet else logging.INFO)
    start = time.perf_counter()
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if not gpus_per_worker and cpus < workers + DECODE_CPUS:
            raise VGGEmbedError(f"the Ray cluster has {cpus:g} CPUs: {workers} model actors (1 CPU each) leave none "
                                f"for decoding; use --workers {max(1, int(cpus - DECODE_CPUS))} or a bigger cluster")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # parts finish one after another
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // batch_size // 4 or 1))
        ds = ds.map_batches(decode_batch, batch_size=batch_size, fn_kwargs={
            "resize": recipe.resize, "size": list(spec.input_size), "max_pixels": opts.max_pixels,
            "fast_decode": recipe.fast_decode}, num_cpus=DECODE_CPUS)
        ds = ds.map_batches(
            Embedder, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker or None, num_cpus=1 if not gpus_per_worker else None,
            fn_constructor_kwargs={"recipe": dataclasses.asdict(recipe), "batch_size": batch_size,
                                   "device": "gpu" if gpus_per_worker else "cpu"})
        pending: dict[int, dict] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in np.unique(np.asarray(batch["id"]) // part_size):
                sel = np.asarray(batch["id"]) // part_size == k
                part = pending.setdefault(int(k), {"id": [], "path": [], "error": [], "embedding": []})
                for key in part:
                    part[key].extend(list(np.asarray(batch[key], dtype=object if key in ("path", "error")
                                                     else None)[sel]))
                expected = min(part_size, len(paths) - int(k) * part_size)
                if len(part["id"]) == expected:
                    rows = pending.pop(int(k))
                    rows["embedding"] = np.stack(rows["embedding"])
                    run.write_part(int(k), rows, recipe.dtype)
                    failed = sum(1 for e in rows["error"] if e)
                    counts["failed"] += failed
                    for p, e in zip(rows["path"], rows["error"]):
                        if e:
                            log(f"vggembed: {p}: {e}")
        if pending:
            raise VGGEmbedError(f"Ray returned incomplete parts {sorted(pending)}; run again with --resume")
    finally:
        counts["seconds"] = time.perf_counter() - start
        if started_here:
            ray.shutdown()
    return counts


def merge(out_dir, output, *, overwrite=False) -> tuple[int, int]:
    """Gather OUT_DIR's parts into the local engine's outputs (OUT, OUT.index.csv, OUT.errors.csv)."""
    import pyarrow.parquet as pq

    from .output import EmbeddingWriter
    from .pipeline import Item

    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        raise VGGEmbedError(f"{out_dir}: no {MANIFEST}; not a folder written by --engine ray")
    manifest = json.loads((out_dir / MANIFEST).read_text())
    missing = [part_name(k) for k in range(manifest["parts"]) if not (out_dir / part_name(k)).exists()]
    if missing:
        raise VGGEmbedError(f"{out_dir}: {len(missing)} of {manifest['parts']} parts missing (first: {missing[0]}); "
                            "finish the run with --resume first")
    if "recipe" not in manifest:
        raise VGGEmbedError(f"{out_dir / MANIFEST}: written by an older vggembed without a recipe; "
                            "run the embedding again")
    writer = EmbeddingWriter(output, overwrite=overwrite)
    next_id = 0
    try:
        writer.begin(Recipe.from_dict(manifest["recipe"]))
        for k in range(manifest["parts"]):
            table = pq.read_table(out_dir / part_name(k))
            ids = table["id"].to_numpy()
            if len(ids) and (ids[0] != next_id or not np.array_equal(ids, np.arange(next_id, next_id + len(ids)))):
                raise VGGEmbedError(f"{out_dir / part_name(k)}: ids do not continue from {next_id}")
            next_id += len(ids)
            errors = table["error"].to_pylist()
            chunk = [Item(int(i), p, error=e) for i, p, e in zip(ids, table["path"].to_pylist(), errors)]
            ok = [e is None for e in errors]
            vectors = None
            if any(ok):
                emb = table["embedding"].combine_chunks().filter(np.array(ok))
                vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(sum(ok), -1)
            writer.write(chunk, vectors)
        if next_id != manifest["inputs"]:
            raise VGGEmbedError(f"{out_dir}: parts hold {next_id} rows, the manifest {manifest['inputs']}")
        writer.finish()
    finally:
        writer.close()
    return writer.rows, writer.failed


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
