"""Read and write TFLite flatbuffers through the schema LiteRT ships.

This is the only module that reads ``ai_edge_litert.schema_py_generated``
(the object API, ``ModelT``) from files (``builder`` writes models with it). It
owns reading a file safely (regular files only, bounded size), parsing with
validation (bad files become one ``ModelError`` naming the file), refusing what
cannot be split correctly (control flow across subgraphs, state kept across
invocations, external weights), tensor type names, operator names, and fast
serialisation. Graph analysis lives in ``graph``, surgery in ``surgery``.
No TensorFlow anywhere.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

from testbed.errors import ModelError

FILE_IDENTIFIER = b"TFL3"

# TensorType -> numpy dtype name. Types without a fixed numpy itemsize
# (STRING, RESOURCE, VARIANT, sub-byte types) are refused by ``parse``.
_NUMPY = {
    fb.TensorType.FLOAT32: "float32", fb.TensorType.FLOAT16: "float16",
    fb.TensorType.FLOAT64: "float64", fb.TensorType.INT8: "int8",
    fb.TensorType.UINT8: "uint8", fb.TensorType.INT16: "int16",
    fb.TensorType.UINT16: "uint16", fb.TensorType.INT32: "int32",
    fb.TensorType.UINT32: "uint32", fb.TensorType.INT64: "int64",
    fb.TensorType.UINT64: "uint64", fb.TensorType.BOOL: "bool",
    fb.TensorType.COMPLEX64: "complex64", fb.TensorType.COMPLEX128: "complex128",
}
_TYPE_CODE = {v: k for k, v in _NUMPY.items()}
_TYPE_NAME = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
_OP_NAME = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}

# A model file is read whole into memory; the bound keeps a wrong path (a disk
# image, a core dump) from eating the machine. Flatbuffers stop at 2 GiB; models
# above that keep weights after the flatbuffer (buffer offsets), still one file.
MAX_MODEL_BYTES = 4 << 30

# Operators that run other subgraphs: a split would have to split those too.
_CALLS_SUBGRAPHS = {"WHILE", "IF", "CALL_ONCE", "CALL", "STABLEHLO_WHILE", "STABLEHLO_CASE",
                    "STABLEHLO_REDUCE", "STABLEHLO_REDUCE_WINDOW", "STABLEHLO_SCATTER", "STABLEHLO_SORT",
                    "STABLEHLO_COMPOSITE"}
# Operators that keep state across invocations in resources the interpreter
# owns: a head and a tail would each hold half of it (or a copy).
_STATEFUL = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "HASHTABLE", "HASHTABLE_FIND",
             "HASHTABLE_IMPORT", "HASHTABLE_SIZE"}

# Exceptions the pure-Python flatbuffer reader raises on a truncated or
# corrupt file (it does no verification of its own).
_PARSE_ERRORS = (struct.error, ValueError, IndexError, TypeError, KeyError,
                 UnicodeDecodeError, OverflowError, RecursionError, AttributeError)


def dtype_name(tensor_type: int) -> str:
    """Numpy dtype name of a TFLite TensorType (``ModelError``-free; assumes parse checked it)."""
    return _NUMPY[tensor_type]


def type_code(dtype: str) -> int:
    """TFLite TensorType of a numpy dtype name."""
    return _TYPE_CODE[np.dtype(dtype).name]


def builtin_code(code: fb.OperatorCodeT) -> int:
    # Schema v3a: builtin codes above 127 live in builtinCode, older files only
    # fill deprecatedBuiltinCode (int8); the larger of the two is the real one.
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def is_custom(model: fb.ModelT, opcode_index: int) -> bool:
    return builtin_code(model.operatorCodes[opcode_index]) == fb.BuiltinOperator.CUSTOM


def op_name(model: fb.ModelT, opcode_index: int) -> str:
    """Operator name, e.g. ``CONV_2D``; custom ops give their custom code (decoded by ``parse``)."""
    code = model.operatorCodes[opcode_index]
    builtin = builtin_code(code)
    if builtin == fb.BuiltinOperator.CUSTOM:
        return str(code.customCode or "")
    return _OP_NAME.get(builtin, f"BUILTIN_{builtin}")


def tensor_name(tensor: fb.TensorT) -> str:
    name = tensor.name
    return name.decode("utf-8") if isinstance(name, bytes) else (name or "")


def buffer_nbytes(buffer: fb.BufferT) -> int:
    data = buffer.data
    return 0 if data is None else len(data)


def read(path: str | Path) -> tuple[fb.ModelT, bytes]:
    """Read and validate a model file. Returns (model, file bytes)."""
    data = read_file(path)
    return parse(data, path=str(path)), data


def read_file(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` (default ``MAX_MODEL_BYTES``) bytes.

    A FIFO would block ``open`` until a writer comes and ``/dev/zero`` never
    ends: open without blocking, then look at what was opened (``fstat`` of the
    descriptor, so a file swapped in after a path check cannot slip through).

    Raises:
        ModelError: missing, unreadable, not a regular file, or too large.
    """
    limit = MAX_MODEL_BYTES if limit is None else limit
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=str(path)) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
            raise ModelError(f"not a regular file ({kind}); give a TFLite file", path=str(path))
        if st.st_size > limit:
            raise ModelError(f"{st.st_size} bytes is more than the {limit}-byte limit for a model file",
                             path=str(path))
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=str(path)) from e
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise ModelError("the file grew while it was read; is something still writing it?", path=str(path))
    return data


