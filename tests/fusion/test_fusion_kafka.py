"""The fusion worker on the real broker: emit modes, a stopped model, late outputs, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.schemas import Detection, ModelRef, decode_result, encode_detection
from tensorline.engine import worker
from tests.conftest import drained, wait_for

pytestmark = pytest.mark.broker
MODELS = ("cnn", "mlp", "logreg")


def fusion_body(fusion: str) -> str:
    """Detections joined into results, with these [fusion] settings added."""
    return f"""
[topics]
detections = {{ partitions = 3 }}
results = {{ partitions = 3 }}
dlq = {{ partitions = 1 }}
[fusion]
input = "detections"
output = "results"
expected_models = ["cnn", "mlp", "logreg"]
max_batch = 16
{fusion}
"""


def send(cfg, pairs, producer=None):
    own = producer is None
    producer = producer or clients.producer(cfg)
    for rid, model in pairs:
        d = Detection(record_id=rid, source="t", ingest_ts_ms=int(time.time() * 1000), model=ModelRef(model, "1"),
                      classes=("normal", "nodule"), scores=(0.3, 0.7), label="nodule")
        producer.send(cfg.topic("detections").name, key=rid.encode(), value=bytes(encode_detection(d)))
    producer.flush()
    if own:
        producer.close()


def results(cfg):
    return [decode_result(r.value) for r in topics.read_all(cfg, cfg.topic("results").name)]


@pytest.mark.parametrize("mode, extra, n_results, n_partial", [
    ("all", "", 10, 0),
    ("quorum", "quorum = 2", 20, 20),
    ("deadline", "deadline_ms = 500", 20, 10),
])
def test_emit_modes_with_one_model_stopped_halfway(tmp_path, write_pipeline, monkeypatch,
                                                   mode, extra, n_results, n_partial):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    cfg = write_pipeline(tmp_path / "p.toml", fusion_body(f'emit = "{mode}"\n{extra}'))
    # records 0-9: every model; records 10-19: the logreg worker is down.
    send(cfg, [(f"r{i}", m) for i in range(20) for m in MODELS if i < 10 or m != "logreg"])
    worker.run(cfg, "fusion", until_idle_s=2.5, stop=threading.Event())
    res = results(cfg)
    assert len(res) == n_results and len({r.record_id for r in res}) == n_results
    partial = [r for r in res if r.partial]
    assert len(partial) == n_partial
    if mode == "deadline":
        assert all(r.missing == ("logreg",) and r.contributors == ("cnn", "mlp") for r in partial)


def test_late_outputs_are_counted_not_emitted_again(tmp_path, write_pipeline, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    cfg = write_pipeline(tmp_path / "p.toml", fusion_body('emit = "quorum"\nquorum = 2'))
    send(cfg, [("r1", "cnn"), ("r1", "mlp")])
    worker.run(cfg, "fusion", until_idle_s=1.5, stop=threading.Event())
    send(cfg, [("r1", "logreg")])  # late: r1 was emitted at quorum
    worker.run(cfg, "fusion", until_idle_s=1.5, stop=threading.Event())
    [r] = results(cfg)
    assert r.record_id == "r1" and r.missing == ("logreg",)


def test_sigkill_with_joins_open_then_restart_gives_each_result_exactly_once(tmp_path, write_pipeline):
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, fusion_body('emit = "all"\nmax_delay_ms = 5'))
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(tmp_path / "state")}

    def spawn(log):
        return subprocess.Popen([sys.executable, "-m", "tensorline.cli", "run", "fusion", "-c", str(path)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / log, "w"), env=env)

    n = 150
    # Each model's outputs arrive in its own order, so joins stay open across batches; the third
    # model's last outputs are sent only after the kill, so joins are open when it lands.
    pairs = [(f"r{i}", "cnn") for i in range(n)] + [(f"r{i}", "mlp") for i in reversed(range(n))]
    before_kill = pairs + [(f"r{i}", "logreg") for i in range(60)]
    proc = spawn("w1.log")
    for k in range(0, len(before_kill), 30):
        send(cfg, before_kill[k:k + 30])
    wait_for(lambda: len(results(cfg)) >= 20, 60, "20 results before the kill")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(results(cfg))
    send(cfg, [(f"r{i}", "logreg") for i in range(60, n)])
    proc = spawn("w2.log")
    try:
        wait_for(lambda: len(results(cfg)) >= n, 90, f"all {n} results")
        wait_for(lambda: drained(cfg), 60, "fusion committed to the end")  # a duplicate would be visible now
        res = results(cfg)
        assert 20 <= killed_at <= 60
        assert len(res) == n and len({r.record_id for r in res}) == n
        assert all(not r.partial for r in res)
        assert "state restored from the changelog" in (tmp_path / "w2.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
