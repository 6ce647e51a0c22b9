"""`vggembed embed --engine ray`: the same embed job across a Ray cluster, the driver out of the data path.

Flow:

1. The driver lists the inputs exactly as the local engine does and cuts
   them into parts (`plan_parts`): runs of up to `part_size` inputs, in
   order. A part is the unit of work and of `--resume`.
2. A fixed pool of model actors (`PartWorker`: weights loaded once per actor
   from the weight file's path, `num_gpus` per actor) takes one part per
   task: it reads and decodes the part's images in threads beside the model
   (the local engine's own `local.batches`, so rows are computed exactly as
   locally, failed images as rows with their error), runs the model, and
   writes the whole part straight into OUT as `part-NNNNN.parquet`,
   atomically. It returns only a small status: counts and the first errors.
3. The driver only plans parts, schedules them, and commits
   `manifest.json` (the inputs' digest, the parts, the run's `Recipe`), so
   its memory and traffic do not grow with the images' pixels or vectors.
   `vggembed merge` gathers the parts into the local engine's outputs.

OUT is a local (or shared) folder or an object-store URL (`s3://`, `gs://`,
... any fsspec protocol). What is in it, and how it is written and read back,
is `store/runfolder.py`'s: this module only plans, schedules and computes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import VGGEmbedError, display
from ..images.inputs import is_unopened_shard, open_shards
from ..images.sources import Source, name_of
from ..net.load import load_recipe, locate
from ..store.recipe import Recipe
from ..store.runfolder import Part, RunDir, Store, part_name, write_part
from .local import Options, Summary, batches, check_outputs, compute, pad_to, widths

RESTART_WAIT = 300.0  # seconds without any live model actor before the run gives up (parts are kept)
MAX_DEATHS = 3  # a part whose actor dies this often is given up (an image that kills the decoder, say)
ERRORS_RETURNED = 20  # per part, in the status sent back to the driver (all of them are in the part)


# ------------------------------------------------------------------ planning
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


# ------------------------------------------------------------- cluster side
class PartWorker:
    """A model actor: loads the network once, then embeds and writes whole parts.

    Its constructor takes only small values (the recipe names the weight file
    by path), so Ray can restart it anywhere without objects from the store.
    Errors while loading are kept and reported by `info()` instead of
    killing the actor, so the driver can show them as one line.
    """

    def __init__(self, recipe: dict, store: str, options: dict, device: str):
        self.store = Store(store)
        self.error = None
        try:
            recipe = Recipe.from_dict(recipe)
            self.model = load_recipe(recipe, device=device)
            self.recipe = check_outputs(self.model, recipe)
            # Decoding threads beside the model, as many as the local engine's default on this node.
            self.opts = Options(**{**options, "workers": min(8, os.cpu_count() or 2), "progress": False})
            self.widths = widths(self.model, self.recipe)
        except VGGEmbedError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - anything else still reaches the user as one line
            self.error = f"{type(e).__name__}: {e}"

    def info(self) -> dict:
        """The bound recipe (or the loading error) and where this actor runs."""
        import socket

        return {"error": self.error, "host": socket.gethostname(),
                "recipe": None if self.error else self.recipe.to_dict()}

    def run(self, part: Part, run_id: str, pad: int) -> dict:
        """Decode, embed and write one part, every batch padded to `pad` images as the local engine pads
        the same run's; return the part's counts and first errors."""
        if self.error:
            raise VGGEmbedError(self.error)
        start = time.perf_counter()
        names: list[str] = []
        errors: list[str | None] = []
        blocks: dict[str, list] = {name: [] for name in self.widths}
        summary = Summary()
        for chunk, batch, _ in batches(self.model, open_shards(part.sources), self.recipe, self.opts, summary):
            names += [item.source for item in chunk]
            errors += [item.error for item in chunk]
            if batch is not None:
                for name, block in compute(self.model, batch, self.recipe, pad).items():
                    blocks[name].append(block)
        arrays = {name: np.concatenate(b) if b else np.zeros((0, self.widths[name]), np.float32)
                  for name, b in blocks.items()}
        write_part(self.store, run_id, part, names, errors, arrays, self.recipe, self.widths, self.model.label)
        failed = [(n, e) for n, e in zip(names, errors) if e is not None]
        return {"part": part.index, "rows": len(names), "failed": len(failed), "errors": failed[:ERRORS_RETURNED],
                "seconds": time.perf_counter() - start}


# -------------------------------------------------------------- driver side
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
        opts: a `local.Options`; `opts.workers` is the number of model actors.
        log: gets one line per failed image (the first `ERRORS_RETURNED` of each part).
    """
    try:
        import ray
    except ImportError:
        raise VGGEmbedError('--engine ray needs Ray: pip install "vggembed[ray]"') from None

    if recipe.resize == "none":
        raise VGGEmbedError("--engine ray needs a fixed input size: use --resize squash or center-crop")
    recipe = locate(recipe)
    if recipe.precision == "int8":
        from ..net.int8 import check_available

        check_available()  # LiteRT and a VNNI/AMX CPU: say so here rather than in every actor's traceback
    weights = os.path.abspath(recipe.weights)
    if address is None and not os.path.isfile(weights):  # a runtime started here: fail before starting it
        raise VGGEmbedError(f"{weights}: no such weight file")
    recipe = recipe.replace(weights=weights)
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
        here = {"weights": recipe.weights, "head": recipe.head}  # the files by path, not the recorded names
        pool += [actor.remote(recipe.to_dict() | here, store.where, dataclasses.asdict(opts),
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
    # Every part is committed and no actor of this run lives: what a writer that died mid-part left (its
    # node lost, its process killed) goes now, not only on a later --resume.
    run.sweep()
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


