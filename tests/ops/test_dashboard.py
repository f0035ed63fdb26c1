"""The dashboard: state JSON from canned lag data, throughput math, a down broker, and on the real
broker the page as headless Chromium renders it, checked against `tensorline lag --json`; a worker
whose metrics say it holds its input is HELD; time lag is never negative, a record timestamped in
the future is reported as clock skew; latency counts only results that became visible while the
dashboard watched, in its window; charts have titles, axes and units."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import contextlib
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import dashboard, latency
from tensorline.ops.lag import GroupLag, PartitionLag
from tensorline.schemas import Record, encode_record
from tensorline.engine import worker
from tensorline.engine.runtime import INGEST_MS
from tensorline.stages.testing import scale_pipeline_body
from tests.conftest import joined, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CFG = config.parse({"pipeline": {"name": "dash"}, "topics": {"in": {}, "mid": {}, "out": {}},
                    "stages": {"a": {"input": "in", "output": "mid", "kind": "tensorline.stages.testing:Scale"},
                               "b": {"input": "mid", "output": "out", "kind": "tensorline.stages.testing:Scale"}}})


def lags(committed_a: int, committed_b: int) -> list[GroupLag]:
    return [GroupLag("a", "dash.a", "dash.in", (PartitionLag(0, committed_a, 100, 3.5), PartitionLag(1, None, 20, 9.0)),
                     members=1),
            GroupLag("b", "dash.b", "dash.mid", (PartitionLag(0, committed_b, committed_b),), members=0)]


class CannedProbe:
    def __init__(self):
        self.closed = 0

    def sample(self, groups):
        assert [g for _, g, _ in groups] == ["dash.a", "dash.b"]
        return {"groups": {"dash.a": {"group_state": "Stable", "workers": [
                    {"member": "h-0", "device": "gpu:0", "client_id": "dash.a.h-0.gpu:0", "host": "127.0.0.1",
                     "partitions": [0, 1], "metrics": "127.0.0.1:9100", "pid": 42, "held": False}]}},
                "dlq": {"topic": "dash.dlq", "total": 2, "complete": True,
                        "counts": [{"stage": "a", "reason": "ValueError", "count": 2}]}}

    def close(self):
        self.closed += 1


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class CannedWatch(latency.Watch):
    """The results watch without its thread: tests add what a reader would have received."""

    def __init__(self, cfg=CFG):
        super().__init__(cfg, dashboard.sinks(cfg))
        self.watching_since = 990.0

    def start(self):
        pass

    def stop(self, timeout_s=0.0):
        pass

    def receive(self, visible_s: float, ingest_ms: int, received_ms: int, produced_ms: int, stage: str = "b"):
        rec = SimpleNamespace(topic="dash.out", headers=[(INGEST_MS, str(ingest_ms).encode()),
                                                        (f"tl.{stage}.received_ms", str(received_ms).encode()),
                                                        (f"tl.{stage}.produced_ms", str(produced_ms).encode())])
        self.add("b", latency.Seen(rec, visible_s))


def canned_sampler(measure, clock=None, watch=None, **kw) -> dashboard.Sampler:
    return dashboard.Sampler(CFG, measure=measure, probe=CannedProbe(), latency_watch=watch or CannedWatch(),
                             clock=clock or Clock(), **kw)


def test_throughput_is_the_change_of_committed_offsets_over_the_window():
    assert dashboard.throughput([(0.0, 100)]) is None
    assert dashboard.throughput([(0.0, 100), (2.0, 140), (4.0, 200)]) == 25.0  # (200 - 100) / 4 s
    assert dashboard.throughput([(0.0, 100), (2.0, 140), (4.0, 200)], window_s=3.0) == 30.0  # from t=2
    assert dashboard.throughput([(0.0, 100), (20.0, 140)], window_s=10.0) == 2.0  # the sample before, however old
    assert dashboard.throughput([(0.0, 100), (2.0, 40)]) == 0.0  # offsets reset: no negative rate


def test_state_from_canned_lag_data():
    clock, probe, watch = Clock(), CannedProbe(), CannedWatch()
    feed = iter([lags(10, 5), lags(30, 9)])
    sampler = dashboard.Sampler(CFG, interval_s=2.0, measure=lambda: next(feed), probe=probe, latency_watch=watch,
                                clock=clock)
    assert sampler.state()["ok"] is None and sampler.state()["stages"] == []
    first = sampler.sample()
    assert [s["throughput"] for s in first["stages"]] == [None, None]  # one sample: no rate yet
    for i, ms in enumerate((20, 10, 30)):  # results visible at 1001.x s: ingest 1000.0 s, b took 5 ms of it
        watch.receive(1001.0 + i / 10, 1_000_000 + 100 * i, 1_000_000 + 100 * i + ms - 10,
                      1_000_000 + 100 * i + ms - 5)
    clock.now += 2.0
    state = json.loads(json.dumps(sampler.sample()))  # plain JSON all the way down
    assert state["ok"] is True and state["error"] is None and state["down_since"] is None
    assert state["pipeline"] == "dash" and state["measured_at"] == state["checked_at"] == 1002.0
    a, b = state["stages"]
    assert a == {"stage": "a", "group": "dash.a", "topic": "dash.in", "lag": 90, "time_lag_s": 9.0, "clock_ahead_s": None,
                 "stuck": False, "members": 1, "state": "ok", "open_joins": None, "oldest_open_join_s": None,
                 "partitions": [{"partition": 0, "committed": 30, "log_end": 100, "lag": 70, "time_lag_s": 3.5,
                                 "stuck": False, "clock_ahead_s": None},
                                {"partition": 1, "committed": None, "log_end": 20, "lag": 20, "time_lag_s": 9.0,
                                 "stuck": False, "clock_ahead_s": None}],
                 "throughput": 10.0, "group_state": "Stable", "held": False, "workers": [
                     {"member": "h-0", "device": "gpu:0", "client_id": "dash.a.h-0.gpu:0", "host": "127.0.0.1",
                      "partitions": [0, 1], "metrics": "127.0.0.1:9100", "pid": 42, "held": False}]}
    assert b["lag"] == 0 and b["throughput"] == 2.0 and b["workers"] == [] and b["group_state"] is None
    assert b["state"] == "idle"
    [lat] = state["latency"]
    # End to end is ingest to visible: 1000 ms each (1001.0 s - 1000.0 s, 1001.1 - 1000.1, ...),
    # not ingest to produced (15, 5, 25 ms).
    assert (lat["stage"], lat["topic"], lat["results"], lat["window_s"]) == ("b", "dash.out", 3, 60.0)
    assert (lat["p50_ms"], lat["p99_ms"], lat["skewed"]) == (1000.0, 1000.0, 0)
    assert lat["stages"] == [{"stage": "b", "results": 3, "before": {"p50_ms": 10.0, "p95_ms": 19.0, "p99_ms": 19.8},
                              "processing": {"p50_ms": 5.0, "p95_ms": 5.0, "p99_ms": 5.0}}]
    assert lat["to_visible"]["p50_ms"] == 985.0  # b's outputs built at 15, 5, 25 ms: 985, 995, 975 ms to visible
    assert state["history"] == {"t": [1000.0, 1002.0], "lag": {"a": [110, 90], "b": [0, 0]},
                                "throughput": {"a": [None, 10.0], "b": [None, 2.0]},
                                "latency": {"b": {"p50_ms": [None, 1000.0], "p99_ms": [None, 1000.0]}}}
    assert state["dlq"]["counts"] == [{"stage": "a", "reason": "ValueError", "count": 2}]


def test_latency_shows_only_results_visible_in_the_window():
    """Results age out of the window by the time they became visible: a run that stopped shows no
    latency a minute later, however many results it left on the topic."""
    clock, watch = Clock(), CannedWatch()
    sampler = canned_sampler(lambda: lags(1, 1), clock=clock, watch=watch)
    watch.receive(1000.0, 963_666, 963_700, 963_710)  # p50 36,334 ms, as the report saw
    [lat] = sampler.sample()["latency"]
    assert (lat["results"], lat["p50_ms"]) == (1, 36334.0)
    clock.now += 60.5
    [lat] = sampler.sample()["latency"]
    assert (lat["results"], lat["p50_ms"], lat["p99_ms"], lat["to_visible"]["p50_ms"]) == (0, None, None, None)
    assert lat["stages"] == []
    watch.receive(1060.5, 1_060_400, 1_060_410, 1_060_450)  # a new result: only it counts
    [lat] = sampler.sample()["latency"]
    assert (lat["results"], lat["p50_ms"]) == (1, 100.0)
    assert sampler.state()["history"]["latency"]["b"]["p50_ms"] == [36334.0, None, 100.0]


def test_spans_add_up_to_ingest_to_visible_and_clamp_skew():
    headers = [(INGEST_MS, b"1000"), ("tl.pre.received_ms", b"1010"), ("tl.pre.produced_ms", b"1030"),
               ("tl.trace_id", b"x"), ("tl.fuse.received_ms", b"1080"), ("tl.fuse.produced_ms", b"1090")]
    got = latency.spans(headers, 1.25)  # visible at 1250 ms
    assert got == latency.Spans(250.0, (latency.StageSpan("pre", 10.0, 20.0), latency.StageSpan("fuse", 50.0, 10.0)),
                                160.0, False)
    assert got.end_to_end_ms == sum(s.before_ms + s.processing_ms for s in got.stages) + got.to_visible_ms
    # The reader's clock 0.2 s behind the workers': to visible reads 0, end to end still >= 0.
    skewed = latency.spans(headers, 1.05)
    assert (skewed.end_to_end_ms, skewed.to_visible_ms, skewed.skewed) == (50.0, 0.0, True)
    assert latency.spans(headers, 0.9).end_to_end_ms == 0.0  # ingest host ahead: never negative
    assert latency.spans([("tl.pre.received_ms", b"1")], 1.0) is None  # no ingest time


def test_time_lag_is_never_negative():
    assert dashboard.lag.time_lag(1000, 3500.0) == (2.5, None)
    assert dashboard.lag.time_lag(4000, 3500.0) == (0.0, 0.5)  # timestamp ahead: 0, and by how much
    g = GroupLag("a", "dash.a", "dash.in", (PartitionLag(0, 1, 5, 0.0, clock_ahead_s=0.8),), members=1)
    assert g.to_dict()["clock_ahead_s"] == 0.8 and g.time_lag_s == 0.0
    assert "timestamp 0.8 s ahead (clock skew)" in dashboard.lag.format_table([g])


def down_sampler() -> dashboard.Sampler:
    """Stage a has input waiting and no member: its workers were given up, or never started. Stage
    b holds two open joins."""
    down = [GroupLag("a", "dash.a", "dash.in", (PartitionLag(0, 10, 100, 30.0),), members=0),
            GroupLag("b", "dash.b", "dash.mid", (PartitionLag(0, 10, 10),), members=0, open_joins=2,
                     oldest_open_join_s=12.5)]
    return canned_sampler(lambda: down)


def test_a_stage_with_no_members_and_pending_input_is_down():
    a, b = down_sampler().sample()["stages"]
    assert (a["state"], a["members"], a["lag"]) == ("down", 0, 90)
    assert (b["state"], b["lag"]) == ("idle", 0)


def test_history_is_bounded():
    clock = Clock()
    sampler = canned_sampler(lambda: lags(1, 1), clock=clock, interval_s=2.0, history_s=10.0)
    for _ in range(20):
        sampler.sample()
        clock.now += 2.0
    assert len(sampler.state()["history"]["t"]) == 5 and sampler.state()["history"]["t"][-1] == 1038.0


def test_a_failing_sample_keeps_the_last_numbers_and_recovers_by_itself():
    clock, probe = Clock(), CannedProbe()
    results = [lags(10, 5), ConnectionError("refused"), ConnectionError("refused"), lags(12, 5)]

    def measure():
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    sampler = dashboard.Sampler(CFG, measure=measure, probe=probe, latency_watch=CannedWatch(), clock=clock)
    sampler.sample()
    for _ in range(2):
        clock.now += 2.0
        down = sampler.sample()
    assert down["ok"] is False and down["error"] == "ConnectionError: refused"
    assert down["down_since"] == 1002.0 and down["checked_at"] == 1004.0 and down["measured_at"] == 1000.0
    assert down["stages"][0]["lag"] == 110 and probe.closed == 2  # last numbers kept; clients rebuilt
    clock.now += 2.0
    up = sampler.sample()
    assert up["ok"] is True and up["down_since"] is None and up["error"] is None and up["stages"][0]["lag"] == 108


def test_client_ids_headers_and_sinks():
    assert dashboard.member_of("demo.detection.cnn", "demo.detection.cnn.gpu-host.example-1.gpu:0") == \
        ("gpu-host.example-1", "gpu:0")
    assert dashboard.member_of("demo.features", "kafka-python-3.0.12") == ("kafka-python-3.0.12", None)
    assert dashboard.dlq_key([("tl.dlq.stage", b"producer"), ("tl.dlq.error", b"BadFile"),
                              ("tl.dlq.reason", b"unreadable-dicom")]) == ("producer", "unreadable-dicom")
    assert dashboard.dlq_key([("tl.dlq.stage", b"features"), ("tl.dlq.error", b"BadTensor")]) == ("features", "BadTensor")
    assert latency.percentiles([10, 20, 30]) == {"p50_ms": 20.0, "p95_ms": 29.0, "p99_ms": 29.8}
    demo = config.load(Path(__file__).parents[2] / "pipeline.toml")
    assert dashboard.sinks(demo) == [("fusion", f"{demo.name}.results")]
    assert dashboard.sinks(CFG) == [("b", "dash.out")]


def test_slot_files_give_metrics_endpoints(tmp_path):
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "g.0.lock").write_text(json.dumps(
        {"group": "g", "member": "h-0", "device": "cpu", "metrics": "127.0.0.1:9", "pid": 7}))
    (tmp_path / "workers" / "g.1.lock").write_text("")  # claimed, metrics not served
    assert dashboard.slot_files(tmp_path) == {("g", "h-0"): {"group": "g", "member": "h-0", "device": "cpu",
                                                             "metrics": "127.0.0.1:9", "pid": 7}}


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def down_dashboard():
    cfg = replace(CFG, bootstrap="127.0.0.1:1")  # a closed port: nothing listens
    # A long interval: after the first (failed) sample the sampler waits, so stop() is immediate.
    dash = dashboard.Dashboard(cfg, interval_s=60.0).start()
    try:
        deadline = time.monotonic() + 30
        while dash.sampler.state()["ok"] is not False:
            assert time.monotonic() < deadline, "no failed sample within 30 s"
            time.sleep(0.2)  # poll of the loop's condition
        yield dash
    finally:
        dash.stop()


def test_down_broker_is_reported_and_the_page_still_answers(down_dashboard):
    status, body = get(down_dashboard.url + "api/state")
    state = json.loads(body)
    assert status == 200 and state["ok"] is False and state["error"] and state["down_since"] is not None
    status, page = get(down_dashboard.url)
    assert status == 200 and b'<script src="dashboard.js">' in page and b"clock skew" in page  # the help text
    status, script = get(down_dashboard.url + "dashboard.js")
    assert status == 200 and b"broker unreachable since" in script
    assert get(down_dashboard.url + "dashboard.css")[0] == 200
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(down_dashboard.url + "nothing-here")


def test_a_sample_stuck_on_the_broker_does_not_hold_stop():
    """Ctrl-C stops the page at once even while a sample waits on an unreachable broker (a client
    retrying its connection for tens of seconds under load held `serve` past 30 s)."""
    in_flight, release = threading.Event(), threading.Event()

    def stuck():
        in_flight.set()
        release.wait(300)
        return lags(0, 0)

    sampler = canned_sampler(stuck)
    board = dashboard.Dashboard(CFG, sampler=sampler).start()
    try:
        wait_for(in_flight.is_set, 30, "a sample in flight")
        board.stop(timeout_s=0.1)
        assert sampler._thread.is_alive()  # stop returned; the stuck sample is left to its daemon thread
        assert sampler.probe.closed == 0  # not closed under it
    finally:
        release.set()


def test_serve_logs_its_url_and_stops_on_ctrl_c():
    # SIGUSR1 makes the child print every thread's stack: what held it, should it not stop.
    script = ("import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True); "
              "from tensorline import config, logs; from tensorline.ops import dashboard; logs.configure(json=True); "
              "dashboard.serve(config.parse({'pipeline': {'name': 'dash', 'bootstrap': '127.0.0.1:1'}}), port=0)")
    # Started with SIGINT ignored, as a shell script's background job starts it (and this suite's
    # processes when `./run test &` runs in one): serve handles SIGINT itself.
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TENSORLINE_BOOTSTRAP": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        line = ""
        while '"dashboard serving"' not in line:
            line = lines.get(timeout=30)
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:"), url
        assert get(url)[0] == 200
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            stacks = []
            with contextlib.suppress(queue.Empty):
                while True:
                    stacks.append(lines.get(timeout=5))
            raise AssertionError("still running 30 s after Ctrl-C:\n" + "".join(stacks[-200:])) from None
    finally:
        proc.kill()
        proc.wait()


class DataCells(HTMLParser):
    """Text of every element with a data-field attribute, keyed by its data-* attributes."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple, str] = {}
        self._open: list[tuple | None] = []

    def handle_starttag(self, tag, attrs):
        data = tuple(sorted((k[5:], v) for k, v in attrs if k.startswith("data-")))
        if tag in ("br", "meta", "link", "polyline"):
            return
        self._open.append(data if any(k == "field" for k, _ in data) else None)
        if self._open[-1] is not None:
            self.cells[data] = ""

    def handle_endtag(self, tag):
        if tag in ("br", "meta", "link", "polyline"):
            return
        if self._open:
            self._open.pop()

    def handle_data(self, text):
        for key in self._open:
            if key is not None:
                self.cells[key] += text

    def get(self, **attrs: object) -> str:
        return self.cells[tuple(sorted((k.replace("_", "-") if k != "field" else k, str(v)) for k, v in attrs.items()))]


