"""The one worker runtime every stage runs on.

Loop: poll -> decode -> micro-batch (up to `max_batch` records, or `max_delay_ms` after the first)
-> one model call per batch -> encode -> produce -> commit. The runtime owns everything Kafka;
a stage owns only its transformation (see `Stage`). It takes a `Source` and a `Sink`, so a
stage runs the same code in memory (tests) and on Kafka (`stages.kafka`).

Exactly-once: outputs, dead letters and the consumed offsets go into one transaction. Under
load a transaction spans the batches finished within `commit_interval_ms` (as Kafka Streams'
commit.interval.ms); a worker with no next batch to start commits at once.
Poll-safe: the model runs on a helper thread while the main thread keeps polling with every
partition paused, so a slow batch never pushes the worker out of its group; a batch slower than
`slow_batch_s` halves the batch size, fast batches grow it back.
Rebalance-safe: on revoke, the in-flight batch is finished and committed before the partitions go.
A record that fails to decode, fails the stage's check, or makes the model raise goes to the
dead-letter topic with its reason and original bytes; a failing batch is bisected to find it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from tensorline import logs
from tensorline.engine import metrics
from tensorline.engine.errors import DeadLetter, reason

Headers = list[tuple[str, bytes]]
TRACE_ID = "tl.trace"
INGEST_MS = "tl.ingest_ms"
# A batch slower than this halves the batch size: a fifth of kafka-python's default
# max.poll.interval.ms (300 s), though polling goes on during the model call anyway.
DEFAULT_SLOW_BATCH_S = 60.0
# A batch faster than this fraction of slow_batch_s lets the batch size grow back by half.
GROW_FRACTION = 0.25
# How long one keep-alive poll waits while the model runs and nothing else is to be done.
KEEPALIVE_POLL_S = 0.05
# Waiting for a model with nothing to collect: poll this often (heartbeats run on kafka-python's
# own thread; polls keep max.poll.interval.ms and rebalances served). A model finishing in
# between is noticed at once: the wait is on its future, not on the poll.
KEEPALIVE_INTERVAL_S = 0.5
# While a batch's model runs, the next batch is collected in slices this short, so the model's
# end is noticed within one slice.
COLLECT_SLICE_S = 0.005
# With nothing in flight, wait this long for a first record before looking at stop/ticks again.
FIRST_RECORD_WAIT_S = 0.5
# Batches handed to the model thread at once: while one runs, the next full batch waits decoded
# behind it, so the model never idles while the main thread commits or decodes.
PIPELINE_DEPTH = 2


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed record, as the runtime sees it (Kafka's ConsumerRecord, minus the client)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class Output:
    """One record to produce (partition None: by key, as the producer's partitioner decides)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None


class Stage(Protocol):
    """What a stage module provides: its name, and batch in -> batch out.

    `process` returns one element per input: an output object (encoded with `encode`, keyed with
    `key`, traced from its input), a ready `Output`, a list of these, or None. Stateful stages
    (fusion) also get `tick` (outputs due without input), `on_assigned`/`on_revoked` (partitions
    come and go) and `committed`/`aborted` (the batch's transaction outcome): see `RecordStage`.
    """

    name: str

    def decode(self, message: Message) -> Any:
        """The message's payload as the stage's input item; raises a CodecError on bad bytes."""

    def check(self, item: Any) -> None:
        """Raise DeadLetter when this item cannot go to the model."""

    def process(self, items: list[Any]) -> list[Any]:
        """One model call for the whole batch; one element per input, in order."""

    def encode(self, output: Any) -> bytes:
        """The output as message bytes."""

    def key(self, output: Any, message: Message) -> bytes | None:
        """The output's partition key."""


class Source(Protocol):
    """Where a worker reads: a consumer group member (or an in-memory list in tests)."""

    def poll(self, timeout_s: float, max_records: int) -> list[Message]: ...

    def keepalive(self) -> None:
        """Poll with every partition paused: heartbeats, rebalances, no records."""

    def resume(self) -> None: ...

    def positions(self, batch: Sequence[Message]) -> dict[tuple[str, int], int]:
        """The offsets to commit after `batch`: per partition, the next offset to read."""

    def idle_positions(self) -> dict[tuple[str, int], int]:
        """When idle: positions beyond the last commit that hold no record (transaction markers)."""

    def rewind(self, batch: Sequence[Message]) -> None:
        """Seek back to the batch's first offsets so an aborted batch is read again."""

    def set_rebalance_listener(self, revoked: Callable[[set[tuple[str, int]]], None],
                               assigned: Callable[[set[tuple[str, int]]], None],
                               lost: Callable[[set[tuple[str, int]]], None]) -> None: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where a worker writes: a (transactional) producer, or a list in tests."""

    transactional: bool

    def begin(self) -> None: ...

    def send(self, output: Output) -> None: ...

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Make the batch's outputs and its consumed offsets durable, atomically when transactional."""

    def abort(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Stats:
    """Counters a worker keeps (logged at exit; exported as metrics by ops)."""

    records_in: int = 0
    records_out: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_seconds: float = 0.0


def now_ms() -> int:
    return int(time.time() * 1000)


def header(headers: Headers, name: str) -> bytes | None:
    """The last value of a header, or None."""
    for k, v in reversed(headers):
        if k == name:
            return v
    return None


def trace_headers(stage: str, headers: Headers, received_ms: int) -> Headers:
    """Input headers plus this stage's received/produced times (and a trace id if missing)."""
    out = [h for h in headers if not h[0].startswith(f"tl.{stage}.")]
    if header(out, TRACE_ID) is None:
        out.append((TRACE_ID, uuid.uuid4().hex.encode()))
    out.append((f"tl.{stage}.received_ms", str(received_ms).encode()))
    out.append((f"tl.{stage}.produced_ms", str(now_ms()).encode()))
    return out


def dead_letter_headers(stage: str, error: BaseException, *, topic: str, partition: int = -1,
                        offset: int = -1, timestamp_ms: int = 0) -> Headers:
    """The reason and origin of a dead letter, as headers: stage, error class and message, and
    the topic/partition/offset/timestamp it came from (-1 where it never was on a topic)."""
    return [
        ("tl.dlq.stage", stage.encode()),
        ("tl.dlq.reason", reason(error).encode()),
        ("tl.dlq.error", type(error).__name__.encode()),
        ("tl.dlq.message", str(error).encode(errors="replace")[:4096]),
        ("tl.dlq.topic", topic.encode()),
        ("tl.dlq.partition", str(partition).encode()),
        ("tl.dlq.offset", str(offset).encode()),
        ("tl.dlq.timestamp_ms", str(timestamp_ms).encode()),
    ]


def dead_letter(stage: str, message: Message, error: BaseException, dlq_topic: str) -> Output:
    """The DLQ record: original key and bytes untouched, the reason and origin in headers."""
    reason = dead_letter_headers(stage, error, topic=message.topic, partition=message.partition,
                                 offset=message.offset, timestamp_ms=message.timestamp_ms)
    return Output(dlq_topic, message.key, message.value, list(message.headers) + reason)


@dataclass
class _Batch:
    """A micro-batch on its way: its messages, when it started, the offsets to commit after it,
    its dead letters and the model call."""

    messages: list[Message]
    received_ms: int
    started: float
    positions: dict[tuple[str, int], int]
    dead: list[Output] = field(default_factory=list)
    model: Future | None = None
    model_seconds: float = 0.0  # the model call alone (it may have waited behind another batch)


class Worker:
    """Runs one stage from a Source to a Sink until stopped."""

    def __init__(self, stage: Stage, source: Source, sink: Sink, *, output_topic: str, dlq_topic: str,
                 max_batch: int, max_delay_ms: int, commit_interval_ms: int = 0,
                 slow_batch_s: float = DEFAULT_SLOW_BATCH_S, log: Any = None):
        self.stage, self.source, self.sink = stage, source, sink
        self.output_topic, self.dlq_topic = output_topic, dlq_topic
        self.max_batch, self.batch_size = max_batch, max_batch
        self.max_delay_s, self.slow_batch_s = max_delay_ms / 1000, slow_batch_s
        self.commit_interval_s = commit_interval_ms / 1000
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.log = log or logs.get(stage=stage.name)
        model_ref = getattr(stage, "model_ref", None)
        self.labels = (stage.name, model_ref.name if model_ref else "")
        self.assigned: set[tuple[str, int]] = set()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage.name}-model")
        self._buffer: list[Message] = []
        self._flight: list[_Batch] = []  # handed to the model thread, oldest first
        # The open transaction: since when, what it holds (a batch, or None for tick outputs,
        # with its outputs and dead letters), and the offsets to commit with it.
        self._open_since: float | None = None
        self._open: list[tuple[_Batch | None, list[Output], list[Output]]] = []
        self._open_positions: dict[tuple[str, int], int] = {}
        source.set_rebalance_listener(self._on_revoke, self._on_assign, self._on_lost)

    # -- loop ------------------------------------------------------------------------------
    def run(self, *, until_idle_s: float | None = None) -> Stats:
        """Process batches until `stop()` (or, when `until_idle_s` is set, until idle that long).

        Pipelined: while batch N's model runs, the main thread collects batch N+1 and, once it is
        full, hands it to the model thread to run next (up to PIPELINE_DEPTH batches in flight); a
        model with nothing queued gets whatever was collected. Batches are produced in order as
        their models finish (and committed, when due) while the next one runs. A revoke finishes
        every batch in flight first.
        """
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self._collect()
                started = self._feed()
                finished = self._drain()
                if self._open_since is not None and (
                        not self._flight or time.monotonic() - self._open_since >= self.commit_interval_s):
                    self._commit()
                ticked = not self._flight and self._tick()
                if started or finished or ticked:
                    idle_since = time.monotonic()
                    continue
                if not self._flight:
                    self._settle()
                if until_idle_s is not None and time.monotonic() - idle_since > until_idle_s:
                    break
            while self._flight:  # stopping: the batches in flight are finished, not dropped
                self._await(self._flight[0])
                if self._flight and not self._finish(self._flight.pop(0)):
                    break
            self._commit()
        finally:
            self._model_thread.shutdown(wait=True)
        return self.stats

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight and return (signal-safe)."""
        self.stop_event.set()

    def _collect(self) -> None:
        """Fill the buffer. With nothing in flight: up to batch_size records, or what came within
        max_delay of the first (waiting up to half a second for a first one). With a batch in
        flight: whatever arrives until its model is done (or the buffer is full)."""
        first_at = None
        while len(self._buffer) < self.batch_size and not self.stop_event.is_set():
            flight = self._flight
            if flight:
                if flight[0].model.done():
                    return
                timeout = COLLECT_SLICE_S
            elif not self._buffer:
                timeout = FIRST_RECORD_WAIT_S
            else:
                first_at = first_at or time.monotonic()
                timeout = first_at + self.max_delay_s - time.monotonic()
                if timeout <= 0:
                    return
            got = self.source.poll(timeout, self.batch_size - len(self._buffer))
            self._buffer.extend(got)
            if not flight and not self._buffer:
                return  # idle: let the loop look at stop, ticks and until_idle

    def _feed(self) -> bool:
        """Hand the buffer to the model thread: at once when the model has nothing to run; when
        full, queued behind the running batch (up to PIPELINE_DEPTH in flight)."""
        if not self._buffer:
            return False
        running = sum(not b.model.done() for b in self._flight)
        if running and (len(self._buffer) < self.batch_size or running >= PIPELINE_DEPTH):
            return False
        self._flight.append(self._start())
        return True

    def _drain(self) -> bool:
        """Produce, in order, the batches whose model is done; when the buffer is full and the
        model thread has PIPELINE_DEPTH batches, wait (polling) for the oldest first."""
        if len(self._buffer) >= self.batch_size and len(self._flight) >= PIPELINE_DEPTH:
            self._await(self._flight[0])
        finished = False
        while self._flight and self._flight[0].model.done():
            self._await(self._flight[0])  # done: only its metrics
            if not self._flight:  # a revoke finished it meanwhile
                break
            finished = True
            if not self._finish(self._flight.pop(0)):
                break
        return finished

    # -- one batch -------------------------------------------------------------------------
    def _start(self) -> "_Batch":
        """Decode and check the buffered records, snapshot their offsets, start the model call."""
        messages, self._buffer = self._buffer, []
        batch = _Batch(messages, now_ms(), time.monotonic(), self.source.positions(messages))
        items = []
        for message in messages:
            try:
                item = self.stage.decode(message)
                self.stage.check(item)
                items.append((message, item))
            except Exception as e:  # bad input of any kind goes to the DLQ, never crashes the worker
                batch.dead.append(self._dead(message, e))
        batch.model = self._model_thread.submit(self._run_model, batch, items)
        return batch

    def _run_model(self, batch: "_Batch", items: list[tuple[Message, Any]]):
        started = time.monotonic()
        try:
            return self._call(items)
        finally:
            batch.model_seconds = time.monotonic() - started

    def _await(self, batch: "_Batch") -> None:
        """Wait for the batch's model, polling (partitions paused) so the group keeps us."""
        assert batch.model is not None
        while not wait([batch.model], timeout=KEEPALIVE_INTERVAL_S).done:
            self.source.keepalive()
        self.source.resume()
        metrics.BATCH_SECONDS.labels(*self.labels).observe(time.monotonic() - batch.started)
        self._adapt(batch.model_seconds)

    def _finish(self, batch: "_Batch") -> bool:
        """Produce the batch's outputs and dead letters into the open transaction, its offsets
        to be committed with it. False when that failed (everything uncommitted is read again)."""
        assert batch.model is not None
        results, model_dead = batch.model.result()
        outputs = [o for message, element in results for o in self._outputs(message, element, batch.received_ms)]
        return self._send(batch, outputs, batch.dead + model_dead, batch.positions)

    def _send(self, batch: "_Batch | None", outputs: list[Output], dead: list[Output],
              positions: dict[tuple[str, int], int]) -> bool:
        """Into the open transaction (begun if none): the outputs and dead letters, then the
        offsets to commit. False (and everything open aborted) on failure."""
        if self._open_since is None:
            self.sink.begin()
            self._open_since = time.monotonic()
        self._open.append((batch, outputs, dead))
        try:
            for out in outputs + dead:
                self.sink.send(out)
        except Exception:
            self.log.exception("send failed; transaction aborted, its batches will be read again",
                               batches=len(self._open))
            self._abort()
            return False
        self._open_positions.update(positions)
        return True

    def _commit(self) -> bool:
        """Commit the open transaction: its outputs and the offsets after its batches. On failure
        it is aborted and its batches are read again (`_abort`)."""
        if self._open_since is None:
            return True
        try:
            self.sink.commit(self._open_positions)
        except Exception:
            self.log.exception("commit failed; transaction aborted, its batches will be read again",
                               batches=len(self._open))
            self._abort()
            return False
        self.stage.committed()
        for batch, outputs, dead in self._open:
            self.stats.records_out += len(outputs)
            self.stats.dead_letters += len(dead)
            if batch is not None:
                self.stats.records_in += len(batch.messages)
                self.stats.batches += 1
                self._observe(batch, outputs, dead)
        self._close_open()
        return True

    def _abort(self) -> None:
        """Abort the open transaction: batches in flight are dropped, the stage forgets what it
        did, and every record not committed is read again."""
        if self._open_since is not None:
            try:
                self.sink.abort()
            except Exception:  # a fenced or closed producer: nothing of the transaction is visible anyway
                self.log.exception("abort failed")
        later, self._flight = self._flight, []
        # Blocking, not polling (this may run inside a rebalance callback): the stage must not
        # be reset under a running model call. Aborts are rare.
        wait([b.model for b in later if b.model is not None])
        self.stage.aborted()
        batches = [b for b, _, _ in self._open if b is not None] + later
        messages = [m for b in batches for m in b.messages] + self._buffer
        if messages:
            self.source.rewind(messages)
        self._buffer = []
        self._close_open()

    def _close_open(self) -> None:
        self._open_since, self._open, self._open_positions = None, [], {}

    def _observe(self, batch: "_Batch", outputs: list[Output], dead: list[Output]) -> None:
        labels = self.labels
        metrics.RECORDS_IN.labels(*labels).inc(len(batch.messages))
        metrics.RECORDS_OUT.labels(*labels).inc(len(outputs))
        metrics.BATCH_SIZE.labels(*labels).observe(len(batch.messages))
        for d in dead:
            metrics.DEAD_LETTERS.labels(*labels, (header(d.headers, "tl.dlq.error") or b"").decode()).inc()
        now, end_to_end = now_ms(), metrics.END_TO_END_SECONDS.labels(*labels)
        for out in outputs:
            ingest = header(out.headers, INGEST_MS)
            if ingest is not None:
                end_to_end.observe((now - int(ingest)) / 1000)

    def _outputs(self, message: Message, element: Any, received_ms: int) -> list[Output]:
        if element is None:
            return []
        return [e if isinstance(e, Output) else
                Output(self.output_topic, self.stage.key(e, message), self.stage.encode(e),
                       trace_headers(self.stage.name, message.headers, received_ms))
                for e in (element if isinstance(element, list) else [element])]

    def _settle(self) -> None:
        """Idle: commit the positions past trailing transaction markers, so lag reads 0 at rest."""
        offsets = self.source.idle_positions()
        if offsets and self._send(None, [], [], offsets):
            self._commit()

    def _tick(self) -> bool:
        """Outputs a stage owes without new input (fusion deadlines), committed at once. Only
        called with no batch in flight, so it never runs beside `process`."""
        outputs = self.stage.tick()
        if outputs and self._send(None, outputs, [], {}):
            self._commit()
        return bool(outputs)

    def _call(self, items: list[tuple[Message, Any]]) -> tuple[list[tuple[Message, Any]], list[Output]]:
        """The model on the batch; on failure, bisect to isolate the records that make it raise."""
        if not items:
            return [], []
        try:
            with metrics.MODEL_SECONDS.labels(*self.labels).time():
                outputs = self.stage.process([item for _, item in items])
            if len(outputs) != len(items):
                raise RuntimeError(f"stage {self.stage.name} returned {len(outputs)} outputs for {len(items)} inputs")
            return list(zip([m for m, _ in items], outputs)), []
        except Exception as e:
            self.stage.aborted()  # a stateful stage forgets what the failed call half-did
            if len(items) == 1:
                return [], [self._dead(items[0][0], e)]
            mid = len(items) // 2
            left, right = self._call(items[:mid]), self._call(items[mid:])
            return left[0] + right[0], left[1] + right[1]

    def _dead(self, message: Message, error: BaseException) -> Output:
        self.log.warning("record to dead-letter topic", topic=message.topic, partition=message.partition,
                         offset=message.offset, error=type(error).__name__, reason=str(error)[:300])
        return dead_letter(self.stage.name, message, error, self.dlq_topic)

    def _adapt(self, seconds: float) -> None:
        self.stats.batch_seconds += seconds
        if seconds > self.slow_batch_s and self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self.log.warning("slow batch: batch size halved", seconds=round(seconds, 2), batch_size=self.batch_size)
        elif seconds < GROW_FRACTION * self.slow_batch_s and self.batch_size < self.max_batch:
            self.batch_size = min(self.max_batch, self.batch_size + max(1, self.batch_size // 2))

    # -- rebalance -------------------------------------------------------------------------
    def _on_revoke(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions are leaving: finish the batches in flight and commit the open transaction
        first, drop buffered records of theirs."""
        if self._flight:
            self.log.info("partitions revoked during a batch: finishing it first", partitions=sorted(partitions),
                          batches=len(self._flight))
        while self._flight:
            if not self._finish(self._flight.pop(0)):
                break
        self._commit()
        self._drop(partitions)

    def _on_lost(self, partitions: set[tuple[str, int]]) -> None:
        """Evicted (session expired): every partition is gone, so the batch in flight and the
        open transaction cannot commit; the transaction is aborted and the partitions' new owners
        read its records again."""
        self.log.warning("partitions lost: the group evicted this worker", partitions=sorted(partitions))
        wait([b.model for b in self._flight if b.model is not None])  # no stage hook beside a model call
        self._drop(partitions)
        if self._open_since is not None or self._flight:
            self._abort()

    def _drop(self, partitions: set[tuple[str, int]]) -> None:
        self._buffer = [m for m in self._buffer if (m.topic, m.partition) not in partitions]
        self.stage.on_revoked(partitions)
        self.assigned -= partitions
        metrics.ASSIGNED_PARTITIONS.labels(*self.labels).set(len(self.assigned))

    def _on_assign(self, partitions: set[tuple[str, int]]) -> None:
        self.stage.on_assigned(partitions)
        self.assigned |= partitions
        metrics.ASSIGNED_PARTITIONS.labels(*self.labels).set(len(self.assigned))
        self.log.info("partitions assigned", partitions=sorted(self.assigned))
