"""Lag on a transactional topic agrees with Kafka's own kafka-consumer-groups; time lag; stuck; a group
with no members and pending input is down; fusion's open joins from its changelog."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import numpy as np
import pytest

from tensorline import cli, config
from tensorline.engine import clients
from tensorline.ops import broker, lag
from tensorline.schemas import Detection, ModelRef, Record, encode_detection, encode_record
from tensorline.engine import worker
from tensorline.stages.testing import scale_pipeline_body
from tests.conftest import joined

pytestmark = pytest.mark.broker


@pytest.fixture
def cfg(namespace, kafka_bootstrap, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    c = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap},
                      "topics": {"in": {"partitions": 3}, "out": {"partitions": 3}, "dlq": {"partitions": 1}},
                      "stages": {"scale": {"input": "in", "output": "out", "kind": "tensorline.stages.testing:Scale"}}})
    clients.create_topics(c)
    return c


def produce_in_transactions(c, n_tx: int, per_tx: int, start: int = 0) -> None:
    producer = clients.producer(c, transactional_id=f"{c.name}.lagtest")
    producer.init_transactions()
    i = start
    for _ in range(n_tx):
        producer.begin_transaction()
        for _ in range(per_tx):
            r = Record(record_id=f"r{i}", source="t", ingest_ts_ms=0, tensors={"x": np.ones(2, np.float32)}, stage="p")
            producer.send(c.topic("in").name, key=f"k{i}".encode(), value=bytes(encode_record(r)))
            i += 1
        producer.commit_transaction()
    producer.close()


def kafka_tool(c, group: str) -> dict[int, tuple[int, int, int]]:
    """partition -> (CURRENT-OFFSET, LOG-END-OFFSET, LAG) as kafka-consumer-groups --describe prints them."""
    cmd = broker.java_command("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                              "--bootstrap-server", clients.bootstrap(c), "--describe", "--group", group)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] == group:
            rows[int(cols[2])] = (int(cols[3]), int(cols[4]), int(cols[5]))
    return rows


def test_lag_matches_kafka_consumer_groups_on_a_transactional_topic(cfg):
    produce_in_transactions(cfg, 3, 10)
    worker.run(cfg, "scale", until_idle_s=2.0, stop=threading.Event(), metrics_port=None)
    [drained] = lag.measure(cfg)
    assert drained.total == 0  # the commit markers are stepped over
    assert drained.open_joins is None and drained.to_dict()["open_joins"] is None  # a stage without state
    produce_in_transactions(cfg, 1, 12, start=30)
    [behind] = lag.measure(cfg)
    tool = kafka_tool(cfg, behind.group)
    ours = {p.partition: (p.committed, p.log_end, p.lag) for p in behind.partitions}
    assert ours == tool
    assert behind.total == 12 + sum(1 for p in behind.partitions if p.lag)  # records + one marker each
    assert all(p.time_lag_s is not None and 0 <= p.time_lag_s < 60 for p in behind.partitions if p.lag)


def test_stuck_flags_only_partitions_behind_whose_offset_does_not_move(cfg, tmp_path):
    produce_in_transactions(cfg, 1, 9)
    history = lag.History(tmp_path / "history.json")
    first = lag.measure(cfg, stuck_after_s=0.5, history=history)
    assert not any(p.stuck for g in first for p in g.partitions)
    seen = json.loads((tmp_path / "history.json").read_text())  # the first look, made a second older
    (tmp_path / "history.json").write_text(json.dumps({k: [c, t - 1.0] for k, (c, t) in seen.items()}))
    again = lag.measure(cfg, stuck_after_s=0.5, history=lag.History(tmp_path / "history.json"))
    [g] = again
    assert all(p.stuck == (p.lag > 0) for p in g.partitions) and any(p.stuck for p in g.partitions)
    assert g.to_dict()["stuck"] is True


def test_a_group_without_members_and_with_pending_input_is_down(tmp_path, write_pipeline, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the lag history file of the CLI
    path = tmp_path / "p.toml"
    c = write_pipeline(path, scale_pipeline_body(partitions=2))
    [nobody] = lag.measure(c)
    assert (nobody.members, nobody.total, nobody.state) == (0, 0, "idle")
    produce_in_transactions(c, 1, 4)
    [down] = lag.measure(c)
    assert (down.members, down.state) == (0, "down") and down.total > 0 and down.to_dict()["state"] == "down"
    member = joined(c, down.group, c.topic("in").name, timeout_s=120)  # a join takes long on a busy machine
    try:
        [reading] = lag.measure(c)
        assert (reading.members, reading.state) == (1, "ok") and reading.total > 0
    finally:
        member.close()  # leaves the group at once
    assert cli.main(["lag", "-c", str(path), "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["stages"]
    assert (shown["state"], shown["members"], shown["lag"]) == ("down", 0, down.total)
    assert cli.main(["lag", "-c", str(path)]) == 0
    assert "DOWN" in capsys.readouterr().out


FUSION_BODY = """
[topics]
detections = { partitions = 2 }
results = { partitions = 2 }
dlq = { partitions = 1 }
[fusion]
input = "detections"
output = "results"
expected_models = ["cnn", "mlp"]
join_timeout_ms = 600000
"""


def test_open_fusion_joins_and_the_oldest_age_from_the_changelog(tmp_path, write_pipeline, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the lag history file of the CLI
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "p.toml"
    c = write_pipeline(path, FUSION_BODY)
    producer = clients.producer(c)
    for rid, model in [("open", "cnn"), ("done", "cnn"), ("done", "mlp")]:  # "done" is joined and emitted
        d = Detection(record_id=rid, source="t", ingest_ts_ms=int(time.time() * 1000), model=ModelRef(model, "1"),
                      classes=("normal", "nodule"), scores=(0.3, 0.7))
        producer.send(c.topic("detections").name, key=rid.encode(), value=bytes(encode_detection(d)))
    producer.flush()
    producer.close()
    started = time.time()
    worker.run(c, "fusion", until_idle_s=1.0, stop=threading.Event(), metrics_port=None)
    capsys.readouterr()  # the worker's log lines
    assert cli.main(["lag", "-c", str(path), "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["stages"]
    assert shown["stage"] == "fusion" and shown["lag"] == 0 and shown["open_joins"] == 1
    assert 0 < shown["oldest_open_join_s"] <= time.time() - started + 1
    assert cli.main(["lag", "-c", str(path)]) == 0
    assert re.search(r"^fusion open joins +1, oldest \d+\.\d s$", capsys.readouterr().out, re.M)
