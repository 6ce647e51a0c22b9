"""The network out of the process: a TensorFlow SavedModel (for TensorFlow Serving and plain TensorFlow) and a
`.tflite` file (for LiteRT).

SavedModel (`saved_model`), written as OUT/VERSION/ (TensorFlow Serving's layout):

- `serving_default`: input `images`, a batch of encoded images (JPEG, PNG,
  GIF, BMP, WebP bytes; string, shape [N]); decoded (`tf.io.decode_image`,
  3 channels; JPEG with the accurate DCT, as Pillow), resized as the recipe
  says (`squash`: to 224x224; `center-crop`: short side to 256, then the
  centre 224x224) by Pillow's BILINEAR algorithm written in TensorFlow ops
  (`_pillow_resize`; docs/deploy.md has the measured difference), then the
  network;
- `pixels`: input `pixels`, float32 [N, 224, 224, 3], RGB in 0..255, for
  callers who decode themselves: exactly `embed`'s computation;
- both return the recipe's outputs under `embed`'s names (`fc2`,
  `pool5_avg`, ...) and with `--top K` its `top_index`, `top_prob`,
  `top_label` (`Recipe.names`);
- `recipe`: a string variable holding the recipe as JSON (weights MD5,
  layers, resize, vggembed version), readable with plain TensorFlow:
  `json.loads(tf.saved_model.load(DIR).recipe.numpy())`.

The mean pixel is subtracted inside both signatures. Weights are variables, so
they live in `variables/`, not in the graph.

`.tflite` (`tflite`): float32, the `pixels` function converted by
TensorFlow's converter (one signature, `serving_default`, input `pixels`);
or, for int8, the very model `--precision int8` runs (`int8.Int8VGG`),
whose outputs are its layers in the order the sidecar lists. Beside it,
`OUT.json` holds the recipe, the inputs, the outputs in order and the labels.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from ..errors import VGGEmbedError
from ..store.destination import Destination, OutputError, is_stream
from ..store.recipe import Recipe
from .model import _key, _pooled
from .tfimport import _silenced_stderr, tensorflow


# ------------------------------------------------------------------ the place
def targets(fmt: str, out, version: int = 1) -> list[Path]:
    """What an export writes: [OUT/VERSION] (a folder) for a SavedModel, [OUT, OUT.json] for a .tflite."""
    out = Path(out)
    return [out / str(version)] if fmt == "saved-model" else [out, out.with_name(out.name + ".json")]


def check_place(fmt: str, paths: list[Path], overwrite: bool) -> None:
    """Refuse what is there already (without --overwrite), or is of the other kind (a file where the version
    folder goes, a folder where a file goes): one line naming it."""
    folder = fmt == "saved-model"
    for p in paths:
        if not os.path.lexists(p):
            continue
        if folder and not p.is_dir():
            raise OutputError(p, "exists and is not a folder")
        if not folder and (p.is_dir() or is_stream(p)):
            raise OutputError(p, "exists and is not a regular file")
        if not overwrite:
            raise VGGEmbedError(f"{p} already exists: pass --overwrite"
                                + (", or another --version" if folder else ""))


@contextlib.contextmanager
def held(fmt: str, out, version: int = 1, overwrite: bool = False):
    """Hold an export's place while it is built and written, checked before any of that slow work: its folder
    made and its lock taken (`Destination`: OUT/VERSION.lock, or OUT.lock beside a .tflite), so a place that
    cannot be written (a parent that is a file, no such folder, no permission) is one line at once; then
    `check_place`. Yields the `Destination`. An export that fails leaves no folder it made."""
    paths = targets(fmt, out, version)
    made = [p for p in paths[0].parents if not os.path.lexists(p)]  # innermost first
    try:
        with Destination(paths[0]) as dest:
            check_place(fmt, paths, overwrite)
            yield dest
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty
        raise


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError or a TensorFlow error while writing `path` as one `OutputError` naming it."""
    with Destination(path).writing():
        try:
            yield
        except Exception as e:  # TensorFlow's file system: FailedPrecondition, NotFound, PermissionDenied, ...
            tf = sys.modules.get("tensorflow")  # not imported by an int8 export
            if tf is None or not isinstance(e, tf.errors.OpError):
                raise
            text = " ".join((e.message or type(e).__name__).split())
            raise OutputError(path, f"cannot write here: {text}") from None


