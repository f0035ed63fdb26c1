"""The Kafka sink on the real broker: where its outputs land."""

from __future__ import annotations

import os

import pytest
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from tensorline.engine import clients
from tensorline.engine.kafka import KafkaSink
from tensorline.engine.runtime import Output

pytestmark = pytest.mark.broker

PARTITIONS = 7


class _Source:
    """What a plain (at-least-once) KafkaSink with no offsets to commit needs of a source."""

    def committed(self, offsets):
        pass


def test_keyed_outputs_land_where_the_default_partitioner_puts_them(write_pipeline, tmp_path):
    """The sink computes a keyed output's partition itself (kafka-python's partitioner costs ~8 us
    a record); every key, the empty one too, must land where the Java client and kafka-python put
    it: a consumer of the output relies on one key, one partition. The first send, before the
    producer has the topic's metadata, is left to kafka-python's partitioner: the same place."""
    cfg = write_pipeline(tmp_path / "p.toml", f"[topics]\nraw = {{ partitions = {PARTITIONS} }}\n"
                                              f"out = {{ partitions = {PARTITIONS} }}\ndlq = {{ partitions = 1 }}\n")
    topic = cfg.topic("out").name
    keys = [b"", b"k", *(os.urandom(n) for n in range(1, 40) for _ in range(5)), *(f"rec-{i}".encode() for i in range(100))]
    sink = KafkaSink(lambda: clients.producer(cfg), _Source(), transactional=False)
    try:
        sink.begin()
        for i, key in enumerate(keys):
            sink.send(Output(topic, key, str(i).encode(), []))
        sink.send(Output(topic, None, b"unkeyed", []))
        sink.commit({})
    finally:
        sink.close()
    records = list(clients.read_range(cfg, topic))
    assert sorted(r.value for r in records) == sorted([str(i).encode() for i in range(len(keys))] + [b"unkeyed"])
    placed = {int(r.value): r.partition for r in records if r.key is not None}
    expected = {i: (kafka_python_murmur2(key) & 0x7FFFFFFF) % PARTITIONS for i, key in enumerate(keys)}
    assert placed == expected
    assert len(set(placed.values())) == PARTITIONS
