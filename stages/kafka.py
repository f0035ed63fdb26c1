"""The runtime's Source and Sink on Kafka: a consumer group member and a (transactional) producer.

Thin adapters over kafka-python, named as Kafka names things. Exactly-once uses KIP-447: one
transactional producer per worker, the consumed offsets sent into the transaction with the
consumer's group metadata, so a zombie of an older generation is fenced by the group coordinator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from tensorline.stages.runtime import KEEPALIVE_POLL_S, Message, Output

# Sends are checked at commit; a minute covers a broker leader change on a small cluster.
SEND_TIMEOUT_S = 60.0


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource"):
        self.source = source

    def on_partitions_revoked(self, revoked):
        if revoked and self.source.revoked:
            self.source.revoked({(tp.topic, tp.partition) for tp in revoked})

    def on_partitions_lost(self, lost):
        # Evicted from the group: nothing of these partitions can be committed any more.
        if lost and self.source.lost:
            self.source.lost({(tp.topic, tp.partition) for tp in lost})

    def on_partitions_assigned(self, assigned):
        if self.source.paused and assigned:  # assigned while a batch runs: keep them quiet too
            self.source.consumer.pause(*assigned)
        if assigned and self.source.assigned:
            self.source.assigned({(tp.topic, tp.partition) for tp in assigned})


class KafkaSource:
    """A consumer group member subscribed to the stage's input topic."""

    def __init__(self, consumer: KafkaConsumer, topics: Sequence[str]):
        self.consumer = consumer
        self.paused = False
        self.revoked: Callable[[set[tuple[str, int]]], None] | None = None
        self.assigned: Callable[[set[tuple[str, int]]], None] | None = None
        self.lost: Callable[[set[tuple[str, int]]], None] | None = None
        self._pending: list[Message] = []
        consumer.subscribe(list(topics), listener=_Listener(self))

    def set_rebalance_listener(self, revoked: Callable[[set[tuple[str, int]]], None],
                               assigned: Callable[[set[tuple[str, int]]], None],
                               lost: Callable[[set[tuple[str, int]]], None]) -> None:
        self.revoked, self.assigned, self.lost = revoked, assigned, lost

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        if self._pending:
            got, self._pending = self._pending[:max_records], self._pending[max_records:]
            return got
        records = self.consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        return [Message(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []), r.timestamp)
                for rs in records.values() for r in rs]

    def keepalive(self) -> None:
        if not self.paused:
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True
        self._pending.extend(self.poll(KEEPALIVE_POLL_S, 500))

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(*self.consumer.paused())
            self.paused = False

    def positions(self, batch: Sequence[Message]) -> dict[tuple[str, int], int]:
        """Per partition the consumer's position (past any transaction marker) unless records of
        that partition still wait unprocessed, then just past the batch's last record."""
        last: dict[tuple[str, int], int] = {}
        for m in batch:
            last[(m.topic, m.partition)] = max(last.get((m.topic, m.partition), -1), m.offset)
        waiting = {(m.topic, m.partition) for m in self._pending}
        assigned = self.consumer.assignment()
        out = {}
        for (topic, partition), offset in last.items():
            position = offset + 1
            if (topic, partition) not in waiting and TopicPartition(topic, partition) in assigned:
                position = max(position, self.consumer.position(TopicPartition(topic, partition)) or 0)
            out[(topic, partition)] = position
        return out

    def rewind(self, batch: Sequence[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            first[(m.topic, m.partition)] = min(first.get((m.topic, m.partition), m.offset), m.offset)
        assigned = self.consumer.assignment()
        for (topic, partition), offset in first.items():
            if TopicPartition(topic, partition) in assigned:
                self.consumer.seek(TopicPartition(topic, partition), offset)
        self._pending = [m for m in self._pending if (m.topic, m.partition) not in first]

    def group_metadata(self):
        return self.consumer.group_metadata()

    def close(self) -> None:
        self.consumer.close()  # leaves the group, so its partitions move at once


class KafkaSink:
    """A producer; transactional (exactly-once) or plain with a consumer commit (at-least-once)."""

    def __init__(self, producer: KafkaProducer, source: KafkaSource, *, transactional: bool):
        self.producer, self.source, self.transactional = producer, source, transactional
        self._futures: list = []
        if transactional:
            producer.init_transactions()

    def begin(self) -> None:
        self._futures = []
        if self.transactional:
            self.producer.begin_transaction()

    def send(self, output: Output) -> None:
        self._futures.append(self.producer.send(output.topic, key=output.key, value=output.value,
                                                headers=output.headers, partition=output.partition))

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        committed = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        if self.transactional:
            if committed:
                self.producer.send_offsets_to_transaction(committed, self.source.group_metadata())
            self.producer.commit_transaction()
        else:
            self.producer.flush()
        for future in self._futures:
            future.get(timeout=SEND_TIMEOUT_S)  # raises the send's error, if any
        if not self.transactional and committed:
            self.source.consumer.commit(committed)
        self._futures = []

    def abort(self) -> None:
        self._futures = []
        if self.transactional:
            self.producer.abort_transaction()

    def close(self) -> None:
        self.producer.close()
