"""Bytes <-> Avro datums <-> numpy: the Confluent wire format and the tensor encoding.

A message is the Confluent framing (magic byte 0, then the schema id as 4 big-endian bytes)
followed by the datum in standard schemaless Avro binary, written and read by fastavro. Tensor
bytes are copied once on encode (into the buffer fastavro builds, which is the message) and not
at all on decode: decoded arrays are views of the message.

A message whose schema id a registry resolved to a compatible evolution of a built-in schema
(`registry.WriterSchema`) is read by Avro schema resolution, with its writer schema and the
built-in one as reader schema: the datum the reader sees has the built-in schema's fields, the
defaults filled in. The schemas to read each id with are built once, at its first message.
"""

import io
import json
import math
import struct
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import IO, Any, cast

import numpy as np
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import expand_schema

from tensorline.schemas.errors import (
    EmptyMessage,
    InvalidDatum,
    MalformedAvro,
    NegativeDimension,
    NonFiniteValue,
    SchemaMismatch,
    SizeMismatch,
    TensorTooLarge,
    TruncatedHeader,
    UnknownMagicByte,
    UnsupportedDtype,
)
from tensorline.schemas.registry import (
    RECORD,
    on_change,
    parsed_schema,
    schema_id,
    schema_name,
    writer_schema,
)

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")  # magic byte, schema id

# A tensor cannot be larger than the Kafka message carrying it: 16 MiB is the broker's
# message.max.bytes for tensorline's topics, so anything bigger could never be produced.
MAX_TENSOR_BYTES = 16 * 1024 * 1024

# Payload reads at least this long come back as views of the message instead of copies. Only
# tensor data is that long in practice, and copying less than 64 KiB costs a few microseconds.
_VIEW_MIN_BYTES = 64 * 1024
# Messages shorter than this hold no read that long: they are read from a BytesIO instead.
_SMALL_MESSAGE_BYTES = _VIEW_MIN_BYTES

# The tensor dtypes the codec accepts, by numpy name, each with its little-endian wire dtype.
_WIRE_DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        name: np.dtype(name).newbyteorder("<")
        for name in (
            "bool", "uint8", "int8", "uint16", "int16", "int32", "int64",
            "float16", "float32", "float64",
        )
    }
)
DTYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)
# The same by dtype of either byte order, for encoding (dtype.name takes ~1 us to compute).
_WIRE_BY_DTYPE: Mapping[np.dtype[Any], tuple[str, np.dtype[Any]]] = MappingProxyType(
    {
        dtype: (name, wire)
        for name, wire in _WIRE_DTYPES.items()
        for dtype in (wire, wire.newbyteorder(">"))
    }
)
_BYTE = np.dtype(np.uint8)
_DTYPE_LIST = ", ".join(DTYPES)


def encode(name: str, datum: Mapping[str, Any]) -> bytearray:
    """Frame `datum` as a Confluent message of the registered schema `name`.

    Returns a bytearray, which Kafka clients take like bytes: converting it would cost one
    more copy of every tensor.
    """
    return _encode(name, datum, strict=True)


def encode_complete(name: str, datum: Mapping[str, Any]) -> bytearray:
    """`encode` for a datum built with exactly the schema's fields (the typed layer's).

    A Record is written by `_write_record`, byte for byte what fastavro writes in a quarter of
    its time; anything it does not take as it comes (a value of another type, a long out of
    range) goes to fastavro, which writes it or raises InvalidDatum as `encode` does.
    """
    if name == RECORD:
        try:
            return _write_record(datum)
        except Exception:  # noqa: BLE001 - fastavro decides, and words the error
            pass
    return _encode(name, datum, strict=False)


_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
# Zigzag varints of -64..63, one byte each: every length, count and dimension of a usual record.
_SMALL_LONGS = tuple(bytes(((n << 1) ^ (n >> 63),)) for n in range(-64, 64))
_ZERO, _ONE = _SMALL_LONGS[64], _SMALL_LONGS[65]


def _long(n: int) -> bytes:
    """An Avro long: zigzag, then a little-endian base-128 varint."""
    if -64 <= n < 64:
        return _SMALL_LONGS[n + 64]
    if type(n) is not int or not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n!r} is not a long")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _text(value: str) -> tuple[bytes, bytes]:
    if type(value) is not str:
        raise TypeError(f"{type(value).__name__} is not a string")
    data = value.encode()
    return _long(len(data)), data


