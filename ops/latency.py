"""End-to-end latency as a reader sees it: from ingest to the moment a read_committed consumer
receives the result.

A result is done when a reader can see it: after its stage sent it and committed the transaction
holding it. The trace's `tl.<stage>.produced_ms` is taken earlier, when the stage builds the
output, and `tl.<stage>.received_ms` is its batch's start (after the batching wait), so latency
from those headers alone ends too early. Here the end is this host's clock (`time.time()`) when
the poll that returned the record came back (`Follower`), and the start is `tl.ingest_ms`, set by
the producer when it read the file.

A result's trace splits the same interval into spans (`spans`), in the order of its headers:
before each stage (the previous stage's send and commit, the topic, this stage's poll and
batching wait), each stage's processing (its batch's start to the output built), and to visible
(the last stage's send and commit, and the reader's fetch). They add up to the end-to-end time.
Across hosts a span includes the difference of their clocks; one that would be negative reads 0
and the result is counted as skewed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import TopicPartition

from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.engine.runtime import INGEST_MS, Headers, header_ms

# The dashboard's latency covers the results that became visible in the last minute: long enough
# for a stable p99 at a few records/s, short enough that a stopped pipeline's numbers leave soon.
DEFAULT_WINDOW_S = 60.0
# At most this many of the newest results in the window: a p99 over 5,000 is stable, and memory
# stays bounded at any rate (a few hundred bytes each).
DEFAULT_MAX_RESULTS = 5000
RECEIVED, PRODUCED = ".received_ms", ".produced_ms"


@dataclass(frozen=True)
class Seen:
    """A record as a reader received it, and this host's time (epoch s) at the poll that returned it."""

    record: Any  # kafka.consumer.fetcher.ConsumerRecord
    visible_s: float

    @property
    def headers(self) -> Headers:
        return list(self.record.headers or [])


def end_to_end_ms(headers: Headers, visible_s: float) -> float | None:
    """Ingest (`tl.ingest_ms`) to `visible_s`, when a read_committed reader received the result, in
    ms; 0 when the ingest host's clock is ahead. None without an ingest time."""
    ingest = header_ms(headers, INGEST_MS)
    return None if ingest is None else max(0.0, visible_s * 1000 - ingest)


@dataclass(frozen=True)
class StageSpan:
    stage: str
    before_ms: float  # the previous stage's produced time (or ingest) to this stage's batch start
    processing_ms: float  # this stage's batch start to its output built (received -> produced)


@dataclass(frozen=True)
class Spans:
    """One result's end-to-end time and its spans along the trace (see the module docstring)."""

    end_to_end_ms: float
    stages: tuple[StageSpan, ...]
    to_visible_ms: float  # the last stage's produced time to visible
    skewed: bool  # a span read negative (clocks of two hosts apart) and was counted as 0


def stage_times(headers: Headers) -> list[tuple[str, int, int]]:
    """(stage, received ms, produced ms) of each stage in the trace, in header order (the order
    the stages ran); a stage missing either time is left out."""
    out = []
    for name, _ in headers:
        if name.startswith("tl.") and name.endswith(RECEIVED):
            stage = name[3:-len(RECEIVED)]
            received, produced = header_ms(headers, name), header_ms(headers, f"tl.{stage}{PRODUCED}")
            if received is not None and produced is not None and stage not in (s for s, _, _ in out):
                out.append((stage, received, produced))
    return out


def spans(headers: Headers, visible_s: float) -> Spans | None:
    """The spans of a result received at `visible_s`; None without an ingest time."""
    ingest = header_ms(headers, INGEST_MS)
    if ingest is None:
        return None
    visible_ms = visible_s * 1000
    raw, last = [], ingest
    for stage, received, produced in stage_times(headers):
        raw.append((stage, received - last, produced - received))
        last = produced
    to_visible = visible_ms - last
    skewed = to_visible < 0 or any(b < 0 or p < 0 for _, b, p in raw)
    return Spans(max(0.0, visible_ms - ingest), tuple(StageSpan(s, max(0.0, b), max(0.0, p)) for s, b, p in raw),
                 max(0.0, to_visible), skewed)


def percentiles(values_ms: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (linear interpolation, numpy's default), each None without values."""
    values = list(values_ms)
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 1), "p95_ms": round(float(p[1]), 1), "p99_ms": round(float(p[2]), 1)}


