"""The supervisor: worker specs per device and model, restart with backoff, crash loops, clean stop."""

from __future__ import annotations

import time

import pytest

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import supervisor

PIPE = {
    "topics": {"in": {}, "out": {}, "det": {}},
    "stages": {
        "scale": {"input": "in", "output": "out", "kind": "tensorline.stages.testing:Scale", "workers": 3,
                  "devices": ["gpu:0", "gpu:1"]},
        "detection": {"input": "out", "output": "det", "workers": 2,
                      "models": {"a": {"path": "a.keras"}, "b": {"path": "b.keras"}}},
    },
}


def test_specs_round_robin_devices_and_one_set_per_model():
    cfg = config.parse({"pipeline": {"name": "s"}, **PIPE})
    scale = supervisor.specs(cfg, "scale")
    assert [(s.device, s.index) for s in scale] == [("gpu:0", 0), ("gpu:1", 1), ("gpu:0", 2)]
    det = supervisor.specs(cfg, "detection")
    assert [(s.model, s.index) for s in det] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [s.model for s in supervisor.specs(cfg, "detection", model="b", workers=1)] == ["b"]
    assert len(supervisor.pipeline_specs(cfg)) == 7
    assert supervisor.specs(cfg, "scale", workers=1, devices=("cpu",))[0].label == "scale.0"


def write(tmp_path, namespace, bootstrap, kind):
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{bootstrap}"\n[topics]\nin = {{}}\nout = {{}}\n'
                    f'[stages.scale]\ninput = "in"\noutput = "out"\nkind = "{kind}"\n')
    return path


def test_a_crashing_worker_is_restarted_then_given_up(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "BACKOFF_S", (0.05, 0.1))
    path = write(tmp_path, "crash", "127.0.0.1:1", "no.such.module:Stage")
    sup = supervisor.Supervisor(str(path), supervisor.specs(config.load(path), "scale"), log_dir=tmp_path / "logs",
                                max_restarts=2, window_s=60)
    sup.start()
    deadline = time.monotonic() + 60
    while not sup.given_up and time.monotonic() < deadline:
        sup.check()
        time.sleep(0.05)
    sup.stop()
    assert [s.label for s in sup.given_up] == ["scale.0"]
    assert "No module named 'no'" in (tmp_path / "logs" / "scale.0.log").read_text()


@pytest.mark.broker
def test_stop_ends_live_workers_cleanly(tmp_path, namespace, kafka_bootstrap, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    path = write(tmp_path, namespace, kafka_bootstrap, "tensorline.stages.testing:Scale")
    clients.create_topics(config.load(path))
    sup = supervisor.Supervisor(str(path), supervisor.specs(config.load(path), "scale", workers=2),
                                log_dir=tmp_path / "logs")
    sup.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
            "worker started" in (tmp_path / "logs" / f"scale.{i}.log").read_text() for i in range(2)):
        time.sleep(0.2)
    assert sup.alive == 2
    sup.stop(timeout_s=20)
    assert [w.proc.returncode for w in sup.running] == [0, 0]
    assert all("worker stopped" in (tmp_path / "logs" / f"scale.{i}.log").read_text() for i in range(2))
