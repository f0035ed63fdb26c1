"""The live ops dashboard: static pages (package data, `ops/static/`) and `/api/state`, served
by the standard library.

A sampler thread measures the pipeline every `interval_s`: each stage group's lag and state
(`lag.measure`: offsets and seconds, never negative, with clock skew reported; ok, stuck, down or
idle) kept as a bounded history, throughput from the change of the committed offsets, dead
letters by (stage, reason) read incrementally, and each group's members with their client id
(member, device) and assigned partitions (DescribeGroups), and whether each holds its input after
too many dead letters (`tensorline_dlq_paused`, read from the metrics endpoint in its slot file).
A stage keeping a changelog shows its open joins and the oldest one's age (`lag.measure`).
Latency comes from the pipeline's results as a read_committed reader receives them, followed
from their end on a thread of its own (`latency.Watch`): end to end (ingest to visible) and its
spans per stage, over the results that became visible in the last minute, so a stopped run's
numbers leave and an earlier run's never show. The page polls `/api/state` and draws it; a stage
DOWN (no member, input waiting) or HELD (a worker holding its input) is shown in red. When the
broker is unreachable the server keeps serving the last numbers with `"ok": false` and the
error; the next good sample clears it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from tensorline import logs
from tensorline.config import PipelineConfig
from tensorline.engine import clients, http
from tensorline.ops import lag, latency, signals
from tensorline.engine.runtime import header
from tensorline.engine.worker import STATE_DIR_ENV

# Half an hour of lag history: one shift's glance back; at 2 s that is 900 points per stage.
DEFAULT_HISTORY_S = 30 * 60
DEFAULT_INTERVAL_S = 2.0
# Stopping waits this long for a sample in flight: it ends within the clients' timeouts.
STOP_S = 30.0
# After Ctrl-C, only this long: a sample waiting on an unreachable broker (a client's
# connect-and-retry takes tens of seconds on a busy machine) must not hold the terminal; it
# reads and writes nothing that needs finishing.
CTRL_C_STOP_S = 2.0
# Throughput over ~10 s: micro-batches commit in steps, a window of a few samples smooths them.
THROUGHPUT_WINDOW_S = 10.0
# One sample reads dead letters for at most this long; a large DLQ is counted over a few samples.
DLQ_READ_BUDGET_S = 3.0
# The dashboard's clients give up on an unreachable broker after 5 s (kafka-python waits 30 s),
# so the page says so within a few seconds; requests on a live connection get 15 s.
CLIENT_SETTINGS = {"bootstrap_timeout_ms": 5000, "request_timeout_ms": 15000}
# A worker's /metrics answers in milliseconds on its host; one that does not within this is shown
# as unknown rather than holding up the sample.
METRICS_READ_S = 1.0
DLQ_PAUSED = "tensorline_dlq_paused"  # 1 while a worker holds its input (tensorline.engine.metrics)
# The page's files, package data of tensorline.ops (`ops/static/`): path -> (file, content type).
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}


def _log():
    """Bound at call time: a logger bound at import would miss the CLI's `logs.configure`."""
    return logs.get(stage="dashboard")


# -- pure parts ---------------------------------------------------------------------------------

def throughput(points: Iterable[tuple[float, int]], window_s: float = THROUGHPUT_WINDOW_S) -> float | None:
    """Records/s from (time, committed offsets summed over partitions) samples, oldest first: the
    change from the oldest sample within `window_s` of the newest (or the one just before it) to
    the newest. None with fewer than two samples; never negative (an offset reset reads as 0)."""
    points = list(points)
    if len(points) < 2:
        return None
    t1, c1 = points[-1]
    older = [p for p in points[:-1] if t1 - p[0] <= window_s] or [points[-2]]
    t0, c0 = older[0]
    return max(0, c1 - c0) / (t1 - t0) if t1 > t0 else None


def member_of(group: str, client_id: str) -> tuple[str, str | None]:
    """(member, device) from a worker's client id `<group>.<host>-<index>.<device>`; another
    client's id is its own member name, with no device."""
    if client_id.startswith(group + "."):
        member, _, device = client_id[len(group) + 1:].rpartition(".")
        if member and device:
            return member, device
    return client_id, None


def dlq_key(headers: list[tuple[str, bytes]]) -> tuple[str, str]:
    """(stage, reason) of a dead letter: `tl.dlq.reason` (a producer's bad file), else the error class."""
    def text(name: str) -> str:
        value = header(headers, name)
        return value.decode(errors="replace") if value else ""
    return text("tl.dlq.stage") or "?", text("tl.dlq.reason") or text("tl.dlq.error") or "?"


