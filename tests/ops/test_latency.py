"""End-to-end latency as a reader sees it: ingest to the poll that received the result (not the
trace's produced time), and on the real broker a follower that reads only what becomes visible
after it starts, stamping each record at or after its transaction's commit."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from tensorline.engine import clients
from tensorline.engine.runtime import INGEST_MS
from tensorline.ops import latency
from tensorline.stages.testing import scale_pipeline_body


def seen(visible_s: float, *headers: tuple[str, int]) -> latency.Seen:
    return latency.Seen(SimpleNamespace(headers=[(k, str(v).encode()) for k, v in headers]), visible_s)


def test_end_to_end_is_ingest_to_the_receive_time_not_the_produced_header():
    result = seen(1.5, (INGEST_MS, 1000), ("tl.fusion.received_ms", 1040), ("tl.fusion.produced_ms", 1100))
    assert latency.end_to_end_ms(result.headers, result.visible_s) == 500.0  # not 100: send and commit count
    assert latency.end_to_end_ms(result.headers, 0.9) == 0.0  # the ingest host's clock ahead: never negative
    assert latency.end_to_end_ms([("tl.fusion.produced_ms", b"1100")], 1.5) is None  # no ingest time


def test_stage_times_follow_the_trace_order():
    headers = [(INGEST_MS, b"1"), ("tl.b.received_ms", b"5"), ("tl.b.produced_ms", b"7"), ("tl.a.received_ms", b"9"),
               ("tl.a.produced_ms", b"12"), ("tl.c.received_ms", b"14")]  # c has no produced time
    assert latency.stage_times(headers) == [("b", 5, 7), ("a", 9, 12)]


def test_window_keeps_at_most_max_results():
    window = latency.Window(window_s=60.0, max_results=3)
    for i in range(5):
        window.add(100.0 + i, latency.Spans(float(i), (), 0.0, False))
    summary = window.summary(110.0)
    assert summary["results"] == 3 and summary["p50_ms"] == 3.0  # the newest three: 2, 3, 4


@pytest.mark.broker
def test_follower_from_the_end_stamps_each_result_when_its_transaction_commits(tmp_path, write_pipeline):
    cfg = write_pipeline(tmp_path / "pipeline.toml", scale_pipeline_body(partitions=2))
    topic = cfg.topic("out").name
    producer = clients.producer(cfg, transactional_id=f"{cfg.name}.latency-test")
    producer.init_transactions()

    def send(n: int, first: int) -> None:
        for i in range(first, first + n):
            producer.send(topic, key=f"k{i}".encode(), value=b"v",
                          headers=[(INGEST_MS, str(int(time.time() * 1000)).encode())])
        producer.flush()

    try:
        producer.begin_transaction()
        send(3, 0)  # an earlier run's results: on the topic before the reader starts
        producer.commit_transaction()
        with latency.Collector(cfg, [topic], from_end=True) as reader:
            producer.begin_transaction()
            send(4, 3)  # sent and flushed: on the broker, not yet visible to read_committed
            committing_s = time.time()
            producer.commit_transaction()
            deadline = time.monotonic() + 30
            while len(reader.seen()) < 4:
                assert time.monotonic() < deadline, f"{len(reader.seen())} of 4 results read"
                time.sleep(0.05)  # poll of the loop's condition
            got = reader.seen()
    finally:
        producer.close()
    assert sorted(s.record.key for s in got) == [b"k3", b"k4", b"k5", b"k6"]  # not k0-k2
    assert all(s.visible_s >= committing_s for s in got)
    for s in got:  # at least the time from ingest to the commit
        ingest_ms = int(dict(s.headers)[INGEST_MS])
        assert latency.end_to_end_ms(s.headers, s.visible_s) >= committing_s * 1000 - ingest_ms
