"""An Avro tensor record through the real broker, transactional and read_committed, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.schemas import Record, decode_record, encode_record

pytestmark = pytest.mark.broker


def record(rid: str, arr: np.ndarray) -> Record:
    return Record(record_id=rid, source="test", ingest_ts_ms=1_700_000_000_000, tensors={"image": arr},
                  stage="producer", attributes={"modality": "CT"}, label="nodule")


def test_transactional_round_trip_is_bit_for_bit(pipeline):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((64, 64)).astype(np.float32),
              "u16": rng.integers(0, 4096, (32, 48), dtype=np.uint16),
              "f64-nan": np.array([np.nan, -0.0, np.inf, 1e-300])}
    producer = clients.producer(pipeline, transactional_id=f"{pipeline.name}.tx")
    producer.init_transactions()
    producer.begin_transaction()
    for rid, arr in arrays.items():
        producer.send(pipeline.topic("raw").name, key=rid.encode(), value=bytes(encode_record(record(rid, arr))))
    producer.commit_transaction()
    producer.begin_transaction()
    producer.send(pipeline.topic("raw").name, key=b"aborted", value=bytes(encode_record(record("aborted", arrays["f32"]))))
    producer.abort_transaction()
    producer.close()

    got = {decode_record(m.value).record_id: decode_record(m.value) for m in topics.read_all(pipeline, pipeline.topic("raw").name)}
    assert set(got) == set(arrays)  # the aborted record is invisible to read_committed
    for rid, arr in arrays.items():
        back = got[rid].tensors["image"]
        assert back.dtype == arr.dtype and back.shape == arr.shape and back.tobytes() == arr.tobytes()
        assert got[rid].label == "nodule" and got[rid].attributes == {"modality": "CT"}


def test_a_ten_mebibyte_tensor_fits_the_raised_limits(pipeline):
    arr = np.arange(10 * 1024 * 1024 // 4, dtype=np.float32).reshape(1280, 2048)
    producer = clients.producer(pipeline)
    producer.send(pipeline.topic("out").name, key=b"big", value=bytes(encode_record(record("big", arr)))).get(30)
    producer.close()
    [msg] = topics.read_all(pipeline, pipeline.topic("out").name)
    assert decode_record(msg.value).tensors["image"].tobytes() == arr.tobytes()
