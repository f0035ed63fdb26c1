"""bench/_common.py's guards: a bench prints only ratios of what it measured, on topics and groups
of its own, on its own broker."""

from __future__ import annotations

import os

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def common():
    return bench_script("_common")


def test_a_ratio_is_printed_only_when_its_measurements_saw_what_was_sent(common):
    m = common.Measured()
    assert m.count("ceiling", 3000, 3000) and m.ratio(450.0, 500.0, "ceiling") == "0.90"
    # An earlier run's records on the topic: more outputs than were sent.
    assert not m.count("kafka", 4000, 77533, "outputs")
    assert m.ratio(77533.5, 1712.0, "kafka", "ceiling") == "n/a"
    assert m.value(77533.5, "kafka", fmt=".1f") == "n/a"
    assert m.value(1712.0, "ceiling", fmt=".1f") == "1712.0"
    assert m.reasons() == ["n/a: kafka: outputs: 77533 measured, 4000 sent"]
    # The first reason stays; a ratio with nothing to divide by is not a number either.
    m.refuse("kafka", "later reason")
    assert m.reasons() == ["n/a: kafka: outputs: 77533 measured, 4000 sent"]
    assert m.ratio(1.0, 0.0) == m.ratio(None, 2.0) == m.value(float("nan")) == "n/a"


def test_every_run_has_a_name_of_its_own(common):
    names = {common.run_name("bstages") for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("bstages") for n in names)


def test_the_bench_broker_wins_over_an_inherited_bootstrap(common, monkeypatch):
    monkeypatch.setenv("TENSORLINE_BOOTSTRAP", "used-broker:9092")
    with common.bootstrap_pinned("127.0.0.1:1234"):
        assert os.environ["TENSORLINE_BOOTSTRAP"] == "127.0.0.1:1234"
    assert os.environ["TENSORLINE_BOOTSTRAP"] == "used-broker:9092"
    monkeypatch.delenv("TENSORLINE_BOOTSTRAP")
    with common.bootstrap_pinned("127.0.0.1:1234"):
        pass
    assert "TENSORLINE_BOOTSTRAP" not in os.environ


def test_a_pipeline_with_records_or_a_group_is_not_fresh(common, pipeline):
    from tensorline.engine import clients

    common.require_fresh(pipeline)  # just created
    producer = clients.producer(pipeline)
    producer.send(pipeline.topic("raw").name, key=b"k", value=b"v", partition=1)
    producer.flush()
    producer.close()
    with pytest.raises(common.UsedTopics, match=rf"{pipeline.topic('raw').name}\[1\] ends at offset 1"):
        common.require_fresh(pipeline)

    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    grouped = pipeline.with_name(f"{pipeline.name}g")
    clients.create_topics(grouped)
    consumer = clients.consumer(grouped, grouped.group_id("features"))
    try:
        consumer.commit({TopicPartition(grouped.topic("out").name, 0): OffsetAndMetadata(0, "", -1)})
    finally:
        consumer.close()
    with pytest.raises(common.UsedTopics, match=rf"group {grouped.name}\.features exists"):
        common.require_fresh(grouped)


def test_bench_stages_prints_n_a_for_what_a_used_broker_skewed(monkeypatch, capsys):
    """Issue 13's run on a used broker: 77,533 outputs seen for 4,000 sent, and the memory phase's
    first RSS read before its records were processed. Only what was measured is printed."""
    import numpy as np

    stages = bench_script("stages")
    m = stages.Measured()
    m.count("kafka", 4000, 77533, "outputs")
    m.count("memory", 1000, 11000, "records committed at the first RSS")
    latency = {name: np.array([5.0, 7.0, 9.0]) for name in ("features", "detection", "e2e")}
    cores = {"features": 0.9, "detection": 0.5, "broker": 0.3, "machine": 1.9}
    real = {"rps": 20.0, "cores": {"realistic": 0.5, "broker": 0.05, "machine": 1.9}, "stats": {},
            "ceilings": [[(21.0, 0.0095)], [(22.0, 0.0096)]], "load": "load average 1.0"}
    stages.report(m, [[(500.0, 0.004)], [(480.0, 0.004)]], (450.0, 0.0042), 50.0, 77533.5, cores, latency, latency,
                  {}, 0, 100.0, 2845.0, real)
    out = capsys.readouterr().out.splitlines()
    summary = dict(field.split("=") for field in out[-1].removeprefix("bench stages: ").split())
    assert {k: summary[k] for k in ("vs_ceiling", "vs_per_message", "kafka_rps", "cpu_bound_vs_ceiling",
                                    "rss_growth")} == dict.fromkeys(("vs_ceiling", "vs_per_message", "kafka_rps",
                                                                     "cpu_bound_vs_ceiling", "rss_growth"), "n/a")
    # What was measured is still printed: the in-process baselines and the paced latency.
    assert summary["ceiling_rps"] == "500.0" and summary["in_memory_vs_ceiling"] == "0.90"
    assert summary["per_message_rps"] == "50.0" and summary["e2e_p50_ms"] == "7"
    assert "n/a: kafka: outputs: 77533 measured, 4000 sent" in out
    assert "n/a: memory: records committed at the first RSS: 11000 measured, 1000 sent" in out
