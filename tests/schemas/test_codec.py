"""Round trips through the codec: tensors of every dtype and shape, the typed messages, framing."""

import io

import fastavro
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