# ------------------------------------------------------------------ the network
def input_shape(vgg, resize: str) -> tuple[int, int, int]:
    """(H, W, 3): exported and served networks take one fixed input size, so each batch has one shape."""
    if resize == "none":
        raise VGGEmbedError("export and serve need a fixed input size: use --resize squash or center-crop")
    w, h = vgg.spec.input_size
    return h, w, 3


def labels_of(vgg) -> list[str]:
    """The names of `prob`'s classes: the attached head's, or the weight file's."""
    return [vgg.label(i) for i in range(vgg.num_classes or 0)]


def _network(vgg):
    """A copy of `vgg` whose weights are tf.Variables: saved in variables/ (a graph holds 2 GB at most)."""
    tf = tensorflow()
    net = copy.copy(vgg)
    with tf.device(vgg.device):
        net._params = {name: (tf.Variable(w, trainable=False, name=f"{name}_W"),
                              tf.Variable(b, trainable=False, name=f"{name}_b"))
                       for name, (w, b) in vgg._params.items()}
    net._functions = {}
    return net


def _head(net, recipe: Recipe, with_labels: bool):
    """fn(pixels) -> {output name: tensor}: one pass up to the deepest layer, each output pooled as asked, as
    `embed` computes the recipe (with --l2-normalize and --dtype)."""
    tf = tensorflow()
    top = recipe.top
    rmac = [o.name for o in recipe.outputs if o.pool == "rmac"]
    if rmac:
        raise VGGEmbedError(f"{rmac[0]}: R-MAC's regions follow each map's size and are pooled outside the "
                            "network; export the map's layer with another pool (gem, avg, max)")
    head = net.head if top else None
    classifier = (head.output.layer, None) if head is not None else ("prob", None)
    inner = net._function(tuple(dict.fromkeys((o.layer, None) for o in recipe.outputs))
                          + ((classifier,) if top else ()))
    table = tf.constant(labels_of(net)) if top and with_labels else None
    if head is not None:  # the head's softmax on its output, in the graph (standardisation folded in)
        w, b = (tf.constant(a) for a in head.folded())

    def probabilities(maps):
        if head is None:
            return maps[_key(("prob", None))]
        v = _pooled(maps[_key(classifier)], head.output.pool)
        if head.recipe.l2_normalize:
            v = v / tf.maximum(tf.norm(v, axis=1, keepdims=True), 1.1754944e-38)
        return tf.nn.softmax(tf.matmul(v, w) + b)

    def run(pixels):
        maps = inner(pixels)
        out = {}
        for o in recipe.outputs:
            v = _pooled(maps[_key((o.layer, None))], o.pool)
            if recipe.l2_normalize:
                v = v / tf.maximum(tf.norm(v, axis=1, keepdims=True), 1.1754944e-38)
            out[o.name] = tf.identity(tf.cast(v, recipe.dtype), name=o.name)
        if top:
            values, indices = tf.math.top_k(probabilities(maps), k=top)
            out["top_index"] = indices
            out["top_prob"] = values
            if table is not None:
                out["top_label"] = tf.gather(table, indices)
        return out

    return run


PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)