def parse(data: bytes, path: str | None = None) -> fb.ModelT:
    """Parse TFLite bytes into a ``ModelT``, refusing what the testbed cannot split.

    Raises:
        ModelError: not a TFLite file, wrong identifier, truncated or corrupt,
            several subgraphs, dynamic shapes, unsupported tensor types.
    """
    where = path or "<model bytes>"
    if len(data) < 8:
        raise ModelError(f"not a TFLite file ({len(data)} bytes, too short for a flatbuffer)", path=where)
    ident = bytes(data[4:8])
    if ident != FILE_IDENTIFIER:
        raise ModelError(f"not a TFLite file: file identifier {ident!r}, expected {FILE_IDENTIFIER!r}",
                         path=where)
    try:
        root = struct.unpack_from("<I", data, 0)[0]
        if root + 4 > len(data):
            raise ValueError("root offset past end of file")
        model = fb.ModelT.InitFromObj(fb.Model.GetRootAs(data, 0))
        _resolve_offset_buffers(model, data)
        _decode_custom_codes(model, where)
        _normalise(model)
    except struct.error as e:
        raise ModelError(f"truncated TFLite file: its tables run past the end of its {len(data)} bytes",
                         path=where) from e
    except _PARSE_ERRORS as e:
        raise ModelError(f"truncated or corrupt TFLite file ({type(e).__name__}: {e})", path=where) from e
    _check_supported(model, where)
    return model


def _resolve_offset_buffers(model: fb.ModelT, data: bytes) -> None:
    # Large models (>2 GB converters) keep weights after the flatbuffer and
    # point at them with offset/size; bring them in as ordinary data.
    for buf in model.buffers or []:
        if buf.offset:
            end = buf.offset + buf.size
            if end > len(data):
                raise ValueError(f"buffer data at {buf.offset}+{buf.size} past end of file")
            buf.data = np.frombuffer(data, dtype=np.uint8, count=buf.size, offset=buf.offset)
            buf.offset = buf.size = 0
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            if op.largeCustomOptionsOffset:
                end = op.largeCustomOptionsOffset + op.largeCustomOptionsSize
                if end > len(data):
                    raise ValueError(f"custom options at {op.largeCustomOptionsOffset} past end of file")
                op.customOptions = np.frombuffer(data, dtype=np.uint8, count=op.largeCustomOptionsSize,
                                                 offset=op.largeCustomOptionsOffset)
                op.largeCustomOptionsOffset = op.largeCustomOptionsSize = 0


def _decode_custom_codes(model: fb.ModelT, where: str) -> None:
    # The reader hands back bytes; names are printed and compared as text.
    for i, code in enumerate(model.operatorCodes or []):
        if isinstance(code.customCode, bytes):
            try:
                code.customCode = code.customCode.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ModelError(f"custom operator code {i} has a name that is not UTF-8 "
                                 f"({code.customCode[:40]!r}); the file is corrupt or not for this runtime",
                                 path=where) from e


def _normalise(model: fb.ModelT) -> None:
    # The object API hands back numpy arrays (views into the file) for index
    # vectors and shapes; lists are cheaper to remap and safe to mutate.
    model.buffers = model.buffers or [fb.BufferT()]
    for sg in model.subgraphs or []:
        sg.inputs = [int(i) for i in (sg.inputs if sg.inputs is not None else [])]
        sg.outputs = [int(i) for i in (sg.outputs if sg.outputs is not None else [])]
        sg.operators = sg.operators or []
        sg.tensors = sg.tensors or []
        for t in sg.tensors:
            t.shape = [int(d) for d in (t.shape if t.shape is not None else [])]
            if t.shapeSignature is not None:
                t.shapeSignature = [int(d) for d in t.shapeSignature]
            tensor_name(t)  # decodes or raises on garbage
        for op in sg.operators:
            op.inputs = [int(i) for i in (op.inputs if op.inputs is not None else [])]
            op.outputs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
            if op.intermediates is not None:
                op.intermediates = [int(i) for i in op.intermediates]


