"""The one worker runtime every stage runs on.

Loop: poll -> decode -> micro-batch (up to `max_batch` records, or `max_delay_ms` after the first)
-> one model call per batch -> encode -> produce -> commit. The runtime owns everything Kafka;
a stage owns only its transformation (see `Stage`). It takes a `Source` and a `Sink`, so a
stage runs the same code in memory (tests) and on Kafka (`stages.kafka`).

Exactly-once: outputs, dead letters and the consumed offsets go into one transaction. Under
load a transaction spans the batches finished within `commit_interval_ms` (as Kafka Streams'
commit.interval.ms); a worker with no batch in flight and no full batch of input waiting commits
at once.
Poll-safe: the model runs on a helper thread while the main thread keeps polling with every
partition paused, so a slow batch never pushes the worker out of its group; a batch slower than
`slow_batch_s` halves the batch size, fast batches grow it back.
Rebalance-safe: on revoke, the in-flight batch is finished and committed before the partitions go.
Failures are sorted as `engine.errors` says. A record error (the record fails to decode, fails
the stage's check, makes the model raise, its output cannot be encoded or is refused by the
broker) sends that record to the dead-letter topic once, with its reason and original bytes (cut
to fit the size limit, with its full size and sha256); a failing batch is bisected to find it. A
transient error is retried with backoff: a model call on the model thread, a send or commit by
aborting the transaction and reading its batches again. A fatal error stops the worker (`Fatal`).
When more than `dlq_max_ratio` of the last `dlq_window` records were dead letters, the worker
holds its input (partitions paused, still in the group) for a cool-down and says so, instead of
draining a broken stream into the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tensorline import logs
from tensorline.engine import metrics
from tensorline.engine.errors import DeadLetter, Fatal, Kind, classify, out_of_memory, reason
from tensorline.engine.state import ChangelogRecord, StateStore

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
# kafka-python calls rebalance listeners on its IO loop, where they block heartbeats: on revoke,
# batches in flight are finished and committed only if their models end within a fifth of the
# 10 s session timeout; slower ones are aborted and read again by the partitions' new owner.
REVOKE_BUDGET_S = 2.0
# Transient failures are retried after 0.5 s, doubling to 30 s: quick for a blip (a leader
# moving, a GPU briefly out of memory), gentle on a broker that is down.
BACKOFF_S = (0.5, 30.0)
# The size kafka-python and the broker add around one record: the record batch header (61 bytes)
# and the record's own varints; headers pay a key and a value length each.
RECORD_OVERHEAD_BYTES = 61 + 5 * 6
HEADER_OVERHEAD_BYTES = 10
# Dead-letter pause: after more than DEFAULT_DLQ_MAX_RATIO of the last DEFAULT_DLQ_WINDOW records
# went to the DLQ, hold the input 30 s, doubling to 10 min while it persists. Half: a stream of
# mostly good records with some bad ones flows on; a broken model or producer does not empty the
# topic into the DLQ before someone looks.
DEFAULT_DLQ_MAX_RATIO = 0.5
DEFAULT_DLQ_WINDOW = 100
DLQ_PAUSE_S = (30.0, 600.0)


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
    """One record to produce (partition None: by key, as the producer's partitioner decides),
    with the input message it came from (`origin`; None for outputs owed without input)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None
    origin: Message | None = field(default=None, compare=False, repr=False)


class OutputFailed(Exception):
    """The sink refused `output` for what it is (too large, invalid): its origin is a dead letter."""

    def __init__(self, output: Output, error: BaseException):
        super().__init__(f"output to {output.topic} refused: {type(error).__name__}: {error}")
        self.output, self.error = output, error


class Interrupted(Exception):
    """The worker stopped while a transient failure was being retried."""


class Stage(Protocol):
    """What a stage module provides: its name, and batch in -> batch out.

    `process` returns one element per input: an output object (encoded with `encode`, keyed with
    `key`, traced from its input), a ready `Output`, a list of these, or None. Every other hook has
    a no-op default in `stages.base.RecordStage`.

    A stateful stage names its `changelog_topic` (co-partitioned with its input) and serializes
    its state values (`serialize_state`/`deserialize_state`); the runtime then gives it `state`, a
    `StateStore` restored before any record of a partition is processed, and calls `expire` for
    keys whose time-to-live has passed.
    """

    name: str
    changelog_topic: str | None

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

    def tick(self) -> list[Output]:
        """Outputs owed without new input; called only with no batch in flight."""

    def expire(self, partition: int, key: bytes, value: Any, now_ms: int) -> list[Output]:
        """A state key's time-to-live passed: write or delete it, and return what it owes."""

    def serialize_state(self, value: Any) -> bytes: ...

    def deserialize_state(self, data: bytes) -> Any: ...

    def on_assigned(self, partitions: set[tuple[str, int]]) -> None: ...

    def on_revoked(self, partitions: set[tuple[str, int]]) -> None: ...

    def committed(self) -> None:
        """The open transaction committed."""

    def aborted(self) -> None:
        """The open transaction aborted: forget anything kept outside `state`."""


class Source(Protocol):
    """Where a worker reads: a consumer group member (or an in-memory list in tests)."""

    def poll(self, timeout_s: float, max_records: int) -> list[Message]: ...

    def keepalive(self) -> None:
        """Poll with every partition paused: heartbeats, rebalances, no records."""

    def resume(self) -> None:
        """Resume the partitions `keepalive` paused (not the held ones)."""

    def hold(self, partitions: set[tuple[str, int]]) -> None:
        """Pause these partitions until `release` (a stateful stage restoring them)."""

    def release(self, partitions: set[tuple[str, int]]) -> None: ...

    def positions(self, batch: Sequence[Message]) -> dict[tuple[str, int], int]:
        """The offsets to commit after `batch`: per partition, the next offset to read."""

    def idle_positions(self) -> dict[tuple[str, int], int]:
        """When idle: positions beyond the last commit that hold no record (transaction markers)."""

    def rewind(self, batch: Sequence[Message]) -> None:
        """Seek back to the batch's first offsets so an aborted batch is read again."""

    def evicted(self) -> bool:
        """True when the group has already dropped this member: nothing it holds can commit."""

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


def header_ms(headers: Headers, name: str) -> int | None:
    """A time header in epoch milliseconds, or None when absent or not a number. Headers come
    from clients we do not control: "1796072778892.297" is read as 1796072778892, "abc" as None."""
    value = header(headers, name)
    if not value or len(value) > 32:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    return int(ms) if ms == ms and abs(ms) < 1e15 else None


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of one record's size on the wire, as the producer and broker limit it."""
    return (RECORD_OVERHEAD_BYTES + len(key or b"") + len(value or b"")
            + sum(HEADER_OVERHEAD_BYTES + len(k.encode()) + len(v) for k, v in headers))


def trace_headers(stage: str, headers: Headers, received_ms: int) -> Headers:
    """Input headers plus this stage's received/produced times (and a trace id if missing)."""
    return Tracer(stage, received_ms).headers(headers)


class Tracer:
    """The trace headers of a batch's outputs, built once per batch: the stage's received and
    produced times (`produced_ms`: when the batch's outputs are built) are the same for all of
    them, and trace ids (for inputs that came without one) count up from one random 128-bit
    number, as unique as a uuid4 each and a tenth of its cost."""

    __slots__ = ("_prefix", "_stamps", "_next_id")

    def __init__(self, stage: str, received_ms: int, produced_ms: int | None = None):
        self._prefix = f"tl.{stage}."
        produced = now_ms() if produced_ms is None else produced_ms
        self._stamps = ((f"tl.{stage}.received_ms", str(received_ms).encode()),
                        (f"tl.{stage}.produced_ms", str(produced).encode()))
        self._next_id = int.from_bytes(os.urandom(16))

    def headers(self, headers: Headers) -> Headers:
        """`headers` (an input's) without this stage's earlier stamps, then a trace id if they
        have none, then this stage's stamps."""
        prefix = self._prefix
        out = [h for h in headers if not h[0].startswith(prefix)] if headers else []
        if header(out, TRACE_ID) is None:
            out.append((TRACE_ID, b"%032x" % (self._next_id & _ID_MASK)))
            self._next_id += 1
        out += self._stamps
        return out


_ID_MASK = (1 << 128) - 1


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


def dead_letter(stage: str, message: Message, error: BaseException, dlq_topic: str, max_bytes: int,
                minimal: bool = False) -> Output:
    """The DLQ record: the original key, bytes and headers, the reason and origin in more headers.

    It always fits in `max_bytes`: what does not fit is cut (the value first, then the original
    headers, then the key), marked `tl.dlq.truncated`, with the value's full size and sha256 so
    the original can be matched. `minimal` keeps only the reason (a dead letter that was itself
    refused once)."""
    why = dead_letter_headers(stage, error, topic=message.topic, partition=message.partition,
                              offset=message.offset, timestamp_ms=message.timestamp_ms)
    key, value, headers = message.key, message.value, list(message.headers) + why
    if not minimal and record_size(key, value, headers) <= max_bytes:
        return Output(dlq_topic, key, value, headers, origin=message)
    full = value or b""
    why += [("tl.dlq.truncated", b"1"), ("tl.dlq.original_bytes", str(len(full)).encode()),
            ("tl.dlq.sha256", hashlib.sha256(full).hexdigest().encode())]
    headers = [] if minimal else list(message.headers) + why
    if minimal or record_size(key, b"", headers) > max_bytes:
        headers = why + [("tl.dlq.headers_dropped", str(len(message.headers)).encode())]
    if minimal or record_size(key, b"", headers) > max_bytes:
        key = (key or b"")[:max(0, max_bytes - record_size(None, b"", headers)) // 2] or None
    room = max(0, max_bytes - record_size(key, b"", headers))
    return Output(dlq_topic, key, None if minimal else full[:room], headers, origin=message)


def _fatal_cause(error: BaseException) -> Fatal | None:
    """The Fatal behind `error`, raised as it is or wrapped (kafka-python wraps what a rebalance
    callback raises in a KafkaError); a fatal Kafka error as a Fatal; else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, Fatal):
            return seen
        if classify(seen) is Kind.FATAL:
            return Fatal(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__
    return None


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
    out_of_memory: bool = False  # a model call ran out of memory and was split: shrink batches


class Worker:
    """Runs one stage from a Source to a Sink until stopped."""

    def __init__(self, stage: Stage, source: Source, sink: Sink, *, output_topic: str, dlq_topic: str,
                 max_batch: int, max_delay_ms: int, commit_interval_ms: int = 0,
                 slow_batch_s: float = DEFAULT_SLOW_BATCH_S, max_message_bytes: int = 16 * 1024 * 1024,
                 dlq_max_ratio: float = DEFAULT_DLQ_MAX_RATIO, dlq_window: int = DEFAULT_DLQ_WINDOW,
                 restore: Callable[[str, set[int]], Iterable[ChangelogRecord]] | None = None, log: Any = None):
        self.stage, self.source, self.sink = stage, source, sink
        self.output_topic, self.dlq_topic = output_topic, dlq_topic
        self.max_message_bytes = max_message_bytes
        self.dlq_max_ratio = dlq_max_ratio
        self._recent: deque[int] = deque(maxlen=dlq_window)  # 1 per recent dead letter, 0 per good record
        self._pause_s = DLQ_PAUSE_S[0]
        self._paused_until: float | None = None
        self._failures = 0  # transient failures since the last commit
        self._in_callback = False  # inside a rebalance listener (kafka-python's poll calls it)
        # Records whose output the sink refused, by (topic, partition, offset): the number of
        # refusals. Read again, such a record goes straight to the DLQ (minimal after two).
        self._refused: dict[tuple[str, int, int], tuple[BaseException, int]] = {}
        # A stateful stage's store, and the partitions assigned but not yet restored (held).
        self.changelog_topic = getattr(stage, "changelog_topic", None)
        self.store: StateStore | None = None
        if self.changelog_topic:
            if restore is None:
                raise ValueError(f"stage {stage.name} keeps state in {self.changelog_topic}: the worker needs a reader")
            self.store = StateStore(stage.serialize_state, stage.deserialize_state)
            stage.state = self.store
        self._read_changelog = restore
        self.depth = 1 if self.store is not None else PIPELINE_DEPTH  # batches in flight at most
        self._restoring: set[tuple[str, int]] = set()
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
        every batch in flight first. Raises `Fatal` when the worker cannot go on.
        """
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if self._paused_until is not None:
                    self._hold()
                    idle_since = time.monotonic()
                    continue
                try:
                    busy = self._step()
                except Interrupted:
                    raise
                except Exception as e:  # the client's poll, or a commit inside a rebalance callback
                    cause = _fatal_cause(e)
                    if cause is not None:
                        raise cause from e
                    if classify(e) is not Kind.TRANSIENT:
                        raise
                    self._failed("poll", e)
                    continue
                if busy:
                    idle_since = time.monotonic()
                elif until_idle_s is not None and time.monotonic() - idle_since > until_idle_s:
                    break
            while self._flight:  # stopping: the batches in flight are finished, not dropped
                self._await(self._flight[0])
                if self._flight and not self._finish(self._flight.pop(0)):
                    break
            self._commit()
        except Interrupted:
            self._abort()
        except Fatal as e:
            self.log.error("worker stopped by a fatal error", error=str(e))
            self.stop_event.set()  # a model call retrying a transient error gives up too
            self._abort()
            raise
        finally:
            self._model_thread.shutdown(wait=True)
        return self.stats

    def _step(self) -> bool:
        """One turn of the loop; True when it started, finished or emitted anything."""
        if self._restoring:
            self._restore()
            return True
        self._collect()
        started = self._feed()
        finished = self._drain()
        if self._open_since is not None and (
                time.monotonic() - self._open_since >= self.commit_interval_s or self._caught_up()):
            self._commit()
        ticked = not self._flight and self._tick()
        if started or finished or ticked or self._flight:
            return True
        self._settle()
        return False

    def _caught_up(self) -> bool:
        """No batch in flight, and no full batch of input waiting (buffered, or at the source now):
        the open transaction has nothing to wait for. A backlog keeps it open until the commit
        interval, even when the model outpaces the fetches (a poll between two fetches comes back
        empty): committing at every such gap made a fast stage pay a transaction per ~4 batches."""
        if self._flight:
            return False
        if len(self._buffer) < self.batch_size:
            self._buffer.extend(self.source.poll(0, self.batch_size - len(self._buffer)))
        return len(self._buffer) < self.batch_size

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
        if not self._buffer or (self.store is not None and self._flight):
            return False  # a stateful stage's batches run one at a time: one owner of its state
        running = sum(not b.model.done() for b in self._flight)
        if running and (len(self._buffer) < self.batch_size or running >= self.depth):
            return False
        self._flight.append(self._start())
        return True

    def _drain(self) -> bool:
        """Produce, in order, the batches whose model is done; when the buffer is full and the
        model thread has PIPELINE_DEPTH batches, wait (polling) for the oldest first."""
        if len(self._buffer) >= self.batch_size and len(self._flight) >= self.depth:
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
        decode, check, refused_any = self.stage.decode, self.stage.check, self._refused
        for message in messages:
            refused = refused_any and refused_any.get((message.topic, message.partition, message.offset))
            if refused:  # its output was refused: it is a dead letter now
                batch.dead.append(self._dead(message, refused[0], minimal=refused[1] > 1))
                continue
            try:
                item = decode(message)
                check(item)
                items.append((message, item))
            except Exception as e:
                if classify(e) is not Kind.RECORD:
                    # not the record's fault (a schema registry unreachable): the batch's records go
                    # back to the buffer, which the retry's abort rewinds, so they are read again
                    self._buffer = messages + self._buffer
                    raise
                batch.dead.append(self._dead(message, e))
        batch.model = self._model_thread.submit(self._run_model, batch, items)
        return batch

    def _run_model(self, batch: "_Batch", items: list[tuple[Message, Any]]):
        started = time.monotonic()
        try:
            return self._call_retrying(batch, items)
        finally:
            batch.model_seconds = time.monotonic() - started

    def _await(self, batch: "_Batch") -> None:
        """Wait for the batch's model, polling (partitions paused) so the group keeps us."""
        assert batch.model is not None
        while not wait([batch.model], timeout=KEEPALIVE_INTERVAL_S).done:
            self.source.keepalive()
        self.source.resume()
        metrics.BATCH_SECONDS.labels(*self.labels).observe(time.monotonic() - batch.started)
        self._adapt(batch)

    def _finish(self, batch: "_Batch") -> bool:
        """Produce the batch's outputs and dead letters into the open transaction, its offsets
        to be committed with it. False when that failed (everything uncommitted is read again)."""
        assert batch.model is not None
        try:
            results, model_dead = batch.model.result()
        except Interrupted:
            self._abort([batch])
            return False
        outputs, dead = [], batch.dead + model_dead
        tracer = Tracer(self.stage.name, batch.received_ms)
        for message, element in results:
            try:
                outputs.extend(self._outputs(message, element, tracer))
            except Exception as e:  # an output that cannot be encoded or would be refused
                if classify(e) is not Kind.RECORD:
                    raise
                dead.append(self._dead(message, e))
        if self._too_many_dead(len(batch.messages), len(dead)):
            self._commit()  # the batches before it were fine
            self._abort([batch])
            self._pause(dead)
            return False
        return self._send(batch, outputs + self._changes(), dead, batch.positions)

    def _send(self, batch: "_Batch | None", outputs: list[Output], dead: list[Output],
              positions: dict[tuple[str, int], int]) -> bool:
        """Into the open transaction (begun if none): the outputs and dead letters, then the
        offsets to commit. False (and everything open aborted) on failure."""
        self._open.append((batch, outputs, dead))
        try:
            if self._open_since is None:
                self.sink.begin()
                self._open_since = time.monotonic()
            for out in outputs + dead:
                self.sink.send(out)
        except Exception as e:
            self._failed("send", e)
            return False
        self._open_positions.update(positions)
        return True

    def _commit(self) -> bool:
        """Commit the open transaction: its outputs and the offsets after its batches. On failure
        it is aborted and its batches are read again (`_failed`)."""
        if self._open_since is None:
            return True
        if self.source.evicted():
            self.log.warning("evicted from the group: the open transaction is aborted, not committed",
                             batches=len(self._open))
            self._abort()
            return False
        try:
            self.sink.commit(self._open_positions)
        except Exception as e:
            self._failed("commit", e)
            return False
        # Committed: nothing below may be taken for a failed commit.
        self._failures = 0
        if self.store is not None:
            self.store.commit()
        self.stage.committed()
        if self._refused:
            for batch, _, _ in self._open:
                for m in batch.messages if batch else ():
                    self._refused.pop((m.topic, m.partition, m.offset), None)
        for batch, outputs, dead in self._open:
            self.stats.records_out += len(outputs)
            self.stats.dead_letters += len(dead)
            if batch is not None:  # capacity is measured on committed work only (never an aborted batch's time)
                self.stats.records_in += len(batch.messages)
                self.stats.batch_seconds += batch.model_seconds
                self.stats.batches += 1
                self._observe(batch, outputs, dead)
        self._close_open()
        return True

    def _failed(self, step: str, error: BaseException) -> None:
        """A send, commit or poll failed: sort the error, abort the open transaction (its
        batches are read again), and remember a refused output's input as a dead letter (record),
        back off (transient) or raise `Fatal`."""
        if isinstance(error, OutputFailed) and error.output.origin is not None:
            m = error.output.origin
            key = (m.topic, m.partition, m.offset)
            self._refused[key] = (error.error, self._refused.get(key, (None, 0))[1] + 1)
            self.log.warning(f"{step}: an output was refused; its input goes to the dead-letter topic",
                             topic=m.topic, partition=m.partition, offset=m.offset,
                             error=type(error.error).__name__, reason=str(error.error)[:300])
            self._abort()
            return
        kind = classify(error)
        if kind is Kind.FATAL:
            raise Fatal(f"{step} failed: {type(error).__name__}: {error}") from error
        self._failures += 1
        self.log.warning(f"{step} failed; transaction aborted, its batches will be read again",
                         error=type(error).__name__, reason=str(error)[:300], batches=len(self._open),
                         attempt=self._failures)
        metrics.RETRIES.labels(*self.labels, type(error).__name__).inc()
        self._abort()
        self._backoff(self._failures)

    def _abort(self, extra: Sequence["_Batch"] = ()) -> None:
        """Abort the open transaction: batches in flight are dropped, the stage forgets what it
        did, and every record not committed (with `extra` batches) is read again."""
        if self._open_since is not None:
            try:
                self.sink.abort()
            except Exception:  # a fenced or closed producer: nothing of the transaction is visible anyway
                self.log.exception("abort failed")
        later, self._flight = self._flight, []
        if self.store is not None:
            # Blocking, not polling (this may run inside a rebalance callback): the state must not
            # be rolled back under a running model call. A stateless stage's dropped calls end alone.
            wait([b.model for b in later if b.model is not None])
        if self.store is not None:
            self.store.abort()
        self.stage.aborted()
        batches = [b for b, _, _ in self._open if b is not None] + list(extra) + later
        messages = [m for b in batches for m in b.messages] + self._buffer
        if messages:
            self.source.rewind(messages)
        self._buffer = []
        self._close_open()

    def _close_open(self) -> None:
        self._open_since, self._open, self._open_positions = None, [], {}

    def _backoff(self, attempt: int) -> None:
        """Wait before retrying (BACKOFF_S, doubling), polling with partitions paused so the group
        keeps this member."""
        if self._in_callback:  # no polls inside kafka-python's rebalance callback: retried after it
            return
        until = time.monotonic() + min(BACKOFF_S[0] * 2 ** (attempt - 1), BACKOFF_S[1])
        while time.monotonic() < until and not self.stop_event.is_set():
            self.source.keepalive()
        self.source.resume()

    # -- dead-letter pause -----------------------------------------------------------------
    def _too_many_dead(self, records: int, dead: int) -> bool:
        """Whether this batch's dead letters would push the recent ratio past dlq_max_ratio (the
        batch itself mostly dead letters). If not, the batch joins the window."""
        window = self._recent.maxlen or 0
        kept = sum(itertools.islice(reversed(self._recent), max(0, window - records)))
        if dead > self.dlq_max_ratio * records and kept + min(dead, window) > self.dlq_max_ratio * window:
            return True
        if dead <= self.dlq_max_ratio * records:
            self._pause_s = DLQ_PAUSE_S[0]
        self._recent.extend(itertools.repeat(1, dead))
        self._recent.extend(itertools.repeat(0, records - dead))
        return False

    def _pause(self, dead: list[Output]) -> None:
        reasons: dict[str, int] = {}
        for d in dead:
            r = (header(d.headers, "tl.dlq.reason") or b"").decode(errors="replace")
            reasons[r] = reasons.get(r, 0) + 1
        self.log.error("too many dead letters: input held; fix the cause (see reasons) or raise "
                       "stages.<stage>.dlq_max_ratio", window=self._recent.maxlen, max_ratio=self.dlq_max_ratio,
                       reasons=reasons, held_s=self._pause_s)
        self._paused_until = time.monotonic() + self._pause_s
        self._pause_s = min(2 * self._pause_s, DLQ_PAUSE_S[1])
        metrics.DLQ_PAUSED.labels(*self.labels).set(1)

    def _hold(self) -> None:
        """Paused: keep the membership (partitions paused) until the cool-down ends; then one
        batch is tried again."""
        assert self._paused_until is not None
        if time.monotonic() < self._paused_until:
            self.source.keepalive()
            return
        self._paused_until = None
        self.source.resume()
        metrics.DLQ_PAUSED.labels(*self.labels).set(0)
        self.log.info("dead-letter pause over: trying the input again")

    def _observe(self, batch: "_Batch", outputs: list[Output], dead: list[Output]) -> None:
        labels = self.labels
        metrics.RECORDS_IN.labels(*labels).inc(len(batch.messages))
        metrics.RECORDS_OUT.labels(*labels).inc(len(outputs))
        metrics.BATCH_SIZE.labels(*labels).observe(len(batch.messages))
        for d in dead:
            metrics.DEAD_LETTERS.labels(*labels, (header(d.headers, "tl.dlq.reason") or b"").decode()).inc()
        now, end_to_end = now_ms(), metrics.END_TO_END_SECONDS.labels(*labels)
        for out in outputs:
            ingest = header_ms(out.headers, INGEST_MS)
            if ingest is not None and ingest <= now:
                end_to_end.observe((now - ingest) / 1000)

    def _outputs(self, message: Message, element: Any, tracer: Tracer) -> list[Output]:
        """The outputs of one input, each encoded, traced and checked to fit: raises a record
        error (this input is a dead letter) when one cannot be built or is too large."""
        if element is None:
            return []
        stage = self.stage
        outputs = [replace(e, origin=message) if isinstance(e, Output) else
                   Output(self.output_topic, stage.key(e, message), stage.encode(e), tracer.headers(message.headers),
                          origin=message)
                   for e in (element if isinstance(element, list) else (element,))]
        for out in outputs:
            size = record_size(out.key, out.value, out.headers)
            if size > self.max_message_bytes:
                raise DeadLetter(f"output to {out.topic} would be {size} bytes, over max_message_bytes "
                                 f"{self.max_message_bytes}", reason="too_large")
        return outputs

    def _settle(self) -> None:
        """Idle: commit the positions past trailing transaction markers, so lag reads 0 at rest."""
        offsets = self.source.idle_positions()
        if offsets and self._send(None, [], [], offsets):
            self._commit()

    def _tick(self) -> bool:
        """Outputs a stage owes without new input, and state keys past their time-to-live,
        committed at once. Only called with no batch in flight, so it never runs beside `process`."""
        outputs = self.stage.tick()
        if self.store is not None:
            now = now_ms()
            for partition, key, value in self.store.expired(now):
                outputs += self.stage.expire(partition, key, value, now)
            outputs += self._changes()
        if outputs and self._send(None, outputs, [], {}):
            self._commit()
        return bool(outputs)

    def _changes(self) -> list[Output]:
        """The state store's writes since the last call, as changelog records."""
        if self.store is None:
            return []
        return [Output(self.changelog_topic, c.key, c.value, c.headers, c.partition) for c in self.store.flush()]

    def _restore(self) -> None:
        """Read the changelog of the partitions assigned since the last turn to the end, then let
        their records in (they were held since assignment). Runs in the main loop, never inside
        a rebalance callback: a long restore cannot cost the group membership."""
        partitions, self._restoring = self._restoring, set()
        started = time.monotonic()
        parts = {p for _, p in partitions}
        by_partition: dict[int, list[ChangelogRecord]] = {p: [] for p in parts}
        for rec in self._read_changelog(self.changelog_topic, parts):
            by_partition[rec.partition].append(rec)
        read = sum(self.store.restore(p, recs) for p, recs in by_partition.items())
        self.source.release(partitions)
        self.log.info("state restored from the changelog", partitions=sorted(parts), records=read,
                      keys=sum(self.store.count(p) for p in parts), seconds=round(time.monotonic() - started, 3))

    def _call_retrying(self, batch: "_Batch", items: list[tuple[Message, Any]]
                       ) -> tuple[list[tuple[Message, Any]], list[Output]]:
        """`_call`, retrying transient failures with backoff (never dead-lettering them); a batch
        that ran out of memory is split in halves. Runs on the model thread."""
        attempt = 0
        while True:
            try:
                return self._call(items)
            except Exception as e:
                if classify(e) is not Kind.TRANSIENT:
                    raise
                attempt += 1
                metrics.RETRIES.labels(*self.labels, type(e).__name__).inc()
                if out_of_memory(e) and len(items) > 1:
                    batch.out_of_memory = True
                    self.log.warning("model call out of memory: splitting the batch", records=len(items),
                                     error=type(e).__name__)
                    mid = len(items) // 2
                    left, right = self._call_retrying(batch, items[:mid]), self._call_retrying(batch, items[mid:])
                    return left[0] + right[0], left[1] + right[1]
                delay = min(BACKOFF_S[0] * 2 ** (attempt - 1), BACKOFF_S[1])
                self.log.warning("model call failed with a transient error: retrying the batch", records=len(items),
                                 error=type(e).__name__, reason=str(e)[:300], attempt=attempt, in_s=delay)
                if self.stop_event.wait(delay):
                    raise Interrupted("stopped while retrying a transient model failure") from e

    def _call(self, items: list[tuple[Message, Any]]) -> tuple[list[tuple[Message, Any]], list[Output]]:
        """The model on the batch; on a record error, bisect to isolate the records that make it
        raise (transient and fatal errors go up: they are not any one record's fault)."""
        if not items:
            return [], []
        savepoint = self.store.savepoint() if self.store is not None else 0
        try:
            with metrics.MODEL_SECONDS.labels(*self.labels).time():
                outputs = self.stage.process([item for _, item in items])
            if len(outputs) != len(items):
                raise Fatal(f"stage {self.stage.name} returned {len(outputs)} outputs for {len(items)} inputs")
            return list(zip([m for m, _ in items], outputs)), []
        except Exception as e:
            if self.store is not None:
                self.store.rollback(savepoint)  # the failed call's writes, and nothing before them
            if classify(e) is not Kind.RECORD:
                raise
            if len(items) == 1:
                return [], [self._dead(items[0][0], e)]
            mid = len(items) // 2
            left, right = self._call(items[:mid]), self._call(items[mid:])
            return left[0] + right[0], left[1] + right[1]

    def _dead(self, message: Message, error: BaseException, minimal: bool = False) -> Output:
        self.log.warning("record to dead-letter topic", topic=message.topic, partition=message.partition,
                         offset=message.offset, reason=reason(error), error=type(error).__name__,
                         message=str(error)[:300])
        return dead_letter(self.stage.name, message, error, self.dlq_topic, self.max_message_bytes, minimal)

    def _adapt(self, batch: "_Batch") -> None:
        seconds = batch.model_seconds
        if (seconds > self.slow_batch_s or batch.out_of_memory) and self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self.log.warning("slow or out-of-memory batch: batch size halved", seconds=round(seconds, 2),
                             batch_size=self.batch_size)
        elif seconds < GROW_FRACTION * self.slow_batch_s and self.batch_size < self.max_batch:
            self.batch_size = min(self.max_batch, self.batch_size + max(1, self.batch_size // 2))

    # -- rebalance -------------------------------------------------------------------------
    def _on_revoke(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions are leaving: finish the batches in flight and commit the open transaction
        first, drop buffered records of theirs."""
        self._in_callback = True
        try:
            if wait([b.model for b in self._flight], timeout=REVOKE_BUDGET_S).not_done:
                self.log.warning("partitions revoked during a batch slower than the revoke budget: aborted, "
                                 "its records are read again", partitions=sorted(partitions),
                                 budget_s=REVOKE_BUDGET_S)
                self._abort()
            else:
                if self._flight:
                    self.log.info("partitions revoked during a batch: finishing it first",
                                  partitions=sorted(partitions), batches=len(self._flight))
                while self._flight:
                    if not self._finish(self._flight.pop(0)):
                        break
                self._commit()
        finally:
            self._in_callback = False
        self._drop(partitions)

    def _on_lost(self, partitions: set[tuple[str, int]]) -> None:
        """Evicted (session expired): every partition is gone, so the batch in flight and the
        open transaction cannot commit; the transaction is aborted and the partitions' new owners
        read its records again."""
        self.log.warning("partitions lost: the group evicted this worker", partitions=sorted(partitions))
        wait([b.model for b in self._flight if b.model is not None])  # no stage hook beside a model call
        self._drop(partitions)
        if self._open_since is not None or self._flight or self._open:
            self._abort()
        self._refused.clear()

    def _drop(self, partitions: set[tuple[str, int]]) -> None:
        self._buffer = [m for m in self._buffer if (m.topic, m.partition) not in partitions]
        self._restoring -= partitions
        if self.store is not None:
            self.store.drop(p for _, p in partitions)
        self._refused = {k: v for k, v in self._refused.items() if (k[0], k[1]) not in partitions}
        self.stage.on_revoked(partitions)
        self.assigned -= partitions
        metrics.ASSIGNED_PARTITIONS.labels(*self.labels).set(len(self.assigned))

    def _on_assign(self, partitions: set[tuple[str, int]]) -> None:
        if self.store is not None:  # restored by the main loop before any of their records
            self.source.hold(partitions)
            self._restoring |= partitions
        self.stage.on_assigned(partitions)
        self.assigned |= partitions
        metrics.ASSIGNED_PARTITIONS.labels(*self.labels).set(len(self.assigned))
        self.log.info("partitions assigned", partitions=sorted(self.assigned))
