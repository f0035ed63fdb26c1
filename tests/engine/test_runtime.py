"""The worker runtime in memory: batching, DLQ with bisection, commits, trace headers, revokes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tensorline.config import parse
from tensorline.schemas import Record, decode_record, encode_record
from tensorline.engine.runtime import TRACE_ID, Message, Worker, header
from tensorline.engine.testing import MemorySink, MemorySource
from tensorline.stages.testing import Scale

PIPELINE = parse({
    "pipeline": {"name": "mem"},
    "topics": {"in": {}, "out": {}},
    "stages": {"scale": {"input": "in", "output": "out", "kind": "tensorline.stages.testing:Scale"}},
})


def message(i: int, *, partition: int = 0, poison: bool = False, x: np.ndarray | None = None) -> Message:
    record = Record(record_id=f"r{i}", source="test", ingest_ts_ms=1000 + i,
                    tensors={"x": np.full(3, i, np.float32) if x is None else x}, stage="producer",
                    attributes={"poison": "1"} if poison else {})
    return Message("mem.in", partition, i, f"k{i}".encode(), bytes(encode_record(record)),
                   [(TRACE_ID, f"trace{i}".encode())], 5000 + i)


def worker(messages, *, max_batch=4, sink=None, **kw) -> tuple[Worker, MemorySink, Scale]:
    stage = Scale(PIPELINE, PIPELINE.stages["scale"], None)
    sink = sink or MemorySink()
    w = Worker(stage, MemorySource(messages), sink, output_topic="mem.out", dlq_topic="mem.dlq",
               max_batch=max_batch, max_delay_ms=0, **kw)
    return w, sink, stage


def test_micro_batches_one_model_call_each_and_all_records_out():
    w, sink, stage = worker([message(i) for i in range(10)])
    stats = w.run(until_idle_s=0)
    assert stage.batch_sizes == [4, 4, 2]
    out = [decode_record(o.value) for o in sink.topic("mem.out")]
    assert [r.record_id for r in out] == [f"r{i}" for i in range(10)]
    assert all(np.array_equal(r.tensors["x"], np.full(3, 2 * i, np.float32)) for i, r in enumerate(out))
    assert sink.offsets == {("mem.in", 0): 10}
    assert (stats.records_in, stats.records_out, stats.dead_letters, stats.batches) == (10, 10, 0, 3)


def test_poison_record_goes_to_dlq_alone_and_the_batch_goes_on():
    msgs = [message(i, poison=(i == 5)) for i in range(8)]
    w, sink, stage = worker(msgs, max_batch=8)
    w.run(until_idle_s=0)
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(8) if i != 5]
    [dead] = sink.topic("mem.dlq")
    assert dead.value == msgs[5].value and dead.key == b"k5"  # original bytes untouched
    assert header(dead.headers, "tl.dlq.error") == b"ValueError"
    assert header(dead.headers, "tl.dlq.message") == b"poisoned record in batch"
    assert (header(dead.headers, "tl.dlq.topic"), header(dead.headers, "tl.dlq.offset")) == (b"mem.in", b"5")
    assert header(dead.headers, "tl.dlq.stage") == b"scale"
    assert stage.batch_sizes[0] == 8 and len(stage.batch_sizes) > 2  # bisected after the failure
    assert sink.offsets == {("mem.in", 0): 8}


@pytest.mark.parametrize("value, error", [
    (b"", b"EmptyMessage"),
    (b"\x07\x00\x00\x00\x01junk", b"UnknownMagicByte"),
    (b"\x00\x00\x00\x00\x01\xff\xff\xff", b"MalformedAvro"),
])
def test_undecodable_bytes_go_to_dlq_with_their_error_class(value, error):
    msgs = [message(0), Message("mem.in", 0, 1, b"bad", value, [], 0), message(2)]
    w, sink, _ = worker(msgs)
    w.run(until_idle_s=0)
    assert len(sink.topic("mem.out")) == 2
    [dead] = sink.topic("mem.dlq")
    assert dead.value == value and header(dead.headers, "tl.dlq.error") == error


def test_tensor_of_wrong_kind_fails_the_check_not_the_batch():
    msgs = [message(0), message(1, x=np.zeros((1, 1, 1, 1, 1), np.float32)), message(2)]
    w, sink, stage = worker(msgs)
    w.run(until_idle_s=0)
    [dead] = sink.topic("mem.dlq")
    assert header(dead.headers, "tl.dlq.error") == b"DeadLetter" and b"tensor 'x'" in header(dead.headers, "tl.dlq.message")
    assert stage.batch_sizes == [2]  # the model never saw the bad record


class FailOnceSink(MemorySink):
    def __init__(self):
        super().__init__()
        self.failures = 1

    def commit(self, offsets):
        if self.failures:
            self.failures -= 1
            raise TimeoutError("broker went away")
        super().commit(offsets)


def test_failed_commit_aborts_and_reads_the_batch_again_without_duplicates():
    w, sink, _ = worker([message(i) for i in range(6)], sink=FailOnceSink())
    w.run(until_idle_s=0)
    assert sorted(decode_record(o.value).record_id for o in sink.topic("mem.out")) == [f"r{i}" for i in range(6)]
    assert sink.offsets == {("mem.in", 0): 6}


def test_trace_headers_keep_the_trace_and_add_stage_times():
    w, sink, _ = worker([message(0)])
    w.run(until_idle_s=0)
    [out] = sink.topic("mem.out")
    assert header(out.headers, TRACE_ID) == b"trace0"
    received = int(header(out.headers, "tl.scale.received_ms"))
    produced = int(header(out.headers, "tl.scale.produced_ms"))
    assert 0 < received <= produced


def test_a_batch_shares_its_stage_times_and_gives_each_untraced_input_its_own_trace_id():
    msgs = [Message("mem.in", 0, i, b"k", m.value, [("tl.scale.received_ms", b"1"), ("other", b"o")], 0)
            for i, m in enumerate(message(i) for i in range(6))]
    w, sink, _ = worker(msgs, max_batch=3)
    w.run(until_idle_s=0)
    outs = sink.topic("mem.out")
    assert len(outs) == 6
    ids = [header(o.headers, TRACE_ID) for o in outs]
    assert len(set(ids)) == 6 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    for o in outs:  # an earlier pass of this stage is replaced, foreign headers kept, in order
        assert [k for k, _ in o.headers] == ["other", TRACE_ID, "tl.scale.received_ms", "tl.scale.produced_ms"]
    for batch in (outs[:3], outs[3:]):
        assert len({tuple(o.headers[2:]) for o in batch}) == 1


def test_tracer_keeps_a_trace_id_and_counts_new_ones_from_a_random_start():
    from tensorline.engine.runtime import Tracer, trace_headers

    tracer = Tracer("s", 10, 20)
    assert tracer.headers([(TRACE_ID, b"t"), ("tl.s.produced_ms", b"5")]) == [
        (TRACE_ID, b"t"), ("tl.s.received_ms", b"10"), ("tl.s.produced_ms", b"20")]
    first, second = (int(header(tracer.headers([]), TRACE_ID), 16) for _ in range(2))
    assert second == (first + 1) % 2**128
    other = int(header(Tracer("s", 10, 20).headers([]), TRACE_ID), 16)
    assert other not in (first, second)  # 2**-127 to fail by chance
    assert header(trace_headers("s", [], 10), "tl.s.received_ms") == b"10"


def test_slow_batches_halve_the_batch_size():
    w, _, stage = worker([message(i) for i in range(12)], max_batch=8, slow_batch_s=0.0)
    w.run(until_idle_s=0)
    assert stage.batch_sizes == [8, 4]
    assert w.batch_size == 2


def test_revoke_during_a_batch_commits_it_first_and_drops_buffered_records():
    msgs = [message(i, partition=i % 2) for i in range(4)]
    w, sink, _ = worker(msgs, max_batch=4)
    w._collect()
    w._flight.append(w._start())
    w._buffer = [message(9, partition=1)]  # polled meanwhile
    w._on_revoke({("mem.in", 1)})  # as the consumer calls it from inside a poll
    assert len(sink.topic("mem.out")) == 4 and w._flight == []  # finished, inside the revoke
    assert w._buffer == []  # the revoked partition's buffered record is left to its new owner
    assert sink.offsets == {("mem.in", 0): 3, ("mem.in", 1): 4}
    w.run(until_idle_s=0)
    assert len(sink.topic("mem.out")) == 4  # not twice


def test_pipelined_batches_commit_in_order():
    w, sink, stage = worker([message(i) for i in range(9)], max_batch=3)
    w.run(until_idle_s=0)
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(9)]
    assert stage.batch_sizes == [3, 3, 3] and sink.offsets == {("mem.in", 0): 9}


class CountingSink(MemorySink):
    """Counts commits and aborts, and notes when the first commit came."""

    def __init__(self):
        super().__init__()
        self.commits, self.aborts, self.first_commit_at = 0, 0, None

    def commit(self, offsets):
        self.commits += 1
        self.first_commit_at = self.first_commit_at or time.monotonic()
        super().commit(offsets)

    def abort(self):
        self.aborts += 1
        super().abort()


class Chained(Scale):
    """A model that finishes batch k only once batch k+1 has been handed to the model thread (or
    no record is left): the worker is always under load, whatever the machine's thread timing."""

    def __init__(self, *args):
        super().__init__(*args)
        self.started = 0  # batches the worker has handed over

    def attach(self, worker: Worker) -> None:
        self.worker, start = worker, worker._start

        def counting_start():
            self.started += 1
            return start()
        worker._start = counting_start

    def process(self, items):
        k, w = len(self.batch_sizes), self.worker
        deadline = time.monotonic() + 30
        while self.started <= k + 1 and not (w.source.next == len(w.source.messages) and not w._buffer):
            assert time.monotonic() < deadline, "the worker stopped handing over batches"
            time.sleep(0.001)  # poll of a condition, not a timing assumption
        return super().process(items)