def sinks(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(stage, output topic) of the stages whose output no stage reads: the pipeline's results
    (the fusion stage's in the demo), whose latency the dashboard shows."""
    inputs = {s.input for s in cfg.stages.values()}
    return [(name, cfg.topic(s.output).name) for name, s in cfg.stages.items() if s.output not in inputs]


def dlq_paused(exposition: str) -> bool:
    """Whether a worker's Prometheus text says it holds its input (`tensorline_dlq_paused` 1)."""
    return any(sample.name == DLQ_PAUSED and sample.value >= 1
               for family in text_string_to_metric_families(exposition) for sample in family.samples)


def held(endpoint: str | None, timeout_s: float = METRICS_READ_S) -> bool | None:
    """Whether the worker serving metrics at `endpoint` (host:port) holds its input; None when it
    serves none or does not answer in `timeout_s`."""
    if not endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    request = urllib.request.Request(url, headers=http.authorization(http.token()))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:  # noqa: S310 (a local slot's http address)
            return dlq_paused(r.read().decode())
    except (OSError, ValueError):  # gone, refused, slow, or not Prometheus text
        return None


def slot_files(state_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, member) -> the worker's slot file (metrics endpoint, pid), for live and stale slots
    alike: only those of current group members are shown."""
    found = {}
    for path in sorted((state_dir / "workers").glob("*.lock")):
        try:
            slot = json.loads(path.read_text() or "null")
            found[(slot["group"], slot["member"])] = slot
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# -- reading the broker -------------------------------------------------------------------------

def _read_range(cfg: PipelineConfig, consumer, topic: str, starts: dict[TopicPartition, int],
                ends: dict[TopicPartition, int], budget_s: float) -> tuple[list, dict[TopicPartition, int]]:
    """Records in [start, end) of each partition of `topic`, read for at most `budget_s`; and where
    each partition's next read starts (its end once read, else where reading stopped)."""
    records = []
    try:
        for rec in clients.read_range(cfg, topic, partitions=[tp.partition for tp in starts],
                                      start={tp.partition: o for tp, o in starts.items()},
                                      end={tp.partition: ends[tp] for tp in starts}, timeout_s=budget_s,
                                      client=consumer):
            records.append(rec)
    except clients.ReadTimeout as stopped:
        return records, {tp: stopped.positions[tp.partition] for tp in starts}
    return records, {tp: max(starts[tp], ends[tp]) for tp in starts}


@dataclass
class _Tally:
    """Dead letters counted so far and where reading goes on."""

    counts: Counter = field(default_factory=Counter)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    complete: bool = True


class BrokerProbe:
    """The sampler's own reads beside `lag.measure`: workers (and their metrics) and dead letters.

    Its admin client and consumer live across samples and are rebuilt after an error; what it has
    counted (DLQ positions and counts) survives the rebuild.
    """

    def __init__(self, cfg: PipelineConfig, state_dir: Path | None = None):
        self.cfg = cfg
        self.state_dir = state_dir or Path(os.environ.get(STATE_DIR_ENV, ".tensorline"))
        self.dlq = _Tally()
        self._admin = self._consumer = None

    def _clients(self):
        if self._admin is None:
            self._admin = clients.admin(self.cfg)
        if self._consumer is None:
            self._consumer = clients.consumer(self.cfg, None, enable_auto_commit=False)
        return self._admin, self._consumer

    def close(self) -> None:
        for client in (self._consumer, self._admin):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing after a broker loss may fail; the client is dropped anyway
                    pass
        self._admin = self._consumer = None

    def sample(self, groups: list[tuple[str, str, str]]) -> dict[str, Any]:
        admin, consumer = self._clients()
        return {"groups": self._groups(admin, groups), "dlq": self._dead_letters(consumer)}

    def _groups(self, admin, groups: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
        """group -> its state and members: client id, member, device, input partitions, metrics
        endpoint, and whether it holds its input (`held`: None when its metrics cannot be read)."""
        described = admin.describe_groups([g for _, g, _ in groups])
        slots = slot_files(self.state_dir)
        out = {}
        for _, group, topic in groups:
            d = described.get(group) or {}
            workers = []
            for m in d.get("members") or []:
                member, device = member_of(group, m.get("client_id") or "")
                assignment = m.get("member_assignment")
                owned = assignment.get("assigned_partitions", []) if isinstance(assignment, dict) else []
                slot = slots.get((group, member), {})
                workers.append({"member": member, "device": device, "client_id": m.get("client_id"),
                                "host": (m.get("client_host") or "").lstrip("/"),
                                "partitions": sorted(p for a in owned if a.get("topic") == topic
                                                     for p in a.get("partitions", [])),
                                "metrics": slot.get("metrics"), "pid": slot.get("pid"),
                                "held": held(slot.get("metrics"))})
            out[group] = {"group_state": d.get("group_state"), "workers": sorted(workers, key=lambda w: w["member"])}
        return out

    def _partitions(self, consumer, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]

    def _dead_letters(self, consumer) -> dict[str, Any]:
        """Dead letters by (stage, reason), counting only what arrived since the last sample."""
        topic = self.cfg.topic(self.cfg.dlq).name
        tally = self.dlq
        tps = self._partitions(consumer, topic)
        if tps:
            ends, begins = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
            if any(tally.positions.get(tp, 0) > ends[tp] for tp in tps):  # the topic was recreated
                tally.counts.clear()
                tally.positions = {}
            starts = {tp: max(tally.positions.get(tp, 0), begins[tp]) for tp in tps}
            records, tally.positions = _read_range(self.cfg, consumer, topic, starts, ends, DLQ_READ_BUDGET_S)
            tally.counts.update(dlq_key(list(r.headers or [])) for r in records)
            tally.complete = all(tally.positions[tp] >= ends[tp] for tp in tps)
        return {"topic": topic, "total": sum(tally.counts.values()), "complete": tally.complete,
                "counts": [{"stage": s, "reason": r, "count": n} for (s, r), n in sorted(tally.counts.items())]}


# -- the sampler --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Point:
    """One sample in the history: per stage its lag, committed offsets and throughput; per sink
    stage its end-to-end p50 and p99 over the latency window then."""

    t: float
    lag: dict[str, int]
    committed: dict[str, int]
    throughput: dict[str, float | None] = field(default_factory=dict)
    latency: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


class Sampler:
    """Samples the pipeline every `interval_s` on its own thread; `state()` is the latest snapshot.

    `measure`, `probe` and `latency` default to the broker (`lag.measure`, `BrokerProbe`, a
    `latency.Watch` of the sink stages' results); tests pass canned ones.
    """

    def __init__(self, cfg: PipelineConfig, *, interval_s: float = DEFAULT_INTERVAL_S,
                 history_s: float = DEFAULT_HISTORY_S, measure: Callable[[], list[lag.GroupLag]] | None = None,
                 probe: Any = None, latency_watch: latency.Watch | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = replace(cfg, kafka={**CLIENT_SETTINGS, **cfg.kafka})
        self.interval_s = interval_s
        self.history: deque[_Point] = deque(maxlen=max(2, math.ceil(history_s / interval_s)))
        lag_history = lag.History(None)  # in memory: stuck needs one earlier observation
        self._measure = measure or (lambda: lag.measure(self.cfg, history=lag_history))
        self.probe = probe if probe is not None else BrokerProbe(self.cfg)
        self.latency = latency_watch if latency_watch is not None else latency.Watch(self.cfg, sinks(self.cfg))
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"ok": None, "error": None, "down_since": None, "checked_at": None,
                                       "measured_at": None, "pipeline": cfg.name, "interval_s": interval_s,
                                       "stages": [], "history": {"t": [], "lag": {}, "throughput": {}, "latency": {}},
                                       "latency": [],
                                       "dlq": {"topic": cfg.topic(cfg.dlq).name, "total": 0, "complete": False,
                                               "counts": []}}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def sample(self) -> dict[str, Any]:
        """Measure once and publish the new state; on any failure keep the last numbers, `ok` false."""
        now = self.clock()
        try:
            lags = self._measure()
            extra = self.probe.sample(lag.groups(self.cfg))
        except Exception as e:  # the broker gone, a timeout, an auth failure: shown, never fatal
            self.probe.close()
            error = f"{type(e).__name__}: {e}"
            with self._lock:
                previous = self._state
                if previous["ok"] is not False:
                    _log().warning("broker unreachable", error=error)
                self._state = {**previous, "ok": False, "error": error, "checked_at": now,
                               "down_since": previous["down_since"] or now}
                return self._state
        results = self.latency.snapshot(now)
        committed = {g.stage: sum(p.committed or 0 for p in g.partitions) for g in lags}
        rates = {}
        for g in lags:
            points = [(p.t, p.committed[g.stage]) for p in self.history if g.stage in p.committed]
            rate = throughput([*points, (now, committed[g.stage])])
            rates[g.stage] = None if rate is None else round(rate, 2)
        self.history.append(_Point(now, {g.stage: g.total for g in lags}, committed, rates,
                                   {r["stage"]: (r["p50_ms"], r["p99_ms"]) for r in results}))
        stages = []
        for g in lags:
            members = extra["groups"].get(g.group, {})
            workers = members.get("workers", [])
            stages.append({**g.to_dict(), "throughput": rates[g.stage],
                           "group_state": members.get("group_state"), "workers": workers,
                           "held": any(w.get("held") for w in workers)})
        state = {"ok": True, "error": None, "down_since": None, "checked_at": now, "measured_at": now,
                 "pipeline": self.cfg.name, "interval_s": self.interval_s, "stages": stages,
                 "history": self._history([g.stage for g in lags], [r["stage"] for r in results]),
                 "latency": results, "dlq": extra["dlq"]}
        with self._lock:
            if self._state["ok"] is False:
                _log().info("broker reachable again", down_since=self._state["down_since"])
            self._state = state
        return state

    def _history(self, stages: list[str], sink_stages: list[str]) -> dict[str, Any]:
        """The history as the page's charts take it: times, and per stage a series (None where a
        sample did not have it)."""
        points = self.history
        return {"t": [round(p.t, 1) for p in points],
                "lag": {s: [p.lag.get(s) for p in points] for s in stages},
                "throughput": {s: [p.throughput.get(s) for p in points] for s in stages},
                "latency": {s: {"p50_ms": [p.latency.get(s, (None, None))[0] for p in points],
                                "p99_ms": [p.latency.get(s, (None, None))[1] for p in points]} for s in sink_stages}}

    def start(self) -> None:
        self._stop.clear()
        self.latency.start()
        self._thread = threading.Thread(target=self._run, name="dashboard-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self, timeout_s: float = STOP_S) -> None:
        """Stop sampling, waiting at most `timeout_s` for a sample in flight (then left to its
        daemon thread, its clients closed with the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.latency.stop(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self.probe.close()


# -- the web server -----------------------------------------------------------------------------

def static_files() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, body) of the page's files, read once from package data."""
    folder = resources.files("tensorline.ops") / "static"
    return {path: (content_type, (folder / name).read_bytes()) for path, (name, content_type) in STATIC.items()}


class _Handler(http.Handler):
    sampler: Sampler  # set on the subclass each Dashboard makes
    files: dict[str, tuple[str, bytes]]  # likewise: `static_files()`

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            self._send(200, "application/json", json.dumps(self.sampler.state()).encode())
        elif path in self.files:
            self._send(200, *self.files[path])
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)


class Dashboard:
    """The sampler and the web server, each on its own thread: `start()`, `url`, `stop()`."""

    def __init__(self, cfg: PipelineConfig, *, host: str = "127.0.0.1", port: int = 0,
                 interval_s: float = DEFAULT_INTERVAL_S, sampler: Sampler | None = None):
        self.sampler = sampler or Sampler(cfg, interval_s=interval_s)
        self.http = http.Server(_Handler, host=host, port=port, name="dashboard", log=_log(),
                                sampler=self.sampler, files=static_files())

    @property
    def url(self) -> str:
        return self.http.url + "/"

    def start(self) -> "Dashboard":
        self.sampler.start()
        self.http.start()
        return self

    def stop(self, timeout_s: float = STOP_S) -> None:
        self.http.stop()
        self.sampler.stop(timeout_s)

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(cfg: PipelineConfig, host: str = "127.0.0.1", port: int = 8050,
          interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Serve the dashboard until SIGINT (Ctrl-C) or SIGTERM (port 0: a free port; the URL is logged)."""
    # kafka-python logs every failed reconnect, every 2 s while the broker is down; the dashboard
    # says so itself (on the page, and one warning per outage).
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    dashboard = Dashboard(cfg, host=host, port=port, interval_s=interval_s).start()
    log = _log()
    log.info("dashboard serving", url=dashboard.url, pipeline=cfg.name)
    try:
        signals.wait_for_stop()
    finally:
        dashboard.stop(CTRL_C_STOP_S)
