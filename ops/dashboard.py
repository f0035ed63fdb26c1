"""The live ops dashboard: one page and `/api/state`, served by the standard library.

A sampler thread measures the pipeline every `interval_s`: each stage group's lag and state
(`lag.measure`: offsets and seconds; ok, stuck, down or idle) kept as a bounded history,
throughput from the change of the committed offsets, end-to-end latency from the trace headers
of the newest results (only the tail of each results partition is read), dead letters by (stage,
reason) read incrementally, and each group's members with their client id (member, device) and
assigned partitions (DescribeGroups), and whether each holds its input after too many dead
letters (`tensorline_dlq_paused`, read from the metrics endpoint in its slot file). A stage
keeping a changelog shows its open joins and the oldest one's age (`lag.measure`). The page polls
`/api/state` and draws it; a stage DOWN (no member, input waiting) or HELD (a worker holding its
input) is shown in red. When the broker is unreachable the server keeps serving the last numbers
with `"ok": false` and the error; the next good sample clears it.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from tensorline import logs
from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.ops import lag
from tensorline.engine.runtime import INGEST_MS, header
from tensorline.engine.worker import STATE_DIR_ENV

# Half an hour of lag history: one shift's glance back; at 2 s that is 900 points per stage.
DEFAULT_HISTORY_S = 30 * 60
DEFAULT_INTERVAL_S = 2.0
# Throughput over ~10 s: micro-batches commit in steps, a window of a few samples smooths them.
THROUGHPUT_WINDOW_S = 10.0
# Latency percentiles over the newest results: a few hundred give a stable p99.
LATENCY_SAMPLES = 300
# One sample reads dead letters for at most this long; a large DLQ is counted over a few samples.
DLQ_READ_BUDGET_S = 3.0
TAIL_READ_BUDGET_S = 3.0
# The dashboard's clients give up on an unreachable broker after 5 s (kafka-python waits 30 s),
# so the page says so within a few seconds; requests on a live connection get 15 s.
CLIENT_SETTINGS = {"bootstrap_timeout_ms": 5000, "request_timeout_ms": 15000}
# A worker's /metrics answers in milliseconds on its host; one that does not within this is shown
# as unknown rather than holding up the sample.
METRICS_READ_S = 1.0
DLQ_PAUSED = "tensorline_dlq_paused"  # 1 while a worker holds its input (tensorline.engine.metrics)



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


def percentiles(values_ms: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation, as numpy and `tensorline demo` compute them)."""
    values = list(values_ms)
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 1), "p95_ms": round(float(p[1]), 1), "p99_ms": round(float(p[2]), 1)}


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


def latency_ms(headers: list[tuple[str, bytes]], stage: str) -> float | None:
    """Ingest to `stage`'s output, from the record's trace headers (None if either is missing)."""
    ingest, produced = header(headers, INGEST_MS), header(headers, f"tl.{stage}.produced_ms")
    try:
        return float(int(produced) - int(ingest)) if ingest and produced else None
    except ValueError:
        return None