def _write_record(datum: Mapping[str, Any]) -> bytearray:
    """A tensorline.v1.Record datum framed as `encode` frames it, written field by field."""
    parts: list[Any] = [_frame(RECORD)[1], *_text(datum["record_id"]), *_text(datum["source"])]
    ts = datum["ingest_ts_ms"]
    if type(ts) is not int:
        raise TypeError("ingest_ts_ms is not an int")
    parts.append(_long(ts))
    for values in (datum["tensors"], datum["attributes"]):
        if type(values) is not dict:
            raise TypeError("not a dict")
        if values:
            parts.append(_long(len(values)))
            for key, value in values.items():
                parts += _text(key)
                if values is datum["attributes"]:
                    parts += _text(value)
                    continue
                if type(value) is not dict or len(value) != 3:
                    raise TypeError("not a tensor datum")
                parts += _text(value["dtype"])
                shape, data = value["shape"], value["data"]
                if type(shape) is not list or type(data) not in (bytes, memoryview):
                    raise TypeError("not a tensor datum")
                if shape:
                    parts.append(_long(len(shape)))
                    parts += [_long(d) for d in shape]
                parts += (_ZERO, _long(len(data) if type(data) is bytes else data.nbytes), data)
        parts.append(_ZERO)
    label = datum["label"]
    parts += (_ZERO,) if label is None else (_ONE, *_text(label))
    parts += _text(datum["stage"])
    model = datum["model"]
    if model is None:
        parts.append(_ZERO)
    else:
        if type(model) is not dict or len(model) != 2:
            raise TypeError("not a model datum")
        parts += (_ONE, *_text(model["name"]), *_text(model["version"]))
    if len(datum) != 8:
        raise TypeError("not a Record datum")
    return bytearray().join(parts)


def _encode(name: str, datum: Mapping[str, Any], *, strict: bool) -> bytearray:
    frame, header = _frame(name)
    sink = _Sink()
    try:
        schemaless_writer(
            cast(IO[bytes], sink),
            frame,
            {"header": header, "payload": datum},
            strict_allow_default=strict,
        )
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise InvalidDatum(f"cannot encode {name}: {type(exc).__name__}: {exc}") from exc
    return sink.buffer


@cache
def _frame(name: str) -> tuple[dict[str, Any], bytes]:
    """A schema for the whole message and the header bytes for `name`, built once.

    The Confluent header is written as a 5-byte Avro fixed before the datum, so fastavro
    builds the message in one buffer; the bytes after the header are the plain Avro datum.
    """
    header = _HEADER.pack(MAGIC_BYTE, schema_id(name))
    header_type = {"type": "fixed", "name": "tensorline.wire.Header", "size": len(header)}
    frame = parse_schema(
        {
            "type": "record",
            "name": "tensorline.wire.Frame",
            "fields": [
                {"name": "header", "type": header_type},
                {"name": "payload", "type": name},
            ],
        },
        named_schemas=dict(parsed_schema(name)["__named_schemas"]),
    )
    return cast(dict[str, Any], frame), header


# A frame holds its schema id: built again when a schema registry's ids are installed.
on_change(_frame.cache_clear)


class _Sink:
    """The file fastavro writes a message to.

    fastavro's compiled writer makes one write of the bytearray it built, which is kept
    rather than copied; its pure-Python fallback writes pieces, which are appended.
    """

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes | bytearray) -> None:
        if not self.buffer and type(data) is bytearray:
            self.buffer = data
        else:
            self.buffer += data


def read_header(message: bytes | bytearray) -> str:
    """The schema name a message is framed with, after checking magic byte and schema id."""
    return schema_name(_wire_id(message))


def _wire_id(message: bytes | bytearray) -> int:
    """The schema id in a message's Confluent header, after checking the header is one."""
    if not message:
        raise EmptyMessage("message is empty; expected a Confluent header and an Avro payload")
    if message[0] != MAGIC_BYTE:
        raise UnknownMagicByte(
            f"magic byte is 0x{message[0]:02x}; expected 0x{MAGIC_BYTE:02x} (Confluent wire format)"
        )
    if len(message) < _HEADER.size:
        raise TruncatedHeader(
            f"message is {len(message)} bytes; the Confluent header alone needs {_HEADER.size}"
        )
    return cast(int, _HEADER.unpack_from(message)[1])


