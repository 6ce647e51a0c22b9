"""The VGG network in TensorFlow, built from a row of `arch.CONFIGS` plus loaded weights.

One compiled `tf.function` per set of requested layers runs the network once
up to the deepest of them and returns each by name. Input is a float32 NHWC
batch of RGB values in 0..255; the mean pixel is subtracted inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LayerError, VGGEmbedError
from ..images.decode import DEFAULT_MAX_PIXELS, prepare
from ..store.recipe import PRECISIONS
from . import arch as arch_mod
from . import pooling
from .readers import aligned_float32
from .spec import WeightSpec
from .tfimport import cpu_has_native_bf16, tensorflow

POOLS = arch_mod.POOLS
TF_PRECISIONS = tuple(p for p in PRECISIONS if p != "int8")  # what `VGG` itself runs


@dataclass(frozen=True)
class Prediction:
    rank: int
    index: int
    label: str
    probability: float


class VGG:
    """A loaded VGG16/VGG19 network.

    Build it with `vggembed.load(path)`. Images may be paths, encoded bytes,
    PIL images or HxWx3 RGB arrays in 0..255.
    """

    def __init__(self, params: dict, spec: WeightSpec, *, precision: str = "float32", device: str = "auto",
                 jit_compile: bool = False):
        tf = tensorflow()

        if precision not in TF_PRECISIONS:
            hint = "; int8 networks come from vggembed.load(..., precision='int8')" if precision == "int8" else ""
            raise VGGEmbedError(f"precision must be one of {TF_PRECISIONS}; received {precision!r}{hint}")
        self.spec = spec
        self.precision = precision
        self.device = _pick_device(device)
        if precision != "float32" and self.device.startswith("/CPU"):
            if precision == "fp16":
                raise VGGEmbedError("fp16 runs on GPUs only; on CPU use --precision bf16 (where supported) or float32")
            if not cpu_has_native_bf16():
                raise VGGEmbedError("this CPU lacks native bf16 (AVX512_BF16 or AMX), where bf16 is slower "
                                    "than float32; use --precision float32")
        self._dtype = {"float32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}[precision]
        self.layers, self._index = network_layers(spec)
        with tf.device(self.device):
            self._params = {name: (self._adopt(w), self._adopt(b)) for name, (w, b) in params.items()}
            self._mean = tf.constant(np.asarray(spec.mean_pixel, np.float32).reshape(1, 1, 1, 3))
        self._functions: dict = {}
        # XLA: measured slower than plain TensorFlow with oneDNN on CPU (benchmarks/throughput.py --only xla).
        self.jit_compile = jit_compile

    def _adopt(self, array):
        """A tensor of one weight array on this network's device and dtype.

        On CPU in float32 the tensor uses the array's own memory (DLPack), so
        the weights are held once, not twice, and start-up skips a 0.5 GB
        copy; the array is then made read-only so it cannot change under the
        network (a read-only array, e.g. one another network holds, is
        copied). Other dtypes and GPUs get a converted copy.
        """
        tf = tensorflow()
        array = aligned_float32(array)
        tensor = tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        if self._dtype != tf.float32:
            return tf.cast(tensor, self._dtype)
        if not self.device.startswith("/CPU"):
            return tf.identity(tensor)
        array.flags.writeable = False  # shared from here on
        return tensor

    # ------------------------------------------------------------------ head
    head = None  # a `head.Head` whose classes `prob` ranks instead of ImageNet's (`attach_head`)

    def attach_head(self, head) -> None:
        """Run `head` (a `net.head.Head`) as this network's classifier: `prob` becomes its probabilities on
        its output (layer and pool), and `label` its class names. `load.load_recipe` checks its recipe first
        (`Head.check_features`)."""
        layer = self.resolve(head.output.layer)
        w, h = self.spec.input_size
        shape = self.spec.output_shape(layer, h, w)
        dim = shape[0] if len(shape) == 1 else int(np.prod(shape)) if head.output.pool == "flatten" else shape[2]
        if dim != head.dim:
            raise VGGEmbedError(f"{head.path}: takes {head.dim}-d {head.output.name} vectors but {self.spec.path} "
                                f"gives {dim}-d ones")
        self.head = head

    def label(self, index: int) -> str:
        """The name of class `index` of `prob`: the head's classes when one is attached, else the file's."""
        if self.head is not None:
            classes = self.head.classes
            return classes[index] if 0 <= index < len(classes) else f"class {index}"
        return self.spec.label(index)

    @property
    def num_classes(self) -> int | None:
        return len(self.head.classes) if self.head is not None else self.spec.num_classes

    # ----------------------------------------------------------------- names
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def resolve(self, name: str, *, embedding: bool = False) -> str:
        """Canonical name of a layer this network can compute (aliases accepted)."""
        canonical = arch_mod.resolve(self.spec.arch, name, embedding=embedding)
        if canonical not in self._index:
            raise LayerError(f"{self.spec.path} has no fully connected layers, so it cannot compute {name!r}; "
                             f"conv/pool layers (conv1_1 .. pool5) work")
        return canonical

    def output_shape(self, name: str, height: int, width: int) -> tuple:
        """Shape of one image's output at `name` for an input of height x width."""
        return self.spec.output_shape(self.resolve(name), height, width)

    # ------------------------------------------------------------- running
    def run(self, batch: np.ndarray, layers, pool: str | None = None, pad_to: int | None = None
            ) -> dict[str, np.ndarray]:
        """Run a preprocessed batch (N, H, W, 3; RGB 0..255) once; return each requested layer.

        Args:
            batch: float32 or uint8 array.
            layers: canonical layer names.
            pool: reduce 4-D outputs over space (`arch.POOLS`: avg, max, flatten, gem, rmac).
            pad_to: pad a short (last) batch with zeros to this size, so every
                batch has one shape: each row then comes from the same kernels
                whatever the number of images (oneDNN picks kernels per shape).
        """
        wanted = tuple(dict.fromkeys(layers))
        out = self.run_outputs(batch, tuple((name, pool) for name in wanted), pad_to)
        return {name: out[name, pool] for name in wanted}

    def run_outputs(self, batch: np.ndarray, outputs, pad_to: int | None = None) -> dict[tuple, np.ndarray]:
        """Run a batch once, as far as the deepest layer asked; return {(layer, pool): array} for each
        (canonical layer, pool or None) in `outputs` (see `run`). A pool on an fc layer is ignored. With a head
        attached, `prob` is the head's probabilities on its output, from the same pass."""
        if self.head is not None and any(name == "prob" for name, _ in outputs):
            feature = (self.head.output.layer, self.head.output.pool)
            rest = tuple(o for o in outputs if o[0] != "prob")
            out = self.run_outputs(batch, tuple(dict.fromkeys(rest + (feature,))), pad_to)
            vectors = out[feature]
            if self.head.recipe.l2_normalize:
                vectors = pooling.unit_rows(vectors)
            probs = self.head.probabilities(vectors)  # as the network's prob: each row as it comes
            return {**{o: out[o] for o in rest}, **{o: probs for o in outputs if o[0] == "prob"}}
        n = len(batch)
        if pad_to is not None and n < pad_to:
            batch = np.concatenate([batch, np.zeros((pad_to - n,) + batch.shape[1:], batch.dtype)])
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise VGGEmbedError(f"batch has shape {batch.shape}; expected (N, H, W, 3)")
        for name, pool in outputs:
            if name not in self._index:
                self.resolve(name)  # raises, naming what is missing
            if pool is not None and pool not in POOLS:
                raise VGGEmbedError(f"pool must be one of {POOLS}; received {pool!r}")
        head = [name for name, _ in outputs if self.layers[self._index[name]].block > 5]
        if head and tuple(batch.shape[1:3]) != tuple(reversed(self.spec.input_size)):
            h, w = self.spec.input_size[1], self.spec.input_size[0]
            raise LayerError(f"layer {head[0]} needs {w}x{h} input (the fc layers' training size); got "
                             f"{batch.shape[2]}x{batch.shape[1]}: use resize 'squash' or 'center-crop', "
                             "or a conv/pool layer")
        # What the graph computes: the map itself for rmac (its regions follow each map's size, see pooling).
        graph = {key: (key[0], None if key[1] == "rmac" or key[0] in head else key[1]) for key in outputs}
        out = self._compute(batch, tuple(dict.fromkeys(graph.values())))
        result = {}
        for key, computed in graph.items():
            rows = out[computed][:n]
            result[key] = pooling.rmac(rows) if key[1] == "rmac" and key[0] not in head else rows
        return result

    def _compute(self, batch: np.ndarray, graph: tuple) -> dict[tuple, np.ndarray]:
        """Every (layer, pool) in `graph` for the whole (padded) batch, as numpy arrays."""
        tf = tensorflow()
        with tf.device(self.device):
            out = self._function(graph)(tf.constant(batch, tf.float32))
        return {key: out[_key(key)].numpy() for key in graph}

    def _function(self, graph: tuple):
        if graph in self._functions:
            return self._functions[graph]
        tf = tensorflow()

        stop = max(self._index[name] for name, _ in graph)
        layers = self.layers[: stop + 1]
        mean, dtype = self._mean, self._dtype

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)], jit_compile=self.jit_compile)
        def forward(x):
            x = tf.cast(x - mean, dtype)
            out = {}
            for layer in layers:
                x = self._apply(layer, x)
                for name, pool in graph:
                    if name == layer.name:
                        out[_key((name, pool))] = _pooled(tf.cast(x, tf.float32), pool)
            return out

        self._functions[graph] = forward
        return forward

    def _apply(self, layer, x):
        """One layer's TensorFlow ops (traced inside `forward`, eager inside `walk`)."""
        tf = tensorflow()
        if layer.kind == "conv":
            w, b = self._params[layer.name]
            return tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
        if layer.kind == "relu":
            return tf.nn.relu(x)
        if layer.kind == "pool":
            return tf.nn.max_pool2d(x, 2, 2, "SAME")
        if layer.kind == "fc":
            w, b = self._params[layer.name]
            if layer.name == "fc6":
                x = tf.reshape(x, [tf.shape(x)[0], -1])  # NHWC flatten, as Frossard's fc6_W rows
            return tf.nn.bias_add(tf.matmul(x, w), b)
        return tf.nn.softmax(tf.cast(x, tf.float32))

    def walk(self, batch: np.ndarray, last: str):
        """Yield (name, float32 tensor) layer by layer up to `last`, holding only the current one.

        For very large inputs (feature maps of a whole photo): each tensor can
        be reduced or saved and dropped before the next is computed.
        """
        tf = tensorflow()
        stop = self._index[self.resolve(last)]
        with tf.device(self.device):
            x = tf.cast(tf.constant(batch, tf.float32) - self._mean, self._dtype)
            for layer in self.layers[: stop + 1]:
                x = self._apply(layer, x)
                yield layer.name, tf.cast(x, tf.float32)

    # -------------------------------------------------------- friendly API
    def features(self, images, layers, *, resize: str = "squash") -> dict[str, np.ndarray]:
        """Named layer outputs for one image or a list of same-sized images.

        Returns:
            {name: array with a leading batch axis}, keyed by the names asked for.
        """
        names = [layers] if isinstance(layers, str) else list(layers)
        canonical = [self.resolve(n) for n in names]
        batch = self._stack(_as_list(images), resize)
        out = self.run(batch, canonical)
        return {n: out[c] for n, c in zip(names, canonical)}

    def embed(self, images, layer: str = "fc2", *, pool: str | None = None, resize: str = "squash",
              batch_size: int = 32, l2_normalize: bool = False) -> np.ndarray:
        """One vector per image, (N, D) float32, rows in input order.

        `fc7` means the post-ReLU vector, equal to `fc2` (Caffe's in-place
        ReLU); 4-D layers need `pool` (avg, max or flatten).
        """
        name = self.embedding_layer(layer, pool)
        images = _as_list(images)
        pad_to = None if resize == "none" else batch_size
        rows = [self.embed_batch(self._stack(images[i: i + batch_size], resize), name, pool, l2_normalize, pad_to)
                for i in range(0, len(images), batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def embedding_layer(self, layer: str, pool: str | None) -> str:
        """Check an embedding request before any image is read; return the canonical layer."""
        name = self.resolve(layer, embedding=True)
        if self.layers[self._index[name]].block <= 5 and pool is None:
            raise LayerError(f"layer {layer} gives a 3-D map per image; choose a pool ({', '.join(POOLS)}) "
                             "to make it a vector")
        return name

    def embed_batch(self, batch: np.ndarray, name: str, pool: str | None, l2_normalize: bool = False,
                    pad_to: int | None = None) -> np.ndarray:
        """Vectors for one preprocessed batch (see `run` for `pad_to`)."""
        vectors = self.run(batch, [name], pool, pad_to)[name]
        return pooling.unit_rows(vectors) if l2_normalize else vectors

    def classify(self, images, top: int = 5, *, resize: str = "squash", batch_size: int = 32) -> list[list[Prediction]]:
        """Top-k classes per image (ImageNet's, or the attached head's), most probable first."""
        if self.head is None:
            self.resolve("prob")
        images = _as_list(images)
        out = []
        for i in range(0, len(images), batch_size):
            batch = self._stack(images[i: i + batch_size], resize)
            probs = self.run(batch, ["prob"], pad_to=batch_size)["prob"]
            out += [self.top_k(p, top) for p in probs]
        return out

    def top_k(self, probs: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(probs, kind="stable")[::-1][:k]
        return [Prediction(r + 1, int(i), self.label(int(i)), float(probs[i])) for r, i in enumerate(order)]

    def _stack(self, images, resize) -> np.ndarray:
        arrays = [prepare(im, resize_mode=resize, size=self.spec.input_size, max_pixels=DEFAULT_MAX_PIXELS)
                  for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise VGGEmbedError(f"images of different sizes {sorted(shapes)} cannot share a batch with resize "
                                "'none'; pass them one at a time")
        return np.stack(arrays).astype(np.float32, copy=False)


def network_layers(spec: WeightSpec) -> tuple[list, dict]:
    """The layers a weight file can compute, in order, and each one's position by name."""
    layers = [layer for layer in arch_mod.layers(spec.arch) if spec.has_fc or layer.block <= 5]
    return layers, {layer.name: i for i, layer in enumerate(layers)}


def _key(output: tuple) -> str:
    """A (layer, pool) pair as a key of a traced function's outputs."""
    return f"{output[0]}/{output[1]}"


def _pooled(y, pool):
    """Reduce a 4-D map to a vector per image (avg, max, flatten, gem); anything else passes
    (rmac is `pooling.rmac`, on the map)."""
    tf = tensorflow()
    if pool is None or len(y.shape) != 4:
        return y
    if pool == "avg":
        return tf.reduce_mean(y, axis=[1, 2])
    if pool == "max":
        return tf.reduce_max(y, axis=[1, 2])
    if pool == "gem":
        p = pooling.GEM_P
        return tf.pow(tf.reduce_mean(tf.pow(tf.maximum(y, pooling.EPS), p), axis=[1, 2]), 1.0 / p)
    return tf.reshape(y, [tf.shape(y)[0], -1])


def _pick_device(device: str) -> str:
    tf = tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        return "/CPU:0"
    if device == "gpu" and not gpus:
        raise VGGEmbedError("--device gpu: TensorFlow sees no GPU (CUDA build of TensorFlow and a driver needed)")
    if device not in ("cpu", "gpu", "auto"):
        raise VGGEmbedError(f"device must be cpu, gpu or auto; received {device!r}")
    if gpus:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialised: growth was set by an earlier model
        return "/GPU:0"
    return "/CPU:0"


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