def sinks(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(stage, output topic) of the stages whose output no stage reads: the pipeline's results
    (the fusion stage's in the demo). Their records carry `tl.<stage>.produced_ms`."""
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
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (a local slot's http address)
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
class _Tail:
    """The newest results of one sink stage: their latencies and where reading goes on."""

    stage: str
    topic: str
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    positions: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass
class _Tally:
    """Dead letters counted so far and where reading goes on."""

    counts: Counter = field(default_factory=Counter)
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    complete: bool = True


class BrokerProbe:
    """The sampler's own reads beside `lag.measure`: workers (and their metrics), latency tails,
    dead letters.

    Its admin client and consumer live across samples and are rebuilt after an error; what it has
    counted (DLQ positions and counts, latency tails) survives the rebuild.
    """

    def __init__(self, cfg: PipelineConfig, state_dir: Path | None = None):
        self.cfg = cfg
        self.state_dir = state_dir or Path(os.environ.get(STATE_DIR_ENV, ".tensorline"))
        self.tails = [_Tail(stage, topic) for stage, topic in sinks(cfg)]
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
        return {"groups": self._groups(admin, groups), "latency": [self._latency(consumer, t) for t in self.tails],
                "dlq": self._dead_letters(consumer)}

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

    def _latency(self, consumer, tail: _Tail) -> dict[str, Any]:
        """Latency percentiles over the newest results; reads at most the last LATENCY_SAMPLES of
        each partition, then only what came since."""
        tps = self._partitions(consumer, tail.topic)
        if tps:
            ends, begins = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
            keep = math.ceil(LATENCY_SAMPLES / len(tps))
            starts = {}
            for tp in tps:
                pos = tail.positions.get(tp, 0)
                if pos > ends[tp]:  # the topic was recreated
                    pos = 0
                starts[tp] = max(pos, ends[tp] - keep, begins[tp])
            records, tail.positions = _read_range(self.cfg, consumer, tail.topic, starts, ends, TAIL_READ_BUDGET_S)
            for rec in sorted(records, key=lambda r: r.timestamp):
                ms = latency_ms(list(rec.headers or []), tail.stage)
                if ms is not None:
                    tail.latencies.append(ms)
        return {"stage": tail.stage, "topic": tail.topic, "samples": len(tail.latencies),
                **percentiles(tail.latencies)}

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

class Sampler:
    """Samples the pipeline every `interval_s` on its own thread; `state()` is the latest snapshot.

    `measure` and `probe` default to the broker (`lag.measure`, `BrokerProbe`); tests pass canned ones.
    """

    def __init__(self, cfg: PipelineConfig, *, interval_s: float = DEFAULT_INTERVAL_S,
                 history_s: float = DEFAULT_HISTORY_S, measure: Callable[[], list[lag.GroupLag]] | None = None,
                 probe: Any = None, clock: Callable[[], float] = time.time):
        self.cfg = replace(cfg, kafka={**CLIENT_SETTINGS, **cfg.kafka})
        self.interval_s = interval_s
        self.history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(
            maxlen=max(2, math.ceil(history_s / interval_s)))
        lag_history = lag.History(None)  # in memory: stuck needs one earlier observation
        self._measure = measure or (lambda: lag.measure(self.cfg, history=lag_history))
        self.probe = probe if probe is not None else BrokerProbe(self.cfg)
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"ok": None, "error": None, "down_since": None, "checked_at": None,
                                       "measured_at": None, "pipeline": cfg.name, "interval_s": interval_s,
                                       "stages": [], "history": {"t": [], "lag": {}}, "latency": [],
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
        self.history.append((now, {g.stage: (g.total, sum(p.committed or 0 for p in g.partitions)) for g in lags}))
        stages = []
        for g in lags:
            members = extra["groups"].get(g.group, {})
            points = [(t, s[g.stage][1]) for t, s in self.history if g.stage in s]
            rate = throughput(points)
            workers = members.get("workers", [])
            stages.append({**g.to_dict(), "throughput": None if rate is None else round(rate, 2),
                           "group_state": members.get("group_state"), "workers": workers,
                           "held": any(w.get("held") for w in workers)})
        history = {"t": [round(t, 1) for t, _ in self.history],
                   "lag": {g.stage: [s[g.stage][0] if g.stage in s else None for _, s in self.history] for g in lags}}
        state = {"ok": True, "error": None, "down_since": None, "checked_at": now, "measured_at": now,
                 "pipeline": self.cfg.name, "interval_s": self.interval_s, "stages": stages, "history": history,
                 "latency": extra["latency"], "dlq": extra["dlq"]}
        with self._lock:
            if self._state["ok"] is False:
                _log().info("broker reachable again", down_since=self._state["down_since"])
            self._state = state
        return state

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dashboard-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a sample in flight ends within the clients' timeouts
        self.probe.close()


# -- the web server -----------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    sampler: Sampler  # set on the subclass each Dashboard makes

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            self._send(200, "application/json", json.dumps(self.sampler.state()).encode())
        elif path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _log().debug("http", client=self.client_address[0], request=format % args)


class Dashboard:
    """The sampler and the web server, each on its own thread: `start()`, `url`, `stop()`."""

    def __init__(self, cfg: PipelineConfig, *, host: str = "127.0.0.1", port: int = 0,
                 interval_s: float = DEFAULT_INTERVAL_S, sampler: Sampler | None = None):
        self.sampler = sampler or Sampler(cfg, interval_s=interval_s)
        handler = type("Handler", (_Handler,), {"sampler": self.sampler})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> "Dashboard":
        self.sampler.start()
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.sampler.stop()

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(cfg: PipelineConfig, host: str = "127.0.0.1", port: int = 8050,
          interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Serve the dashboard until Ctrl-C (port 0: a free port; the URL is logged)."""
    # kafka-python logs every failed reconnect, every 2 s while the broker is down; the dashboard
    # says so itself (on the page, and one warning per outage).
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    dashboard = Dashboard(cfg, host=host, port=port, interval_s=interval_s).start()
    log = _log()
    log.info("dashboard serving", url=dashboard.url, pipeline=cfg.name)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("dashboard reachable beyond this host; it has no authentication", host=host)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tensorline dashboard</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem 2rem; color: #1d2530; background: #f7f8fa; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem; } h2 { font-size: 1.05rem; margin: 0 0 .4rem; }
.meta { color: #5b6675; font-size: .85rem; }
#banner { display: none; padding: .6rem 1rem; margin: .6rem 0; border-radius: 4px; font-weight: 600; }
#banner.down { display: block; background: #fde2e1; color: #8a1c17; border: 1px solid #e5a3a0; }
#banner.wait { display: block; background: #eef1f5; color: #3c4654; border: 1px solid #cfd6df; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 6px; padding: .8rem 1rem; margin: .8rem 0; }
.stale section { opacity: .55; }
table { border-collapse: collapse; margin: .3rem 1.5rem .3rem 0; display: inline-table; vertical-align: top; }
th, td { padding: .15rem .6rem; text-align: right; border-bottom: 1px solid #eef0f3; }
th { color: #5b6675; font-weight: 500; } td.l, th.l { text-align: left; }
.stuck, .held, .state-down, .state-stuck { color: #b3261e; font-weight: 700; }
svg.spark { vertical-align: middle; background: #f2f5f9; border-radius: 3px; }
svg.spark polyline { fill: none; stroke: #2b6cb0; stroke-width: 1.5; }
</style>
</head>
<body>
<h1>tensorline <span id="pipeline" data-field="pipeline"></span></h1>
<div class="meta">measured <span id="measured" data-field="measured_at">-</span>; refreshes every 2 s</div>
<div id="banner" data-field="banner"></div>
<div id="stages"></div>
<section><h2>End-to-end latency</h2><div id="latency"></div></section>
<section><h2>Dead letters</h2><div id="dlq"></div></section>
<script>
"use strict";
const esc = v => String(v ?? "-").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
const hms = t => t ? new Date(t * 1000).toTimeString().slice(0, 8) : "-";
const num = (v, d) => v === null || v === undefined ? "-" : Number(v).toFixed(d);
const cell = (attrs, value, cls) => "<td" + Object.entries(attrs).map(([k, v]) => ` data-${k}="${esc(v)}"`).join("")
  + (cls ? ` class="${cls}"` : "") + ">" + esc(value) + "</td>";

function sparkline(stage, values) {
  const w = 260, h = 44, pts = values.map((v, i) => [i, v]).filter(p => p[1] !== null);
  const max = Math.max(1, ...pts.map(p => p[1])), n = Math.max(1, values.length - 1);
  const xy = pts.map(([i, v]) => `${(i / n * w).toFixed(1)},${(h - 2 - v / max * (h - 4)).toFixed(1)}`).join(" ");
  return `<svg class="spark" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" data-stage="${esc(stage)}" data-field="sparkline">`
    + `<title>lag over the last ${values.length} samples, max ${max}</title><polyline points="${xy}"/></svg>`
    + ` <span class="meta">max <span data-stage="${esc(stage)}" data-field="lag_max">${pts.length ? max : "-"}</span></span>`;
}

const HELD = "HELD (dead letters)";

function stageHtml(s, lags) {
  const st = {stage: s.stage}, owner = {}, joins = s.open_joins !== null && s.open_joins !== undefined;
  for (const w of s.workers) for (const p of w.partitions) owner[p] = w.member + " (" + (w.device ?? "?") + ")";
  let h = `<section data-stage="${esc(s.stage)}"><h2>${esc(s.stage)}</h2>`
    + `<div class="meta">group ${esc(s.group)} (${esc(s.group_state)}) reading ${esc(s.topic)}</div>`
    + "<table><tr><th>state</th><th>lag</th><th>time lag s</th><th>stuck</th><th>records/s</th><th>workers</th>"
    + (joins ? "<th>open joins</th><th>oldest join s</th>" : "") + "</tr><tr>"
    + (s.held ? cell({...st, field: "state"}, HELD, "held")
       : cell({...st, field: "state"}, String(s.state).toUpperCase(), "state-" + s.state))
    + cell({...st, field: "lag"}, s.lag) + cell({...st, field: "time_lag_s"}, num(s.time_lag_s, 1))
    + cell({...st, field: "stuck"}, s.stuck ? "STUCK" : "no", s.stuck ? "stuck" : "")
    + cell({...st, field: "throughput"}, num(s.throughput, 1)) + cell({...st, field: "workers"}, s.workers.length)
    + (joins ? cell({...st, field: "open_joins"}, s.open_joins) + cell({...st, field: "oldest_open_join_s"}, num(s.oldest_open_join_s, 1)) : "")
    + "</tr></table>" + sparkline(s.stage, lags || []);
  h += "<br><table><tr><th>partition</th><th>committed</th><th>log-end</th><th>lag</th><th>time lag s</th><th>stuck</th><th class=l>worker</th></tr>";
  for (const p of s.partitions) {
    const pa = {...st, partition: p.partition};
    h += "<tr>" + cell({...pa, field: "partition"}, p.partition) + cell({...pa, field: "committed"}, p.committed)
      + cell({...pa, field: "log_end"}, p.log_end) + cell({...pa, field: "lag"}, p.lag)
      + cell({...pa, field: "time_lag_s"}, num(p.time_lag_s, 1))
      + cell({...pa, field: "stuck"}, p.stuck ? "STUCK" : "no", p.stuck ? "stuck" : "")
      + cell({...pa, field: "worker"}, owner[p.partition] ?? "-", "l") + "</tr>";
  }
  h += "</table><table><tr><th class=l>worker</th><th class=l>device</th><th class=l>partitions</th><th class=l>host</th><th class=l>metrics</th><th class=l>input</th></tr>";
  for (const w of s.workers) {
    const wa = {...st, member: w.member};
    h += "<tr>" + cell({...wa, field: "member"}, w.member, "l") + cell({...wa, field: "device"}, w.device, "l")
      + cell({...wa, field: "partitions"}, w.partitions.join(","), "l") + cell({...wa, field: "host"}, w.host, "l")
      + cell({...wa, field: "metrics"}, w.metrics, "l")
      + cell({...wa, field: "held"}, w.held ? HELD : w.held === false ? "reading" : "-", w.held ? "l held" : "l") + "</tr>";
  }
  if (!s.workers.length) h += `<tr><td class=l colspan=6>no members</td></tr>`;
  return h + "</table></section>";
}

function render(state) {
  document.getElementById("pipeline").textContent = state.pipeline;
  document.getElementById("measured").textContent = hms(state.measured_at);
  const banner = document.getElementById("banner");
  if (state.ok === false) {
    banner.className = "down";
    banner.textContent = `broker unreachable since ${hms(state.down_since)}: ${state.error}`
      + (state.measured_at ? ` (numbers below are from ${hms(state.measured_at)})` : "");
  } else if (state.ok === null) {
    banner.className = "wait"; banner.textContent = "waiting for the first sample...";
  } else { banner.className = ""; banner.textContent = ""; }
  document.body.classList.toggle("stale", state.ok === false);
  document.getElementById("stages").innerHTML = state.stages.map(s => stageHtml(s, state.history.lag[s.stage])).join("");
  let lt = "<table><tr><th class=l>stage</th><th class=l>topic</th><th>results</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>";
  for (const l of state.latency) {
    const la = {"latency-stage": l.stage};
    lt += "<tr>" + cell({...la, field: "stage"}, l.stage, "l") + cell({...la, field: "topic"}, l.topic, "l")
      + cell({...la, field: "samples"}, l.samples) + cell({...la, field: "p50_ms"}, num(l.p50_ms, 1))
      + cell({...la, field: "p95_ms"}, num(l.p95_ms, 1)) + cell({...la, field: "p99_ms"}, num(l.p99_ms, 1)) + "</tr>";
  }
  document.getElementById("latency").innerHTML = lt + "</table>";
  let dt = `<div class="meta">topic ${esc(state.dlq.topic)}${state.dlq.complete ? "" : " (still counting)"}</div>`
    + "<table><tr><th class=l>stage</th><th class=l>reason</th><th>count</th></tr>";
  for (const d of state.dlq.counts) {
    dt += "<tr>" + cell({"dlq-stage": d.stage, reason: d.reason, field: "stage"}, d.stage, "l")
      + cell({"dlq-stage": d.stage, reason: d.reason, field: "reason"}, d.reason, "l")
      + cell({"dlq-stage": d.stage, reason: d.reason, field: "count"}, d.count) + "</tr>";
  }
  dt += `<tr><th class=l colspan=2>total</th>` + cell({field: "dlq_total"}, state.dlq.total) + "</tr>";
  document.getElementById("dlq").innerHTML = dt + "</table>";
}

async function refresh() {
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    render(await r.json());
  } catch (e) {
    const banner = document.getElementById("banner");
    banner.className = "down"; banner.textContent = "dashboard server unreachable: " + e;
  }
  setTimeout(refresh, 2000);
}
refresh();
</script>
</body>
</html>
"""
