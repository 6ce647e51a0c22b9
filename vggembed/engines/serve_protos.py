"""The protobuf messages of TensorFlow Serving's gRPC API that `serve_grpc.py` speaks, built at run time.

Only the messages and fields `vggembed serve` reads or writes, with TensorFlow's and TensorFlow Serving's
message names, field numbers and types (tensorflow/core/framework/{tensor,tensor_shape,types}.proto,
tensorflow/core/protobuf/meta_graph.proto, tensorflow_serving/apis/{model,predict,get_model_metadata,
get_model_status}.proto), so they are the same bytes on the wire as the official `tensorflow-serving-api`
client's; fields we do not know are kept as unknown fields and ignored.

Why not `tensorflow-serving-api`'s generated modules, or protoc's output: those pin TensorFlow and protobuf
versions (tensorflow-serving-api 2.21 requires tensorflow>=2.21 and protobuf>=6.31), and generated code checks
the protobuf runtime it finds; and TensorFlow registers `tensorflow.TensorProto` and its .proto file names in
protobuf's default pool, so a second definition of the same names (compiled protos) fails to load beside
`import tensorflow`. Here the descriptors are built with `descriptor_pb2` into a pool of their own: no file name
or message name can clash with TensorFlow's, the server runs with any protobuf that TensorFlow runs with, and
`--precision int8` serves gRPC without importing TensorFlow at all.
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2

F = descriptor_pb2.FieldDescriptorProto
STRING, BYTES, INT64, INT32, FLOAT, DOUBLE, BOOL, UINT32, UINT64, MESSAGE, ENUM = (
    F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_INT64, F.TYPE_INT32, F.TYPE_FLOAT, F.TYPE_DOUBLE, F.TYPE_BOOL,
    F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_MESSAGE, F.TYPE_ENUM)

# tensorflow.DataType: the values a served tensor may have (proto3 enums are open: others pass as numbers).
DATA_TYPES = {"DT_INVALID": 0, "DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT16": 5,
              "DT_INT8": 6, "DT_STRING": 7, "DT_INT64": 9, "DT_BOOL": 10, "DT_BFLOAT16": 14, "DT_HALF": 19}
AVAILABLE = 30  # tensorflow.serving.ModelVersionStatus.State


def _message(name, fields, nested=(), enums=()):
    """A DescriptorProto: fields are (name, number, type, repeated, type_name or None)."""
    m = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, repeated, type_name in fields:
        f = m.field.add(name=fname, number=number, type=ftype, label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
        if type_name:
            f.type_name = type_name
    m.nested_type.extend(nested)
    m.enum_type.extend(enums)
    return m


def _map_entry(name, value_type, value_type_name=None):
    entry = _message(name, [("key", 1, STRING, False, None), ("value", 2, value_type, False, value_type_name)])
    entry.options.map_entry = True
    return entry


def _enum(name, values):
    e = descriptor_pb2.EnumDescriptorProto(name=name)
    for vname, number in values.items():
        e.value.add(name=vname, number=number)
    return e


def _tensorflow_file():
    f = descriptor_pb2.FileDescriptorProto(name="vggembed/serving/tensorflow.proto", package="tensorflow",
                                           syntax="proto3")
    f.enum_type.append(_enum("DataType", DATA_TYPES))
    f.message_type.append(_message("TensorShapeProto", [
        ("dim", 2, MESSAGE, True, ".tensorflow.TensorShapeProto.Dim"), ("unknown_rank", 3, BOOL, False, None)],
        nested=[_message("Dim", [("size", 1, INT64, False, None), ("name", 2, STRING, False, None)])]))
    f.message_type.append(_message("TensorProto", [
        ("dtype", 1, ENUM, False, ".tensorflow.DataType"),
        ("tensor_shape", 2, MESSAGE, False, ".tensorflow.TensorShapeProto"),
        ("version_number", 3, INT32, False, None), ("tensor_content", 4, BYTES, False, None),
        ("half_val", 13, INT32, True, None), ("float_val", 5, FLOAT, True, None),
        ("double_val", 6, DOUBLE, True, None), ("int_val", 7, INT32, True, None),
        ("string_val", 8, BYTES, True, None), ("int64_val", 10, INT64, True, None),
        ("bool_val", 11, BOOL, True, None), ("uint32_val", 16, UINT32, True, None),
        ("uint64_val", 17, UINT64, True, None)]))
    f.message_type.append(_message("TensorInfo", [
        ("name", 1, STRING, False, None), ("dtype", 2, ENUM, False, ".tensorflow.DataType"),
        ("tensor_shape", 3, MESSAGE, False, ".tensorflow.TensorShapeProto")]))
    f.message_type.append(_message("SignatureDef", [
        ("inputs", 1, MESSAGE, True, ".tensorflow.SignatureDef.InputsEntry"),
        ("outputs", 2, MESSAGE, True, ".tensorflow.SignatureDef.OutputsEntry"),
        ("method_name", 3, STRING, False, None)],
        nested=[_map_entry("InputsEntry", MESSAGE, ".tensorflow.TensorInfo"),
                _map_entry("OutputsEntry", MESSAGE, ".tensorflow.TensorInfo")]))
    return f


def _serving_file():
    f = descriptor_pb2.FileDescriptorProto(name="vggembed/serving/tensorflow_serving.proto",
                                           package="tensorflow.serving", syntax="proto3",
                                           dependency=["vggembed/serving/tensorflow.proto",
                                                       "google/protobuf/wrappers.proto", "google/protobuf/any.proto"])
    spec = ("model_spec", 1, MESSAGE, False, ".tensorflow.serving.ModelSpec")
    f.message_type.append(_message("ModelSpec", [
        ("name", 1, STRING, False, None), ("version", 2, MESSAGE, False, ".google.protobuf.Int64Value"),
        ("version_label", 4, STRING, False, None), ("signature_name", 3, STRING, False, None)]))
    f.message_type.append(_message("PredictRequest", [
        spec, ("inputs", 2, MESSAGE, True, ".tensorflow.serving.PredictRequest.InputsEntry"),
        ("output_filter", 3, STRING, True, None)],
        nested=[_map_entry("InputsEntry", MESSAGE, ".tensorflow.TensorProto")]))
    f.message_type.append(_message("PredictResponse", [
        ("model_spec", 2, MESSAGE, False, ".tensorflow.serving.ModelSpec"),
        ("outputs", 1, MESSAGE, True, ".tensorflow.serving.PredictResponse.OutputsEntry")],
        nested=[_map_entry("OutputsEntry", MESSAGE, ".tensorflow.TensorProto")]))
    f.message_type.append(_message("SignatureDefMap", [
        ("signature_def", 1, MESSAGE, True, ".tensorflow.serving.SignatureDefMap.SignatureDefEntry")],
        nested=[_map_entry("SignatureDefEntry", MESSAGE, ".tensorflow.SignatureDef")]))
    f.message_type.append(_message("GetModelMetadataRequest", [spec, ("metadata_field", 2, STRING, True, None)]))
    f.message_type.append(_message("GetModelMetadataResponse", [
        spec, ("metadata", 2, MESSAGE, True, ".tensorflow.serving.GetModelMetadataResponse.MetadataEntry")],
        nested=[_map_entry("MetadataEntry", MESSAGE, ".google.protobuf.Any")]))
    f.message_type.append(_message("GetModelStatusRequest", [spec]))
    # error_code is a tensorflow.error.Code enum in TensorFlow Serving: the same varint on the wire.
    f.message_type.append(_message("StatusProto", [("error_code", 1, INT32, False, None),
                                                   ("error_message", 2, STRING, False, None)]))
    f.message_type.append(_message("ModelVersionStatus", [
        ("version", 1, INT64, False, None), ("state", 2, ENUM, False, ".tensorflow.serving.ModelVersionStatus.State"),
        ("status", 3, MESSAGE, False, ".tensorflow.serving.StatusProto")],
        enums=[_enum("State", {"UNKNOWN": 0, "START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40,
                               "END": 50})]))
    f.message_type.append(_message("GetModelStatusResponse", [
        ("model_version_status", 1, MESSAGE, True, ".tensorflow.serving.ModelVersionStatus")]))
    return f


def _build():
    pool = descriptor_pool.DescriptorPool()
    for module in (wrappers_pb2, any_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    for f in (_tensorflow_file(), _serving_file()):
        pool.AddSerializedFile(f.SerializeToString())
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21
        from google.protobuf.message_factory import MessageFactory

        GetMessageClass = MessageFactory(pool).GetPrototype  # noqa: N806
    return {name: GetMessageClass(pool.FindMessageTypeByName(name)) for name in (
        "tensorflow.TensorProto", "tensorflow.serving.PredictRequest", "tensorflow.serving.PredictResponse",
        "tensorflow.serving.SignatureDefMap", "tensorflow.serving.GetModelMetadataRequest",
        "tensorflow.serving.GetModelMetadataResponse", "tensorflow.serving.GetModelStatusRequest",
        "tensorflow.serving.GetModelStatusResponse")}


_classes = _build()
TensorProto = _classes["tensorflow.TensorProto"]
PredictRequest = _classes["tensorflow.serving.PredictRequest"]
PredictResponse = _classes["tensorflow.serving.PredictResponse"]
SignatureDefMap = _classes["tensorflow.serving.SignatureDefMap"]
GetModelMetadataRequest = _classes["tensorflow.serving.GetModelMetadataRequest"]
GetModelMetadataResponse = _classes["tensorflow.serving.GetModelMetadataResponse"]
GetModelStatusRequest = _classes["tensorflow.serving.GetModelStatusRequest"]
GetModelStatusResponse = _classes["tensorflow.serving.GetModelStatusResponse"]
