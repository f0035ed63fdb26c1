"""Hostile input on the real broker: a foreign producer writes odd headers, odd keys and bad
values into every stage's input topic, between good records, while real workers of every stage
(preprocess, features, detection, fusion) run. Every good record gives exactly one result, every
bad value is in the DLQ exactly once with its reason, and no worker exits or stalls.

Odd headers and keys on a good value are no reason to refuse it: a header we do not understand is
carried along, a null header value as an empty one (kafka-python cannot send null header values),
a header key that is not UTF-8 as U+FFFD characters (as the Java client reads it).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.record.default_records import DefaultRecordBatchBuilder

from tensorline.engine import clients, worker
from tensorline.engine.runtime import header
from tensorline.schemas import (CodecError, Detection, ModelRef, Record, decode_detection, decode_record, decode_result,
                                encode_detection, encode_record)

pytestmark = pytest.mark.broker

STAGES = {"raw": ("preprocess", None), "pre": ("features", None), "feat": ("detection", "head"), "det": ("fusion", None)}
OUTPUT = {"raw": "pre", "pre": "feat", "feat": "det", "det": "res"}
# Whole test, workers' start-up included; a worker that stalls on a record fails it here.
DEADLINE_S = 240.0
HUGE = 1 << 20  # a 1 MiB header value, a 1 MiB key


def body(models) -> str:
    return f"""
[topics]
raw = {{ partitions = 2 }}
pre = {{ partitions = 2 }}
feat = {{ partitions = 2 }}
det = {{ partitions = 2 }}
res = {{ partitions = 2 }}
dlq = {{ partitions = 1 }}
[stages.preprocess]
input = "raw"
output = "pre"
max_batch = 8
max_delay_ms = 20
[stages.preprocess.params]
size = 16
[stages.features]
input = "pre"
output = "feat"
max_batch = 8
max_delay_ms = 20
[stages.features.models.backbone]
path = "{models / 'backbone.keras'}"
[stages.detection]
input = "feat"
output = "det"
max_batch = 8
max_delay_ms = 20
[stages.detection.models.head]
path = "{models / 'head.keras'}"
input = "embedding"
[fusion]
input = "det"
output = "res"
expected_models = ["head"]
max_batch = 8
max_delay_ms = 20
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8)]).save(folder / "backbone.keras")
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")]).save(folder / "head.keras")
    return folder


# -- what a foreign client can write that kafka-python's producer would refuse ----------------------

class RawKey(str):
    """A header key kafka-python writes as these bytes, UTF-8 or not (it calls key.encode())."""

    def __new__(cls, raw: bytes) -> "RawKey":
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *args, **kwargs) -> bytes:
        return self.raw


class NullValue(bytes):
    """A header value kafka-python writes as null (see `null_header_values`); an empty value to
    its checks and size sums."""


@contextlib.contextmanager
def null_header_values(monkeypatch):
    """While it lasts, kafka-python's record builder writes NullValue header values as null, as
    the Java client can (kafka-python's send() refuses None, its builder does not). Other header
    values are untouched, so the workers running meanwhile are not affected."""
    original = DefaultRecordBatchBuilder.append

    def append(self, offset, timestamp, key, value, headers, *args, **kwargs):
        headers = [(k, None if isinstance(v, NullValue) else v) for k, v in headers]
        return original(self, offset, timestamp, key, value, headers, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DefaultRecordBatchBuilder, "append", append)
        yield


@dataclass
class Sent:
    """One injected record: where it went, what it is, what must come of it."""

    topic: str  # the topic key ("raw", ...)
    kind: str
    good: bool
    record_id: str | None
    key: bytes | None
    value: bytes
    headers: list = field(default_factory=list)
    carried: tuple | None = None  # a header the stage's output must carry, normalised
    reason: str | None = None     # the DLQ reason a bad value must get
    partition: int = -1
    offset: int = -1


def good_value(topic: str, rid: str, rng: np.random.Generator) -> bytes:
    now = int(time.time() * 1000)
    if topic == "det":
        return bytes(encode_detection(Detection(record_id=rid, source="hostile", ingest_ts_ms=now,
                                                model=ModelRef("head", "1"), classes=("normal", "nodule"),
                                                scores=(0.3, 0.7))))
    tensors = {"raw": {"image": rng.integers(0, 4096, (16, 16)).astype(np.uint16)},
               "pre": {"image": rng.standard_normal((16, 16, 1)).astype(np.float32)},
               "feat": {"embedding": rng.standard_normal(8).astype(np.float32)}}[topic]
    stage = {"raw": "producer", "pre": "preprocess", "feat": "features"}[topic]
    return bytes(encode_record(Record(record_id=rid, source="hostile", ingest_ts_ms=now, tensors=tensors, stage=stage)))


