"""A small writer of TFLite flatbuffers: the few tables an int8 VGG needs, straight from numpy arrays.

`int8.Int8VGG` describes its quantized network with `Graph` (tensors with
their quantization, constant weights, operators) and `Graph.finish` lays it
out with the `flatbuffers` runtime. Field numbers are those of the published
schema (tensorflow/compiler/mlir/lite/schema/schema.fbs, which fixes them for
good: new fields are only ever appended); tests read the result back with
LiteRT's generated reader. Each constant goes into the builder as it is
added, so memory holds the model once plus the one layer being added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# TensorType
FLOAT32, INT32, INT8 = 0, 2, 9
_NUMPY = {FLOAT32: np.float32, INT32: np.int32, INT8: np.int8}

# BuiltinOperator: (code, version). Versions are those TensorFlow's converter gives these ops with int8
# tensors, so a runtime that accepts its models accepts these.
CONV_2D = (3, 3)
DEQUANTIZE = (6, 2)
FULLY_CONNECTED = (9, 4)
MAX_POOL_2D = (17, 2)
RELU = (19, 2)
RESHAPE = (22, 1)
MEAN = (40, 2)
SUB = (41, 2)
REDUCE_MAX = (82, 2)
QUANTIZE = (114, 1)

# BuiltinOptions union members
CONV_2D_OPTIONS, POOL_2D_OPTIONS, FULLY_CONNECTED_OPTIONS, RESHAPE_OPTIONS, REDUCER_OPTIONS, SUB_OPTIONS = (
    1, 5, 8, 17, 27, 28)
# Padding and ActivationFunctionType
SAME = 0
NONE, RELU_ACTIVATION = 0, 1

SCHEMA_VERSION = 3
DATA_ALIGN = 16  # Buffer.data is (force_align: 16)


@dataclass
class Tensor:
    name: str
    dtype: int
    shape: tuple
    batch: bool  # first dimension is the batch: -1 in shape_signature
    buffer: int = 0  # 0: no data (the empty buffer every model starts with)
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int = 0


@dataclass
class Operator:
    opcode: int
    inputs: list
    outputs: list
    options_type: int = 0
    options: tuple = ()  # ((slot, kind, value), ...) of the options table


@dataclass
class Graph:
    """One subgraph being described; constants are written into the builder as they come."""

    size_hint: int = 1 << 20
    tensors: list = field(default_factory=list)
    operators: list = field(default_factory=list)
    opcodes: list = field(default_factory=list)
    buffers: list = field(default_factory=lambda: [None])  # offsets of Buffer.data vectors; 0: the empty one

    def __post_init__(self):
        import flatbuffers

        self.builder = flatbuffers.Builder(self.size_hint)

    def tensor(self, name: str, dtype: int, shape, *, batch: bool = True, scale=None, zero_point=None,
               axis: int = 0, data: np.ndarray | None = None) -> int:
        """Add a tensor (with `data`: a constant); returns its index.

        `scale` and `zero_point` are per tensor (one value) or per channel along `axis`.
        """
        buffer = 0
        if data is not None:
            data = np.ascontiguousarray(data, _NUMPY[dtype])
            if tuple(data.shape) != tuple(shape):
                raise ValueError(f"{name}: data of shape {data.shape} for a tensor of shape {tuple(shape)}")
            buffer = len(self.buffers)
            self.buffers.append(self._bytes(data))
        if scale is not None:
            scale = np.atleast_1d(np.asarray(scale, np.float32))
            zero_point = np.broadcast_to(np.asarray(zero_point, np.int64), scale.shape)
        self.tensors.append(Tensor(name, dtype, tuple(int(d) for d in shape), batch, buffer, scale, zero_point, axis))
        return len(self.tensors) - 1

    def op(self, code: tuple, inputs, outputs, options_type: int = 0, options=()) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        self.operators.append(Operator(self.opcodes.index(code), list(inputs), list(outputs), options_type,
                                       tuple(options)))

    def _bytes(self, data: np.ndarray) -> int:
        """Write one constant's bytes as a [ubyte] vector now (little-endian, 16-byte aligned)."""
        b = self.builder
        raw = memoryview(data.astype(data.dtype.newbyteorder("<"), copy=False)).cast("B")
        b.StartVector(1, raw.nbytes, DATA_ALIGN)
        b.head = b.head - raw.nbytes
        b.Bytes[b.head: b.head + raw.nbytes] = raw
        return b.EndVector()

    def finish(self, inputs, outputs, description: str = "vggembed") -> memoryview:
        """The model's bytes (a view of the builder's buffer: write it out or copy it)."""
        b = self.builder
        buffers = []
        for data in self.buffers:
            b.StartObject(3)
            if data is not None:
                b.PrependUOffsetTRelativeSlot(0, data, 0)
            buffers.append(b.EndObject())
        tensors = [self._tensor(t) for t in self.tensors]
        operators = [self._operator(o) for o in self.operators]
        name = b.CreateString("main")
        subgraph_fields = (self._offsets(tensors), self._ints(inputs), self._ints(outputs), self._offsets(operators))
        b.StartObject(6)
        for slot, value in enumerate(subgraph_fields):
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        b.PrependUOffsetTRelativeSlot(4, name, 0)
        subgraph = b.EndObject()
        codes = []
        for code, version in self.opcodes:
            b.StartObject(4)
            b.PrependInt8Slot(0, min(code, 127), 0)  # deprecated_builtin_code: the code itself below 127
            b.PrependInt32Slot(2, version, 1)
            b.PrependInt32Slot(3, code, 0)
            codes.append(b.EndObject())
        codes, subgraphs, buffers = self._offsets(codes), self._offsets([subgraph]), self._offsets(buffers)
        text = b.CreateString(description)
        b.StartObject(8)
        b.PrependUint32Slot(0, SCHEMA_VERSION, 0)
        b.PrependUOffsetTRelativeSlot(1, codes, 0)
        b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
        b.PrependUOffsetTRelativeSlot(3, text, 0)
        b.PrependUOffsetTRelativeSlot(4, buffers, 0)
        b.Finish(b.EndObject(), file_identifier=b"TFL3")
        return memoryview(b.Bytes)[b.Head():]

    # ------------------------------------------------------------ tables
    def _tensor(self, t: Tensor) -> int:
        b = self.builder
        quantization = None
        if t.scale is not None:
            scale = self._numbers(t.scale, np.float32)
            zero_point = self._numbers(t.zero_point, np.int64)
            b.StartObject(7)
            b.PrependUOffsetTRelativeSlot(2, scale, 0)
            b.PrependUOffsetTRelativeSlot(3, zero_point, 0)
            b.PrependInt32Slot(6, t.axis, 0)
            quantization = b.EndObject()
        shape = self._ints(t.shape)
        signature = self._ints((-1,) + t.shape[1:]) if t.batch else None
        name = b.CreateString(t.name)
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, t.dtype, 0)
        b.PrependUint32Slot(2, t.buffer, 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if quantization is not None:
            b.PrependUOffsetTRelativeSlot(4, quantization, 0)
        if signature is not None:
            b.PrependUOffsetTRelativeSlot(7, signature, 0)
        return b.EndObject()

    def _operator(self, o: Operator) -> int:
        b = self.builder
        inputs, outputs = self._ints(o.inputs), self._ints(o.outputs)
        options = None
        if o.options_type:
            vectors = {slot: self._ints(value) for slot, kind, value in o.options if kind == "ints"}
            b.StartObject(1 + max((slot for slot, _, _ in o.options), default=0))
            for slot, kind, value in o.options:
                if kind == "int8":
                    b.PrependInt8Slot(slot, value, 0)
                elif kind == "int32":
                    b.PrependInt32Slot(slot, value, 0)
                elif kind == "bool":
                    b.PrependBoolSlot(slot, value, 0)
                else:
                    b.PrependUOffsetTRelativeSlot(slot, vectors[slot], 0)
            options = b.EndObject()
        b.StartObject(5)
        b.PrependUint32Slot(0, o.opcode, 0)
        b.PrependUOffsetTRelativeSlot(1, inputs, 0)
        b.PrependUOffsetTRelativeSlot(2, outputs, 0)
        if options is not None:
            b.PrependUint8Slot(3, o.options_type, 0)
            b.PrependUOffsetTRelativeSlot(4, options, 0)
        return b.EndObject()

    def _ints(self, values) -> int:
        return self._numbers(np.asarray(values, np.int32), np.int32)

    def _numbers(self, values, dtype) -> int:
        return self.builder.CreateNumpyVector(np.asarray(values, np.dtype(dtype).newbyteorder("<")).reshape(-1))

    def _offsets(self, offsets) -> int:
        b = self.builder
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()