def _check_supported(model: fb.ModelT, where: str) -> None:
    subgraphs = model.subgraphs or []
    _check_operators(model, where)
    if len(subgraphs) != 1:
        raise ModelError(f"unsupported model: {len(subgraphs)} subgraphs (only single-subgraph models "
                         "can be split)", path=where)
    sg = subgraphs[0]
    for what, n in (("operators", len(sg.operators)), ("inputs", len(sg.inputs)), ("outputs", len(sg.outputs))):
        if n == 0:
            raise ModelError(f"unsupported model: no {what} (nothing to run or to split)", path=where)
    if model.externalBuffers or model.externalBufferGroups:
        raise ModelError("unsupported model: weights kept in external buffers (a LiteRT extension the "
                         "splitter does not copy)", path=where)
    n_t, n_b, n_c = len(sg.tensors), len(model.buffers), len(model.operatorCodes or [])
    for t in sg.tensors:
        if t.isVariable:
            raise ModelError(f"unsupported model: variable tensor {tensor_name(t)!r} keeps state across "
                             "invocations (a head and a tail would each hold their own copy)", path=where)
        if t.type not in _NUMPY:
            raise ModelError(f"unsupported tensor type {_TYPE_NAME.get(t.type, t.type)} "
                             f"for tensor {tensor_name(t)!r}", path=where)
        if not 0 <= t.buffer < n_b:
            raise ModelError(f"corrupt TFLite file: tensor {tensor_name(t)!r} names buffer {t.buffer} "
                             f"of {n_b}", path=where)
        sig = t.shapeSignature if t.shapeSignature is not None else t.shape
        if any(d < 0 for d in list(sig) + list(t.shape)):
            raise ModelError(f"unsupported model: dynamic shape {list(sig)} for tensor "
                             f"{tensor_name(t)!r} (static shapes only)", path=where)
    for i, op in enumerate(sg.operators):
        if op.mutatingVariableInputs is not None and any(op.mutatingVariableInputs):
            raise ModelError(f"unsupported model: operator {i} updates a variable input in place (state "
                             "across invocations)", path=where)
        if not 0 <= op.opcodeIndex < n_c:
            raise ModelError(f"corrupt TFLite file: operator {i} has opcode {op.opcodeIndex} of {n_c}",
                             path=where)
        for idx in op.inputs + op.outputs:
            if not -1 <= idx < n_t:
                raise ModelError(f"corrupt TFLite file: operator {i} names tensor {idx} of {n_t}",
                                 path=where)
    for idx in sg.inputs + sg.outputs:
        if not 0 <= idx < n_t:
            raise ModelError(f"corrupt TFLite file: model input/output names tensor {idx} of {n_t}",
                             path=where)


def _check_operators(model: fb.ModelT, where: str) -> None:
    """Refuse operators whose meaning a split would change (checked on the opcode table:
    a model lists every operator kind it uses there, whichever subgraph uses it)."""
    for i in range(len(model.operatorCodes or [])):
        if is_custom(model, i):
            continue
        name = op_name(model, i)
        if name in _CALLS_SUBGRAPHS:
            n = len(model.subgraphs or [])
            raise ModelError(f"unsupported model: control flow ({name}) runs other subgraphs ({n} in the file); "
                             "only single-subgraph models can be split", path=where)
        if name in _STATEFUL:
            raise ModelError(f"unsupported model: stateful operator {name} keeps resources across invocations "
                             "(a head and a tail would each hold their own copy)", path=where)


class _AlignedBuffer(fb.BufferT):
    """A Buffer whose data vector is 16-byte aligned and copied in one slice.

    The generated ``BufferT.Pack`` aligns uint8 data to 1 byte and copies via
    ``tobytes``; the schema asks for ``force_align: 16`` (kernels may map
    weights directly), and splitting 32 parts should cost little more than
    copying their bytes.
    """

    def __init__(self, data) -> None:
        super().__init__(data=data)

    def Pack(self, builder: flatbuffers.Builder):  # noqa: N802 - flatbuffers API
        data_off = None
        if self.data is not None:
            view = memoryview(self.data).cast("B")
            n = view.nbytes
            builder.StartVector(1, n, 16)
            builder.head -= n
            builder.Bytes[builder.head:builder.head + n] = view
            data_off = builder.EndVector()
        fb.BufferStart(builder)
        if data_off is not None:
            fb.BufferAddData(builder, data_off)
        return fb.BufferEnd(builder)


def serialize(model: fb.ModelT) -> bytes:
    """Pack a ``ModelT`` into TFLite bytes (identifier TFL3, weights 16-aligned)."""
    return bytes(serialize_view(model))


def serialize_view(model: fb.ModelT, builder: flatbuffers.Builder | None = None) -> memoryview:
    """Like ``serialize`` but without the final copy: a read-only view of the builder's buffer.

    Splitting writes ~32 x the model size; one copy fewer per part is measurable,
    and so is reusing a ``builder`` (its buffer is already faulted in). The view is
    valid until that builder is used again.
    """
    buffers = model.buffers
    payload = sum(buffer_nbytes(b) for b in buffers)
    model.buffers = [_AlignedBuffer(b.data) if b.data is not None and len(b.data) else fb.BufferT()
                     for b in buffers]
    try:
        # Pre-size the builder: growing it doubles and copies everything built so far.
        n_tensors = sum(len(sg.tensors) for sg in model.subgraphs)
        need = payload + 16 * len(buffers) + 256 * n_tensors + 65536
        if builder is None or len(builder.Bytes) < need:
            builder = flatbuffers.Builder(need)
        else:
            builder.Clear()
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return memoryview(builder.Bytes)[builder.Head():].toreadonly()
    finally:
        model.buffers = buffers