class Window:
    """The spans of the results that became visible in the last `window_s` (at most the newest
    `max_results`), by their visible time: older ones leave as time passes, so a stopped
    pipeline, or an earlier run, never shows as current."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_results: int = DEFAULT_MAX_RESULTS):
        self.window_s = window_s
        self._results: deque[tuple[float, Spans]] = deque(maxlen=max_results)

    def add(self, visible_s: float, result: Spans) -> None:
        self._results.append((visible_s, result))

    def summary(self, now_s: float) -> dict[str, Any]:
        """Results in the window ending at `now_s`: their count, end-to-end percentiles, how many
        were skewed, and the percentiles of each span (`stages`: before and processing per stage,
        in trace order, with how many results passed it; `to_visible`)."""
        while self._results and self._results[0][0] < now_s - self.window_s:
            self._results.popleft()
        results = [r for t, r in self._results if t <= now_s]
        by_stage: dict[str, list[StageSpan]] = {}
        for r in results:
            for s in r.stages:
                by_stage.setdefault(s.stage, []).append(s)
        return {"window_s": self.window_s, "results": len(results), **percentiles(r.end_to_end_ms for r in results),
                "skewed": sum(r.skewed for r in results),
                "stages": [{"stage": stage, "results": len(found),
                            "before": percentiles(s.before_ms for s in found),
                            "processing": percentiles(s.processing_ms for s in found)}
                           for stage, found in by_stage.items()],
                "to_visible": percentiles(r.to_visible_ms for r in results)}


class Follower:
    """Reads topics read_committed, with no consumer group, and stamps every record with this
    host's time when the poll returning it came back: when the result became visible (to within
    a poll, if the caller polls continuously).

    `from_end`: start at each partition's end (the last stable offset), so only results that
    become visible from now on are read; else at the beginning. Partitions that appear later
    (a topic created, or grown) are picked up on the next poll, likewise.
    """

    def __init__(self, cfg: PipelineConfig, topics: Iterable[str], *, from_end: bool):
        self.topics = list(topics)
        self.from_end = from_end
        self.consumer = clients.consumer(cfg, None, isolation_level="read_committed", enable_auto_commit=False)
        self._assigned: set[TopicPartition] = set()
        self.assign()

    def assign(self) -> bool:
        """Assign every partition of the topics known now, placing new ones at their start (and
        resolving that position now, so a record committed from here on is read); True once any
        partition is assigned."""
        found = {TopicPartition(t, p) for t in self.topics for p in self.consumer.partitions_for_topic(t) or ()}
        new = found - self._assigned
        if new:
            self.consumer.assign(sorted(found))
            (self.consumer.seek_to_end if self.from_end else self.consumer.seek_to_beginning)(*sorted(new))
            for tp in new:
                self.consumer.position(tp)
            self._assigned = found
        return bool(self._assigned)

    def poll(self, timeout_s: float) -> list[Seen]:
        """The records the next poll returns (waiting at most `timeout_s`), each with the time it came back."""
        if not self.assign():
            time.sleep(timeout_s)  # no topic yet: nothing to read
            return []
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        visible_s = time.time()
        return [Seen(r, visible_s) for tp in sorted(batches) for r in batches[tp]]

    def close(self) -> None:
        self.consumer.close()


class Collector:
    """A `Follower` polled on a thread of its own, keeping every record it receives, so the caller
    may block (measure lag, print progress) without delaying any record's visible time. `seen()`
    raises what stopped the thread, if anything did."""

    def __init__(self, cfg: PipelineConfig, topics: Iterable[str], *, from_end: bool, poll_s: float = 0.2):
        self._follower = Follower(cfg, topics, from_end=from_end)
        self._poll_s = poll_s
        self._seen: list[Seen] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                got = self._follower.poll(self._poll_s)
                with self._lock:
                    self._seen.extend(got)
        except Exception as e:  # handed to the caller by seen()
            self._error = e
        finally:
            self._follower.close()

    def seen(self) -> list[Seen]:
        if self._error is not None:
            raise self._error
        with self._lock:
            return list(self._seen)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """Follows the results of each (stage, topic) on a thread of its own, from their end when it
    starts (results of an earlier run are never counted), and keeps a `Window` per stage.
    `snapshot(now)` is what the dashboard shows; `add` is the thread's way in, and tests'."""

    def __init__(self, cfg: PipelineConfig, sinks: list[tuple[str, str]], *, window_s: float = DEFAULT_WINDOW_S,
                 retry_s: float = 2.0):
        self.cfg = cfg
        self.sinks = sinks
        self.retry_s = retry_s
        self.windows = {stage: Window(window_s) for stage, _ in sinks}
        self.watching_since: float | None = None  # set once the follower has its start positions
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, stage: str, seen: Seen) -> None:
        result = spans(seen.headers, seen.visible_s)
        if result is not None:
            with self._lock:
                self.windows[stage].add(seen.visible_s, result)

    def snapshot(self, now_s: float) -> list[dict[str, Any]]:
        with self._lock:
            return [{"stage": stage, "topic": topic, "watching_since": self.watching_since, "error": self.error,
                     **self.windows[stage].summary(now_s)} for stage, topic in self.sinks]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dashboard-results", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop following, waiting at most `timeout_s` for the thread (a poll ends within 0.5 s;
        creating a follower, within the client's timeouts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        stage_of = {topic: stage for stage, topic in self.sinks}
        follower = None
        while not self._stop.is_set():
            try:
                if follower is None:
                    follower = Follower(self.cfg, stage_of, from_end=True)
                    if follower.assign():
                        self.watching_since = time.time()
                elif self.watching_since is None and follower.assign():
                    self.watching_since = time.time()
                for seen in follower.poll(0.5):
                    self.add(stage_of[seen.record.topic], seen)
                self.error = None
            except Exception as e:  # the broker gone or a topic reset: start again from the end
                self.error = f"{type(e).__name__}: {e}"
                self.watching_since = None
                if follower is not None:
                    try:
                        follower.close()
                    except Exception:  # closing after a broker loss may fail; it is dropped anyway
                        pass
                    follower = None
                self._stop.wait(self.retry_s)
        if follower is not None:
            follower.close()
