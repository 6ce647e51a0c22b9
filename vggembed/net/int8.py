"""`--precision int8`: VGG quantized to int8 by vggembed itself, written as a TFLite model, run by LiteRT/XNNPACK.

CPUs with AVX512-VNNI, AVX-VNNI or AMX do four int8 multiply-adds where they
do one float32, and XNNPACK's int8 kernels use them; no TensorFlow path does.

- Static full-integer quantization: `Int8VGG.calibrate` runs the
  calibration set (`calibration/` in this package, or `--calibration DIR`)
  through the network in float32 and "as int8 so far", rounds the weights
  to int8 per output channel, measures each activation's range (its peak
  times RANGE_MARGIN) and corrects each bias for the mean shift the
  rounding causes (bias correction, measured with every earlier layer
  already int8). `write_model` then writes exactly that network as a TFLite
  flatbuffer (`tflite.Graph`), with the ops, scales and zero points
  TensorFlow's converter gave the same network written with fake-quant
  ranges (RECIPE_VERSION 2 had the converter build it: from the same plan
  its model computes the same to the bit, but it took 12 GB and 2 minutes
  for VGG16). `_check_int8` refuses a model where a conv or fully connected
  layer would run float.
- No TensorFlow anywhere: calibration's convolutions run in float32 on
  LiteRT (one small model per layer), its fc layers in float64 (exact on
  int8 codes), the rest in numpy; the built-in views are resized in
  integer arithmetic (`_resize_exact`). So one weight file and calibration
  set give the same int8 model to the byte on every machine checked
  (docs/startup.md): the model follows its calibration's last bits. VGG16
  converts in about 40 CPU-seconds, peaking at 1.5 GB.
- One model per set of requested layers and pool, converted on first use and
  cached in the weights cache (`$VGGEMBED_HOME/int8/`), keyed by everything
  that changes the result, written atomically and checked by SHA-256 before
  use. A run whose model is cached reads only fc8 of the weight file.
- The last layer (fc8, 4 MFLOP of VGG16's 15,500) and the softmax run in
  float32 on the dequantized relu7: an int8 softmax gives probabilities in
  steps of 1/256 and int8 logits tie often at the top, which would make
  top-5 ranks arbitrary. So `classify` and `embed --layer fc2` share one
  int8 model.

`Int8VGG` has `VGG`'s interface (`run`, `embed_batch`, `embed`, `classify`,
...), so the runner, the CLI and the Ray actor use it unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import ImageError, VGGEmbedError
from ..store.recipe import INT8_SCHEME, __version__
from . import pooling, tflite
from .model import VGG, network_layers
from .tfimport import _silenced_stderr
from .weights import WeightSpec

CPUINFO = "/proc/cpuinfo"  # tests point this at a fake file
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CALIBRATION_DIR = Path(__file__).parent / "calibration"
# Calibration holds the "int8 so far" stream of every image at one layer (VGG16, 40 images: 0.65 GB at the
# widest), so it is capped.
MAX_CALIBRATION_IMAGES = 64
RECIPE_VERSION = INT8_SCHEME  # in the cache key: a new scheme never reads an old model
INPUT_RANGE = (0.0, 255.0)
# Activation ranges are the largest values seen in calibration times this margin: photos outside the set
# went 15-30% beyond it (measured on 240 views), and clipping the peaks that max-pooling carries on cost more
# than the coarser step (benchmarks/throughput.py --only int8 prints the fidelity).
RANGE_MARGIN = 1.15
CALIBRATION_ROWS = 8
# The float32 network's statistics go through every layer this many images at a time: each layer's LiteRT
# model holds its input and output for them (VGG16: about 40 MB per image over all layers).
FLOAT_ROWS = 2
# fc layers in calibration multiply this many kernel rows at a time in float64, so a float64 copy of the
# kernel exists one slice at a time (fc6 whole: 822 MB).
FC_ROWS = 2048
# The built-in calibration set at 224x224 (SHA-256 of its 40 views' pixels, `_pixels_digest`): the same on
# every machine (`_resize_exact`); a conversion on pixels that differ says so, since its model will too.
BUILTIN_SHA256 = "c23071e641c398d381da6b120d52672aca2b780424075c1b45dd085021d0630a"
# Fixed views of each calibration photo (fractions of width and height: left, top, right, bottom; mirrored):
# the whole photo, its centre, and two mirrored corners, so ranges cover framings a user's photos have.
VIEWS = ((0, 0, 1, 1, False), (0.15, 0.15, 0.85, 0.85, False), (0, 0, 0.7, 0.7, True), (0.3, 0.3, 1, 1, True))


def cpu_has_int8_dot() -> bool:
    """True where the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        with open(CPUINFO) as f:
            words = set(f.read().split())
    except OSError:
        return False
    return any(flag in words for flag in INT8_FLAGS)


def check_available(device: str = "auto") -> None:
    """Refuse int8 early (before weights load) where it cannot run or would be slow.

    Raises:
        VGGEmbedError: LiteRT is missing, a GPU was asked for, or the CPU lacks VNNI/AMX.
    """
    _interpreter_class()
    if device == "gpu":
        raise VGGEmbedError("--precision int8 runs on the CPU (LiteRT/XNNPACK); use --device cpu or auto, or "
                            "--precision bf16/fp16 on a GPU")
    if not cpu_has_int8_dot():
        raise VGGEmbedError("this CPU lacks int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX_INT8), "
                            "where int8 is slower than float32 and loses accuracy to 16-bit saturation; use "
                            "--precision float32")


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise VGGEmbedError('--precision int8 needs LiteRT: pip install "vggembed[int8]"') from None
    return Interpreter