def nan_value(topic: str, rid: str, pad: int = 0) -> bytes:
    """A valid message whose tensor (or scores) the stage's model would read is NaN."""
    if topic == "det":
        return bytes(encode_detection(Detection(record_id=rid, source="hostile", ingest_ts_ms=0,
                                                model=ModelRef("head", "1"), classes=("normal", "nodule"),
                                                scores=(float("nan"), 0.5))))
    shape = {"raw": (16, 16), "pre": (16, 16, 1), "feat": (8,)}[topic]
    name = "embedding" if topic == "feat" else "image"
    tensors = {name: np.full(shape, np.nan, np.float32)}
    if pad:
        tensors["pad"] = np.zeros(pad, np.uint8)
    return bytes(encode_record(Record(record_id=rid, source="hostile", ingest_ts_ms=0, tensors=tensors, stage="x")))


def sized(build, size: int) -> bytes:
    """build(pad) grown until its message is exactly `size` bytes (Avro lengths are varints)."""
    pad = size
    for _ in range(4):
        value = build(pad)
        if len(value) == size:
            return value
        pad -= len(value) - size
    raise AssertionError(f"could not size a message to {size} bytes")


def near_limit_value(topic: str, rid: str, limit: int) -> tuple[bytes, str | None]:
    """A value 300 bytes short of the message limit, and the reason its dead letter must carry."""
    size = limit - 300
    if topic == "raw":  # garbage: its dead letter (bytes + tl.dlq.* headers) is over the limit
        return b"\xff" * size, "UnknownMagicByte"
    if topic == "pre":  # a good input whose output (input tensors forwarded + embedding) cannot fit
        image = np.zeros((16, 16, 1), np.float32)
        return sized(lambda pad: bytes(encode_record(Record(
            record_id=rid, source="hostile", ingest_ts_ms=0, stage="preprocess",
            tensors={"image": image, "pad": np.zeros(pad, np.uint8)}))), size), "too_large"
    if topic == "feat":
        return sized(lambda pad: nan_value("feat", rid, pad), size), "non_finite"
    return sized(lambda pad: bytes(encode_detection(Detection(
        record_id=rid, source="hostile", ingest_ts_ms=0, model=ModelRef("head", "1"), classes=("normal", "nodule"),
        scores=(5.0, -2.0), attributes={"pad": "x" * pad}))), size), "not_probabilities"


