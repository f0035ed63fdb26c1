"""The runtime under faults, in memory: odd headers, outputs and dead letters at the size limit,
record / transient / fatal errors, evictions, refused outputs and the dead-letter pause."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kafka.errors import MessageSizeTooLargeError

from tensorline.engine import metrics
from tensorline.engine.errors import Fatal
from tensorline.engine.runtime import INGEST_MS, Message, Output, OutputFailed, Worker, header, record_size
from tensorline.engine.testing import MemorySink, MemorySource
from tensorline.schemas import decode_record
from tensorline.stages.testing import Scale

from tests.engine.test_runtime import PIPELINE, message


def run_worker(messages, *, stage=None, sink=None, **kw) -> tuple[Worker, MemorySink, Scale]:
    stage = stage or Scale(PIPELINE, PIPELINE.stages["scale"], None)
    sink = sink or MemorySink()
    w = Worker(stage, MemorySource(messages), sink, output_topic="mem.out", dlq_topic="mem.dlq",
               max_batch=kw.pop("max_batch", 4), max_delay_ms=0, **kw)
    w.run(until_idle_s=0)
    return w, sink, stage


def ids(outputs: list[Output]) -> list[str]:
    return [decode_record(o.value).record_id for o in outputs]


def with_headers(m: Message, *headers: tuple[str, bytes]) -> Message:
    return Message(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers) + list(headers), m.timestamp_ms)


@pytest.mark.parametrize("ingest", [b"1796072778892.297", b"abc", b"", b"nan", b"1e400", b"9" * 100])
def test_a_foreign_ingest_time_header_never_stops_a_stage(ingest):
    msgs = [with_headers(message(i), (INGEST_MS, ingest)) for i in range(3)]
    w, sink, _ = run_worker(msgs)
    assert ids(sink.topic("mem.out")) == ["r0", "r1", "r2"] and w.stats.records_in == 3


def test_unknown_headers_are_carried_on_untouched():
    msgs = [with_headers(message(0), ("x-null", b""), ("\ufffd\ufffd", b"odd key"), ("x-big", b"y" * 5000))]
    _, sink, _ = run_worker(msgs)
    [out] = sink.topic("mem.out")
    assert header(out.headers, "x-null") == b"" and header(out.headers, "\ufffd\ufffd") == b"odd key"


def test_an_output_over_the_size_limit_is_a_dead_letter_not_an_abort_loop():
    big = message(1, x=np.zeros(400, np.float32))  # its output, like its input, is ~1.7 kB
    msgs = [message(0), big, message(2)]
    # the input fits; its output, with this stage's trace headers added, does not
    limit = record_size(big.key, big.value, big.headers) + 10
    _, sink, _ = run_worker(msgs, max_message_bytes=limit)
    assert ids(sink.topic("mem.out")) == ["r0", "r2"]
    [dead] = sink.topic("mem.dlq")  # cut to fit with its reason headers
    assert header(dead.headers, "tl.dlq.reason") == b"too_large" and big.value.startswith(dead.value)
    assert record_size(dead.key, dead.value, dead.headers) <= limit
    assert sink.offsets == {("mem.in", 0): 3}


def test_a_dead_letter_always_fits_cut_with_its_size_and_sha256():
    limit = 4096
    bad = Message("mem.in", 0, 1, b"k", b"\x07" + b"z" * (limit - 100), [("h", b"v" * 50)], 0)
    _, sink, _ = run_worker([message(0), bad, message(2)], max_message_bytes=limit)
    [dead] = sink.topic("mem.dlq")
    assert record_size(dead.key, dead.value, dead.headers) <= limit
    assert header(dead.headers, "tl.dlq.truncated") == b"1"
    assert header(dead.headers, "tl.dlq.original_bytes") == str(len(bad.value)).encode()
    import hashlib
    assert header(dead.headers, "tl.dlq.sha256") == hashlib.sha256(bad.value).hexdigest().encode()
    assert bad.value.startswith(dead.value) and len(dead.value) > limit // 2
    assert header(dead.headers, "tl.dlq.reason") == b"UnknownMagicByte"
    assert ids(sink.topic("mem.out")) == ["r0", "r2"]


def test_a_dead_letter_whose_headers_alone_are_too_large_keeps_the_reason():
    limit = 4096
    bad = Message("mem.in", 0, 0, b"k" * 3000, b"\x07junk", [("h", b"v" * 5000)], 0)
    _, sink, _ = run_worker([bad], max_message_bytes=limit)
    [dead] = sink.topic("mem.dlq")
    assert record_size(dead.key, dead.value, dead.headers) <= limit
    assert header(dead.headers, "tl.dlq.headers_dropped") == b"1"
    assert header(dead.headers, "tl.dlq.reason") == b"UnknownMagicByte"


class Flaky(Scale):
    """Fails its first `failures` calls with `error`, then works."""

    def __init__(self, error: BaseException, failures: int = 2):
        super().__init__(PIPELINE, PIPELINE.stages["scale"], None)
        self.error, self.failures = error, failures

    def process(self, items):
        if self.failures:
            self.failures -= 1
            self.batch_sizes.append(len(items))
            raise self.error
        return super().process(items)


@pytest.mark.parametrize("error", [TimeoutError("device busy"), MemoryError()])
def test_a_transient_model_error_is_retried_never_dead_lettered(error):
    _, sink, stage = run_worker([message(i) for i in range(4)], stage=Flaky(error))
    assert ids(sink.topic("mem.out")) == ["r0", "r1", "r2", "r3"] and sink.topic("mem.dlq") == []


def test_a_model_out_of_memory_splits_the_batch_and_shrinks_the_next():
    w, sink, stage = run_worker([message(i) for i in range(8)], stage=Flaky(MemoryError(), failures=1), max_batch=4)
    assert stage.batch_sizes[:3] == [4, 2, 2]  # failed whole, then run in halves
    assert ids(sink.topic("mem.out")) == [f"r{i}" for i in range(8)] and sink.topic("mem.dlq") == []


def test_tensorflow_resource_exhausted_is_transient():
    tf = pytest.importorskip("tensorflow")
    _, sink, _ = run_worker([message(i) for i in range(2)],
                            stage=Flaky(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"), 1))
    assert ids(sink.topic("mem.out")) == ["r0", "r1"] and sink.topic("mem.dlq") == []


def test_a_fatal_model_error_stops_the_worker_and_dead_letters_nothing():
    stage = Flaky(Fatal("model file unreadable"), failures=99)
    with pytest.raises(Fatal, match="model file unreadable"):
        run_worker([message(i) for i in range(4)], stage=stage)


class RefusingSink(MemorySink):
    """Refuses, at commit, outputs of records whose id is in `refuse` (as a broker refuses a
    record too large for the topic); counts commits."""

    def __init__(self, refuse: set[str], dead_letters_too: bool = False):
        super().__init__()
        self.refuse, self.dead_letters_too, self.commits = refuse, dead_letters_too, 0

    def commit(self, offsets):
        for out in self._open:
            refused = (out.topic == "mem.out" and decode_record(out.value).record_id in self.refuse) or (
                self.dead_letters_too and out.topic == "mem.dlq" and out.value)
            if refused:
                raise OutputFailed(out, MessageSizeTooLargeError("over the topic's max.message.bytes"))
        self.commits += 1
        super().commit(offsets)


def test_a_refused_output_sends_its_input_to_the_dlq_once_and_the_rest_once():
    msgs = [message(i) for i in range(6)]
    _, sink, _ = run_worker(msgs, sink=RefusingSink({"r2"}))
    assert ids(sink.topic("mem.out")) == ["r0", "r1", "r3", "r4", "r5"]
    [dead] = sink.topic("mem.dlq")
    assert header(dead.headers, "tl.dlq.reason") == b"MessageSizeTooLargeError" and dead.value == msgs[2].value
    assert sink.offsets == {("mem.in", 0): 6}


def test_a_refused_dead_letter_is_sent_again_minimal():
    bad = Message("mem.in", 0, 1, b"k", b"\x07junk", [], 0)
    _, sink, _ = run_worker([message(0), bad, message(2)], sink=RefusingSink(set(), dead_letters_too=True))
    [dead] = sink.topic("mem.dlq")
    assert dead.value is None and header(dead.headers, "tl.dlq.original_bytes") == b"5"
    assert ids(sink.topic("mem.out")) == ["r0", "r2"]


class CountingSink(MemorySink):
    def __init__(self):
        super().__init__()
        self.commits = self.aborts = 0

    def commit(self, offsets):
        self.commits += 1
        super().commit(offsets)

    def abort(self):
        self.aborts += 1
        super().abort()


def test_an_evicted_worker_aborts_before_committing_and_its_records_are_read_again():
    sink = CountingSink()
    w = Worker(Scale(PIPELINE, PIPELINE.stages["scale"], None), MemorySource([message(i) for i in range(4)]), sink,
               output_topic="mem.out", dlq_topic="mem.dlq", max_batch=4, max_delay_ms=0)
    w.source.evicted_flag = True
    w._collect()
    batch = w._start()
    w._await(batch)
    assert w._finish(batch) and not w._commit()
    assert (sink.commits, sink.aborts, sink.committed) == (0, 1, [])
    w.source.evicted_flag = False  # rejoined: the records come again, once
    w.run(until_idle_s=0)
    assert ids(sink.topic("mem.out")) == ["r0", "r1", "r2", "r3"] and sink.commits == 1


def test_a_commit_refused_as_fenced_stops_the_worker():
    from kafka.errors import ProducerFencedError

    class Fenced(MemorySink):
        def commit(self, offsets):
            raise ProducerFencedError("a newer instance with this transactional id")

    with pytest.raises(Fatal, match="ProducerFencedError"):
        run_worker([message(0)], sink=Fenced())


def test_mostly_dead_letters_hold_the_input_instead_of_draining_it():
    bad = [Message("mem.in", 0, i, b"k", b"\x07junk", [], 0) for i in range(300)]
    stage = Scale(PIPELINE, PIPELINE.stages["scale"], None)
    sink = MemorySink()
    w = Worker(stage, MemorySource(bad), sink, output_topic="mem.out", dlq_topic="mem.dlq", max_batch=4,
               max_delay_ms=0, dlq_max_ratio=0.5, dlq_window=20)
    runner = threading.Thread(target=w.run)
    runner.start()
    deadline = time.monotonic() + 30
    while w._paused_until is None and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # poll of a condition
    paused = w._paused_until is not None
    w.stop()
    runner.join(30)
    assert paused and not runner.is_alive()
    assert 0 < len(sink.topic("mem.dlq")) <= 20  # a window's worth, not the whole stream
    assert sink.offsets[("mem.in", 0)] < 300
    assert metrics.DLQ_PAUSED.labels("scale", "")._value.get() == 1


def test_some_dead_letters_among_good_records_flow_on():
    msgs = [message(i) if i % 4 else Message("mem.in", 0, i, b"k", b"\x07junk", [], 0) for i in range(200)]
    w, sink, _ = run_worker(msgs, dlq_window=20)
    assert len(sink.topic("mem.dlq")) == 50 and len(sink.topic("mem.out")) == 150
    assert w._paused_until is None