def _pillow_axis(img, out_size, axis: int):
    """Pillow's BILINEAR resample of uint8-valued `img` (float64, H x W x 3) along `axis` (1: width, 0: height).

    Written as Pillow's C code is (`precompute_coeffs`, `normalize_coeffs_8bpc`,
    `ImagingResampleHorizontal_8bpc`): a triangle filter widened by the scale
    when reducing, weights normalised by their sequential sum and rounded to
    22-bit integers, each output the rounded integer sum of its taps. Sums of
    integers below 2^53 are exact in float64, so the result is Pillow's to the
    bit except where the float64 weights themselves round differently.
    """
    tf = tensorflow()
    in_size = tf.shape(img, out_type=tf.int32)[axis]
    in_f = tf.cast(in_size, tf.float64)
    scale = in_f / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # bilinear: support 1, widened by the scale
    ss = 1.0 / filterscale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C's (int): toward zero
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    taps = xmin[:, None] + tf.range(ksize)[None, :]  # (out, ksize)
    valid = taps < xmax[:, None]
    arg = tf.abs((tf.cast(taps, tf.float64) - center[:, None] + 0.5) * ss)
    zero = tf.zeros_like(arg)
    w = tf.where(valid & (arg < 1.0), 1.0 - arg, zero)
    ww = tf.foldl(lambda acc, col: acc + col, tf.transpose(w), initializer=tf.zeros_like(center))  # in order
    k = tf.where(ww[:, None] != 0.0, w / tf.where(ww == 0.0, tf.ones_like(ww), ww)[:, None], w)
    kint = tf.where(k < 0, tf.math.ceil(-0.5 + k * 2.0 ** PRECISION_BITS),
                    tf.floor(0.5 + k * 2.0 ** PRECISION_BITS))  # C's (int) of a value of either sign
    taps = tf.minimum(taps, in_size - 1)
    if axis == 1:
        acc = tf.reduce_sum(tf.gather(img, taps, axis=1) * kint[None, :, :, None], axis=2)
    else:
        acc = tf.reduce_sum(tf.gather(img, taps, axis=0) * kint[:, :, None, None], axis=1)
    return tf.clip_by_value(tf.floor((acc + 2.0 ** (PRECISION_BITS - 1)) / 2.0 ** PRECISION_BITS), 0.0, 255.0)


def _pillow_resize(img, h, w):
    """Pillow's `Image.resize((w, h), BILINEAR)` of an 8-bit RGB image: width first, then height."""
    return _pillow_axis(_pillow_axis(img, w, 1), h, 0)


def _decoder(resize: str, h: int, w: int):
    """fn(encoded string [N]) -> float32 [N, h, w, 3]: decode and resize each image as `prepare` does."""
    tf = tensorflow()
    short = round(min(w, h) * 256 / 224)

    def one(data):
        # JPEG with the accurate integer DCT, as Pillow (libjpeg-turbo's default); decode_image uses the fast one.
        img = tf.cond(tf.io.is_jpeg(data),
                      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                      lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))
        img = tf.cast(img, tf.float64)
        if resize == "squash":
            out = _pillow_resize(img, h, w)
        else:  # center-crop: short side to `short` (Python's round: half to even, as tf.round), then the centre
            size = tf.cast(tf.shape(img)[:2], tf.float64)
            scale = short / tf.reduce_min(size)
            nh = tf.maximum(h, tf.cast(tf.round(size[0] * scale), tf.int32))
            nw = tf.maximum(w, tf.cast(tf.round(size[1] * scale), tf.int32))
            out = _pillow_resize(img, nh, nw)
            out = out[(nh - h) // 2: (nh - h) // 2 + h, (nw - w) // 2: (nw - w) // 2 + w]
        return tf.cast(tf.ensure_shape(out, [h, w, 3]), tf.float32)

    def decode(images):
        return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([h, w, 3], tf.float32))

    return decode