# interval 0: a commit at every turn of the loop that finishes a batch (a turn may finish two).
@pytest.mark.parametrize("interval_ms, commits", [(0, range(3, 7)), (60_000, range(1, 2))])
def test_under_load_one_transaction_spans_the_batches_of_the_commit_interval(interval_ms, commits):
    stage = Chained(PIPELINE, PIPELINE.stages["scale"], None)
    sink = CountingSink()
    w = Worker(stage, MemorySource([message(i) for i in range(12)]), sink, output_topic="mem.out",
               dlq_topic="mem.dlq", max_batch=2, max_delay_ms=0, commit_interval_ms=interval_ms)
    stage.attach(w)
    stats = w.run(until_idle_s=0)
    assert stage.batch_sizes == [2] * 6 and sink.commits in commits
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(12)]
    assert sink.offsets == {("mem.in", 0): 12} and (stats.records_in, stats.batches) == (12, 6)


def test_a_worker_with_no_next_batch_commits_at_once_whatever_the_interval():
    w, sink, _ = worker([message(i) for i in range(3)], sink=CountingSink(), commit_interval_ms=60_000)
    started = time.monotonic()
    w.run(until_idle_s=2.0)
    assert sink.first_commit_at - started < 1.0  # long before the idle run ends, let alone the interval
    assert sink.commits == 1 and len(sink.topic("mem.out")) == 3


