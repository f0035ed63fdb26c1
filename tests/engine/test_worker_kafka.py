"""Stage workers on the real broker: in = out, DLQ, SIGKILL + restart, a joining worker, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.schemas import Record, decode_record, encode_record
from tensorline.engine import worker
from tensorline.stages.testing import scale_pipeline_body
from tests.conftest import drained, wait_for

pytestmark = pytest.mark.broker


def produce(cfg: config.PipelineConfig, n: int, *, poison: set[int] = frozenset(), first: int = 0) -> None:
    producer = clients.producer(cfg)
    for i in range(first, first + n):
        record = Record(record_id=f"r{i}", source="test", ingest_ts_ms=int(time.time() * 1000),
                        tensors={"x": np.arange(4, dtype=np.float32) + i}, stage="producer",
                        attributes={"poison": "1"} if i in poison else {})
        producer.send(cfg.topic("in").name, key=f"k{i}".encode(), value=bytes(encode_record(record)))
    producer.flush()
    producer.close()


def ids(cfg: config.PipelineConfig, key: str = "out") -> list[str]:
    return [decode_record(r.value).record_id for r in topics.read_all(cfg, cfg.topic(key).name)]




def spawn(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(path.parent / "state")}
    return subprocess.Popen([sys.executable, "-m", "tensorline.cli", "run", "scale", "-c", str(path)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def records_in(path: Path, cfg: config.PipelineConfig, slot: int) -> float:
    """What the worker in `slot` has committed so far, from its own /metrics."""
    lock = path.parent / "state" / "workers" / f"{cfg.group_id('scale')}.{slot}.lock"
    try:
        endpoint = json.loads(lock.read_text())["metrics"]
        body = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=2).read().decode()
    except (OSError, ValueError, KeyError):
        return 0.0
    found = re.search(r'tensorline_records_in_total\{model="",stage="scale"\} ([0-9.e+]+)', body)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def pipeline_file(tmp_path):
    return tmp_path / "pipeline.toml"


def test_records_in_equal_records_out_and_poison_goes_to_dlq(pipeline_file, write_pipeline, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(pipeline_file.parent / "state"))
    cfg = write_pipeline(pipeline_file, scale_pipeline_body())
    produce(cfg, 50, poison={17})
    stats = worker.run(cfg, "scale", until_idle_s=3.0, stop=threading.Event())
    out = ids(cfg)
    assert sorted(out) == sorted(f"r{i}" for i in range(50) if i != 17) and len(out) == 49
    [dead] = topics.read_all(cfg, cfg.topic("dlq").name)
    headers = dict(dead.headers)
    assert headers["tl.dlq.error"] == b"ValueError" and headers["tl.dlq.stage"] == b"scale"
    assert decode_record(dead.value).record_id == "r17"  # the original bytes
    assert stats.records_in == 50 and stats.dead_letters == 1


def test_sigkill_mid_stream_and_restart_gives_each_record_exactly_once(pipeline_file, write_pipeline):
    cfg = write_pipeline(pipeline_file, scale_pipeline_body(sleep_s=0.2))
    produce(cfg, 200)
    first = spawn(pipeline_file, pipeline_file.parent / "w1.log")
    wait_for(lambda: len(ids(cfg)) >= 40, 60, "some output before the kill")
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = len(ids(cfg))
    assert partial < 200
    second = spawn(pipeline_file, pipeline_file.parent / "w2.log")
    try:
        wait_for(lambda: len(ids(cfg)) >= 200, 120, "all 200 records")
        wait_for(lambda: drained(cfg), 60, "the group committed to the end")  # a duplicate would be visible now
        out = ids(cfg)
        assert len(out) == 200 and len(set(out)) == 200
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def test_scaling_up_then_down_mid_stream_loses_and_duplicates_nothing(pipeline_file, write_pipeline):
    cfg = write_pipeline(pipeline_file, scale_pipeline_body(partitions=4, sleep_s=0.15))
    produce(cfg, 120)
    logs = [pipeline_file.parent / "a.log", pipeline_file.parent / "b.log"]
    a = spawn(pipeline_file, logs[0])
    wait_for(lambda: len(ids(cfg)) >= 30, 60, "the first worker's output")
    b = spawn(pipeline_file, logs[1])  # scale up: b takes partitions from a
    # The rest of the stream comes once b owns partitions, so a slow start cannot leave b idle.
    wait_for(lambda: '"partitions": [[' in logs[1].read_text(), 90, "the second worker's partitions")
    produce(cfg, 240, first=120)
    wait_for(lambda: records_in(pipeline_file, cfg, slot=1) >= 20, 90, "the second worker's share")
    b.send_signal(signal.SIGTERM)  # scale down mid-stream: b's partitions go back to a
    try:
        assert b.wait(30) == 0, logs[1].read_text()[-3000:]
        wait_for(lambda: len(ids(cfg)) >= 360, 120, "all 360 records")
        wait_for(lambda: drained(cfg), 60, "the group committed to the end")
        out = ids(cfg)
        assert len(out) == 360 and len(set(out)) == 360
    finally:
        a.send_signal(signal.SIGTERM)
        code = a.wait(30)
    assert code == 0, logs[0].read_text()[-3000:]
    stopped = [json.loads(line) for log in logs for line in log.read_text().splitlines()
               if '"worker stopped"' in line]
    assert len(stopped) == 2 and all(s["records_in"] > 0 for s in stopped)  # both did work
    assert sum(s["records_in"] for s in stopped) == 360


def test_sigterm_exits_cleanly_within_bound(pipeline_file, write_pipeline):
    cfg = write_pipeline(pipeline_file, scale_pipeline_body(sleep_s=0.5))
    produce(cfg, 100)
    log = pipeline_file.parent / "w.log"
    proc = spawn(pipeline_file, log)
    wait_for(lambda: len(ids(cfg)) >= 8, 60, "first output")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - started < 15
    assert '"worker stopped"' in log.read_text()
    assert len(set(ids(cfg))) == len(ids(cfg))  # the batch in flight was committed once, not twice
