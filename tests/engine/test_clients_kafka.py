"""clients.read_range on the real broker: the end fixed when reading starts, explicit ranges,
open transactions not waited for, and its errors."""

from __future__ import annotations

import pytest

from tensorline.engine import clients

pytestmark = pytest.mark.broker


def send(cfg, topic: str, values: list[tuple[int, bytes]], **producer_settings) -> None:
    producer = clients.producer(cfg, **producer_settings)
    for partition, value in values:
        producer.send(topic, value=value, partition=partition)
    producer.flush()
    producer.close()


def test_reads_to_the_log_end_when_reading_starts_and_not_past_it(pipeline):
    topic = pipeline.topic("raw").name
    send(pipeline, topic, [(0, b"a0"), (0, b"a1"), (1, b"b0")])
    read = clients.read_range(pipeline, topic)
    first = next(read)  # the end offsets are fixed now
    send(pipeline, topic, [(0, b"late"), (1, b"late")])
    got = sorted((r.partition, r.offset, r.value) for r in [first, *read])
    assert got == [(0, 0, b"a0"), (0, 1, b"a1"), (1, 0, b"b0")]
    assert sorted(r.value for r in clients.read_range(pipeline, topic)) == [b"a0", b"a1", b"b0", b"late", b"late"]


def test_an_explicit_range_and_a_reused_consumer(pipeline):
    topic = pipeline.topic("raw").name
    send(pipeline, topic, [(0, f"v{i}".encode()) for i in range(5)] + [(1, b"w0")])
    consumer = clients.consumer(pipeline, None)
    try:
        got = clients.read_range(pipeline, topic, partitions=[0], start={0: 1}, end={0: 3}, client=consumer)
        assert [(r.offset, r.value) for r in got] == [(1, b"v1"), (2, b"v2")]
        assert not consumer.paused()  # what the read paused is resumed for the consumer's next use
        assert [r.value for r in clients.read_range(pipeline, topic, start={0: 4}, client=consumer)] == [b"v4", b"w0"]
    finally:
        consumer.close()
    assert list(clients.read_range(pipeline, topic, partitions=[1], start={1: 1})) == []


def test_an_open_transaction_is_not_waited_for_under_read_committed(pipeline):
    topic = pipeline.topic("raw").name
    send(pipeline, topic, [(0, b"committed")])
    producer = clients.producer(pipeline, transactional_id=f"{pipeline.name}.open")
    producer.init_transactions()
    producer.begin_transaction()
    try:
        producer.send(topic, value=b"open", partition=0)
        producer.flush()
        assert [r.value for r in clients.read_range(pipeline, topic, timeout_s=10)] == [b"committed"]
        uncommitted = clients.read_range(pipeline, topic, isolation_level="read_uncommitted", timeout_s=10)
        assert [r.value for r in uncommitted] == [b"committed", b"open"]
    finally:
        producer.abort_transaction()
        producer.close()


def test_unknown_topics_partitions_and_an_end_never_reached(pipeline):
    topic = pipeline.topic("raw").name
    with pytest.raises(KeyError, match="does not exist"):
        list(clients.read_range(pipeline, f"{pipeline.name}.nowhere"))
    with pytest.raises(clients.UnknownTopicOrPartition, match=r"has partitions \[0, 1\], not \[0, 7\]"):
        list(clients.read_range(pipeline, topic, partitions=[0, 7]))
    with pytest.raises(ValueError, match=r"offsets given for partitions \[1\]"):
        list(clients.read_range(pipeline, topic, partitions=[0], start={1: 0}))
    send(pipeline, topic, [(0, b"x"), (0, b"y")])
    got = []
    with pytest.raises(clients.ReadTimeout, match="not at its end offsets") as stopped:
        for r in clients.read_range(pipeline, topic, end={0: 10}, timeout_s=1.0):
            got.append(r.value)
    assert got == [b"x", b"y"] and stopped.value.positions == {0: 2, 1: 0}


def test_a_state_changelog_is_created_to_be_compacted_promptly(kafka_bootstrap, namespace):
    """Restore must not read history: segments roll within a minute and tombstones go after five."""
    from kafka.admin import ConfigResource, ConfigResourceType

    from tensorline.config import CHANGELOG, COMPACTED_TOPIC_CONFIGS, parse

    cfg = parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap},
                 "topics": {"det": {"partitions": 2}, "res": {}, "dlq": {}},
                 "fusion": {"input": "det", "output": "res", "expected_models": ["a"]}})
    clients.create_topics(cfg)
    admin = clients.admin(cfg)
    try:
        name = cfg.topic(CHANGELOG).name
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])["topic"][name]
    finally:
        admin.close()
    assert found["cleanup.policy"]["value"] == "compact"
    assert {k: found[k]["value"] for k in COMPACTED_TOPIC_CONFIGS} == COMPACTED_TOPIC_CONFIGS