def _threads() -> int:
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Int8VGG(VGG):
    """A VGG network whose conv and fc layers run in int8 (see the module docstring).

    Build it with `vggembed.load(path, precision="int8")`. Input must be the
    weights' input size (224x224): the int8 model is converted for it.
    `params` needs only fc8 (what runs in float32 outside the int8 model);
    the whole weight file is read again when a model has to be converted.
    No TensorFlow is imported.
    """

    def __init__(self, params: dict, spec: WeightSpec, *, calibration=None, log=_log):
        check_available()
        self.spec = spec
        self.precision = "int8"
        self.device = "/CPU:0"
        self.layers, self._index = network_layers(spec)
        self.calibration = None if calibration is None else Path(calibration)
        self.log = log
        self._params = params
        self._interpreters: dict = {}
        if spec.has_fc:
            self._fc8 = (np.asarray(params["fc8"][0], np.float32), np.asarray(params["fc8"][1], np.float32))

    # ------------------------------------------------------------- running
    def _compute(self, batch: np.ndarray, graph: tuple) -> dict[tuple, np.ndarray]:
        size = tuple(reversed(self.spec.input_size))
        if tuple(batch.shape[1:3]) != size:
            raise VGGEmbedError(f"--precision int8 runs at the {size[1]}x{size[0]} input it was converted for; got "
                                f"{batch.shape[2]}x{batch.shape[1]}: use resize 'squash' or 'center-crop', or "
                                "--precision float32")
        head = [key for key in graph if key[0] in ("fc8", "prob")]
        # What the int8 model computes for each key: GeM has no int8 kernel, so its map comes out of the model
        # and is pooled here in float32 (fc layers come without a pool from `run_outputs`: classify and an fc2
        # run share one model).
        source = {key: (key[0], None if key[1] == "gem" else key[1]) for key in graph if key not in head}
        if head:
            source["relu7", None] = ("relu7", None)
        body = tuple(sorted(set(source.values()), key=lambda key: (key[0], key[1] or "")))
        interpreter = self._interpreter(body)
        x = interpreter.get_input_details()[0]
        if tuple(x["shape"]) != batch.shape:
            interpreter.resize_tensor_input(x["index"], batch.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(x["index"], np.ascontiguousarray(batch, np.float32))
        interpreter.invoke()
        # Outputs come in `body`'s order (`write_model`).
        got = {key: interpreter.get_tensor(o["index"]) for key, o in zip(body, interpreter.get_output_details())}
        out = {key: pooling.gem(got[computed]) if key[1] == "gem" else got[computed]
               for key, computed in source.items()}
        if head:
            w, b = self._fc8
            logits = out["relu7", None] @ w + b
            out["fc8", None] = logits
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            out["prob", None] = e / e.sum(axis=1, keepdims=True)
        return out

    def walk(self, batch, last):
        raise VGGEmbedError("feature maps run at each image's own size, and an int8 model has the fixed input it "
                            "was converted for; use --precision float32 (or bf16)")

    def _interpreter(self, body: tuple):
        """The LiteRT interpreter of one output set (XNNPACK is its default CPU delegate), created once."""
        key = body
        if key not in self._interpreters:
            Interpreter = _interpreter_class()
            content = self.model_bytes(body)
            quiet = not os.environ.get("VGGEMBED_VERBOSE")
            with _silenced_stderr() if quiet else contextlib.nullcontext():  # "Created ... XNNPACK delegate"
                interpreter = Interpreter(model_content=content, num_threads=_threads())
                interpreter.allocate_tensors()  # applies the delegate
            if len(interpreter.get_output_details()) != len(body):
                raise VGGEmbedError(f"int8 model for {body} has {len(interpreter.get_output_details())} outputs")
            self._interpreters[key] = interpreter
        return self._interpreters[key]

    # ----------------------------------------------------- conversion cache
    def cache_key(self, body: tuple) -> dict:
        """Everything that changes the int8 model: a cache entry is used only when all of it matches."""
        return {"recipe": RECIPE_VERSION, "weights_md5": self.spec.md5, "arch": self.spec.arch,
                "legacy_transpose": self.spec.legacy_transpose, "outputs": [list(key) for key in body],
                "input_size": list(self.spec.input_size), "calibration": self.calibration_digest(),
                "numpy": np.__version__, "litert": metadata.version("ai-edge-litert"), "vggembed": __version__}

    def cache_path(self, key: dict) -> Path:
        from .cache import cache_dir

        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir() / "int8" / f"{self.spec.arch}-{self.spec.md5[:8]}-{digest}.tflite"

    def model_bytes(self, body: tuple) -> bytes:
        """The int8 model's bytes: from the cache when its entry is whole and matches, else converted and cached."""
        key = self.cache_key(body)
        path = self.cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One process converts; others (Ray actors on one machine) wait and then read its result.
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            content = _read_entry(path, key, self.log)
            if content is None:
                source = self.calibration or "the built-in set"
                names = ", ".join(f"{layer}:{pool}" if pool else layer for layer, pool in body)
                self.log(f"vggembed: converting {self.spec.path} to int8 for {names}, calibrating on "
                         f"{len(self.calibration_images())} images from {source}; a full-size VGG16 takes about 40 "
                         "CPU-seconds and 1.5 GB of memory, once")
                if (self.calibration is None and tuple(self.spec.input_size) == (224, 224)
                        and _pixels_digest(self.calibration_images()) != BUILTIN_SHA256):
                    self.log("vggembed: warning: the built-in calibration photos decode to other pixels here "
                             "than where vggembed was made (a different JPEG decoder?); this int8 model will "
                             "differ from other machines' in the last bits")
                start = time.perf_counter()
                content = self.convert(body)
                _write_entry(path, key, content)
                self.log(f"vggembed: converted to int8 in {time.perf_counter() - start:.0f}s; cached as {path}")
        return content

    def convert(self, body: tuple) -> bytes:
        """The int8 TFLite model of the outputs `body` ((canonical layer, pool) pairs, in output order), in
        this process.

        `calibrate` makes the plan; `write_model` writes exactly that network; `_check_int8` then
        refuses a model where a conv or fully connected layer would not run on int8 kernels.
        """
        plan = self.calibrate(body)
        content = bytes(write_model(self.spec, body, plan))
        del plan
        _give_back_freed_memory()  # calibration's arrays, before the run goes on
        _check_int8(content, self.spec.path)
        return content

    def weights(self) -> dict:
        """Every layer's (weight, bias): the arrays given, or the weight file read again if they were not all."""
        if all(layer.param in self._params for layer in self.layers if layer.param):
            return self._params
        from .weights import load_weights

        params, _ = load_weights(self.spec.path, legacy_transpose=self.spec.legacy_transpose)
        from .cache import cached_md5

        if cached_md5(self.spec.path) != self.spec.md5:
            raise VGGEmbedError(f"{self.spec.path} changed while it was in use; run again")
        return params

    def calibrate(self, body: tuple) -> dict:
        """Measure what the int8 network needs, on the calibration images, layer by layer.

        Returns a plan:
        - `weights`: each conv/fc layer's kernel rounded per output channel, as (int8 array in the float
          kernel's layout, float32 scale per channel);
        - `ranges`: the span of every activation that becomes an int8 tensor: after each ReLU, each wanted
          conv/fc layer before its ReLU, each pooled output (`name/pool`); the largest values seen times
          RANGE_MARGIN;
        - `biases`: each conv/fc bias after bias correction: minus the mean, over the calibration images, of
          what the int8 network (rounded weights, int8 input) adds to that channel, measured with everything
          before it already int8.

        The float32 network's statistics come first, a few images at a time through all layers
        (`_float_statistics`); then the "int8 so far" stream, one layer at a time over the whole set, held
        as int8 codes (`_int8_stream`). Neither keeps a float32 activation of the whole set but the one
        layer being corrected.
        """
        stop = max(self._index[n] for n, _ in body)
        layers = self.layers[: stop + 1]
        images = np.stack(self.calibration_images())
        params = self.weights()
        plan = {"weights": {}, "biases": {}, "ranges": {}}
        for layer in layers:
            if layer.param:
                w, b = params[layer.name]
                plan["weights"][layer.name] = _round_per_channel(np.asarray(w, np.float32))
                plan["biases"][layer.name] = np.array(b, np.float32)
        stats = self._float_statistics(images, layers, params, body)
        del params
        for name, peak in stats["peak"].items():
            plan["ranges"][name] = (0.0, RANGE_MARGIN * peak)
        for name, (lo, hi) in stats["spread"].items():
            plan["ranges"][name] = (RANGE_MARGIN * lo, RANGE_MARGIN * hi)
        self._int8_stream(images, layers, plan, stats["sums"], {n for n, _ in body})
        return plan

    def _float_statistics(self, images, layers, params, body) -> dict:
        """The float32 network on `images`: per channel sums of every conv/fc output (float64), every ReLU's
        peak, and the min and max of every wanted conv/fc output (before its ReLU) and pooled output.

        Blocks 1-5 run FLOAT_ROWS images at a time through every layer; the fc layers run on the whole set at
        once (one pass over their weights).
        """
        sums, peak, spread = {}, {}, {}
        names = {n for n, _ in body}
        convs = {}
        mean = np.asarray(self.spec.mean_pixel, np.float32)

        def observe(layer, x):
            if layer.kind in ("conv", "fc"):
                sums[layer.name] = sums.get(layer.name, 0) + _channel_sums(x)
            if layer.kind == "relu":
                peak[layer.name] = max(peak.get(layer.name, 0.0), float(x.max()))
            if layer.name in names and layer.kind in ("conv", "fc"):
                _widen(spread, layer.name, x)
            for name, pool in body:
                if name == layer.name and pool is not None and x.ndim == 4:
                    _widen(spread, f"{name}/{pool}", _pool(x, pool))

        def forward(x, layer):
            if layer.kind == "conv":
                if layer.name not in convs:
                    convs[layer.name] = _FloatConv(*params[layer.name], x.shape[1:])
                x = convs[layer.name](x)
            elif layer.kind == "fc":
                w, b = params[layer.name]
                x = _dense64(x.reshape(len(x), -1), w) + b
            elif layer.kind == "relu":
                np.maximum(x, 0, out=x)
            elif layer.kind == "pool":
                x = _max_pool(x)
            observe(layer, x)
            return x

        convs_part = [layer for layer in layers if layer.block <= 5]
        head = [layer for layer in layers if layer.block > 5]
        outs = []
        for i in range(0, len(images), FLOAT_ROWS):
            x = images[i: i + FLOAT_ROWS].astype(np.float32) - mean
            for layer in convs_part:
                x = forward(x, layer)
            if head:
                outs.append(x)
        convs.clear()
        if head:
            x = np.concatenate(outs)
            for layer in head:
                x = forward(x, layer)
        return {"sums": sums, "peak": peak, "spread": spread}

    def _int8_stream(self, images, layers, plan: dict, float_sums: dict, names: set) -> None:
        """Run the set "as int8 so far", one layer at a time, and correct each conv/fc bias in `plan` in turn.

        Between layers the stream is int8 codes with their (scale, zero point), as the int8 model holds it;
        a conv/fc output waits in float32 for its channel means, is shifted by the correction, and becomes
        codes again (through its ReLU, or its own range where it is wanted before the ReLU).
        """
        ranges = plan["ranges"]
        mean = np.asarray(self.spec.mean_pixel, np.float32)
        q = qparams(_centred_range(self.spec.mean_pixel))
        # The input: whole values 0..255 (exact at scale 1), minus the mean, on the centred range's grid.
        codes = _map_rows(lambda x: _quantize(x.astype(np.float32) - mean, q), images, np.int8)
        pending = None  # a conv/fc output in float32, waiting for the ReLU after it
        for layer in layers:
            if layer.kind in ("conv", "fc"):
                kernel, scale = plan["weights"][layer.name]
                bias = plan["biases"][layer.name]
                if layer.kind == "conv":
                    conv = _FloatConv(_rounded(kernel, scale), bias, codes.shape[1:], source=q)
                    y = _map_rows(conv, codes, np.float32)
                    del conv
                else:
                    # Exact: whole-number codes times whole-number weights, as the int8 kernel's int32 sum.
                    steps = _dense64(codes.reshape(len(codes), -1).astype(np.float64) - q[1], kernel)
                    y = (steps * (q[0] * scale.astype(np.float64)) + bias).astype(np.float32)
                shift = ((_channel_sums(y) - float_sums[layer.name]) / (y.size // y.shape[-1])).astype(np.float32)
                plan["biases"][layer.name] = bias - shift
                _map_rows(lambda rows: np.subtract(rows, shift, out=rows), y)
                if layer.name in names:  # wanted before its ReLU: an int8 tensor of its own
                    q = qparams(ranges[layer.name])
                    codes, pending = _map_rows(lambda rows: _quantize(rows, q, inplace=True), y, np.int8), None
                else:
                    codes, pending = None, y
                del y
            elif layer.kind == "relu":
                relu_q = qparams(ranges[layer.name])
                if pending is not None:
                    codes = _map_rows(lambda rows: _quantize(np.maximum(rows, 0, out=rows), relu_q, inplace=True),
                                      pending, np.int8)
                else:
                    codes = _map_rows(lambda rows: _quantize(np.maximum(_dequantize(rows, q), 0), relu_q), codes,
                                      np.int8)
                pending, q = None, relu_q
            elif layer.kind == "pool":
                codes = _map_rows(_max_pool, codes, np.int8)  # the max of codes is the code of the max


    # --------------------------------------------------------- calibration
    def calibration_images(self) -> list[np.ndarray]:
        """The calibration inputs (224x224x3 uint8), always the same for the same set, in a fixed order."""
        if getattr(self, "_calibration_images", None) is None:
            self._calibration_images = calibration_images(self.calibration, self.spec.input_size)
        return self._calibration_images

    def calibration_digest(self) -> str:
        """The calibration inputs, for the cache key. The built-in set by what makes its pixels (its photos'
        bytes, the views, the size, Pillow's version for the JPEG decoder; the resize is exact), so a cached
        run decodes nothing; a --calibration folder by its images' pixels."""
        h = hashlib.sha256()
        if self.calibration is None:
            from PIL import __version__ as pillow

            h.update(json.dumps([VIEWS, list(self.spec.input_size), pillow]).encode())
            for path in sorted(CALIBRATION_DIR.glob("*.jpg")):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
            return h.hexdigest()
        return _pixels_digest(self.calibration_images())


def _pixels_digest(images) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(im.tobytes())
    return h.hexdigest()


class _FloatConv:
    """One 3x3 convolution (stride 1, SAME padding) in float32 on LiteRT, for calibration.

    With `source` (scale, zero point) it takes int8 codes and dequantizes them first, inside the model.
    """

    def __init__(self, kernel, bias, shape, *, source=None):
        h, w, c = shape
        kernel = np.moveaxis(np.asarray(kernel, np.float32), 3, 0)  # HWIO -> OHWI
        g = tflite.Graph(size_hint=kernel.nbytes + 4 * kernel.shape[0] + (1 << 16))
        if source is None:
            x = f = g.tensor("x", tflite.FLOAT32, (1, h, w, c))
        else:
            x = g.tensor("x", tflite.INT8, (1, h, w, c), scale=source[0], zero_point=source[1])
            f = g.tensor("x/float", tflite.FLOAT32, (1, h, w, c))
            g.op(tflite.DEQUANTIZE, [x], [f])
        wt = g.tensor("w", tflite.FLOAT32, kernel.shape, batch=False, data=kernel)
        bt = g.tensor("b", tflite.FLOAT32, (kernel.shape[0],), batch=False, data=bias)
        y = g.tensor("y", tflite.FLOAT32, (1, h, w, kernel.shape[0]))
        g.op(tflite.CONV_2D, [f, wt, bt], [y], tflite.CONV_2D_OPTIONS, _CONV_OPTIONS + [(3, "int8", tflite.NONE)])
        quiet = not os.environ.get("VGGEMBED_VERBOSE")
        with _silenced_stderr() if quiet else contextlib.nullcontext():
            self.interpreter = _interpreter_class()(model_content=bytes(g.finish([x], [y])), num_threads=_threads())
        self.rows = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if len(x) != self.rows:
            it.resize_tensor_input(it.get_input_details()[0]["index"], (len(x), *x.shape[1:]))
            quiet = not os.environ.get("VGGEMBED_VERBOSE")
            with _silenced_stderr() if quiet else contextlib.nullcontext():
                it.allocate_tensors()
            self.rows = len(x)
        it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x))
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])


