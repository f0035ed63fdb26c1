"""The DLQ: counts and records by reason (in memory and on the real broker), redrive exactly once."""

from __future__ import annotations

import io
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import dlq, topics
from tensorline.producers import publish
from tensorline.schemas import Record, decode_record, encode_record
from tensorline.engine import worker
from tensorline.engine.runtime import Message, Worker, dead_letter_headers
from tensorline.engine.testing import MemorySink, MemorySource
from tensorline.stages.preprocess import Preprocess


@pytest.fixture
def cfg(namespace, kafka_bootstrap, tmp_path, monkeypatch):
    """raw -> scale -> out, with three poison records, one undecodable and one bad file in the DLQ."""
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    c = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap},
                      "topics": {"raw": {"partitions": 2}, "out": {"partitions": 2}, "dlq": {"partitions": 1}},
                      "stages": {"scale": {"kind": "tensorline.stages.testing:Scale", "input": "raw",
                                           "output": "out", "max_batch": 4}}}, "test-pipeline.toml")
    clients.create_topics(c)
    producer = clients.producer(c)
    for i in range(8):
        r = Record(record_id=f"r{i}", source="t", ingest_ts_ms=0, stage="producer",
                   tensors={"x": np.ones(2, np.float32)}, attributes={"poison": "1"} if i in (2, 4, 6) else {})
        producer.send(c.topic("raw").name, key=f"k{i}".encode(), value=bytes(encode_record(r)),
                      headers=[("tl.trace", f"t{i}".encode())])
    producer.send(c.topic("raw").name, key=b"junk", value=b"not avro")
    producer.close()
    worker.run(c, "scale", until_idle_s=1.5, stop=threading.Event(), metrics_port=None)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    publish.produce(c, [str(bad)], progress=False)
    return c


def raw(cfg) -> list:
    return topics.read_all(cfg, cfg.topic("raw").name)


@pytest.mark.broker
def test_counts_and_show_by_reason_and_stage(cfg):
    assert dlq.counts(cfg) == [
        {"stage": "producer", "reason": "unreadable_image", "count": 1, "redriven": 0},
        {"stage": "scale", "reason": "UnknownMagicByte", "count": 1, "redriven": 0},
        {"stage": "scale", "reason": "ValueError", "count": 3, "redriven": 0},
    ]
    poisoned = dlq.show(cfg, reason="ValueError")
    assert sorted(r["key"] for r in poisoned) == ["k2", "k4", "k6"]
    origin = {(r.partition, r.offset): r for r in raw(cfg)}
    for row in poisoned:
        assert row["stage"] == "scale" and row["message"] == "poisoned record in batch"
        assert row["topic"] == cfg.topic("raw").name and (row["partition"], row["offset"]) in origin
        assert row["value_size"] == len(origin[(row["partition"], row["offset"])].value) and not row["redriven"]
    [file] = dlq.show(cfg, stage="producer")
    assert file["reason"] == "unreadable_image" and file["partition"] == -1 and file["file"].endswith("broken.png")
    assert len(dlq.show(cfg, limit=2)) == 2
    assert "poisoned record in batch" in dlq.format_letters(poisoned)
    assert "ValueError" in dlq.format_counts(dlq.counts(cfg))


@pytest.mark.broker
def test_redrive_sends_originals_back_exactly_once_across_runs_and_filters(cfg):
    before = raw(cfg)
    first = dlq.redrive(cfg, reason="ValueError")
    assert (first["redriven"], first["already_redriven"], first["records_sent"]) == (3, 0, 3)
    again = dlq.redrive(cfg, reason="ValueError")
    assert (again["redriven"], again["already_redriven"]) == (0, 3)
    wider = dlq.redrive(cfg, stage="scale")  # matches the three again, and the undecodable record
    assert (wider["redriven"], wider["already_redriven"]) == (1, 3)
    everything = dlq.redrive(cfg)
    assert everything["redriven"] == 0 and [n["reason"] for n in everything["not_redriven"]] == ["unreadable_image"]
    assert "still bad" in everything["not_redriven"][0]["why"]
    after = raw(cfg)
    seen = {(b.partition, b.offset) for b in before}
    added = [r for r in after if (r.partition, r.offset) not in seen]
    originals = {(r.key, r.value): r for r in before}
    assert Counter(r.key for r in added) == Counter([b"k2", b"k4", b"k6", b"junk"])  # one copy each
    for r in added:
        original = originals[(r.key, r.value)]  # the original bytes and key
        assert r.partition == original.partition
        assert list(r.headers or []) == list(original.headers or [])  # tl.dlq.* gone, the rest kept
    assert [(row["count"], row["redriven"]) for row in dlq.counts(cfg)] == [(1, 0), (1, 1), (3, 3)]
    poisoned = [decode_record(r.value) for r in added if r.key != b"junk"]
    assert sorted(p.record_id for p in poisoned) == ["r2", "r4", "r6"]


