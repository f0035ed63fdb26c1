"""One test per kind of bad input: the exact error class, and a message naming the problem."""

import re
from collections.abc import Callable

import numpy as np
import pytest

from tensorline.schemas import (
    MAX_TENSOR_BYTES,
    RECORD,
    Detection,
    ModelRef,
    Record,
    decode,
    decode_detection,
    decode_record,
    encode,
    encode_detection,
    encode_record,
    tensor_from_avro,
    tensor_to_avro,
)
from tensorline.schemas.errors import (
    BadTensor,
    CodecError,
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
    UnknownSchemaId,
    UnknownSchemaName,
    UnsupportedDtype,
)

DETECTION = Detection("r", "s", 0, ModelRef("m", "1"), ("cat",), (0.5,))


def raises_exactly(error: type[CodecError], match: str, call: Callable[[], object]) -> CodecError:
    """Run `call`: it must raise exactly `error`, not a subclass, with `match` in its message."""
    with pytest.raises(error, match=re.escape(match)) as info:
        call()
    assert type(info.value) is error and isinstance(info.value, ValueError)
    return info.value


def record_message(tensor: dict[str, object]) -> bytearray:
    """A Record message whose one tensor, "image", is the raw Avro datum given."""
    datum = {
        "record_id": "r", "source": "s", "ingest_ts_ms": 0, "tensors": {"image": tensor},
        "attributes": {}, "stage": "ingest",
    }
    return encode(RECORD, datum)


def test_empty_message() -> None:
    raises_exactly(EmptyMessage, "message is empty", lambda: decode(b""))


def test_unknown_magic_byte() -> None:
    raises_exactly(
        UnknownMagicByte, "magic byte is 0x7b; expected 0x00", lambda: decode(b'{"id": "r"}')
    )


def test_truncated_header() -> None:
    raises_exactly(
        TruncatedHeader, "message is 3 bytes; the Confluent header alone needs 5",
        lambda: decode(b"\x00\x00\x00"),
    )


def test_unknown_schema_id() -> None:
    raises_exactly(
        UnknownSchemaId, "unknown schema id 258; expected one of 1, 2, 3",
        lambda: decode(b"\x00\x00\x00\x01\x02" + b"\x00" * 8),
    )


def test_unknown_schema_name() -> None:
    raises_exactly(
        UnknownSchemaName, "unknown schema name 'tensorline.v1.Nope'; expected one of",
        lambda: encode("tensorline.v1.Nope", {}),
    )


def test_message_of_another_schema_names_both() -> None:
    raises_exactly(
        SchemaMismatch,
        "framed with schema id 2 (tensorline.v1.Detection); expected tensorline.v1.Record",
        lambda: decode_record(encode_detection(DETECTION)),
    )


def test_truncated_avro() -> None:
    message = bytes(encode_detection(DETECTION))
    raises_exactly(
        MalformedAvro, f"cannot decode the {len(message) - 8}-byte tensorline.v1.Detection",
        lambda: decode_detection(message[:-3]),
    )


def test_garbage_avro() -> None:
    raises_exactly(
        MalformedAvro, "cannot decode the 10-byte tensorline.v1.Detection payload",
        lambda: decode(b"\x00\x00\x00\x00\x02" + b"\xff" * 10),
    )


def test_trailing_bytes_after_the_datum() -> None:
    message = bytes(encode_detection(DETECTION)) + b"\x00\x00"
    raises_exactly(
        MalformedAvro, "2 trailing bytes after the tensorline.v1.Detection datum",
        lambda: decode_detection(message),
    )


def test_datum_that_does_not_fit_the_schema() -> None:
    raises_exactly(
        InvalidDatum, "cannot encode tensorline.v1.Record: ValueError: Field source",
        lambda: encode(RECORD, {"record_id": "r"}),
    )


def test_scores_not_one_per_class() -> None:
    raises_exactly(
        InvalidDatum, "2 scores for 1 classes; expected one score per class",
        lambda: Detection("r", "s", 0, ModelRef("m", "1"), ("cat",), (0.5, 0.5)),
    )


def test_unsupported_dtype_on_encode() -> None:
    record = Record("r", "s", 0, {"x": np.zeros(2, np.complex64)}, "ingest")
    error = raises_exactly(
        UnsupportedDtype, "tensor 'x': dtype complex64 is not one of bool, uint8",
        lambda: encode_record(record),
    )
    assert isinstance(error, BadTensor) and error.tensor == "x"


def test_unsupported_dtype_on_decode() -> None:
    message = record_message({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8})
    error = raises_exactly(
        UnsupportedDtype, "tensor 'image': dtype 'complex64' is not one of bool, uint8",
        lambda: decode_record(message),
    )
    assert isinstance(error, BadTensor) and error.tensor == "image"
    assert error.problem.startswith("dtype 'complex64'")


def test_negative_dimension() -> None:
    message = record_message({"dtype": "uint8", "shape": [2, -1], "data": b""})
    raises_exactly(
        NegativeDimension, "tensor 'image': shape (2, -1) has a negative dimension",
        lambda: decode_record(message),
    )


def test_byte_length_not_matching_shape() -> None:
    datum = {"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 15}
    raises_exactly(
        SizeMismatch, "tensor 'w': 15 data bytes, but shape (2, 2) of float32 needs 16",
        lambda: tensor_from_avro(datum, name="w"),
    )


def test_zero_size_shape_too_large_for_numpy() -> None:
    datum = {"dtype": "uint8", "shape": [2**62, 2**62, 0], "data": b""}
    raises_exactly(SizeMismatch, "is not representable", lambda: tensor_from_avro(datum))


def test_tensor_over_the_size_limit() -> None:
    assert MAX_TENSOR_BYTES == 16 * 1024 * 1024
    size = MAX_TENSOR_BYTES + 1
    datum = {"dtype": "uint8", "shape": [size], "data": bytes(size)}
    raises_exactly(
        TensorTooLarge, "16777217 bytes exceeds the limit of 16777216 bytes",
        lambda: tensor_from_avro(datum),
    )
    raises_exactly(
        TensorTooLarge, "tensor 'big': 32 bytes exceeds the limit of 16 bytes",
        lambda: tensor_to_avro(np.zeros(4, np.float64), name="big", max_bytes=16),
    )
    message = bytes(encode_record(Record("r", "s", 0, {"t": np.zeros(8, np.uint8)}, "ingest")))
    raises_exactly(
        TensorTooLarge, "tensor 't': 8 bytes exceeds the limit of 7 bytes",
        lambda: decode_record(message, max_bytes=7),
    )


def test_nonfinite_values_where_forbidden() -> None:
    arr = np.array([1.0, np.nan, np.inf, -np.inf], np.float16)
    message = bytes(encode_record(Record("r", "s", 0, {"probs": arr}, "ingest")))
    assert np.isnan(decode_record(message).tensors["probs"][1])  # allowed by default
    raises_exactly(
        NonFiniteValue, "tensor 'probs': 3 of 4 values are NaN or Inf; expected finite values",
        lambda: decode_record(message, allow_nonfinite=False),
    )


def test_tensor_errors_are_bad_tensors() -> None:
    tensor_errors = (UnsupportedDtype, NegativeDimension, SizeMismatch, TensorTooLarge)
    assert all(issubclass(error, BadTensor) for error in (*tensor_errors, NonFiniteValue))
    assert not issubclass(MalformedAvro, BadTensor)
