"""The dashboard: state JSON from canned lag data, throughput math, a down broker, and on the real
broker the page as headless Chromium renders it, checked against `tensorline lag --json`; a worker
whose metrics say it holds its input is HELD."""

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
from contextlib import contextmanager
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import dashboard
from tensorline.ops.lag import GroupLag, PartitionLag
from tensorline.schemas import Record, encode_record
from tensorline.engine import worker
from tensorline.engine.runtime import INGEST_MS
from tensorline.stages.testing import scale_pipeline_body

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
                "latency": [{"stage": "b", "topic": "dash.out", "samples": 3, "p50_ms": 20.0, "p95_ms": 29.0, "p99_ms": 29.8}],
                "dlq": {"topic": "dash.dlq", "total": 2, "complete": True,
                        "counts": [{"stage": "a", "reason": "ValueError", "count": 2}]}}

    def close(self):
        self.closed += 1


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_throughput_is_the_change_of_committed_offsets_over_the_window():
    assert dashboard.throughput([(0.0, 100)]) is None
    assert dashboard.throughput([(0.0, 100), (2.0, 140), (4.0, 200)]) == 25.0  # (200 - 100) / 4 s
    assert dashboard.throughput([(0.0, 100), (2.0, 140), (4.0, 200)], window_s=3.0) == 30.0  # from t=2
    assert dashboard.throughput([(0.0, 100), (20.0, 140)], window_s=10.0) == 2.0  # the sample before, however old
    assert dashboard.throughput([(0.0, 100), (2.0, 40)]) == 0.0  # offsets reset: no negative rate


def test_state_from_canned_lag_data():
    clock, probe = Clock(), CannedProbe()
    feed = iter([lags(10, 5), lags(30, 9)])
    sampler = dashboard.Sampler(CFG, interval_s=2.0, measure=lambda: next(feed), probe=probe, clock=clock)
    assert sampler.state()["ok"] is None and sampler.state()["stages"] == []
    first = sampler.sample()
    assert [s["throughput"] for s in first["stages"]] == [None, None]  # one sample: no rate yet
    clock.now += 2.0
    state = json.loads(json.dumps(sampler.sample()))  # plain JSON all the way down
    assert state["ok"] is True and state["error"] is None and state["down_since"] is None
    assert state["pipeline"] == "dash" and state["measured_at"] == state["checked_at"] == 1002.0
    a, b = state["stages"]
    assert a == {"stage": "a", "group": "dash.a", "topic": "dash.in", "lag": 90, "time_lag_s": 9.0, "stuck": False,
                 "members": 1, "state": "ok", "open_joins": None, "oldest_open_join_s": None,
                 "partitions": [{"partition": 0, "committed": 30, "log_end": 100, "lag": 70, "time_lag_s": 3.5, "stuck": False},
                                {"partition": 1, "committed": None, "log_end": 20, "lag": 20, "time_lag_s": 9.0, "stuck": False}],
                 "throughput": 10.0, "group_state": "Stable", "held": False, "workers": [
                     {"member": "h-0", "device": "gpu:0", "client_id": "dash.a.h-0.gpu:0", "host": "127.0.0.1",
                      "partitions": [0, 1], "metrics": "127.0.0.1:9100", "pid": 42, "held": False}]}
    assert b["lag"] == 0 and b["throughput"] == 2.0 and b["workers"] == [] and b["group_state"] is None
    assert b["state"] == "idle"
    assert state["history"] == {"t": [1000.0, 1002.0], "lag": {"a": [110, 90], "b": [0, 0]}}
    assert state["latency"][0]["p99_ms"] == 29.8 and state["dlq"]["counts"] == [{"stage": "a", "reason": "ValueError", "count": 2}]


def down_sampler() -> dashboard.Sampler:
    """Stage a has input waiting and no member: its workers were given up, or never started. Stage
    b holds two open joins."""
    down = [GroupLag("a", "dash.a", "dash.in", (PartitionLag(0, 10, 100, 30.0),), members=0),
            GroupLag("b", "dash.b", "dash.mid", (PartitionLag(0, 10, 10),), members=0, open_joins=2,
                     oldest_open_join_s=12.5)]
    return dashboard.Sampler(CFG, measure=lambda: down, probe=CannedProbe(), clock=Clock())


def test_a_stage_with_no_members_and_pending_input_is_down():
    a, b = down_sampler().sample()["stages"]
    assert (a["state"], a["members"], a["lag"]) == ("down", 0, 90)
    assert (b["state"], b["lag"]) == ("idle", 0)


def test_history_is_bounded():
    clock = Clock()
    sampler = dashboard.Sampler(CFG, interval_s=2.0, history_s=10.0, measure=lambda: lags(1, 1), probe=CannedProbe(), clock=clock)
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

    sampler = dashboard.Sampler(CFG, measure=measure, probe=probe, clock=clock)
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
    assert dashboard.latency_ms([(INGEST_MS, b"1000"), ("tl.fusion.produced_ms", b"1250")], "fusion") == 250.0
    assert dashboard.latency_ms([(INGEST_MS, b"1000")], "fusion") is None
    assert dashboard.percentiles([10, 20, 30]) == {"p50_ms": 20.0, "p95_ms": 29.0, "p99_ms": 29.8}
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
            time.sleep(0.2)
        yield dash
    finally:
        dash.stop()


def test_down_broker_is_reported_and_the_page_still_answers(down_dashboard):
    status, body = get(down_dashboard.url + "api/state")
    state = json.loads(body)
    assert status == 200 and state["ok"] is False and state["error"] and state["down_since"] is not None
    status, page = get(down_dashboard.url)
    assert status == 200 and b"broker unreachable since" in page
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(down_dashboard.url + "nothing-here")


def test_serve_logs_its_url_and_stops_on_ctrl_c():
    script = ("from tensorline import config, logs; from tensorline.ops import dashboard; logs.configure(json=True); "
              "dashboard.serve(config.parse({'pipeline': {'name': 'dash', 'bootstrap': '127.0.0.1:1'}}), port=0)")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TENSORLINE_BOOTSTRAP": ""})
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
        assert proc.wait(30) == 0
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
        if tag in ("br", "meta", "polyline"):
            return
        self._open.append(data if any(k == "field" for k, _ in data) else None)
        if self._open[-1] is not None:
            self.cells[data] = ""

    def handle_endtag(self, tag):
        if tag in ("br", "meta", "polyline"):
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


def test_page_shows_a_down_stage(tmp_path):
    with dashboard.Dashboard(CFG, sampler=down_sampler(), interval_s=60.0) as dash:
        cells = render(dash.url, tmp_path)
    assert cells.get(stage="a", field="state") == "DOWN"
    assert cells.get(stage="b", field="state") == "IDLE"
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
    consumer = clients.consumer(cfg, group, cfg.topic("in").name, client_id=f"{group}.{member}.cpu")
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            assert time.monotonic() < deadline, "the member never got partitions"
            consumer.poll(timeout_ms=200)
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
        time.sleep(0.3)


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
    assert cells.get(latency_stage="scale", field="samples") == "29"  # every output, poison excluded
    assert float(cells.get(latency_stage="scale", field="p50_ms")) >= 0
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