def decode(
    message: bytes | bytearray, *, expect: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The schema name and Avro datum of a message; `expect` rejects other schemas unread.

    `bytes` fields of 64 KiB or more come back as memoryviews of `message`, not copies:
    read-only when it is `bytes`, as Kafka consumers deliver it.
    """
    reading = _reading(message, expect, _READINGS)
    return reading[0], _read(message, reading)


def decode_plain(message: bytes | bytearray, expect: str) -> dict[str, Any]:
    """`decode` of a message of schema `expect`, with logical types read as their plain Avro
    type (timestamp-millis as epoch milliseconds, not a datetime): what the typed layer keeps,
    without a datetime built and taken apart again for every message."""
    return _read(message, _reading(message, expect, _PLAIN_READINGS))


# How to read a schema id: (schema name, writer schema, reader schema, or None to read with the
# writer schema alone: the id's writer schema is the built-in one).
_Reading = tuple[str, dict[str, Any], dict[str, Any] | None]
# By schema id, for `decode` and for `decode_plain`; built again when the ids change.
_READINGS: dict[int, _Reading] = {}
_PLAIN_READINGS: dict[int, _Reading] = {}
on_change(_READINGS.clear)
on_change(_PLAIN_READINGS.clear)


def _reading(
    message: bytes | bytearray, expect: str | None, readings: dict[int, _Reading]
) -> _Reading:
    """How to read `message`, after checking its header and that it is framed with `expect`."""
    wire_id = _wire_id(message)
    reading = readings.get(wire_id)
    if reading is None:
        reading = readings[wire_id] = _new_reading(wire_id, plain=readings is _PLAIN_READINGS)
    if expect is not None and reading[0] != expect:
        raise SchemaMismatch(
            f"message is framed with schema id {wire_id} ({reading[0]}); expected {expect}"
        )
    return reading


def _new_reading(wire_id: int, *, plain: bool) -> _Reading:
    """The schemas to read `wire_id` with: the built-in schema it names, and its writer schema
    first when that is an evolution of the built-in one (Avro schema resolution)."""
    name = schema_name(wire_id)
    builtin = _plain_schema(name) if plain else parsed_schema(name)
    text = writer_schema(wire_id)
    if text is None:
        return name, builtin, None
    writer = json.loads(text)
    return name, _parse(_without_logical_types(writer) if plain else writer), builtin


def _read(message: bytes | bytearray, reading: _Reading) -> dict[str, Any]:
    """The datum after the header, read to the message's end as `reading` says.

    A message shorter than _VIEW_MIN_BYTES holds no field that long, so it is read from a
    BytesIO (fastavro reads it in C, ~2x faster than through `_MessageStream`'s Python reads)
    with the same result: every field a copy.
    """
    name, writer, reader = reading
    size = len(message)
    try:
        if size < _SMALL_MESSAGE_BYTES:
            small = io.BytesIO(message)
            small.seek(_HEADER.size)
            datum = schemaless_reader(small, writer, reader)
            end = small.tell()
        else:
            view = memoryview(message)
            try:
                stream = _MessageStream(view, _VIEW_MIN_BYTES)
                datum = schemaless_reader(cast(IO[bytes], stream), writer, reader)
            except AttributeError:
                # fastavro decodes strings with .decode(), which memoryviews lack: a string of
                # _VIEW_MIN_BYTES or more is rare, so read again with every chunk as bytes.
                stream = _MessageStream(view, size + 1)
                datum = schemaless_reader(cast(IO[bytes], stream), writer, reader)
            end = stream.pos
    except Exception as exc:
        raise MalformedAvro(
            f"cannot decode the {size - _HEADER.size}-byte {name} payload: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if end != size:
        raise MalformedAvro(
            f"{size - end} trailing bytes after the {name} datum; expected none"
        )
    return cast(dict[str, Any], datum)


@cache
def _plain_schema(name: str) -> dict[str, Any]:
    """The registered schema `name` with its logical types dropped (the same bytes on the wire:
    a logical type only annotates its underlying type)."""
    return _parse(_without_logical_types(expand_schema(parsed_schema(name))))


def _without_logical_types(node: Any) -> Any:
    """A schema's JSON without its logical types (nor fastavro's own `__` keys)."""
    if isinstance(node, dict):
        return {
            k: _without_logical_types(v)
            for k, v in node.items()
            if k != "logicalType" and not k.startswith("__")
        }
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


def _parse(schema: Any) -> dict[str, Any]:
    """A self-contained schema's JSON, parsed by fastavro with named types of its own."""
    return cast(dict[str, Any], parse_schema(schema, named_schemas={}))


class _MessageStream:
    """A file-like reader over a message's Avro payload, for fastavro's schemaless_reader.

    Reads of at least `view_min` bytes return memoryview slices, so tensor data is not copied;
    shorter reads return bytes, which fastavro's integer and string decoders require.
    """

    __slots__ = ("_view", "_view_min", "pos")

    def __init__(self, view: memoryview, view_min: int) -> None:
        self._view = view
        self._view_min = view_min
        self.pos = _HEADER.size

    def read(self, size: int) -> bytes | memoryview:
        if size < 0:
            raise EOFError(f"negative length {size}")
        start = self.pos
        chunk = self._view[start : start + size]
        self.pos = start + len(chunk)
        return chunk if size >= self._view_min else chunk.tobytes()


def tensor_to_avro(
    arr: np.ndarray, *, name: str | None = None, max_bytes: int = MAX_TENSOR_BYTES
) -> dict[str, Any]:
    """The Avro Tensor datum for `arr`, converted to little-endian C order if it is not so.

    `data` is a memoryview of the array (no copy; fastavro copies it into the message), so
    do not modify `arr` before the datum is encoded.
    """
    found = _WIRE_BY_DTYPE.get(arr.dtype)
    if found is None:
        raise UnsupportedDtype(f"dtype {arr.dtype} is not one of {_DTYPE_LIST}", tensor=name)
    if arr.nbytes > max_bytes:
        raise TensorTooLarge(
            f"{arr.nbytes} bytes exceeds the limit of {max_bytes} bytes", tensor=name
        )
    dtype_name, wire = found
    flat = np.asarray(arr).astype(wire, order="C", copy=False).ravel()
    return {"dtype": dtype_name, "shape": list(arr.shape), "data": flat.view(_BYTE).data}


def tensor_from_avro(
    datum: Mapping[str, Any],
    *,
    name: str | None = None,
    allow_nonfinite: bool = True,
    max_bytes: int = MAX_TENSOR_BYTES,
) -> np.ndarray:
    """The validated array for an Avro Tensor datum; `name` says which tensor in errors.

    The array views the datum's bytes (np.frombuffer, no copy): it is read-only when they are
    immutable, may be unaligned, and keeps the message alive; `.copy()` gives an owned array.
    """
    wire = _WIRE_DTYPES.get(datum["dtype"])
    if wire is None:
        raise UnsupportedDtype(
            f"dtype {datum['dtype']!r} is not one of {_DTYPE_LIST}", tensor=name
        )
    shape = tuple(datum["shape"])
    if any(dim < 0 for dim in shape):
        raise NegativeDimension(
            f"shape {shape} has a negative dimension; expected all >= 0", tensor=name
        )
    data = datum["data"]
    if len(data) > max_bytes:
        raise TensorTooLarge(
            f"{len(data)} bytes exceeds the limit of {max_bytes} bytes", tensor=name
        )
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        raise SizeMismatch(
            f"{len(data)} data bytes, but shape {shape} of {wire.name} needs {expected}",
            tensor=name,
        )
    try:
        arr = np.frombuffer(data, dtype=wire).reshape(shape)
    except ValueError as exc:  # a zero-size shape with dimensions too large for numpy
        raise SizeMismatch(f"shape {shape} is not representable: {exc}", tensor=name) from exc
    if not allow_nonfinite and wire.kind == "f":
        bad = arr.size - np.count_nonzero(np.isfinite(arr))
        if bad:
            raise NonFiniteValue(
                f"{bad} of {arr.size} values are NaN or Inf; expected finite values", tensor=name
            )
    return arr
