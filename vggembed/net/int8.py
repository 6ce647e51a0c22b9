"""`--precision int8`: VGG quantized to int8 by TensorFlow's TFLite converter, run by LiteRT with XNNPACK.

CPUs with AVX512-VNNI, AVX-VNNI or AMX do four int8 multiply-adds where they
do one float32, and XNNPACK's int8 kernels use them; no TensorFlow path does.

- Static full-integer quantization, written out rather than left to the
  converter's calibrator: `Int8VGG.calibrate` runs the calibration set
  (`calibration/` in this package, or `--calibration DIR`) through the
  network layer by layer, rounds the weights to int8 per output channel,
  measures each activation's range (its peak times RANGE_MARGIN) and
  corrects each bias for the mean shift the rounding causes (bias
  correction, measured with every earlier layer already int8). The network
  is then written with those fake-quant ranges and the converter turns it
  into int8 kernels; `_check_int8` refuses a model where a conv or fully
  connected layer stayed float. One weight file and calibration set always
  give the same int8 model.
- One model per set of requested (layer, pool) outputs, converted on first use
  (about 100 s for VGG16 on 2 cores) and cached in the weights cache
  (`$VGGEMBED_HOME/int8/`), keyed by everything that changes the result,
  written atomically and checked by SHA-256 before use.
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
import os
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import ImageError, VGGEmbedError
from ..store.recipe import __version__
from .model import VGG, _pooled
from .tfimport import _silenced_stderr, tensorflow
from .weights import WeightSpec

CPUINFO = "/proc/cpuinfo"  # tests point this at a fake file
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CALIBRATION_DIR = Path(__file__).parent / "calibration"
# Calibration holds both streams of every image at one layer (VGG16, 40 images: 3.4 GB peak), so it is capped.
MAX_CALIBRATION_IMAGES = 64
# Bump when the conversion recipe changes, so older cache entries are not used.
RECIPE_VERSION = 2
INPUT_RANGE = (0.0, 255.0)
# Activation ranges are the largest values seen in calibration times this margin: photos outside the set
# went 15-30% beyond it (measured on 240 views), and clipping the peaks that max-pooling carries on cost more
# than the coarser step (benchmarks/throughput.py --only int8 prints the fidelity).
RANGE_MARGIN = 1.15
CALIBRATION_ROWS = 8
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


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Int8VGG(VGG):
    """A VGG network whose conv and fc layers run in int8 (see the module docstring).

    Build it with `vggembed.load(path, precision="int8")`. Input must be the
    weights' input size (224x224): the int8 model is converted for it.
    """

    def __init__(self, params: dict, spec: WeightSpec, *, calibration=None, log=_log):
        check_available()
        # The float32 network (sharing the loaded arrays' memory) is what the converter quantizes.
        super().__init__(params, spec, precision="float32", device="cpu")
        self.precision = "int8"
        self.calibration = None if calibration is None else Path(calibration)
        self.log = log
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
        # (fc layers come without a pool from `run_outputs`: classify and an fc2 run share one model)
        body = tuple(sorted({key for key in graph if key not in head} | ({("relu7", None)} if head else set()),
                            key=lambda key: (key[0], key[1] or "")))
        interpreter = self._interpreter(body)
        x = interpreter.get_input_details()[0]
        if tuple(x["shape"]) != batch.shape:
            interpreter.resize_tensor_input(x["index"], batch.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(x["index"], np.ascontiguousarray(batch, np.float32))
        interpreter.invoke()
        # Outputs come in the order the converted function returns them: `body`'s.
        out = {key: interpreter.get_tensor(o["index"]) for key, o in zip(body, interpreter.get_output_details())}
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
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            quiet = not os.environ.get("VGGEMBED_VERBOSE")
            with _silenced_stderr() if quiet else contextlib.nullcontext():  # "Created ... XNNPACK delegate"
                interpreter = Interpreter(model_content=content, num_threads=threads or 1)
                interpreter.allocate_tensors()  # applies the delegate
            if len(interpreter.get_output_details()) != len(body):
                raise VGGEmbedError(f"int8 model for {body} has {len(interpreter.get_output_details())} outputs")
            self._interpreters[key] = interpreter
        return self._interpreters[key]

    # ----------------------------------------------------- conversion cache
    def cache_key(self, body: tuple) -> dict:
        """Everything that changes the int8 model: a cache entry is used only when all of it matches."""
        tf = tensorflow()
        return {"recipe": RECIPE_VERSION, "weights_md5": self.spec.md5, "arch": self.spec.arch,
                "legacy_transpose": self.spec.legacy_transpose, "outputs": [list(key) for key in body],
                "input_size": list(self.spec.input_size), "calibration": self.calibration_digest(),
                "tensorflow": tf.__version__, "litert": metadata.version("ai-edge-litert"), "vggembed": __version__}

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
                content = self._convert_in_child(body, path.with_name(f"{path.name}.{os.getpid()}.out"))
                _write_entry(path, key, content)
                self.log(f"vggembed: int8 model cached as {path}")
        return content

    def _convert_in_child(self, body: tuple, out: Path) -> bytes:
        """Convert in a child process: it peaks at 12.2 GB for VGG16 (TensorFlow's converter alone: 10.1 GB
        for the float model) and the converter keeps 4 GB after returning; a child gives it all back."""
        import subprocess

        source = self.calibration or "the built-in set"
        names = ", ".join(f"{layer}:{pool}" if pool else layer for layer, pool in body)
        self.log(f"vggembed: converting {self.spec.path} to int8 for {names}, calibrating on {len(self.calibration_images())} images "
                 f"from {source}; VGG16 takes about 2 minutes on 2 cores and about 12 GB of memory, once")
        start = time.perf_counter()
        job = {"weights": self.spec.path, "legacy_transpose": self.spec.legacy_transpose,
               "outputs": [list(key) for key in body], "calibration": None if self.calibration is None else str(self.calibration),
               "out": str(out)}
        try:
            child = subprocess.run([sys.executable, "-m", "vggembed.net.int8", json.dumps(job)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   errors="backslashreplace")
            if child.returncode != 0:
                lines = child.stderr.strip().splitlines()
                raise VGGEmbedError(lines[-1] if lines else f"{self.spec.path}: int8 conversion failed "
                                                             f"(exit status {child.returncode})")
            content = out.read_bytes()
        finally:
            out.unlink(missing_ok=True)
        self.log(f"vggembed: converted to int8 in {time.perf_counter() - start:.0f}s")
        return content

    def convert(self, body: tuple) -> bytes:
        """The int8 TFLite model of the outputs `body` ((canonical layer, pool) pairs, in output order), in
        this process.

        The network is written with its quantization made explicit (`_quantized`: weights rounded to their
        int8 grid, every activation through a fake-quant op with the range `calibrate` measured), and the
        converter turns exactly that into int8 kernels; `_check_int8` then refuses a model where a conv or
        fully connected layer did not become int8.
        """
        tf = tensorflow()
        h, w = self.spec.input_size[1], self.spec.input_size[0]
        plan = self.calibrate(body)
        _give_back_freed_memory()  # calibration's activations, before the converter's own peak
        forward = self._quantized(body, plan)
        # Input and output stay float32: the quantize of the 0..255 input (scale 1: exact for whole values)
        # and the dequantize of the outputs are two cheap ops inside the graph, so the network keeps VGG's
        # interface (float32 batches in, float32 vectors out).
        fn = tf.function(lambda x: [forward(x)[key] for key in body],
                         input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, "x")])
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        quiet = not os.environ.get("VGGEMBED_VERBOSE")
        try:
            with _silenced_stderr() if quiet else contextlib.nullcontext(), warnings.catch_warnings():
                # Its MLIR log goes to fd 2; it warns that float inputs have no "input stats" (none are needed:
                # the input is quantized inside the graph with its fake-quant range).
                warnings.filterwarnings("ignore", "Statistics for quantized inputs")
                content = converter.convert()
        except Exception as e:  # the converter raises its own kinds with multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VGGEmbedError(f"{self.spec.path}: int8 conversion failed: {first}") from None
        _check_int8(content, self.spec.path)
        return content

    def calibrate(self, body: tuple) -> dict:
        """Measure what the int8 network needs, on the calibration images, layer by layer.

        Returns a plan: per-channel int8 `weights` (already rounded, so the converter reproduces them
        exactly), `ranges` of every activation that becomes an int8 tensor, and `biases` after bias
        correction: each conv/fc bias minus the mean, over the calibration images, of what the int8
        network (rounded weights, quantized input) adds to that channel, measured with everything before it
        already int8. Activation ranges are the largest values seen times RANGE_MARGIN.
        """
        stop = max(self._index[n] for n, _ in body)
        names = {n for n, _ in body}
        plan = {"weights": {}, "biases": {}, "ranges": {}}
        # Both streams (float32, and int8 as far as computed) of the whole set, one layer at a time, computed
        # CALIBRATION_ROWS images at a time: 1.5 GB at the widest layer for 40 images.
        exact = np.stack(self.calibration_images()).astype(np.float32)
        quant = _chunked(lambda x: _fake_quant(_fake_quant(x, INPUT_RANGE) - self._mean, self._centred_range()),
                         exact)
        exact -= np.asarray(self.spec.mean_pixel, np.float32)
        for layer in self.layers[: stop + 1]:
            if layer.kind in ("conv", "fc"):
                w, b = (p.numpy() for p in self._params[layer.name])
                plan["weights"][layer.name] = _round_per_channel(w)
                plan["biases"][layer.name] = b
                exact = _chunked(lambda x: self._apply(layer, x), exact)
                quant = _chunked(lambda x: _layer(layer, x, plan), quant)
                total = np.zeros(b.shape, np.float64)
                for i in range(0, len(quant), CALIBRATION_ROWS):
                    diff = quant[i: i + CALIBRATION_ROWS] - exact[i: i + CALIBRATION_ROWS]
                    total += diff.reshape(-1, diff.shape[-1]).sum(axis=0, dtype=np.float64)
                shift = (total / (quant.size // quant.shape[-1])).astype(np.float32)
                plan["biases"][layer.name] = b - shift
                quant -= shift
            elif layer.kind == "relu":
                np.maximum(exact, 0, out=exact)
                plan["ranges"][layer.name] = (0.0, RANGE_MARGIN * float(exact.max()))
                quant = _chunked(lambda x: _layer(layer, x, plan), quant)
            else:
                exact = _chunked(lambda x: self._apply(layer, x), exact)
                quant = _chunked(lambda x: self._apply(layer, x), quant)
            if layer.name in names and layer.kind in ("conv", "fc"):  # wanted before its ReLU: an int8 tensor
                plan["ranges"][layer.name] = _spread(exact)
                quant = _chunked(lambda x: _fake_quant(x, plan["ranges"][layer.name]), quant)
            for name, pool in body:
                if name == layer.name and pool is not None and exact.ndim == 4:
                    plan["ranges"][f"{name}/{pool}"] = _spread(_chunked(lambda x: _pooled(x, pool), exact))
        return plan

    def _centred_range(self) -> tuple[float, float]:
        """The range of the mean-subtracted 0..255 input."""
        mean = np.asarray(self.spec.mean_pixel, np.float64)
        return float(INPUT_RANGE[0] - mean.max()), float(INPUT_RANGE[1] - mean.min())

    def _quantized(self, body: tuple, plan: dict):
        """The float network with its int8 quantization explicit: what the converter makes int8."""
        stop = max(self._index[n] for n, _ in body)
        names = {n for n, _ in body}
        layers = self.layers[: stop + 1]
        mean, centred = self._mean, self._centred_range()

        def forward(x):
            x = _fake_quant(_fake_quant(x, INPUT_RANGE) - mean, centred)
            out = {}
            for layer in layers:
                x = _layer(layer, x, plan)
                if layer.name in names:
                    if layer.kind in ("conv", "fc"):  # wanted before its ReLU: an int8 tensor of its own
                        x = _fake_quant(x, plan["ranges"][layer.name])
                    for name, pool in body:
                        if name != layer.name:
                            continue
                        out[name, pool] = x
                        if pool is not None and len(x.shape) == 4:
                            out[name, pool] = _fake_quant(_pooled(x, pool), plan["ranges"][f"{name}/{pool}"])
            return out

        return forward

    # --------------------------------------------------------- calibration
    def calibration_images(self) -> list[np.ndarray]:
        """The calibration inputs (224x224x3 uint8), always the same for the same set, in a fixed order."""
        if getattr(self, "_calibration_images", None) is None:
            self._calibration_images = calibration_images(self.calibration, self.spec.input_size)
        return self._calibration_images

    def calibration_digest(self) -> str:
        h = hashlib.sha256()
        for im in self.calibration_images():
            h.update(im.tobytes())
        return h.hexdigest()


def calibration_images(folder=None, size=(224, 224)) -> list[np.ndarray]:
    """Preprocessed calibration inputs.

    Without `folder`: four fixed views (`VIEWS`) of each photo shipped in
    `vggembed/calibration/` (see its SOURCES.md). With `folder`: its images
    (recursive, sorted as `embed` sorts them), each squashed to `size`;
    above MAX_CALIBRATION_IMAGES an evenly spaced selection of them.

    Raises:
        VGGEmbedError: the folder is missing or has no images; ImageError for one that does not decode.
    """
    from ..images.decode import load_rgb, prepare
    from ..images.inputs import expand

    if folder is None:
        out = []
        for path in sorted(CALIBRATION_DIR.glob("*.jpg")):
            img = load_rgb(str(path))
            for left, top, right, bottom, mirror in VIEWS:
                w, h = img.size
                view = img.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
                if mirror:
                    view = view.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
                out.append(prepare(view, size=size))
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


def _round_per_channel(w: np.ndarray) -> np.ndarray:
    """`w` on its int8 grid: symmetric, one scale per output channel (the last axis), -127..127."""
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) / 127
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)


def _fake_quant(x, span):
    """`x` rounded to 256 levels over `span` (widened to hold 0), as an int8 tensor holds it."""
    tf = tensorflow()
    lo, hi = min(span[0], 0.0), max(span[1], 0.0)
    if hi - lo < 1e-6:  # a layer that is all zeros on the calibration set
        hi = lo + 1e-6
    return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8)


def _spread(x: np.ndarray) -> tuple[float, float]:
    return RANGE_MARGIN * float(x.min()), RANGE_MARGIN * float(x.max())


def _chunked(fn, x: np.ndarray) -> np.ndarray:
    """fn (TensorFlow ops) over the rows of x, CALIBRATION_ROWS at a time, into one numpy array."""
    out = None
    for i in range(0, len(x), CALIBRATION_ROWS):
        y = np.asarray(fn(x[i: i + CALIBRATION_ROWS]))
        if out is None:
            out = np.empty((len(x), *y.shape[1:]), np.float32)
        out[i: i + len(y)] = y
    return out


def _layer(layer, x, plan: dict):
    """One layer of the int8 network, written in float: rounded weights, corrected bias, quantized ReLU."""
    tf = tensorflow()
    if layer.kind == "conv":
        return tf.nn.bias_add(tf.nn.conv2d(x, plan["weights"][layer.name], 1, "SAME"), plan["biases"][layer.name])
    if layer.kind == "fc":
        if layer.name == "fc6":
            x = tf.reshape(x, [tf.shape(x)[0], -1])  # NHWC flatten, as in VGG
        return tf.nn.bias_add(tf.matmul(x, plan["weights"][layer.name]), plan["biases"][layer.name])
    if layer.kind == "relu":
        return _fake_quant(tf.nn.relu(x), plan["ranges"][layer.name])
    if layer.kind == "pool":
        return tf.nn.max_pool2d(x, 2, 2, "SAME")
    raise ValueError(layer.kind)


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


def _convert_main(job: str) -> int:
    """`python -m vggembed.int8 JOB`: the child `Int8VGG._convert_in_child` starts; JOB is a JSON object."""
    from .weights import load_weights

    job = json.loads(job)
    try:
        params, spec = load_weights(job["weights"], legacy_transpose=job["legacy_transpose"])
        model = Int8VGG(params, spec, calibration=job["calibration"], log=lambda line: None)
        content = model.convert(tuple((name, pool) for name, pool in job["outputs"]))
    except VGGEmbedError as e:
        print(e, file=sys.stderr)
        return 1
    with open(job["out"], "wb") as f:
        f.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(_convert_main(sys.argv[1]))
