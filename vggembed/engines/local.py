"""Reader -> model -> writer: the loop behind `vggembed embed` and `vggembed classify`.

The runner owns ordering and accounting: every input is either a row or a
recorded failure, in input order; it times decoding-wait and compute apart.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import LayerError, VGGEmbedError, display
from ..images.decode import DEFAULT_MAX_PIXELS, prepare
from ..images.pipeline import Item, chunks, decode_stream, stack
from ..images.sources import fetch_ahead, name_of
from ..net import arch as arch_mod
from ..net import pooling
from ..net.model import VGG, Prediction
from ..store.recipe import Recipe


@dataclass
class Options:
    """How a run goes; what its vectors mean is the `Recipe`."""

    batch_size: int = 16
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    strict: bool = False
    progress: bool = False
    fetch_ahead: int = 32  # remote reads in flight, beside the decoding threads


def pad_to(recipe: Recipe, opts: Options, inputs: int | None = None) -> int | None:
    """The one shape every batch of a run is padded to: the batch size, or the number of `inputs` when
    a run has fewer (so one image costs one image, not a batch); None for native-size images (one per batch).

    Each row then comes from the same kernels whatever batch it falls in, so a
    command gives the same rows every time (oneDNN picks kernels per shape).
    """
    if recipe.resize == "none":
        return None
    return opts.batch_size if inputs is None else max(1, min(opts.batch_size, inputs))


@dataclass
class Summary:
    images: int = 0
    failed: int = 0
    skipped: int = 0  # done by an earlier, interrupted run
    seconds: float = 0.0
    wait_seconds: float = 0.0  # the model waiting for decoded images
    first_batch_seconds: float | None = None

    def line(self, verb: str) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        text = f"{verb} {self.images - self.failed} of {self.images} images in {self.seconds:.1f}s ({rate:.1f} images/s)"
        if self.failed:
            text += f"; {self.failed} failed"
        if self.skipped:
            text += f"; {self.skipped} already done by the interrupted run"
        return text


class StrictStop(VGGEmbedError):
    """--strict: the first bad image ends the run."""


class _Counted:
    """Iterate `items`, counting them and noting when they end."""

    def __init__(self, items: Iterable, before: int = 0):
        self.items, self.count, self.ended = items, before, False

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item
        self.ended = True


def batches(model: VGG, sources: Iterable[str], recipe: Recipe, opts: Options, summary: Summary,
            total: int | None = None, before: int = 0
            ) -> Iterator[tuple[list[Item], np.ndarray | None, int | None]]:
    """Decoded chunks of `sources` with their stacked batch and the size to pad it to, in input order.

    The pad size follows `pad_to` from the number of inputs of the whole run
    (`before` were done by an interrupted run): known at once from `total`,
    or, when the inputs are streamed, as soon as they end within the first
    batch; either way the same inputs give the same size.
    """
    from tqdm import tqdm

    fn = functools.partial(prepare, resize_mode=recipe.resize, size=model.spec.input_size,
                           max_pixels=opts.max_pixels, fast_decode=recipe.fast_decode)
    # Native-size images differ in shape, so each is its own batch.
    batch_size = pad_to(recipe, opts) or 1
    window = max(2 * batch_size, 4 * opts.workers)
    counted = _Counted(sources, before)
    stream = decode_stream(fetch_ahead(counted, opts.fetch_ahead), fn, workers=opts.workers, window=window)
    start = time.perf_counter()
    with tqdm(total=total, unit="img", file=sys.stderr, disable=not opts.progress, dynamic_ncols=True) as bar:
        waited = time.perf_counter()
        for chunk in chunks(stream, batch_size):
            summary.wait_seconds += time.perf_counter() - waited
            for item in chunk:
                if item.error is not None:
                    line = f"{display(item.source)}: {item.error}"
                    if opts.strict:
                        raise StrictStop(f"{line} (--strict)")
                    if opts.progress:
                        bar.write(f"vggembed: {line}", file=sys.stderr)
                    elif sys.stderr is not None:  # None: started with stderr closed
                        print(f"vggembed: {line}", file=sys.stderr)
            inputs = before + total if total is not None else counted.count if counted.ended else None
            yield chunk, stack(chunk), pad_to(recipe, opts, inputs)
            if summary.first_batch_seconds is None:
                summary.first_batch_seconds = time.perf_counter() - start
            summary.images += len(chunk)
            summary.failed += sum(item.error is not None for item in chunk)
            summary.seconds = time.perf_counter() - start
            bar.update(len(chunk))
            waited = time.perf_counter()


def skip_done(sources: Iterable, done: list[str], run: str = "the interrupted run",
              hint: str = "resume with the same inputs, or pass --overwrite to start over") -> Iterator:
    """Skip the inputs an interrupted run (`run`) finished, checking they are the same ones (by name)."""
    it = iter(sources)
    for i, expected in enumerate(done):
        got = next(it, None)
        if got is None or name_of(got) != expected:
            got_text = "missing" if got is None else repr(display(name_of(got)))
            raise VGGEmbedError(
                f"--resume: input {i + 1} is {got_text} but {run} had {display(expected)!r}; {hint}")
    yield from it


def check_complete(sources: Iterable, writer, recipe: Recipe) -> None:
    """`--resume` on an output that is already complete: it is done only if it was made with `recipe` (bound to
    its weights) from the same inputs, in order; otherwise one line saying what differs."""
    recorded, names = writer.recorded()
    hint = "pass --overwrite (without --resume) to embed again"
    if recorded is not None:
        recipe.check_same(recorded, f"--resume: {writer.out} (complete)", hint)
    for extra in skip_done(sources, names, f"{writer.out} (complete)", hint):
        raise VGGEmbedError(f"--resume: {writer.out} is complete with {len(names)} inputs, but input "
                            f"{len(names) + 1} is {display(name_of(extra))!r}, which it does not hold; {hint}")


def check_outputs(model: VGG, recipe: Recipe) -> Recipe:
    """Check what `recipe` asks against the loaded network, before any image is read; return it bound to the
    network's weight file."""
    if not recipe.outputs and not recipe.top:
        raise VGGEmbedError("nothing to compute: name a --layer, or --top K")
    for output in recipe.outputs:
        model.resolve(output.layer)
    classifier = model.head.output.layer if model.head is not None else "prob"
    if recipe.top:
        model.resolve(classifier)
    head = [o.name for o in recipe.outputs if arch_mod.is_head(o.layer)] + (
        ["--top"] if recipe.top and arch_mod.is_head(model.resolve(classifier)) else [])
    if recipe.resize == "none" and head:
        w, h = model.spec.input_size
        what = "--top" if head[0] == "--top" else f"layer {head[0]}"
        raise LayerError(f"{what} needs the {w}x{h} input the fc layers were trained at: use --resize squash or "
                         "center-crop, or conv/pool layers only")
    return recipe.bind(model.spec, model.head)


