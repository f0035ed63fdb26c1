"""The DLQ on the real broker: counts and records by reason, redrive exactly once."""

from __future__ import annotations

import io
import threading
from collections import Counter

import numpy as np
import pytest

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import dlq, topics
from tensorline.producers import publish
from tensorline.schemas import Record, decode_record, encode_record
from tensorline.engine import worker
from tensorline.engine.runtime import dead_letter_headers

pytestmark = pytest.mark.broker


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
