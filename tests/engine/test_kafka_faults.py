"""The Kafka sink and source under faults, against the real broker: nothing of an aborted
transaction reaches a later one, and records of foreign clients are read as the Java client reads
them."""

from __future__ import annotations

import subprocess
import time

import pytest
from kafka import TopicPartition
from kafka.consumer.group import ConsumerGroupMetadata
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from tensorline.engine import clients, compat
from tensorline.engine.kafka import KafkaSink, KafkaSource
from tests.conftest import joined, wait_for

pytestmark = pytest.mark.broker


class _Source:
    """What KafkaSink needs of a source: group metadata (here: whatever the test says) and the
    committed-offsets callback."""

    def __init__(self, metadata):
        self.metadata = metadata

    def group_metadata(self):
        return self.metadata

    def committed(self, offsets):
        pass


def test_offsets_of_a_failed_transaction_never_reach_a_later_one(pipeline, namespace):
    """KAFKA-7296 in kafka-python 3.0.12: a TxnOffsetCommit refused (here: a member the group does
    not know, as after an eviction) stays pending in the transaction manager through the abort;
    the sink's next transaction must not commit it."""
    topic, group = pipeline.topic("raw").name, f"{namespace}.g"
    consumer = joined(pipeline, group, topic)
    try:
        live = consumer.group_metadata()
        ghost = ConsumerGroupMetadata(group_id=group, generation_id=live.generation_id, member_id="ghost-member")
        source = _Source(ghost)
        sink = KafkaSink(lambda: clients.producer(pipeline, transactional_id=f"{namespace}.tx"), source,
                         transactional=True)
        sink.begin()
        with pytest.raises(Exception):
            sink.commit({(topic, 1): 50})  # refused: UNKNOWN_MEMBER_ID
        sink.abort()
        source.metadata = consumer.group_metadata()
        sink.begin()
        sink.commit({(topic, 0): 7})
        sink.close()
        committed = {p: consumer.committed(TopicPartition(topic, p)) for p in (0, 1)}
        assert committed == {0: 7, 1: None}  # partition 1's refused offset 50 never committed
    finally:
        consumer.close()


def test_a_join_that_completes_between_polls_is_taken_up_by_the_next_poll(pipeline, namespace):
    """kafka-python 3.0.12 ran a join only while `need_rejoin()`: a rejoin the consumer asks for
    itself (its subscription or the topics' metadata changed) clears that as the JoinGroup goes
    out, so a join that completed after its poll timed out was never taken up: the member stayed
    rebalancing, heartbeats off, its assignment not applied, until the group evicted it (a test
    worker sat so for 120 s). And a join that completed between polls was sent again, a new
    rebalance per poll. The Java client joins while a join is needed *or pending*, and takes up
    a completed one (`AbstractCoordinator.rejoinNeededOrPending`); here, the same."""
    first, second = pipeline.topic("raw").name, pipeline.topic("out").name
    consumer = joined(pipeline, f"{namespace}.g", first)
    coordinator = consumer._coordinator
    try:
        wait_for(lambda: consumer.partitions_for_topic(second), 60, f"topic {second} in the metadata")
        generation = coordinator._generation.generation_id
        consumer.subscribe([first, second])  # the consumer's own reason to rejoin
        consumer.poll(timeout_ms=0)  # the JoinGroup goes out; the poll returns before its answer
        wait_for(lambda: coordinator._join_task is None or coordinator._join_task.is_done, 60, "the join done")
        both = {first, second}
        wait_for(lambda: consumer.poll(timeout_ms=0) is not None and {tp.topic for tp in consumer.assignment()} == both,
                 60, "the completed join taken up (its assignment applied)", every_s=0.05)
        assert coordinator.stable() and coordinator._heartbeat_enabled
        assert coordinator._generation.generation_id == generation + 1  # one rebalance, not one per poll
    finally:
        consumer.close()


def _batch_with_header_key(key_bytes: bytes) -> bytes:
    class RawKey(str):  # a header key written as raw bytes, as kcat or a C client can
        def encode(self, *_a, **_k):
            return key_bytes

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 16)
    builder.append(0, timestamp=None, key=b"k", value=b"v", headers=[(RawKey("x"), b"1")])
    return bytes(builder.build())


def test_a_header_key_that_is_not_utf8_is_read_as_java_reads_it():
    compat.lenient_header_keys()
    [record] = list(DefaultRecordBatch(_batch_with_header_key(b"\xff\xfe")))
    assert record.headers == [("\ufffd\ufffd", b"1")] and record.value == b"v"


def console_produce(bootstrap: str, topic: str, lines: list[str]) -> None:
    """Kafka's own console producer (a Java client, from the broker's jars): it writes what
    kafka-python cannot, such as a null header value (KIP-810's null.marker)."""
    from tensorline.ops import broker

    cmd = broker.java_command("org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", bootstrap,
                              "--topic", topic, "--property", "parse.headers=true", "--property", "parse.key=true",
                              "--property", "null.marker=NULL")
    subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, check=True, timeout=120, capture_output=True)


def test_foreign_headers_reach_the_runtime_as_sendable_headers(pipeline, namespace, kafka_bootstrap):
    """Null header values (from a Java client) and non-UTF-8 header keys (raw bytes) on the
    broker are read by the source as headers the runtime can carry on: no CorruptRecordError
    from poll, no None value the producer would refuse."""
    topic = pipeline.topic("raw").name
    console_produce(kafka_bootstrap, topic, ["x-null:NULL,x-ok:1\tb\tv2"])
    producer = clients.producer(pipeline)

    class RawKey(str):
        def encode(self, *_a, **_k):
            return b"\xff\xfe"

    producer.send(topic, key=b"a", value=b"v1", headers=[(RawKey("x"), b"1")]).get(timeout=60)
    producer.close()
    source = KafkaSource(clients.consumer(pipeline, f"{namespace}.h"), [topic])
    source.set_rebalance_listener(lambda _: None, lambda _: None, lambda _: None)
    got, deadline = [], time.monotonic() + 60
    while len(got) < 2:
        assert time.monotonic() < deadline, f"read {len(got)} of 2 records"
        got += source.poll(0.5, 10)
    source.close()
    headers = {m.value: m.headers for m in got}
    assert headers == {b"v1": [("\ufffd\ufffd", b"1")], b"v2": [("x-null", b""), ("x-ok", b"1")]}