def injected(topic: str, limit: int, rng: np.random.Generator) -> list[Sent]:
    """One topic's records: twelve good ones (four plain, five with odd headers, three with odd
    keys) and the bad values, interleaved so that dead letters never outnumber good records."""
    def trace() -> list:
        return [("tl.trace", uuid.uuid4().hex.encode()), ("tl.ingest_ms", str(int(time.time() * 1000)).encode())]

    goods = []
    for j in range(4):
        rid = f"{topic}-plain-{j}"
        goods.append(Sent(topic, "plain", True, rid, f"k-{rid}".encode(), good_value(topic, rid, rng), trace()))
    odd_headers = {
        "null_header_value": (("x-null", NullValue()), ("x-null", b"")),
        "non_utf8_header_key": ((RawKey(b"\xff\xfe"), b"odd"), ("\ufffd\ufffd", b"odd")),
        "fractional_ingest_ms": (("tl.ingest_ms", b"1796072778892.297"),) * 2,
        "text_ingest_ms": (("tl.ingest_ms", b"abc"),) * 2,
        "huge_header": (("x-huge", b"h" * HUGE),) * 2,
    }
    for kind, (odd, carried) in odd_headers.items():
        rid = f"{topic}-{kind}"
        headers = [h for h in trace() if h[0] != odd[0]] + [odd]
        goods.append(Sent(topic, kind, True, rid, f"k-{rid}".encode(), good_value(topic, rid, rng), headers,
                          carried=carried))
    for kind, key in (("null_key", None), ("binary_key", b"\x00\xff\xfe\x80"), ("huge_key", b"K" * HUGE)):
        rid = f"{topic}-{kind}"
        goods.append(Sent(topic, kind, True, rid, key, good_value(topic, rid, rng), trace()))

    other = "raw" if topic == "det" else "det"  # a valid message of the other schema
    good = good_value(topic, f"{topic}-template", rng)
    near, near_reason = near_limit_value(topic, f"{topic}-near_limit", limit)
    bads = [
        ("empty", b"", "EmptyMessage"),
        ("garbage", b"garbage \x00\x01\x02", "UnknownMagicByte"),
        ("truncated_avro", good[: len(good) // 2], "MalformedAvro"),
        ("nan", nan_value(topic, f"{topic}-nan"), "non_finite"),
        ("unknown_schema_id", good[:1] + struct.pack(">I", 9999) + good[5:], "UnknownSchemaId"),
        ("other_schema", good_value(other, f"{topic}-other_schema", rng), "SchemaMismatch"),
        ("near_limit", near, near_reason),
    ]
    if topic == "det":
        bads.append(("not_probabilities", bytes(encode_detection(Detection(
            record_id="det-not_probabilities", source="hostile", ingest_ts_ms=0, model=ModelRef("head", "1"),
            classes=("normal", "nodule"), scores=(0.9, 0.9)))), "not_probabilities"))
    bad = [Sent(topic, kind, False, None, f"k-{topic}-{kind}".encode(), value, trace(), reason=reason)
           for kind, value, reason in bads]
    out = []
    for j, g in enumerate(goods):
        out.append(g)
        if j < len(bad):
            out.append(bad[j])
    return out


def inject(cfg, records: list[Sent]) -> None:
    """Send with a plain kafka-python producer (not the project's), each good/bad pair to one
    partition; record where each landed."""
    producer = KafkaProducer(bootstrap_servers=clients.bootstrap(cfg).split(","), max_request_size=cfg.max_message_bytes,
                             acks="all", linger_ms=5)
    try:
        futures = []
        for i, r in enumerate(records):
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(r.key, r.value, r.headers)
            assert size <= cfg.max_message_bytes, (r.topic, r.kind, size)
            futures.append(producer.send(cfg.topic(r.topic).name, key=r.key, value=r.value, headers=r.headers,
                                         partition=(i // 2) % 2))
        producer.flush()
        for r, f in zip(records, futures):
            meta = f.get(timeout=60)
            r.partition, r.offset = meta.partition, meta.offset
    finally:
        producer.close()


class Tail:
    """Every committed record of some topics from the beginning, read incrementally
    (read_committed), so waiting for results does not re-read the DLQ's large records."""

    def __init__(self, cfg, keys: list[str]):
        self.consumer = clients.consumer(cfg, None)
        tps = [TopicPartition(cfg.topic(k).name, p) for k in keys
               for p in range(cfg.topic(k).partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.names = {cfg.topic(k).name: k for k in keys}
        self.records: dict[str, list] = {k: [] for k in keys}

    def poll(self) -> None:
        for tp, rs in self.consumer.poll(timeout_ms=500, max_records=1000).items():
            self.records[self.names[tp.topic]].extend(rs)

    def close(self) -> None:
        self.consumer.close()


def test_hostile_records_into_every_stage(tmp_path, write_pipeline, models, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    started = time.monotonic()
    cfg = write_pipeline(tmp_path / "pipeline.toml", body(models))
    rng = np.random.default_rng(11)
    records = [r for topic in STAGES for r in injected(topic, cfg.max_message_bytes, rng)]

    stop = threading.Event()
    failures: dict[str, str] = {}

    def run(stage: str, model: str | None) -> None:
        try:
            worker.run(cfg, stage, model=model, stop=stop, metrics_port=None)
            if not stop.is_set():
                failures[stage] = "returned before it was stopped"
        except BaseException:
            failures[stage] = traceback.format_exc()

    threads = {stage: threading.Thread(target=run, args=(stage, model), name=f"hostile-{stage}", daemon=True)
               for stage, model in STAGES.values()}
    for t in threads.values():
        t.start()
    with null_header_values(monkeypatch):
        inject(cfg, records)
    tail = Tail(cfg, ["raw", "res", "dlq", *OUTPUT.values()])
    good = [r for r in records if r.good]
    bad = {(cfg.topic(r.topic).name, r.partition, r.offset): r for r in records if not r.good}
    try:
        while True:
            tail.poll()
            done = ({decode_result(r.value).record_id for r in tail.records["res"]} >= {r.record_id for r in good}
                    and len(tail.records["dlq"]) >= len(bad))
            dead = dict(failures) | {s: "thread ended" for s, t in threads.items() if not t.is_alive()
                                     and s not in failures}
            assert not dead, "workers exited:\n" + "\n".join(f"[{s}] {f}" for s, f in dead.items())
            if done:
                break
            if time.monotonic() - started > DEADLINE_S:
                raise AssertionError(missing(tail, good, bad))
    finally:
        stop.set()
        for t in threads.values():
            t.join(60)
    assert not [s for s, t in threads.items() if t.is_alive()], "a worker did not stop within 60 s"
    assert not failures, "\n".join(f"[{s}] {f}" for s, f in failures.items())
    # Everything the stopped workers committed, read once more: anything produced twice is here now.
    ends = tail.consumer.end_offsets(list(tail.consumer.assignment()))  # read_committed: the stable end
    while any(tail.consumer.position(tp) < end for tp, end in ends.items()):
        assert time.monotonic() - started < DEADLINE_S + 60, "reading the topics to their end timed out"
        tail.poll()
    tail.close()

    # The injection itself: the null header value reached the broker as a null.
    raw_null = [r for r in tail.records["raw"] if any(k == "x-null" for k, _ in r.headers or [])]
    assert [v for r in raw_null for k, v in r.headers if k == "x-null"] == [None]  # a real null on the wire

    results = Counter(decode_result(r.value).record_id for r in tail.records["res"])
    assert {rid: n for rid, n in results.items() if n != 1} == {}, "results produced more than once"
    assert set(results) == {r.record_id for r in good}, missing(tail, good, bad)

    for r in good:  # the stage's own output: once, odd headers carried, keys kept where the stage keeps them
        out = [o for o in tail.records[OUTPUT[r.topic]] if record_id(OUTPUT[r.topic], o.value) == r.record_id]
        assert len(out) == 1, (r.topic, r.kind, len(out))
        if r.carried:
            assert r.carried in list(out[0].headers), (r.topic, r.kind, [k for k, _ in out[0].headers])
        if r.topic in ("raw", "pre"):
            assert out[0].key == r.key, (r.topic, r.kind)

    letters = Counter((header(d.headers, "tl.dlq.topic").decode(), int(header(d.headers, "tl.dlq.partition")),
                       int(header(d.headers, "tl.dlq.offset"))) for d in tail.records["dlq"])
    extra = {o: n for o, n in letters.items() if o not in bad or n != 1}
    assert not extra, f"dead letters that are not one per bad record: {extra}"
    assert set(letters) == set(bad), missing(tail, good, bad)
    for d in tail.records["dlq"]:
        origin = (header(d.headers, "tl.dlq.topic").decode(), int(header(d.headers, "tl.dlq.partition")),
                  int(header(d.headers, "tl.dlq.offset")))
        sent, reason = bad[origin], (header(d.headers, "tl.dlq.reason") or b"").decode()
        assert reason == sent.reason, (sent.topic, sent.kind, reason)
        if sent.kind == "near_limit":  # its bytes and the reason headers do not fit in one message
            assert sent.value.startswith(d.value or b""), (sent.topic, sent.kind)
        else:
            assert d.value == sent.value and d.key == sent.key, (sent.topic, sent.kind)


def record_id(topic: str, value: bytes) -> str | None:
    """The record id of a message on `topic`; None for what was injected there undecodable."""
    decode = {"res": decode_result, "det": decode_detection}.get(topic, decode_record)
    try:
        return decode(value).record_id
    except CodecError:
        return None


def missing(tail: Tail, good: list[Sent], bad: dict) -> str:
    """What has not come out yet: good records without a result, bad ones without a dead letter."""
    results = {decode_result(r.value).record_id for r in tail.records["res"]}
    origins = {(header(d.headers, "tl.dlq.topic").decode(), int(header(d.headers, "tl.dlq.partition")),
                int(header(d.headers, "tl.dlq.offset"))) for d in tail.records["dlq"]}
    no_result = [f"{r.topic}/{r.kind}" for r in good if r.record_id not in results]
    no_letter = [f"{r.topic}/{r.kind}@{r.partition}:{r.offset}" for o, r in bad.items() if o not in origins]
    return f"no result for {no_result}; no dead letter for {no_letter}"