class Gappy(MemorySource):
    """Every other poll comes back empty, as a consumer's does between two fetches of a backlog."""

    def __init__(self, messages):
        super().__init__(messages)
        self.polls = 0

    def poll(self, timeout_s, max_records):
        self.polls += 1
        return [] if self.polls % 2 else super().poll(timeout_s, max_records)


def test_a_backlog_keeps_the_transaction_open_when_a_poll_between_fetches_comes_back_empty():
    """With a model faster than the fetches, a worker used to commit whenever no batch was in
    flight: at every empty poll between two fetches, a transaction per ~4 batches under a backlog
    (a third of the broker's CPU per record). A full batch waiting at the source keeps it open."""
    sink = CountingSink()
    w = Worker(Scale(PIPELINE, PIPELINE.stages["scale"], None), Gappy([message(i) for i in range(8)]), sink,
               output_topic="mem.out", dlq_topic="mem.dlq", max_batch=2, max_delay_ms=0, commit_interval_ms=60_000)
    w._collect()  # the first poll: nothing yet
    w._collect()  # the first batch
    w._flight.append(w._start())
    w._await(w._flight[0])
    assert w._finish(w._flight.pop(0))  # produced into the open transaction: nothing in flight now
    w._step()  # its poll comes back empty, as between two fetches; 6 records wait at the source
    assert sink.commits == 0 and len(w._buffer) == 2
    stats = w.run(until_idle_s=0)
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(8)]
    assert sink.offsets == {("mem.in", 0): 8} and stats.records_in == 8


def test_a_failed_commit_reads_every_batch_of_its_transaction_again():
    w, sink, _ = worker([message(i) for i in range(8)], max_batch=2, sink=FailOnceSink(), commit_interval_ms=60_000)
    stats = w.run(until_idle_s=0)
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(8)]
    assert sink.offsets == {("mem.in", 0): 8} and stats.records_in == 8


def test_lost_partitions_abort_the_open_transaction():
    w, sink, _ = worker([message(i) for i in range(4)], sink=CountingSink(), commit_interval_ms=60_000)
    w._collect()
    batch = w._start()
    w._await(batch)
    w._finish(batch)  # produced into the open transaction, not committed yet
    w._on_lost({("mem.in", 0)})
    assert sink.aborts == 1 and sink.commits == 0 and sink.committed == []
    w._commit()
    assert sink.commits == 0  # nothing left open to commit


def test_a_full_batch_waits_decoded_behind_the_running_one_up_to_the_pipeline_depth():
    w, sink, stage = worker([message(i) for i in range(6)], max_batch=2)
    stage.sleep_s = 0.3
    w._collect()
    assert w._feed() and len(w._flight) == 1
    w._collect()  # full at once: the source has records
    assert w._feed() and len(w._flight) == 2 and not w._flight[0].model.done()  # queued, not waiting
    w._collect()
    assert not w._feed() and len(w._buffer) == 2  # the model thread has two: this one waits
    assert w._drain() and len(w._flight) == 1  # waited for the oldest, produced it
    w.run(until_idle_s=0)
    assert [decode_record(o.value).record_id for o in sink.topic("mem.out")] == [f"r{i}" for i in range(6)]
