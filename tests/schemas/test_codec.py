"""Round trips through the codec: tensors of every dtype and shape, the typed messages, framing."""

import io

import fastavro
import pytest
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorline.schemas import (
    DETECTION,
    DTYPES,
    FUSED_RESULT,
    RECORD,
    CodecError,
    Detection,
    FusedResult,
    ModelRef,
    Record,
    decode,
    decode_detection,
    decode_record,
    decode_result,
    encode,
    encode_detection,
    encode_record,
    encode_result,
    read_header,
    tensor_from_avro,
    tensor_to_avro,
)
from tensorline.schemas.registry import parsed_schema

# Strings Avro can carry: any text that is valid UTF-8 (no lone surrogates).
TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
# Epoch millis within datetime's range, which fastavro's timestamp-millis decoding needs.
TIMESTAMPS = st.integers(-(2**45), 2**47)
FLOAT32 = st.floats(width=32, allow_nan=False)
MODELS = st.builds(ModelRef, TEXT, TEXT)

DTYPE_ANY_ORDER = st.sampled_from(DTYPES).flatmap(
    lambda name: st.sampled_from([np.dtype(name), np.dtype(name).newbyteorder(">")])
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
SMALL_ARRAYS = DTYPE_ANY_ORDER.flatmap(lambda dtype: hnp.arrays(dtype, SHAPES))


def little_endian(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("<"))


def assert_same_tensor(got: np.ndarray, sent: np.ndarray) -> None:
    """Bit-for-bit equality (NaN payloads and -0.0 included), little-endian dtype, same shape."""
    expected = little_endian(sent)
    assert got.dtype == expected.dtype and got.dtype.byteorder in "<|"
    assert got.shape == sent.shape
    assert got.tobytes() == expected.tobytes()


@settings(max_examples=300, deadline=None)
@given(arr=SMALL_ARRAYS, transpose=st.booleans())
def test_tensor_round_trip_is_bit_exact(arr: np.ndarray, transpose: bool) -> None:
    sent = arr.T if transpose else arr
    record = Record("r", "s", 0, {"t": sent}, "ingest")
    assert_same_tensor(decode_record(bytes(encode_record(record))).tensors["t"], sent)


def test_every_dtype_zero_d_and_empty_tensors_round_trip() -> None:
    assert DTYPES == (
        "bool", "uint8", "int8", "uint16", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
    for name in DTYPES:
        for shape in [(), (0,), (3, 0, 2), (2, 3)]:
            arr = np.ones(shape, dtype=name)
            assert_same_tensor(tensor_from_avro(tensor_to_avro(arr)), arr)


def test_big_endian_and_strided_input_is_sent_little_endian_c_order() -> None:
    arr = np.arange(12, dtype=">i2").reshape(3, 4)[:, ::2]
    datum = tensor_to_avro(arr)
    assert datum == {"dtype": "int16", "shape": [3, 2], "data": datum["data"]}
    assert bytes(datum["data"]) == b"\x00\x00\x02\x00\x04\x00\x06\x00\x08\x00\x0a\x00"
    assert_same_tensor(tensor_from_avro(datum), arr)


def test_little_endian_contiguous_tensor_is_not_copied_to_the_datum() -> None:
    arr = np.arange(6, dtype=np.float32)
    assert np.shares_memory(np.frombuffer(tensor_to_avro(arr)["data"], np.uint8), arr)


def test_decoded_tensor_is_a_read_only_view_of_the_message() -> None:
    arr = np.arange(1 << 15, dtype=np.float64)  # 256 KiB: above the zero-copy threshold
    message = bytes(encode_record(Record("r", "s", 0, {"t": arr}, "ingest")))
    got = decode_record(message).tensors["t"]
    start = np.frombuffer(message, np.uint8).__array_interface__["data"][0]
    assert start <= got.__array_interface__["data"][0] < start + len(message)
    assert not got.flags.writeable
    np.testing.assert_array_equal(got, arr)


def test_framing_bytes_are_confluent_magic_and_big_endian_id() -> None:
    model = ModelRef("m", "1")
    detection = Detection("a", "s", 1, model, ("x",), (1.0,))
    result = FusedResult("a", "s", 1, "mean", ("x",), (1.0,), "x", ("m",), (), False)
    assert encode_record(Record("a", "s", 1, {}, "ingest"))[:5] == b"\x00\x00\x00\x00\x01"
    assert encode_detection(detection)[:5] == b"\x00\x00\x00\x00\x02"
    assert encode_result(result)[:5] == b"\x00\x00\x00\x00\x03"


def test_detection_bytes_are_standard_avro_after_the_header() -> None:
    detection = Detection("a", "s", 1, ModelRef("m", "1"), ("x",), (1.0,))
    assert encode_detection(detection) == (
        b"\x00\x00\x00\x00\x02"  # magic byte, schema id 2
        b"\x02a\x02s\x02"  # record_id, source, ingest_ts_ms 1 (zig-zag 2)
        b"\x02m\x021"  # model name, version
        b"\x02\x02x\x00"  # classes: block of 1, "x", end
        b"\x02\x00\x00\x80\x3f\x00"  # scores: block of 1, 1.0f little-endian, end
        b"\x00\x00"  # label: null branch; attributes: empty map
    )


def test_payload_decodes_with_plain_fastavro() -> None:
    record = Record("r", "s", 5, {"t": np.arange(3, dtype=np.int32)}, "ingest", {"k": "v"})
    message = bytes(encode_record(record))
    datum = fastavro.schemaless_reader(io.BytesIO(message[5:]), parsed_schema(RECORD))
    assert isinstance(datum, dict)
    data = np.arange(3, dtype="<i4").tobytes()
    assert datum["tensors"]["t"] == {"dtype": "int32", "shape": [3], "data": data}
    assert datum["attributes"] == {"k": "v"} and datum["stage"] == "ingest"


@settings(max_examples=100, deadline=None)
@given(
    record_id=TEXT,
    source=TEXT,
    ts=TIMESTAMPS,
    attributes=st.dictionaries(TEXT, TEXT, max_size=3),
    label=st.none() | TEXT,
    stage=TEXT,
    model=st.none() | MODELS,
)
def test_record_round_trip(
    record_id: str,
    source: str,
    ts: int,
    attributes: dict[str, str],
    label: str | None,
    stage: str,
    model: ModelRef | None,
) -> None:
    tensors = {"image": np.full((2, 2), 0.5, np.float32), "mask": np.zeros(3, bool)}
    sent = Record(record_id, source, ts, tensors, stage, attributes, label, model)
    got = decode_record(encode_record(sent))
    assert (got.record_id, got.source, got.stage) == (record_id, source, stage)
    assert got.ingest_ts_ms == ts
    assert (got.attributes, got.label, got.model) == (attributes, label, model)
    assert list(got.tensors) == ["image", "mask"]
    for name, arr in tensors.items():
        assert_same_tensor(got.tensors[name], arr)


@settings(max_examples=100, deadline=None)
@given(
    ts=TIMESTAMPS,
    model=MODELS,
    scored=st.lists(st.tuples(TEXT, FLOAT32), max_size=5),
    attributes=st.dictionaries(TEXT, TEXT, max_size=3),
    label=st.none() | TEXT,
)
def test_detection_round_trip(
    ts: int,
    model: ModelRef,
    scored: list[tuple[str, float]],
    attributes: dict[str, str],
    label: str | None,
) -> None:
    classes = tuple(c for c, _ in scored)
    scores = tuple(s for _, s in scored)
    sent = Detection("r", "s", ts, model, classes, scores, attributes, label)
    assert decode_detection(encode_detection(sent)) == sent


@settings(max_examples=100, deadline=None)
@given(
    ts=TIMESTAMPS,
    scored=st.lists(st.tuples(TEXT, FLOAT32), min_size=1, max_size=5),
    contributors=st.lists(TEXT, max_size=3).map(tuple),
    missing=st.lists(TEXT, max_size=3).map(tuple),
    attributes=st.dictionaries(TEXT, TEXT, max_size=3),
    label=st.none() | TEXT,
)
def test_fused_result_round_trip(
    ts: int,
    scored: list[tuple[str, float]],
    contributors: tuple[str, ...],
    missing: tuple[str, ...],
    attributes: dict[str, str],
    label: str | None,
) -> None:
    classes = tuple(c for c, _ in scored)
    scores = tuple(s for _, s in scored)
    sent = FusedResult(
        "r", "s", ts, "weighted", classes, scores, classes[0], contributors, missing,
        bool(missing), attributes, label,
    )
    assert decode_result(encode_result(sent)) == sent


def test_generic_decode_names_the_schema() -> None:
    message = encode_detection(Detection("r", "s", 0, ModelRef("m", "1"), (), ()))
    name, datum = decode(message)
    assert name == read_header(message) == DETECTION
    assert datum["model"] == {"name": "m", "version": "1"}
    assert read_header(encode(FUSED_RESULT, {
        "record_id": "r", "source": "s", "ingest_ts_ms": 0, "strategy": "mean", "classes": [],
        "scores": [], "decision": "", "contributors": [], "missing": [], "partial": True,
        "attributes": {},
    })) == FUSED_RESULT


def test_long_strings_round_trip() -> None:
    note = "é" * 70_000  # 140 KB of UTF-8: above the size at which payload reads are views
    sent = Record("r", "s", 0, {"t": np.arange(3.0)}, "ingest", {"note": note}, label=note)
    got = decode_record(encode_record(sent))
    assert got.attributes == {"note": note} and got.label == note


@settings(max_examples=300, deadline=None)
@given(schema_id=st.sampled_from([1, 2, 3]), payload=st.binary(max_size=64))
def test_arbitrary_payloads_decode_or_raise_codec_errors(schema_id: int, payload: bytes) -> None:
    message = b"\x00" + schema_id.to_bytes(4, "big") + payload
    try:
        decode(message)
    except CodecError:
        pass


def test_every_truncation_of_a_record_is_a_codec_error() -> None:
    record = Record("r", "s", 7, {"t": np.arange(40, dtype=np.int16)}, "ingest", {"k": "v"}, "y")
    message = bytes(encode_record(record))
    for end in range(len(message)):
        try:
            decode_record(message[:end])
        except CodecError:
            continue
        raise AssertionError(f"a message cut to {end} of {len(message)} bytes decoded")


# -- the fast paths: the same answers as the general ones --------------------------------------
MESSAGES = st.builds(
    Record, TEXT, TEXT, TIMESTAMPS,
    st.dictionaries(TEXT, SMALL_ARRAYS, max_size=3), TEXT,
    st.dictionaries(TEXT, TEXT, max_size=3), st.none() | TEXT, st.none() | MODELS,
).map(lambda r: bytes(encode_record(r)))


def decoded(message: bytes) -> object:
    """decode's datum, or the codec error it raised: its type and what it says up to the
    underlying reader's own words (a negative length reads "negative length -1" from the view
    stream, "Expected -1 bytes, read 6" from fastavro on a BytesIO)."""
    try:
        return decode(message)
    except CodecError as exc:
        return type(exc), str(exc).split(" payload: ")[0]


@settings(max_examples=300, deadline=None)
@given(message=MESSAGES, cut=st.integers(0, 8), at=st.integers(5), byte=st.integers(0, 255))
def test_small_messages_read_from_bytes_as_from_the_view_stream(message: bytes, cut: int, at: int, byte: int) -> None:
    """A message under 64 KiB is read from a BytesIO; read through `_MessageStream` (as longer
    messages are) it gives the same datum or the same error, whole, cut short or with a byte
    of its payload changed (which is also how the BytesIO path meets negative lengths)."""
    from tensorline.schemas import codec

    damaged = bytearray(message)
    damaged[5 + at % (len(message) - 5)] = byte
    for candidate in (message, message[: max(5, len(message) - cut)], bytes(damaged)):
        small = decoded(candidate)
        before, codec._SMALL_MESSAGE_BYTES = codec._SMALL_MESSAGE_BYTES, 0  # every message takes the stream path
        try:
            streamed = decoded(candidate)
        finally:
            codec._SMALL_MESSAGE_BYTES = before
        assert repr(small) == repr(streamed)


@settings(max_examples=200, deadline=None)
@given(message=MESSAGES)
def test_plain_decode_is_decode_with_timestamps_as_epoch_millis(message: bytes) -> None:
    from datetime import UTC, datetime, timedelta

    from tensorline.schemas.codec import decode_plain

    _, datum = decode(message)
    plain = decode_plain(message, RECORD)
    ts = datum.pop("ingest_ts_ms")
    assert plain.pop("ingest_ts_ms") == (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert repr(plain) == repr(datum)


@settings(max_examples=200, deadline=None)
@given(record=st.builds(
    Record, TEXT, TEXT, st.integers(-(2**63), 2**63 - 1),
    st.dictionaries(TEXT, SMALL_ARRAYS, max_size=3), TEXT,
    st.dictionaries(TEXT, TEXT, max_size=3), st.none() | TEXT, st.none() | MODELS,
))
def test_typed_encode_writes_what_the_strict_encode_writes(record: Record) -> None:
    """encode_record skips fastavro's field check, not a byte: the message is the one `encode`
    writes for the same datum, and any int64 timestamp comes back as it went."""
    from tensorline.schemas.messages import _model_to_avro

    datum = {
        "record_id": record.record_id, "source": record.source, "ingest_ts_ms": record.ingest_ts_ms,
        "tensors": {k: tensor_to_avro(v, name=k) for k, v in record.tensors.items()},
        "attributes": record.attributes, "label": record.label, "stage": record.stage,
        "model": None if record.model is None else _model_to_avro(record.model),
    }
    message = encode_record(record)
    assert message == encode(RECORD, datum)
    assert decode_record(message).ingest_ts_ms == record.ingest_ts_ms


def test_typed_encode_of_long_varints_and_odd_values_matches_fastavro() -> None:
    """Dimensions, lengths and timestamps of several varint bytes; and values `_write_record` does
    not take itself (a numpy timestamp, a bytearray of data, an extra field, a long out of range,
    a label not a string), which fastavro writes or refuses as it would alone."""
    from tensorline.schemas.codec import _encode, encode_complete

    sent = Record("r" * 300, "s", -(2**40), {"wide": np.zeros((0, 100_000, 3)), "big": np.ones(70_000, np.uint8)},
                  "ingest", {"k" * 200: "v" * 20_000}, "é" * 64, ModelRef("m" * 64, "v" * 63))
    got = decode_record(encode_record(sent))
    assert got.tensors["wide"].shape == (0, 100_000, 3) and got.attributes == sent.attributes
    datum = {"record_id": "r", "source": "s", "ingest_ts_ms": np.int64(5),
             "tensors": {"t": {"dtype": "uint8", "shape": [2], "data": bytearray(b"ab")}},
             "attributes": {}, "label": None, "stage": "x", "model": None}
    assert encode_complete(RECORD, datum) == encode(RECORD, datum)
    for bad in ({**datum, "extra": 1}, {**datum, "ingest_ts_ms": 2**63}, {**datum, "label": 3}):
        try:
            expected = _encode(RECORD, bad, strict=False)  # fastavro on its own
        except CodecError as exc:
            with pytest.raises(type(exc), match="cannot encode"):
                encode_complete(RECORD, bad)
        else:
            assert encode_complete(RECORD, bad) == expected
