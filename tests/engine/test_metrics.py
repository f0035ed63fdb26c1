"""Worker metrics: counters, histograms and the DLQ reason label move as the runtime works."""

from __future__ import annotations

import urllib.request

import numpy as np
from prometheus_client import REGISTRY

from tensorline.config import parse
from tensorline.engine import metrics
from tensorline.schemas import Record, encode_record
from tensorline.engine.runtime import INGEST_MS, Message, Worker
from tensorline.engine.testing import MemorySink, MemorySource
from tensorline.stages.testing import Scale

CFG = parse({"pipeline": {"name": "met"}, "topics": {"in": {}, "out": {}},
             "stages": {"metered": {"input": "in", "output": "out", "kind": "tensorline.stages.testing:Scale"}}})


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": "metered", "model": "", **labels}) or 0.0


def test_counters_follow_a_run_with_a_dead_letter():
    before = (value("tensorline_records_in_total"), value("tensorline_records_out_total"),
              value("tensorline_dead_letters_total", reason="ValueError"), value("tensorline_batch_size_count"))
    msgs = []
    for i in range(6):
        r = Record(record_id=f"r{i}", source="t", ingest_ts_ms=0, tensors={"x": np.ones(2, np.float32)},
                   stage="p", attributes={"poison": "1"} if i == 2 else {})
        msgs.append(Message("met.in", 0, i, None, bytes(encode_record(r)), [(INGEST_MS, b"1000")], 0))
    stage = Scale(CFG, CFG.stages["metered"], None)
    Worker(stage, MemorySource(msgs), MemorySink(), output_topic="met.out", dlq_topic="met.dlq",
           max_batch=3, max_delay_ms=0).run(until_idle_s=0)
    after = (value("tensorline_records_in_total"), value("tensorline_records_out_total"),
             value("tensorline_dead_letters_total", reason="ValueError"), value("tensorline_batch_size_count"))
    assert [a - b for a, b in zip(after, before)] == [6, 5, 1, 2]
    assert value("tensorline_end_to_end_seconds_count") >= 5  # from the ingest header
    assert value("tensorline_model_seconds_count") >= 2


def test_metrics_are_served_over_http():
    metrics.RECORDS_IN.labels("served", "").inc()
    with metrics.serve(0) as server:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    assert 'tensorline_records_in_total{model="",stage="served"} 1.0' in body
