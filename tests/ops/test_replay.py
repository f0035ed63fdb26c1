"""Replays on the real broker: reset by time, refusal while live, plan numbers, into a version."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pytest

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import replay, topics
from tensorline.schemas import Detection, ModelRef, Record, decode_record, decode_result, encode_detection, encode_record
from tensorline.engine import worker
from tests.conftest import wait_for

pytestmark = pytest.mark.broker


def scale_pipeline(name: str, bootstrap: str, *, factor: float = 2.0, second: bool = False) -> config.PipelineConfig:
    """in -> scale -> mid (-> scale2 -> out)."""
    stages = {"scale": {"kind": "tensorline.stages.testing:Scale", "input": "in", "output": "mid",
                        "max_batch": 8, "max_delay_ms": 20, "params": {"factor": factor}}}
    if second:
        stages["scale2"] = {"kind": "tensorline.stages.testing:Scale", "input": "mid", "output": "out",
                            "max_batch": 8, "max_delay_ms": 20, "params": {"factor": 3.0}}
    cfg = config.parse({"pipeline": {"name": name, "bootstrap": bootstrap},
                        "topics": {"in": {"partitions": 3}, "mid": {"partitions": 3}, "out": {"partitions": 3},
                                   "dlq": {"partitions": 1}},
                        "stages": stages}, "test-pipeline.toml")
    clients.create_topics(cfg)
    return cfg


def produce(cfg, ids: range) -> None:
    producer = clients.producer(cfg)
    for i in ids:
        record = Record(record_id=f"r{i}", source="test", ingest_ts_ms=0, stage="producer",
                        tensors={"x": np.full(2, float(i), np.float32)})
        producer.send(cfg.topic("in").name, key=f"k{i}".encode(), value=bytes(encode_record(record)))
    producer.flush()
    producer.close()


def now_between_batches() -> datetime:
    """A time strictly after every record sent so far and before any sent next (record
    timestamps are whole milliseconds): the clock is read once it has passed the current
    millisecond, and returned once it has passed the millisecond it read."""
    def next_ms(after: int) -> int:
        return wait_for(lambda: (ms := time.time_ns() // 1_000_000) > after and ms, 5, "the clock to move", every_s=0.001)
    t = next_ms(time.time_ns() // 1_000_000)
    next_ms(t)
    return datetime.fromtimestamp(t / 1000, timezone.utc)


def records(cfg, topic_name: str) -> list[Record]:
    return [decode_record(r.value) for r in topics.read_all(cfg, topic_name)]


def run(cfg, stage: str) -> None:
    worker.run(cfg, stage, until_idle_s=1.5, stop=threading.Event(), metrics_port=None)


def committed(cfg, group: str) -> dict:
    admin = clients.admin(cfg)
    try:
        return {tp: o.offset for tp, o in admin.list_group_offsets({group: None}).get(group, {}).items()}
    finally:
        admin.close()


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))


def test_reset_by_time_reprocesses_exactly_the_records_from_then_on(namespace, kafka_bootstrap):
    cfg = scale_pipeline(namespace, kafka_bootstrap)
    produce(cfg, range(0, 12))
    t = now_between_batches()
    produce(cfg, range(12, 20))
    run(cfg, "scale")
    assert len(records(cfg, cfg.topic("mid").name)) == 20
    plans = replay.plan(cfg, "scale", None, t)
    assert sum(p.records for p in plans) == 8 and all(p.committed == p.end for p in plans)
    done = replay.reset(cfg, "scale", None, t)
    assert [(p.partition, p.start) for p in done] == [(p.partition, p.start) for p in plans]
    before = Counter(r.record_id for r in records(cfg, cfg.topic("mid").name))
    run(cfg, "scale")
    after = Counter(r.record_id for r in records(cfg, cfg.topic("mid").name))
    assert after - before == Counter(f"r{i}" for i in range(12, 20)) and not before - after
    assert all(p.committed == p.end for p in replay.plan(cfg, "scale", None, t))


def test_plan_numbers_for_offsets_earliest_and_a_time_window(namespace, kafka_bootstrap):
    cfg = scale_pipeline(namespace, kafka_bootstrap)
    produce(cfg, range(0, 9))
    t1 = now_between_batches()
    produce(cfg, range(9, 15))
    t2 = now_between_batches()
    produce(cfg, range(15, 22))
    everything = replay.plan(cfg, "scale", None, replay.EARLIEST)
    assert sum(p.records for p in everything) == 22 and all(p.committed is None for p in everything)
    window = replay.plan(cfg, "scale", None, t1, t2)
    assert sum(p.records for p in window) == 6
    end0 = next(p.end for p in everything if p.partition == 0)
    [one] = replay.plan(cfg, "scale", None, replay.parse_offsets(["0:1"]))
    assert (one.partition, one.start, one.end, one.records) == (0, 1, end0, end0 - 1)
    with pytest.raises(replay.ReplayError, match="outside"):
        replay.plan(cfg, "scale", None, {0: end0 + 5})
    assert "upper bound" in replay.format_plan(window)


def test_reset_refuses_while_a_worker_is_live_and_names_it(namespace, kafka_bootstrap):
    cfg = scale_pipeline(namespace, kafka_bootstrap)
    produce(cfg, range(5))
    stop = threading.Event()
    live = threading.Thread(target=worker.run, args=(cfg, "scale"), kwargs={"stop": stop, "metrics_port": None})
    live.start()
    try:
        deadline = time.monotonic() + 30
        while len(records(cfg, cfg.topic("mid").name)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)  # poll of the loop's condition
        with pytest.raises(replay.GroupActive) as refused:
            replay.reset(cfg, "scale", None, replay.EARLIEST)
        assert f"group {namespace}.scale has 1 live member(s): {namespace}.scale." in str(refused.value)
    finally:
        stop.set()
        live.join(30)
    before = committed(cfg, f"{namespace}.scale")
    assert sum(before.values()) == 5
    replay.reset(cfg, "scale", None, replay.EARLIEST)
    assert sum(committed(cfg, f"{namespace}.scale").values()) == 0


def test_into_version_replays_downstream_into_new_topics_up_to_the_end_and_leaves_live_alone(namespace, kafka_bootstrap):
    cfg = scale_pipeline(namespace, kafka_bootstrap, second=True)
    produce(cfg, range(0, 10))
    t2 = now_between_batches()
    produce(cfg, range(10, 16))  # after the replay's end: must not be replayed
    run(cfg, "scale")
    run(cfg, "scale2")
    live_out = [(r.record_id, r.tensors["x"].tolist()) for r in records(cfg, cfg.topic("out").name)]
    live_groups = {g: committed(cfg, g) for g in (f"{namespace}.scale", f"{namespace}.scale2")}
    assert len(live_out) == 16
    changed = scale_pipeline(namespace, kafka_bootstrap, factor=10.0, second=True)  # the "model change"
    result = replay.into_version(changed, "scale", "v2", replay.EARLIEST, t2)
    assert result["stages"] == ["scale", "scale2"]
    assert result["topics"] == {f"{namespace}.{k}": f"{namespace}.{k}.v2" for k in ("mid", "out", "dlq")}
    assert result["groups"] == [f"{namespace}.scale.v2", f"{namespace}.scale2.v2"]
    mid = records(cfg, f"{namespace}.mid.v2")
    out = records(cfg, f"{namespace}.out.v2")
    assert sorted(r.record_id for r in mid) == sorted(f"r{i}" for i in range(10))
    assert sorted((r.record_id, r.tensors["x"].tolist()) for r in out) == \
        sorted((f"r{i}", [i * 30.0] * 2) for i in range(10))
    assert [(r.record_id, r.tensors["x"].tolist()) for r in records(cfg, cfg.topic("out").name)] == live_out
    assert {g: committed(cfg, g) for g in live_groups} == live_groups
    assert result["diff"] is None and "scale2" in replay.format_version(result)
    with pytest.raises(replay.ReplayError, match="exists already"):
        replay.into_version(changed, "scale", "v2", replay.EARLIEST)


MODELS = ("cnn", "mlp", "logreg")


def fusion_pipeline(name: str, bootstrap: str, fusion: dict) -> config.PipelineConfig:
    cfg = config.parse({"pipeline": {"name": name, "bootstrap": bootstrap},
                        "topics": {"detections": {"partitions": 2}, "results": {"partitions": 2},
                                   "dlq": {"partitions": 1}},
                        "fusion": {"input": "detections", "output": "results", "expected_models": list(MODELS),
                                   "max_batch": 16, **fusion}}, "test-pipeline.toml")
    clients.create_topics(cfg)
    return cfg


def test_into_version_with_changed_fusion_weights_diffs_the_decisions(namespace, kafka_bootstrap):
    cfg = fusion_pipeline(namespace, kafka_bootstrap, {"strategy": "soft_vote"})
    producer = clients.producer(cfg)
    for i in range(10):
        for model in MODELS:
            # r0-r3: only cnn sees a nodule (soft vote: normal; cnn weighted 10x: nodule); r4-r9: all agree.
            p = (0.9 if model == "cnn" else 0.2) if i < 4 else 0.8
            d = Detection(record_id=f"r{i}", source="t", ingest_ts_ms=0, model=ModelRef(model, "1"),
                          classes=("normal", "nodule"), scores=(1 - p, p))
            producer.send(cfg.topic("detections").name, key=f"r{i}".encode(), value=bytes(encode_detection(d)))
    producer.close()
    run(cfg, "fusion")
    live = topics.read_all(cfg, cfg.topic("results").name)
    changelog = len(topics.read_all(cfg, cfg.topic("fusion-changelog").name))
    live_offsets = committed(cfg, f"{namespace}.fusion")
    assert len(live) == 10
    weighted = fusion_pipeline(namespace, kafka_bootstrap,
                               {"strategy": "weighted_average", "params": {"weights": {"cnn": 10.0}}})
    result = replay.into_version(weighted, "fusion", "v2", replay.EARLIEST)
    assert result["diff"] == {"live_topic": f"{namespace}.results", "versioned_topic": f"{namespace}.results.v2",
                              "compared": 10, "changed": 4, "unchanged": 6, "transitions": {"normal->nodule": 4},
                              "only_live": 0, "only_versioned": 0}
    versioned = [decode_result(r.value) for r in topics.read_all(cfg, f"{namespace}.results.v2")]
    assert sorted(r.record_id for r in versioned) == sorted(f"r{i}" for i in range(10))
    assert all(r.strategy == "weighted_average" for r in versioned)
    assert [(r.key, r.value) for r in topics.read_all(cfg, cfg.topic("results").name)] == \
        [(r.key, r.value) for r in live]
    assert len(topics.read_all(cfg, cfg.topic("fusion-changelog").name)) == changelog
    assert committed(cfg, f"{namespace}.fusion") == live_offsets
    assert "4 changed" in replay.format_version(result)