def render(url: str, tmp_path: Path) -> DataCells:
    """The page's DOM after its scripts ran, as headless Chromium dumps it."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    out = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    cells = DataCells()
    cells.feed(out.stdout)
    return cells


def test_page_shows_the_unreachable_banner(down_dashboard, tmp_path):
    cells = render(down_dashboard.url, tmp_path)
    banner = cells.get(field="banner")
    assert banner.startswith("broker unreachable since ") and "KafkaTimeoutError" in banner, banner


def test_page_shows_a_down_stage_and_charts_with_titles_axes_and_units(tmp_path):
    sampler = down_sampler()
    for _ in range(2):  # two samples here and the dashboard's first: lines to draw
        sampler.sample()
        sampler.clock.now += 2.0
    with dashboard.Dashboard(CFG, sampler=sampler, interval_s=60.0) as dash:
        cells = render(dash.url, tmp_path)
    assert cells.get(stage="a", field="state") == "DOWN" == cells.get(stage="a", field="overview_state")
    assert cells.get(stage="b", field="state") == "IDLE"
    assert cells.get(stage="a", field="time_lag_s") == "30.0"
    for chart, title, unit in (("lag-a", "Lag of a (records)", "records"),
                               ("throughput-b", "Throughput of b (records/s)", "records/s"),
                               ("latency-b", "End-to-end latency of b, last 60 s (ms)", "ms")):
        assert cells.get(chart=chart, field="chart_title") == title
        assert cells.get(chart=chart, field="y_label") == unit
        assert cells.get(chart=chart, field="x_label") == "time (this host)"
        assert cells.get(chart=chart, field="y_axis") == "" and cells.get(chart=chart, field="x_axis") == ""
        assert cells.get(chart=chart, field="y_tick", tick=0) == "0"
        assert [cells.get(chart=chart, field="x_tick", tick=i) for i in range(3)] == [
            time.strftime("%H:%M:%S", time.localtime(t)) for t in (1000.0, 1002.0, 1004.0)]
    assert [cells.get(chart="lag-a", field="y_tick", tick=i) for i in range(5)] == ["0", "25", "50", "75", "100"]  # lag 90
    assert cells.get(chart="latency-b", field="legend", series="p99") == "\u25ac p99"
    assert cells.get(latency_stage="b", field="samples") == "0" and cells.get(latency_stage="b", field="p50_ms") == "-"
    assert cells.get(latency_stage="b", field="latency_note").startswith("no result became visible in the last 60 s")
    assert (cells.get(stage="b", field="open_joins"), cells.get(stage="b", field="oldest_open_join_s")) == ("2", "12.5")
    with pytest.raises(KeyError):  # a stage without state has no joins column
        cells.get(stage="a", field="open_joins")


# -- real broker, headless Chromium -----------------------------------------------------------------

def produce(cfg: config.PipelineConfig, ids: range, poison: set[int] = frozenset()) -> None:
    producer = clients.producer(cfg)
    for i in ids:
        now = int(time.time() * 1000)
        record = Record(record_id=f"r{i}", source="test", ingest_ts_ms=now, tensors={"x": np.ones(4, np.float32)},
                        stage="producer", attributes={"poison": "1"} if i in poison else {})
        producer.send(cfg.topic("in").name, key=f"k{i}".encode(), value=bytes(encode_record(record)),
                      headers=[(INGEST_MS, str(now).encode())])
    producer.flush()
    producer.close()


@contextmanager
def live_member(cfg: config.PipelineConfig, state_dir: Path, metrics: str):
    """A live member of the scale group with a worker's client id and slot file (metrics at
    `metrics`), assigned every partition: it reads but never commits, so no offset moves."""
    group = cfg.group_id("scale")
    member = f"{socket.gethostname()}-0"
    (state_dir / "workers").mkdir(parents=True, exist_ok=True)
    (state_dir / "workers" / f"{group}.0.lock").write_text(json.dumps(
        {"group": group, "member": member, "device": "cpu", "metrics": metrics, "pid": 1}))
    consumer = joined(cfg, group, cfg.topic("in").name, 30, client_id=f"{group}.{member}.cpu")
    try:
        yield member
    finally:
        consumer.close()


def sampled(dash: dashboard.Dashboard, done, what: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        state = dash.sampler.state()
        if state["ok"] and done(state):
            return state
        assert time.monotonic() < deadline, f"{what}: {state}"
        time.sleep(0.3)  # poll of the loop's condition


@pytest.mark.broker
def test_page_shows_the_lag_tensorline_lag_reports(tmp_path, write_pipeline, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "pipeline.toml"
    cfg = write_pipeline(path, scale_pipeline_body())
    produce(cfg, range(30), poison={7})
    worker.run(cfg, "scale", until_idle_s=2.0, stop=threading.Event(), metrics_port=None)
    produce(cfg, range(30, 42))  # not processed: the lag, stable now that the worker stopped
    # A live member that reads but never commits: the workers column without moving any offset;
    # nothing serves its metrics.
    with live_member(cfg, tmp_path / "state", "127.0.0.1:9") as member, \
            dashboard.Dashboard(cfg, interval_s=1.0) as dash:
        sampled(dash, lambda s: s["stages"][0]["workers"] and len(s["history"]["t"]) >= 2, "no complete sample")
        cli = subprocess.run([sys.executable, "-m", "tensorline.cli", "lag", "-c", str(path), "--json"],
                             capture_output=True, text=True, timeout=60, check=True)
        cells = render(dash.url, tmp_path)
    [expected] = json.loads(cli.stdout)["stages"]
    assert expected["lag"] == 12
    assert cells.get(field="banner") == ""
    assert int(cells.get(stage="scale", field="lag")) == expected["lag"]
    assert cells.get(stage="scale", field="stuck") == "no"
    assert expected["state"] == "ok" and cells.get(stage="scale", field="state") == "OK"
    assert cells.get(stage="scale", field="throughput") == "0.0"  # nothing consumes now
    assert float(cells.get(stage="scale", field="time_lag_s")) >= 0
    for p in expected["partitions"]:
        for f in ("committed", "log_end", "lag"):
            assert cells.get(stage="scale", partition=p["partition"], field=f) == str(p[f]), (p, f)
        assert cells.get(stage="scale", partition=p["partition"], field="worker") == f"{member} (cpu)"
    assert cells.get(stage="scale", member=member, field="device") == "cpu"
    assert cells.get(stage="scale", member=member, field="partitions") == "0,1,2"
    assert cells.get(stage="scale", member=member, field="metrics") == "127.0.0.1:9"
    assert cells.get(stage="scale", member=member, field="held") == "-"  # its metrics could not be read
    # The 29 results came before the dashboard started: an earlier run's, not shown as current.
    assert cells.get(latency_stage="scale", field="samples") == "0"
    assert cells.get(latency_stage="scale", field="p50_ms") == "-"
    assert cells.get(latency_stage="scale", field="latency_note").startswith("no result became visible")
    assert cells.get(dlq_stage="scale", reason="ValueError", field="count") == "1"
    assert cells.get(field="dlq_total") == "1"


@pytest.mark.broker
def test_a_worker_holding_its_input_after_dead_letters_is_held(tmp_path, write_pipeline, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    cfg = write_pipeline(tmp_path / "pipeline.toml", scale_pipeline_body())
    # The worker's metrics as the runtime sets them while it holds its input (`_pause`).
    registry = CollectorRegistry()
    Gauge("tensorline_dlq_paused", "holds its input", ["stage", "model"], registry=registry).labels("scale", "").set(1)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with live_member(cfg, tmp_path / "state", f"127.0.0.1:{server.server_address[1]}") as member, \
                dashboard.Dashboard(cfg, interval_s=60.0) as dash:  # one sample, at start
            sampled(dash, lambda s: s["stages"][0]["workers"], "no sample with the worker")
            [stage] = json.loads(get(dash.url + "api/state")[1])["stages"]
            cells = render(dash.url, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert stage["held"] is True and [w["held"] for w in stage["workers"]] == [True]
    assert stage["state"] == "ok"  # as `tensorline lag` says: the broker does not know
    assert cells.get(stage="scale", field="state") == "HELD (dead letters)"
    assert cells.get(stage="scale", member=member, field="held") == "HELD (dead letters)"


@pytest.mark.broker
def test_time_lag_of_a_record_timestamped_in_the_future_is_zero_and_called_skew(tmp_path, write_pipeline, monkeypatch):
    """The producing host's clock 30 s ahead of the dashboard's: the record is not -30 s old."""
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    cfg = write_pipeline(tmp_path / "pipeline.toml", scale_pipeline_body())
    producer = clients.producer(cfg)
    producer.send(cfg.topic("in").name, value=b"from a host whose clock is ahead", partition=0,
                  timestamp_ms=int(time.time() * 1000) + 30_000)
    producer.flush()
    producer.close()
    with dashboard.Dashboard(cfg, interval_s=60.0) as dash:  # one sample, at start
        state = sampled(dash, lambda s: s["stages"], "no sample")
        cells = render(dash.url, tmp_path)
    [stage] = state["stages"]
    assert stage["state"] == "down" and stage["lag"] == 1  # nobody reads it
    assert stage["time_lag_s"] == 0.0 and 20 < stage["clock_ahead_s"] <= 30
    assert stage["partitions"][0]["time_lag_s"] == 0.0
    assert cells.get(stage="scale", field="time_lag_s") == "0.0"
    assert cells.get(stage="scale", partition=0, field="time_lag_s") == "0.0 (skew)"
    note = cells.get(stage="scale", field="clock_ahead")
    assert "s ahead of this host (clock skew)" in note, note
    assert cells.get(stage="scale", field="overview_state") == "DOWN"


@pytest.mark.broker
def test_latency_is_ingest_to_visible_of_results_seen_while_watching(tmp_path, write_pipeline, monkeypatch):
    """An earlier run's results are on the topic when the dashboard starts: they are not counted.
    The results of a run while it watches are, each from ingest to when the dashboard's
    read_committed consumer received it, with their spans along the trace."""
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    cfg = write_pipeline(tmp_path / "pipeline.toml", scale_pipeline_body())
    produce(cfg, range(10))
    worker.run(cfg, "scale", until_idle_s=1.0, stop=threading.Event(), metrics_port=None)  # the earlier run
    with dashboard.Dashboard(cfg, interval_s=0.5) as dash:
        before = sampled(dash, lambda s: s["latency"][0]["watching_since"], "not following the results")
        assert before["latency"][0]["results"] == 0 and before["latency"][0]["p50_ms"] is None
        produce(cfg, range(10, 30))
        worker.run(cfg, "scale", until_idle_s=1.0, stop=threading.Event(), metrics_port=None)
        state = sampled(dash, lambda s: s["latency"][0]["results"] == 20, "the new results not counted")
        cells = render(dash.url, tmp_path)
    [lat] = state["latency"]
    assert lat["skewed"] == 0  # one clock: every result was received after its output was built
    assert [s["stage"] for s in lat["stages"]] == ["scale"]
    [scale] = lat["stages"]
    assert lat["p99_ms"] >= lat["to_visible"]["p99_ms"] and lat["p99_ms"] >= scale["processing"]["p99_ms"]
    assert float(cells.get(latency_stage="scale", field="samples")) == 20
    assert float(cells.get(latency_stage="scale", field="p50_ms")) == lat["p50_ms"]
    assert cells.get(latency_stage="scale", span="scale", field="span") == "scale processing"
    assert cells.get(latency_stage="scale", span="before:scale", field="span") == "before scale"
    assert float(cells.get(latency_stage="scale", span="to_visible", field="p50_ms")) == lat["to_visible"]["p50_ms"]
    assert cells.get(chart="latency-scale", field="chart_title") == "End-to-end latency of scale, last 60 s (ms)"