@pytest.mark.broker
def test_a_bad_file_is_redriven_once_its_bytes_parse(cfg):
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.uint16).reshape(3, 4))
    headers = dead_letter_headers("producer", ValueError("no reader for .npy (yet)"), topic=cfg.topic("raw").name)
    headers += [("tl.dlq.file", b"/data/scan.npy"), ("tl.dlq.reason", b"unsupported_format")]
    producer = clients.producer(cfg)
    producer.send(cfg.topic("dlq").name, key=b"/data/scan.npy", value=buf.getvalue(), headers=headers)
    producer.close()
    result = dlq.redrive(cfg, reason="unsupported_format")
    assert (result["redriven"], result["records_sent"]) == (1, 1)
    [sent] = [decode_record(r.value) for r in raw(cfg) if r.key not in {f"k{i}".encode() for i in range(8)} | {b"junk"}]
    assert sent.source == "/data/scan.npy" and sent.tensors["image"].shape == (3, 4)
    assert dlq.redrive(cfg, reason="unsupported_format")["redriven"] == 0


# --- issue 11, finding 8: `dlq list` by each dead letter's own reason (in memory) -------------------


def as_dlq_record(offset: int, output) -> ConsumerRecord:
    """An Output sent to the DLQ, as a consumer would read it back."""
    return ConsumerRecord("t.dlq", 0, 0, offset, 1000 + offset, 0, output.key, output.value,
                          list(output.headers), None, -1, -1, -1)


class SentProducer:
    """A stand-in for the producer: keeps what was sent (kafka-python's send() signature)."""

    def __init__(self):
        self.sent = []

    def send(self, topic, value=None, key=None, headers=None, partition=None):
        self.sent.append(SimpleNamespace(topic=topic, key=key, value=value, headers=headers or []))


def test_list_groups_by_each_dead_letters_own_reason(tmp_path):
    cfg = config.parse({"pipeline": {"name": "t"}, "topics": {"raw": {}, "pre": {}},
                        "stages": {"preprocess": {"input": "raw", "output": "pre", "params": {"views": ["full"]}}}})
    image = np.arange(64, dtype=np.uint16).reshape(8, 8)

    def record(i: int, img: np.ndarray, **attrs: str) -> Message:
        r = Record(record_id=f"r{i}", source="s", ingest_ts_ms=0, tensors={"image": img}, stage="producer",
                   attributes=attrs)
        return Message("t.raw", 0, i, f"k{i}".encode(), bytes(encode_record(r)), [], 0)

    messages = [record(0, image), record(1, image, rescale_slope="1e38"),
                record(2, np.full((8, 8), np.nan, np.float32)), record(3, np.zeros((8, 8, 3), np.uint8)),
                record(4, image, rescale_slope="abc"), Message("t.raw", 0, 5, b"k5", b"not avro", [], 0)]
    sink = MemorySink()
    Worker(Preprocess(cfg, cfg.stages["preprocess"], None), MemorySource(messages), sink, output_topic="t.pre",
           dlq_topic="t.dlq", max_batch=8, max_delay_ms=0).run(until_idle_s=0)
    found = [dlq.to_letter(as_dlq_record(i, o)) for i, o in enumerate(sink.topic("t.dlq"))]
    # A dead letter from before the reason header: its error class is all there is.
    old = dead_letter_headers("features", ValueError("x"), topic="t.pre")
    old = [(k, b"NonFiniteValue" if k == "tl.dlq.error" else v) for k, v in old if k != "tl.dlq.reason"]
    found.append(dlq.to_letter(ConsumerRecord("t.dlq", 0, 0, 9, 0, 0, b"k", b"v", old, None, -1, -1, -1)))
    # A zero-byte file, as the producer dead-letters it.
    (tmp_path / "empty.dcm").write_bytes(b"")
    producer = SentProducer()
    publish.Publisher(cfg, producer=producer, progress=False).publish_file(tmp_path / "empty.dcm")
    [sent] = producer.sent
    found.append(dlq.to_letter(as_dlq_record(10, sent)))

    assert dlq.tally(found) == [
        {"stage": "features", "reason": "NonFiniteValue", "count": 1, "redriven": 0},
        {"stage": "preprocess", "reason": "UnknownMagicByte", "count": 1, "redriven": 0},
        {"stage": "preprocess", "reason": "bad_attribute", "count": 1, "redriven": 0},
        {"stage": "preprocess", "reason": "bad_shape", "count": 1, "redriven": 0},
        {"stage": "preprocess", "reason": "non_finite", "count": 2, "redriven": 0},
        {"stage": "producer", "reason": "empty_file", "count": 1, "redriven": 0},
    ]
    by_key = {letter.key: letter for letter in found}
    assert "record r1" in by_key["k1"].message and "'image_full'" in by_key["k1"].message
    assert by_key["k1"].error == "DeadLetter"  # the class stays in tl.dlq.error
    empty = by_key[str(tmp_path / "empty.dcm")]
    assert empty.message == f"{tmp_path / 'empty.dcm'}: empty_file: the file has no bytes"
    assert empty.file == str(tmp_path / "empty.dcm") and empty.value_size == 0
    listed = dlq.format_counts(dlq.tally(found))
    assert "DeadLetter" not in listed and "non_finite" in listed and "empty_file" in listed


def test_redrive_sends_a_null_header_value_back_as_an_empty_one():
    rec = ConsumerRecord("t.dlq", 0, 0, 0, 0, 0, b"k", b"v",
                         [("odd", None), ("tl.trace", b"t1"), ("tl.dlq.reason", b"non_finite")], None, -1, -1, -1)
    assert dlq.original_headers(rec) == [("odd", b""), ("tl.trace", b"t1")]