def saved_model(vgg, recipe: Recipe, out, version: int = 1, overwrite: bool = False) -> Path:
    """Write OUT/VERSION/ (saved_model.pb, variables/); return that folder. See the module docstring."""
    tf = tensorflow()
    if vgg.precision == "int8":
        raise VGGEmbedError("a SavedModel runs in TensorFlow, which has no int8 VGG: use --format tflite for int8, "
                            "or --precision float32/bf16/fp16")
    h, w, _ = input_shape(vgg, recipe.resize)
    target, = targets("saved-model", out, version)
    check_place("saved-model", [target], overwrite)
    net = _network(vgg)
    run = _head(net, recipe, with_labels=True)
    decode = _decoder(recipe.resize, h, w)

    module = tf.Module()
    module.variables_ = [v for pair in net._params.values() for v in pair]
    module.recipe = tf.Variable(json.dumps(recipe.to_dict(), sort_keys=True), trainable=False, name="recipe")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def from_images(images):
        return run(decode(images))

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="pixels")])
    def from_pixels(pixels):
        return run(pixels)

    module.from_images, module.from_pixels = from_images, from_pixels
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _writing(target), _quiet():
            tf.saved_model.save(module, str(staging), signatures={
                "serving_default": from_images.get_concrete_function(),
                "pixels": from_pixels.get_concrete_function()})
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tflite(vgg, recipe: Recipe, out, overwrite: bool = False) -> dict:
    """Write OUT (.tflite) and OUT.json (recipe, input, outputs in order, labels); return the sidecar."""
    paths = targets("tflite", out)
    check_place("tflite", paths, overwrite)
    h, w, _ = input_shape(vgg, recipe.resize)
    if vgg.precision == "int8":
        content, order = _int8_model(vgg, recipe)
    elif vgg.precision == "float32":
        content = _float_tflite(vgg, recipe, h, w)
        order = [n for n in recipe.names if n != "top_label"]
    else:
        raise VGGEmbedError(f"--format tflite is float32 or int8; got --precision {vgg.precision}")
    side = {"recipe": recipe.to_dict(), "input": {"name": "pixels", "shape": [None, h, w, 3], "dtype": "float32",
                                        "range": "RGB 0..255, mean subtracted inside"},
            "outputs": order, "labels": labels_of(vgg) if recipe.top else None}
    # Both written beside their places first, then renamed into them: a failed write replaces neither.
    staged = [(path, path.with_name(f".{path.name}.{os.getpid()}.partial"), data)
              for path, data in zip(paths, (content, (json.dumps(side, indent=1) + "\n").encode()))]
    try:
        with _writing(paths[0]):
            for _, tmp, data in staged:
                tmp.write_bytes(data)
            for path, tmp, _ in staged:
                os.replace(tmp, path)
    finally:
        for _, tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return side


def _float_tflite(vgg, recipe: Recipe, h: int, w: int) -> bytes:
    """The `pixels` function as a float32 .tflite with one signature (serving_default: pixels -> named outputs);
    converted from a SavedModel, which is how the converter keeps signatures and output names."""
    import tempfile

    tf = tensorflow()
    module = tf.Module()
    net = _network(vgg)
    module.variables_ = [v for pair in net._params.values() for v in pair]
    run = _head(net, recipe, with_labels=False)
    module.fn = tf.function(run, input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="pixels")])
    with tempfile.TemporaryDirectory(prefix="vggembed-tflite-") as tmp:
        try:
            with _quiet():
                tf.saved_model.save(module, tmp, signatures={"serving_default": module.fn.get_concrete_function()})
                converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
                return converter.convert()
        except Exception as e:  # the converter's own kinds, multi-line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VGGEmbedError(f"{vgg.spec.path}: conversion to .tflite failed: {first}") from None


def _int8_model(vgg, recipe: Recipe):
    """The int8 model `--precision int8` runs for these outputs, and its output names in the file's order."""
    outside = [o.name for o in recipe.outputs if o.layer in ("fc8", "prob") or o.pool in ("gem", "rmac")]
    if recipe.top or outside or recipe.l2_normalize or recipe.dtype != "float32":
        raise VGGEmbedError("an int8 .tflite holds the int8 layers only (fc8, the softmax, GeM and R-MAC pooling, "
                            "--l2-normalize and --dtype run in float32 beside it in vggembed): drop --top"
                            + (f" and {', '.join(outside)}" if outside else ""))
    keys = {(o.layer, o.pool): o.name for o in recipe.outputs}
    body = tuple(sorted(keys, key=lambda key: (key[0], key[1] or "")))  # as Int8VGG._compute orders them
    return vgg.model_bytes(body), [keys[key] for key in body]


@contextlib.contextmanager
def _quiet():
    """TensorFlow's saving and converting logs (fd 2, warnings), unless -v."""
    if os.environ.get("VGGEMBED_VERBOSE"):
        yield
        return
    with _silenced_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