_CONV_OPTIONS = [(0, "int8", tflite.SAME), (1, "int32", 1), (2, "int32", 1)]  # stride 1; + the activation


def write_model(spec: WeightSpec, body: tuple, plan: dict) -> memoryview:
    """The int8 TFLite model of `plan` (see `Int8VGG.calibrate`) computing the outputs `body` ((canonical
    layer, pool or None) pairs; GeM and R-MAC are pooled outside the model), in that order.

    Input float32 NHWC 0..255 (any batch size), quantized inside (scale 1); the mean is subtracted in
    int8; every conv/fc layer runs on int8 kernels (per-channel weights, int32 biases) with its ReLU fused
    unless the layer is wanted before it; outputs are dequantized to float32. Scales, zero points, biases
    and the ops are those TensorFlow's converter gave the same network written with fake-quant ranges
    (tests/test_int8.py checks every tensor against the plan; the converter's outputs were identical to
    the bit): a range becomes (scale, zero point) by `qparams`, a per-channel weight scale is that of the
    rounded weights, a bias is rounded at input scale times weight scale.
    """
    layers, index = network_layers(spec)
    names = {n for n, _ in body}
    layers = layers[: max(index[n] for n in names) + 1]
    size = sum(plan["weights"][n][0].nbytes + 8 * plan["biases"][n].size for n in plan["weights"])
    g = tflite.Graph(size_hint=size + (1 << 20))
    h, w = spec.input_size[1], spec.input_size[0]
    x = g.tensor("x", tflite.FLOAT32, (1, h, w, 3))
    q = qparams(INPUT_RANGE)
    t = g.tensor("input", tflite.INT8, (1, h, w, 3), scale=q[0], zero_point=q[1])
    g.op(tflite.QUANTIZE, [x], [t])
    # The mean is an int8 constant on its own range's grid (as the converter quantizes a constant).
    mean = np.asarray(spec.mean_pixel, np.float32)
    mq = qparams((float(mean.min()), float(mean.max())))
    codes = np.clip(np.floor(mean.astype(np.float64) / mq[0] + 0.5) + mq[1], -128, 127).astype(np.int8)
    m = g.tensor("mean", tflite.INT8, (1, 1, 1, 3), batch=False, scale=mq[0], zero_point=mq[1],
                 data=codes.reshape(1, 1, 1, 3))
    q = qparams(_centred_range(spec.mean_pixel))
    centred = g.tensor("centred", tflite.INT8, (1, h, w, 3), scale=q[0], zero_point=q[1])
    g.op(tflite.SUB, [t, m], [centred], tflite.SUB_OPTIONS, [(1, "bool", True)])
    state = {"t": centred, "q": q, "shape": (1, h, w, 3)}
    outputs, constants = {}, {}

    def add(layer, relu=None, source=None):
        """A conv/fc layer from `source` (default: the current tensor), its ReLU `relu` fused if given."""
        t, q, shape = source or (state["t"], state["q"], state["shape"])
        kernel, scale = plan["weights"][layer.name]
        out_q = qparams(plan["ranges"][relu.name if relu else layer.name])
        # The converter's per-channel scale is that of the rounded weights, whose largest is float32(127 scale).
        w_scale = (np.float32(127) * scale).astype(np.float64) / 127
        b_scale = q[0] * w_scale
        bias = np.rint(plan["biases"][layer.name].astype(np.float64) / b_scale).astype(np.int32)
        zero = np.zeros(len(scale), np.int64)
        if layer.kind == "fc" and len(shape) == 4:  # NHWC flatten, as in VGG
            flat = (1, math.prod(shape[1:]))
            new = g.tensor(f"{layer.name}/flatten", tflite.INT8, flat, scale=q[0], zero_point=q[1])
            g.op(tflite.RESHAPE, [t, _shape(g, layer.name, flat)], [new])
            t, shape = new, flat
        if layer.name not in constants:  # a layer added twice shares them
            kernel = np.moveaxis(kernel, 3, 0) if layer.kind == "conv" else kernel.T  # OHWI; (out, in)
            constants[layer.name] = (
                g.tensor(f"{layer.name}/weights", tflite.INT8, kernel.shape, batch=False, scale=w_scale,
                         zero_point=zero, data=kernel),
                g.tensor(f"{layer.name}/bias", tflite.INT32, bias.shape, batch=False, scale=b_scale,
                         zero_point=zero, data=bias))
        wt, bt = constants[layer.name]
        shape = shape[:-1] + (len(scale),)
        out = g.tensor(relu.name if relu else layer.name, tflite.INT8, shape, scale=out_q[0], zero_point=out_q[1])
        act = tflite.RELU_ACTIVATION if relu else tflite.NONE
        if layer.kind == "conv":
            g.op(tflite.CONV_2D, [t, wt, bt], [out], tflite.CONV_2D_OPTIONS, _CONV_OPTIONS + [(3, "int8", act)])
        else:
            g.op(tflite.FULLY_CONNECTED, [t, wt, bt], [out], tflite.FULLY_CONNECTED_OPTIONS, [(0, "int8", act)])
        return out, out_q, shape

    skip = None
    for i, layer in enumerate(layers):
        after = layers[i + 1] if i + 1 < len(layers) else None
        if layer is skip:
            pass  # a ReLU fused into the layer before it
        elif layer.kind in ("conv", "fc"):
            source = (state["t"], state["q"], state["shape"])
            relu = after if after is not None and after.kind == "relu" and layer.name not in names else None
            state["t"], state["q"], state["shape"] = add(layer, relu)
            if layer.name in names:
                outputs[layer.name] = (state["t"], state["q"], state["shape"])
                if layer.kind == "fc" and after is not None and after.kind == "relu":
                    # The converter computes such an fc layer twice: wanted as it is, and again with its ReLU
                    # fused (no RELU op on the wanted output, so one rounding less on the way on).
                    state["t"], state["q"], state["shape"] = add(layer, after, source)
                    skip = after
            else:
                skip = relu
        elif layer.kind == "relu":
            out_q = qparams(plan["ranges"][layer.name])
            out = g.tensor(layer.name, tflite.INT8, state["shape"], scale=out_q[0], zero_point=out_q[1])
            g.op(tflite.RELU, [state["t"]], [out])
            state["t"], state["q"] = out, out_q
        elif layer.kind == "pool":
            n, hh, ww, c = state["shape"]
            state["shape"] = (n, -(-hh // 2), -(-ww // 2), c)
            out = g.tensor(layer.name, tflite.INT8, state["shape"], scale=state["q"][0], zero_point=state["q"][1])
            g.op(tflite.MAX_POOL_2D, [state["t"]], [out], tflite.POOL_2D_OPTIONS,
                 [(0, "int8", tflite.SAME), (1, "int32", 2), (2, "int32", 2), (3, "int32", 2), (4, "int32", 2)])
            state["t"] = out
        if layer.name in names and layer.name not in outputs:
            outputs[layer.name] = (state["t"], state["q"], state["shape"])

    results = []
    for name, pool in body:
        t, q, shape = outputs[name]
        if pool is not None and len(shape) == 4:
            t, shape = _pooled_output(g, name, pool, t, q, shape, qparams(plan["ranges"][f"{name}/{pool}"]))
        out = g.tensor(f"{name}/float" if pool is None else f"{name}/{pool}/float", tflite.FLOAT32, shape)
        g.op(tflite.DEQUANTIZE, [t], [out])
        results.append(out)
    return g.finish([x], results, description=f"vggembed {__version__} int8 {spec.arch}")


def _pooled_output(g, name, pool, t, q, shape, out_q):
    """A 4-D int8 map reduced to a vector per image, on its pooled range `out_q`."""
    if pool == "flatten":
        flat = (1, math.prod(shape[1:]))
        out = g.tensor(f"{name}/flatten", tflite.INT8, flat, scale=q[0], zero_point=q[1])
        g.op(tflite.RESHAPE, [t, _shape(g, name, flat)], [out])
        t, q, shape = out, q, flat
    else:
        axes = g.tensor(f"{name}/{pool}/axes", tflite.INT32, (2,), batch=False, data=np.array([1, 2], np.int32))
        if pool == "max" and out_q != q:  # REDUCE_MAX keeps its input's scale: requantize first
            r = g.tensor(f"{name}/{pool}/requantized", tflite.INT8, shape, scale=out_q[0], zero_point=out_q[1])
            g.op(tflite.QUANTIZE, [t], [r])
            t, q = r, out_q
        shape = (1, shape[3])
        out = g.tensor(f"{name}/{pool}", tflite.INT8, shape, scale=out_q[0], zero_point=out_q[1])
        g.op(tflite.MEAN if pool == "avg" else tflite.REDUCE_MAX, [t, axes], [out], tflite.REDUCER_OPTIONS,
             [(0, "bool", False)])
        return out, shape
    if out_q != q:
        r = g.tensor(f"{name}/requantized", tflite.INT8, shape, scale=out_q[0], zero_point=out_q[1])
        g.op(tflite.QUANTIZE, [t], [r])
        t = r
    return t, shape


def _shape(g, name, shape) -> int:
    """A constant new shape for RESHAPE: any batch size."""
    return g.tensor(f"{name}/shape", tflite.INT32, (2,), batch=False, data=np.array([-1, shape[1]], np.int32))


def qparams(span) -> tuple[float, int]:
    """(scale, zero point) of the int8 tensor that holds `span`, as TensorFlow's converter sets them for a
    fake-quant range: the span widened to hold 0 (and to at least 1e-6), its ends as float32, the zero point
    taken from the nearer end and rounded to an integer in -128..127 (in double precision)."""
    lo, hi = min(span[0], 0.0), max(span[1], 0.0)
    if hi - lo < 1e-6:  # a layer that is all zeros on the calibration set
        hi = lo + 1e-6
    rmin, rmax = float(np.float32(lo)), float(np.float32(hi))
    scale = (rmax - rmin) / 255.0
    zero = -128 - rmin / scale if 128 + abs(rmin / scale) < 127 + abs(rmax / scale) else 127 - rmax / scale
    zero = -128 if zero < -128 else 127 if zero > 127 else math.copysign(math.floor(abs(zero) + 0.5), zero)
    return scale, int(zero)


def _centred_range(mean_pixel) -> tuple[float, float]:
    """The range of the mean-subtracted 0..255 input."""
    mean = np.asarray(mean_pixel, np.float64)
    return float(INPUT_RANGE[0] - mean.max()), float(INPUT_RANGE[1] - mean.min())


def _quantize(x: np.ndarray, q, *, inplace: bool = False) -> np.ndarray:
    """float32 values -> int8 codes on the grid (scale, zero point) q, rounding half up, saturating.
    `inplace`: x (float32) is used as the scratch space."""
    scale, zero = q
    y = np.multiply(x, np.float32(1 / scale), out=x if inplace else None, dtype=np.float32)
    y += np.float32(zero + 0.5)
    np.floor(y, out=y)
    np.clip(y, -128, 127, out=y)
    return y.astype(np.int8)


def _dequantize(codes: np.ndarray, q) -> np.ndarray:
    scale, zero = q
    y = codes.astype(np.float32)
    y -= np.float32(zero)
    y *= np.float32(scale)
    return y


def _round_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`w` on its int8 grid: symmetric, one scale per output channel (the last axis), -127..127.

    Returns (int8 codes in `w`'s layout, float32 scales); `_rounded` gives the float values. Rounded a
    block of rows at a time, so fc6 (411 MB) needs no float32 copy of itself."""
    rows = w.reshape(-1, w.shape[-1])
    scale = np.abs(rows).max(axis=0) / 127
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    codes = np.empty(rows.shape, np.int8)
    for i in range(0, len(rows), 1024):
        block = rows[i: i + 1024] / scale
        np.rint(block, out=block)
        np.clip(block, -127, 127, out=block)
        codes[i: i + 1024] = block
    return codes.reshape(w.shape), scale


def _rounded(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale


def _dense64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w in float64, FC_ROWS rows of w at a time.

    The fc layers of calibration run in float64 so that the plan does not depend on the BLAS: on whole
    numbers (int8 codes and weights) every sum is exact in any order, and on floats its order moves only
    bits that the float32 plan does not keep (OpenBLAS's AVX2 and AVX-512 kernels gave different fc biases
    in float32).
    """
    x = np.asarray(x, np.float64)
    out = np.zeros((len(x), w.shape[1]), np.float64)
    for i in range(0, w.shape[0], FC_ROWS):
        out += x[:, i: i + FC_ROWS] @ w[i: i + FC_ROWS].astype(np.float64)
    return out


def _channel_sums(x: np.ndarray) -> np.ndarray:
    """Per channel (last axis) sums in float64."""
    return np.add.reduce(x.reshape(-1, x.shape[-1]), axis=0, dtype=np.float64)


def _widen(spread: dict, name: str, x: np.ndarray) -> None:
    lo, hi = float(x.min()), float(x.max())
    if name in spread:
        lo, hi = min(lo, spread[name][0]), max(hi, spread[name][1])
    spread[name] = (lo, hi)


def _max_pool(x: np.ndarray) -> np.ndarray:
    """2x2 max pooling, stride 2, SAME padding (an odd edge pools what it has)."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        low = np.iinfo(x.dtype).min if x.dtype.kind == "i" else -np.inf
        x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=low)
    return x.reshape(n, -(-h // 2), 2, -(-w // 2), 2, c).max(axis=(2, 4))


def _pool(x: np.ndarray, pool: str) -> np.ndarray:
    """A 4-D map reduced per image as `model._pooled` does (avg, max or flatten)."""
    if pool == "avg":
        return x.mean(axis=(1, 2), dtype=np.float32)
    if pool == "max":
        return x.max(axis=(1, 2))
    return x.reshape(len(x), -1)


def _map_rows(fn, x: np.ndarray, dtype=None) -> np.ndarray | None:
    """fn over the rows of x, CALIBRATION_ROWS at a time; with `dtype`, its results gathered into one array."""
    out = None
    for i in range(0, len(x), CALIBRATION_ROWS):
        y = fn(x[i: i + CALIBRATION_ROWS])
        if dtype is not None:
            if out is None:
                out = np.empty((len(x), *y.shape[1:]), dtype)
            out[i: i + len(y)] = y
    return out


def calibration_images(folder=None, size=(224, 224)) -> list[np.ndarray]:
    """Preprocessed calibration inputs.

    Without `folder`: four fixed views (`VIEWS`) of each photo shipped in
    `calibration/` (see its SOURCES.md), squashed to `size` by `_resize_exact`,
    so they are the same pixels (`BUILTIN_SHA256`) on every machine and with
    every Pillow. With `folder`: its images (recursive, sorted as `embed` sorts
    them), each squashed to `size` as `embed` does (Pillow, whose resampling
    changed in its last bits between 12.3 and 13.0); above
    MAX_CALIBRATION_IMAGES an evenly spaced selection of them.

    Raises:
        VGGEmbedError: the folder is missing or has no images; ImageError for one that does not decode.
    """
    from ..images.decode import load_rgb, prepare
    from ..images.inputs import expand

    if folder is None:
        out = []
        for path in sorted(CALIBRATION_DIR.glob("*.jpg")):
            photo = np.asarray(load_rgb(str(path)))
            h, w = photo.shape[:2]
            for left, top, right, bottom, mirror in VIEWS:
                view = photo[round(top * h): round(bottom * h), round(left * w): round(right * w)]
                out.append(_resize_exact(view[:, ::-1] if mirror else view, size))
        return out
    folder = Path(folder)
    if not folder.is_dir():
        raise VGGEmbedError(f"{folder}: --calibration needs a folder of images")
    paths = list(expand([os.fsdecode(folder)], None))
    if not paths:
        raise VGGEmbedError(f"{folder}: no images to calibrate on")
    if len(paths) > MAX_CALIBRATION_IMAGES:
        paths = [paths[i * len(paths) // MAX_CALIBRATION_IMAGES] for i in range(MAX_CALIBRATION_IMAGES)]
    out = []
    for p in paths:
        try:
            out.append(prepare(p, size=size))
        except ImageError as e:
            raise VGGEmbedError(f"{e} (in the --calibration folder; remove it or fix it)") from None
    return out


def _resize_exact(image: np.ndarray, size) -> np.ndarray:
    """An HxWx3 uint8 image squashed to `size` (width, height) by a triangle (bilinear, antialiased) filter,
    in integer arithmetic: the same pixels on every machine.

    Weights are whole numbers (14 bits), so every sum is an exact integer in float64 (below 2**53): the
    product does not depend on the BLAS or its order of summation, and the result is rounded half up by
    integer division.
    """
    rows, cols = _filter_weights(image.shape[0], size[1]), _filter_weights(image.shape[1], size[0])
    channels = np.moveaxis(image, 2, 0).astype(np.float64)  # (3, H, W)
    acc = np.moveaxis(rows @ channels @ cols.T, 0, 2).astype(np.int64)
    denom = rows.sum(axis=1).astype(np.int64)[:, None, None] * cols.sum(axis=1).astype(np.int64)[None, :, None]
    return np.clip((2 * acc + denom) // (2 * denom), 0, 255).astype(np.uint8)


def _filter_weights(source: int, target: int) -> np.ndarray:
    """(target, source) whole-number weights of a triangle filter as wide as one target pixel (at least one
    source pixel), centred on each target pixel's centre."""
    scale = source / target
    support = max(scale, 1.0)
    centres = (np.arange(target) + 0.5) * scale
    distance = np.abs((np.arange(source) + 0.5)[None, :] - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - distance)
    return np.floor(weights / weights.sum(axis=1, keepdims=True) * (1 << 14) + 0.5)


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them for reuse otherwise); a no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _check_int8(content: bytes, where) -> None:
    """Refuse a model in which a conv or fully connected layer would run on float kernels."""
    Interpreter = _interpreter_class()
    interpreter = Interpreter(model_content=content)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            x, w = tensors[op["inputs"][0]], tensors[op["inputs"][1]]
            if x["dtype"] != np.int8 or w["dtype"] != np.int8:
                raise VGGEmbedError(f"{where}: int8 conversion left {op['op_name']} {op['index']} in "
                                    f"{np.dtype(x['dtype']).name}; not using it")


def _read_entry(path: Path, key: dict, log) -> bytes | None:
    """The cached model's bytes if the entry is whole and was made for `key`; None (with a note) otherwise."""
    meta = path.with_name(path.name + ".json")
    if not path.exists() and not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        content = path.read_bytes()
        if info.get("key") == key and info.get("sha256") == hashlib.sha256(content).hexdigest():
            return content
    except (OSError, ValueError):
        pass
    log(f"vggembed: cached int8 model {path} is incomplete, corrupt or stale; converting again")
    return None


def _write_entry(path: Path, key: dict, content: bytes) -> None:
    """Model first, then its sidecar (key + SHA-256), each via a temporary file and os.replace."""
    for target, data in ((path, content),
                         (path.with_name(path.name + ".json"),
                          json.dumps({"key": key, "sha256": hashlib.sha256(content).hexdigest(),
                                      "bytes": len(content)}, indent=1).encode())):
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
