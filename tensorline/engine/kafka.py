"""The runtime's Source and Sink on Kafka: a consumer group member and a (transactional) producer.

Thin adapters over kafka-python, named as Kafka names things. Exactly-once uses KIP-447: one
transactional producer per worker, the consumed offsets sent into the transaction with the
consumer's group metadata, so a zombie of an older generation is fenced by the group coordinator.

An aborted transaction leaves nothing behind: the sink closes its producer and starts the next
transaction on a fresh one with the same transactional id. kafka-python 3.0.12's transaction
manager keeps the offsets of a failed TxnOffsetCommit (`_pending_txn_offset_commits`, cleared
only on success: the defect the Java client fixed in KAFKA-7296), and a later transaction would
commit them, moving a partition another member now owns backwards. A fresh producer's
InitProducerId also bumps the epoch, so a late EndTxn of the old one cannot decide the fate of a
new transaction (the KAFKA-17754 hazard; kafka-python has no KIP-890 transaction version 2).
Records of foreign clients are taken as they come: a header with a null value is read as an
empty value (kafka-python cannot send null header values onward).
A source may be bounded (replays): given end offsets, or a drain event that fixes them at the
log end when set, it reads up to them, never commits past them, and then calls `on_end`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import TopicAuthorizationFailedError
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from tensorline.engine.errors import Kind, classify
from tensorline.engine.partitioner import partition_for_key
from tensorline.engine.runtime import KEEPALIVE_POLL_S, Message, Output, OutputFailed

# Sends are checked at commit; a minute covers a broker leader change on a small cluster.
SEND_TIMEOUT_S = 60.0


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource"):
        self.source = source

    def on_partitions_revoked(self, revoked):
        if revoked and self.source.revoked:
            self.source.revoked({(tp.topic, tp.partition) for tp in revoked})
        self.source.forget(revoked)

    def on_partitions_lost(self, lost):
        # Evicted from the group: nothing of these partitions can be committed any more.
        if lost and self.source.lost:
            self.source.lost({(tp.topic, tp.partition) for tp in lost})
        self.source.forget(lost)

    def on_partitions_assigned(self, assigned):
        if self.source.paused and assigned:  # assigned while a batch runs: keep them quiet too
            self.source.consumer.pause(*assigned)
        if assigned and self.source.assigned:
            self.source.assigned({(tp.topic, tp.partition) for tp in assigned})


class KafkaSource:
    """A consumer group member subscribed to the stage's input topic.

    Bounded when given `end_offsets` ((topic, partition) -> offset, every partition of the
    input) or a `drain` event (once set: the input's log-end offsets at that moment): records at
    or past the end are dropped, commits never pass it, and once every partition is assigned,
    read to its end and committed past every record handed out, `on_end` is called. One member
    must hold every partition, as a replay's own group does.
    """

    def __init__(self, consumer: KafkaConsumer, topics: Sequence[str], *,
                 end_offsets: Mapping[tuple[str, int], int] | None = None,
                 drain: threading.Event | None = None):
        self.consumer = consumer
        self.topics = list(topics)
        self.paused = False  # every partition paused by keepalive
        self.held: set[TopicPartition] = set()  # paused until released (restoring state)
        self.revoked: Callable[[set[tuple[str, int]]], None] | None = None
        self.assigned: Callable[[set[tuple[str, int]]], None] | None = None
        self.lost: Callable[[set[tuple[str, int]]], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self.end_offsets = None if end_offsets is None else {TopicPartition(t, p): o for (t, p), o in end_offsets.items()}
        self.drain = drain
        self.bounded = end_offsets is not None or drain is not None
        self._handed: dict[TopicPartition, int] = {}     # bounded: next offset after the records handed out
        self._committed: dict[TopicPartition, int] = {}  # offsets the sink has committed
        self._pending: list[Message] = []
        consumer.subscribe(self.topics, listener=_Listener(self))

    def set_rebalance_listener(self, revoked: Callable[[set[tuple[str, int]]], None],
                               assigned: Callable[[set[tuple[str, int]]], None],
                               lost: Callable[[set[tuple[str, int]]], None]) -> None:
        self.revoked, self.assigned, self.lost = revoked, assigned, lost

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        if self._pending:
            got, self._pending = self._pending[:max_records], self._pending[max_records:]
        else:
            got = self._fetch(timeout_s, max_records)
            if not got and self.on_end and self._at_end():
                self.on_end()
        if self.bounded:
            for m in got:
                tp = TopicPartition(m.topic, m.partition)
                self._handed[tp] = max(self._handed.get(tp, 0), m.offset + 1)
        return got

    def _fetch(self, timeout_s: float, max_records: int) -> list[Message]:
        records = self.consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        # kafka-python leaves a subscribed topic the principal may not read out of the metadata
        # and only logs it: the worker would idle for good. The Java consumer throws
        # TopicAuthorizationException from poll (Metadata.maybeThrowAnyException); so does this.
        refused = self.consumer._client.cluster.unauthorized_topics.intersection(self.topics)
        if refused:
            raise TopicAuthorizationFailedError(f"not authorized to read {', '.join(sorted(refused))} "
                                                f"(no READ ACL for this principal: run `tensorline acls apply`)")
        ends = self._ends()
        got = [Message(r.topic, r.partition, r.offset, r.key, r.value,
                       [(k, b"" if v is None else v) for k, v in r.headers] if r.headers else [], r.timestamp)
               for tp, rs in records.items() for r in rs if ends is None or tp not in ends or r.offset < ends[tp]]
        if ends:
            done = [tp for tp in self.consumer.assignment() if tp in ends and self.consumer.position(tp) >= ends[tp]]
            if done:
                self.consumer.pause(*done)
        return got

    def _ends(self) -> dict[TopicPartition, int] | None:
        """The end offsets, fixed at the log end on the first call after `drain` is set."""
        if self.end_offsets is None and self.drain is not None and self.drain.is_set():
            tps = [TopicPartition(t, p) for t in self.topics for p in self.consumer.partitions_for_topic(t) or ()]
            self.end_offsets = self.consumer.end_offsets(tps)
        return self.end_offsets

    def _at_end(self) -> bool:
        ends = self._ends()
        if ends is None:
            return False
        assigned = self.consumer.assignment()
        return all(tp in assigned and self._committed.get(tp, -1) >= self._handed.get(tp, -1)
                   and self.consumer.position(tp) >= end for tp, end in ends.items())

    def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """The sink committed these offsets (what a bounded source waits for before its end, and
        what `idle_positions` compares against)."""
        self._committed.update({TopicPartition(t, p): o for (t, p), o in offsets.items()})

    def idle_positions(self) -> dict[tuple[str, int], int]:
        """Positions past what was committed, with nothing handed out in between: the transaction
        markers after the last batch. Committing them makes an idle group's lag 0."""
        if self._pending:
            return {}
        ends = self.end_offsets or {}
        out = {}
        for tp in self.consumer.assignment():
            done = self._committed.get(tp)
            if done is None:
                continue
            position = self.consumer.position(tp)
            if position is not None and position > done and (tp not in ends or position <= ends[tp]):
                out[(tp.topic, tp.partition)] = position
        return out

    def forget(self, partitions) -> None:
        """Partitions gone in a rebalance: whoever gets them reads from the committed offsets."""
        self.held -= set(partitions)
        for tp in partitions:
            self._handed.pop(tp, None)
            self._committed.pop(tp, None)

    def keepalive(self) -> None:
        if not self.paused:
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True
        self._pending.extend(self._fetch(KEEPALIVE_POLL_S, 500))

    def resume(self) -> None:
        if self.paused:
            ends = self.end_offsets or {}
            self.consumer.resume(*[tp for tp in self.consumer.paused() if tp not in self.held
                                   and (tp not in ends or self.consumer.position(tp) < ends[tp])])
            self.paused = False

    def hold(self, partitions: set[tuple[str, int]]) -> None:
        tps = {TopicPartition(t, p) for t, p in partitions}
        self.held |= tps
        self.consumer.pause(*tps)

    def release(self, partitions: set[tuple[str, int]]) -> None:
        tps = {TopicPartition(t, p) for t, p in partitions} & self.held
        self.held -= tps
        assigned = self.consumer.assignment()
        if not self.paused:
            self.consumer.resume(*(tps & assigned))

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
            end = (self.end_offsets or {}).get(TopicPartition(topic, partition))
            out[(topic, partition)] = position if end is None else min(position, end)
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

    def evicted(self) -> bool:
        """True once the group coordinator has told this member it is no longer in the group
        (a heartbeat or commit met UNKNOWN_MEMBER_ID or ILLEGAL_GENERATION: kafka-python resets
        the generation at once, while the lost partitions are only handed over on the next poll).
        A transaction committed now would be refused, so the runtime aborts it instead."""
        return self.consumer.group_metadata().generation_id < 0 and bool(self.consumer.assignment())

    def close(self) -> None:
        self.consumer.close()  # leaves the group, so its partitions move at once


class KafkaSink:
    """A producer; transactional (exactly-once) or plain with a consumer commit (at-least-once).

    `new_producer` builds it: after an abort the sink closes the producer and begins the next
    transaction on a fresh one (see the module docstring), so nothing of an aborted transaction,
    pending offsets included, can reach a later one. A keyed output's partition is computed here
    (`partitioner`), as the default partitioner would, from the producer's metadata.
    """

    def __init__(self, new_producer: Callable[[], KafkaProducer], source: KafkaSource, *, transactional: bool):
        self.new_producer, self.source, self.transactional = new_producer, source, transactional
        self.producer: KafkaProducer | None = None
        self._sent: list[tuple[Output, Any]] = []
        self._ready()

    def _ready(self) -> KafkaProducer:
        """The producer, built (and its transactions initialised) if there is none."""
        if self.producer is None:
            producer = self.new_producer()
            if self.transactional:
                try:
                    producer.init_transactions()
                except Exception:
                    producer.close(timeout=0)
                    raise
            self.producer = producer
        return self.producer

    def begin(self) -> None:
        self._sent = []
        if self.transactional:
            self._ready().begin_transaction()

    def send(self, output: Output) -> None:
        try:
            producer, partition = self._ready(), output.partition
            if partition is None and output.key is not None:
                # None while the producer has no metadata of the topic: send waits for it (and fails) as ever
                known = producer._metadata.partitions_for_topic(output.topic)
                partition = partition_for_key(output.key, len(known)) if known else None
            future = producer.send(output.topic, key=output.key, value=output.value, headers=output.headers,
                                   partition=partition)
        except Exception as e:
            raise (OutputFailed(output, e) if classify(e) is Kind.RECORD else e) from e
        self._sent.append((output, future))

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit the outputs sent and `offsets`; an output the broker refused for what it is
        (too large, invalid) raises OutputFailed naming it, any other failure as it came."""
        producer = self._ready()
        committed = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            if self.transactional:
                if committed:
                    producer.send_offsets_to_transaction(committed, self.source.group_metadata())
                producer.commit_transaction()
            else:
                producer.flush()
            for _, future in self._sent:  # done once committed or flushed: get() only to wait or raise
                if not future.is_done or future.exception is not None:
                    future.get(timeout=SEND_TIMEOUT_S)  # raises the send's error, if any
        except Exception as e:
            refused = next(((o, f.exception) for o, f in self._sent
                            if f.is_done and f.failed() and classify(f.exception) is Kind.RECORD), None)
            raise (OutputFailed(*refused) if refused else e) from e
        if not self.transactional and committed:
            self.source.consumer.commit(committed)
        self._sent = []
        self.source.committed(offsets)

    def abort(self) -> None:
        """Abort the open transaction by closing the producer: the next `begin` initialises a
        fresh one, whose InitProducerId aborts what the old one left open and fences it."""
        self._sent = []
        if self.transactional and self.producer is not None:
            producer, self.producer = self.producer, None
            producer.close(timeout=0)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