def widths(model: VGG, recipe: Recipe) -> dict[str, int]:
    """The width of each array `recipe` makes (`compute`'s), at the network's input size."""
    w, h = model.spec.input_size
    out = {}
    for o in recipe.outputs:
        shape = model.output_shape(o.layer, h, w)
        out[o.name] = shape[0] if len(shape) == 1 else int(np.prod(shape)) if o.pool == "flatten" else shape[2]
    if recipe.top:
        out["top_index"] = out["top_prob"] = recipe.top
    return out


def compute(model: VGG, batch: np.ndarray, recipe: Recipe, pad: int | None = None) -> dict[str, np.ndarray]:
    """Every array `recipe` makes for one preprocessed batch, from one pass of the network (as far as the
    deepest layer asked, `prob` only with --top): {output name: (N, D) vectors, `top_index`: (N, K) int32,
    `top_prob`: (N, K) float32}. Ranks are `VGG.top_k`'s (ties: the higher class index first)."""
    wanted = tuple((o.layer, o.pool) for o in recipe.outputs) + ((("prob", None),) if recipe.top else ())
    out = model.run_outputs(batch, wanted, pad)
    arrays = {}
    for o in recipe.outputs:
        vectors = out[o.layer, o.pool]
        arrays[o.name] = pooling.unit_rows(vectors) if recipe.l2_normalize else vectors
    if recipe.top:
        probs = out["prob", None]
        index = np.argsort(probs, axis=1, kind="stable")[:, ::-1][:, : recipe.top]
        arrays["top_index"] = index.astype(np.int32)
        arrays["top_prob"] = np.take_along_axis(probs, index, axis=1).astype(np.float32)
    return arrays


def embed(model: VGG, sources: Iterable[str], writer, recipe: Recipe, opts: Options,
          total: int | None = None) -> Summary:
    """Run every source through the network into `writer` (an `writer.EmbeddingWriter`): each array
    `recipe` asks (`compute`), a row per image, in input order."""
    recipe = check_outputs(model, recipe)
    try:
        writer.begin(recipe, label=model.label)
        summary = Summary(skipped=writer.done)
        done = writer.resumed_sources
        if done:
            sources = skip_done(sources, done)
            total = None if total is None else total - len(done)
        for chunk, batch, pad in batches(model, sources, recipe, opts, summary, total, before=len(done)):
            writer.write(chunk, None if batch is None else compute(model, batch, recipe, pad))
        writer.finish()
    finally:
        writer.close()
    return summary


def classify(model: VGG, sources: Iterable[str], emit: Callable[[str, list], None], *, top: int, recipe: Recipe,
             opts: Options, total: int | None = None) -> Summary:
    """Call `emit(source, predictions)` for every image that decodes, in input order: the top-`top`
    `Prediction`s, the very `top_index`/`top_prob` that `embed --top` writes (`compute`)."""
    recipe = check_outputs(model, recipe.replace(outputs=(), top=top))
    summary = Summary()
    for chunk, batch, pad in batches(model, sources, recipe, opts, summary, total):
        if batch is None:
            continue
        arrays = compute(model, batch, recipe, pad)
        ok = [item for item in chunk if item.error is None]
        for item, index, prob in zip(ok, arrays["top_index"].tolist(), arrays["top_prob"].tolist()):
            emit(item.source, [Prediction(rank, i, model.label(i), p)
                               for rank, (i, p) in enumerate(zip(index, prob), 1)])
    return summary
