"""The supervisor: worker specs per device and model, restart with backoff, crash loops, clean stop;
workers that outlive a killed supervisor, a second supervisor of the same groups, given-up stages."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from tests.conftest import wait_for

from tensorline import config
from tensorline.engine import clients
from tensorline.engine.errors import FATAL_EXIT_CODE
from tensorline.engine.worker import STATE_DIR_ENV
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


TOPICS = "[topics]\nin = {}\nout = {}\n"


def stage_body(kind: str, *, name: str = "scale", workers: int = 1, **params: str) -> str:
    """A stage table from topic `in` to `out` (with TOPICS, the body of a pipeline file)."""
    body = f'[stages.{name}]\ninput = "in"\noutput = "out"\nkind = "{kind}"\nworkers = {workers}\n'
    if params:
        body += f"[stages.{name}.params]\n" + "".join(f"{k} = {v}\n" for k, v in params.items())
    return body


def write(tmp_path, namespace, bootstrap, kind):
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{bootstrap}"\n{TOPICS}{stage_body(kind)}')
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
        time.sleep(0.05)  # poll of the loop's condition
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
        time.sleep(0.2)  # poll of the loop's condition
    assert sup.alive == 2
    sup.stop(timeout_s=20)
    assert [w.proc.returncode for w in sup.running] == [0, 0]
    assert all("worker stopped" in (tmp_path / "logs" / f"scale.{i}.log").read_text() for i in range(2))


def held_slots(state: Path) -> dict[str, int | None]:
    """Slot file name -> the pid written in it, for the slot files a live process holds locked."""
    held = {}
    for path in sorted((state / "workers").glob("*.lock")):
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                held[path.name] = json.loads(handle.read() or "{}").get("pid")
    return held


def alive(pid: int) -> bool:
    """Running; a zombie nobody has reaped yet counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False




def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorline.cli", *args]


@pytest.mark.broker
def test_workers_of_a_killed_supervisor_exit_and_a_second_up_is_refused(tmp_path, write_pipeline):
    path = tmp_path / "p.toml"
    write_pipeline(path, TOPICS + stage_body("tensorline.stages.testing:Scale", workers=2))
    state = tmp_path / "state"
    env = {**os.environ, STATE_DIR_ENV: str(state)}

    def two_workers_up():
        slots = held_slots(state)
        return slots if len(slots) == 2 and all(slots.values()) else None

    with open(tmp_path / "up.log", "w") as log:
        up = subprocess.Popen(cli("up", "-c", str(path)), env=env, stdout=log, stderr=log)
    pids: list[int] = []
    try:
        slots = wait_for(two_workers_up, 60, "two workers up")
        pids = list(slots.values())
        second = subprocess.run(cli("up", "-c", str(path)), env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0
        assert "already" in second.stderr and str(up.pid) in second.stderr, second.stderr
        assert "worker started" not in second.stderr and held_slots(state) == slots  # it started nothing
        up.kill()
        up.wait()
        wait_for(lambda: not any(alive(p) for p in pids), 30, "every worker of the killed supervisor gone")
    finally:
        up.kill()
        up.wait()
        for pid in {*pids, *(p for p in held_slots(state).values() if p)}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_live_workers_of_the_groups_are_named_and_nothing_starts(tmp_path, monkeypatch):
    """Orphans where PDEATHSIG is unavailable: a live process holds a worker slot of the group."""
    state = tmp_path / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    path = write(tmp_path, "orphans", "127.0.0.1:1", "tensorline.stages.testing:Scale")
    cfg = config.load(path)
    (state / "workers").mkdir(parents=True)
    slot = open(state / "workers" / f"{cfg.group_id('scale')}.0.lock", "a")
    fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
    slot.write(json.dumps({"group": cfg.group_id("scale"), "member": "h-0", "pid": 4242}))
    slot.flush()
    sup = supervisor.Supervisor(str(path), supervisor.specs(cfg, "scale"), log_dir=tmp_path / "logs")
    try:
        with pytest.raises(supervisor.AlreadyRunning, match="4242") as refused:
            sup.start()
        assert "kill 4242" in str(refused.value) and sup.running == []
    finally:
        sup.stop()
        slot.close()


@pytest.mark.broker
def test_a_worker_whose_supervisor_is_gone_stops_cleanly(tmp_path, write_pipeline):
    """The second line of defence: the supervisor pid a worker was given is not its parent."""
    path = tmp_path / "p.toml"
    write_pipeline(path, TOPICS + stage_body("tensorline.stages.testing:Scale"))
    env = {**os.environ, STATE_DIR_ENV: str(tmp_path / "state"), "TENSORLINE_SUPERVISOR_PID": "1"}
    proc = subprocess.run(cli("run", "scale", "-c", str(path)), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "supervisor gone" in proc.stderr and "worker stopped" in proc.stderr


@pytest.mark.broker
@pytest.mark.parametrize("keep_going", [False, True])
def test_a_given_up_stage_ends_the_supervisor_unless_keep_going(tmp_path, write_pipeline, monkeypatch, keep_going):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setattr(supervisor, "BACKOFF_S", (0.05, 0.1))
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, TOPICS + stage_body("tensorline.stages.testing:Scale")
                         + stage_body("tensorline.stages.testing:Scale", name="broken", factor='"not a number"'))
    sup = supervisor.Supervisor(str(path), supervisor.pipeline_specs(cfg), log_dir=tmp_path / "logs",
                                max_restarts=1, window_s=60)
    deadline = time.monotonic() + 60
    healthy_alive = []

    def until() -> bool:
        if keep_going and sup.given_up:
            healthy_alive.append(sup.running[0].proc.poll() is None)
            return True
        return time.monotonic() > deadline

    code = sup.run_forever(interval_s=0.1, until=until, **({"keep_going": True} if keep_going else {}))
    assert time.monotonic() < deadline, "the supervisor neither gave up the broken stage nor exited"
    assert [s.label for s in sup.given_up] == ["broken.0"]
    assert "could not convert string to float" in (tmp_path / "logs" / "broken.0.log").read_text()
    assert code == (0 if keep_going else 1)
    assert healthy_alive == ([True] if keep_going else [])
    assert all(w.proc.returncode is not None for w in sup.running)  # the healthy stage stopped with it


def test_a_fatal_exit_is_given_up_at_once_with_its_last_line(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "fatal_stage.py").write_text(
        "import sys\n"
        "def Stage(*args):\n"
        "    print('some start-up chatter', file=sys.stderr)\n"
        "    print('Fatal: not authorized to write t.out', file=sys.stderr)\n"
        f"    sys.exit({FATAL_EXIT_CODE})\n")
    path = write(tmp_path, "fatal", "127.0.0.1:1", "fatal_stage:Stage")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "plugins")}
    deadline = time.monotonic() + 30
    with structlog.testing.capture_logs() as logged:
        sup = supervisor.Supervisor(str(path), supervisor.specs(config.load(path), "scale"), log_dir=tmp_path / "logs",
                                    env=env, max_restarts=5, window_s=60)
        code = sup.run_forever(interval_s=0.05, until=lambda: time.monotonic() > deadline)
    assert code == 1 and [s.label for s in sup.given_up] == ["scale.0"]
    [given_up] = [e for e in logged if "exit_code" in e]
    assert given_up["exit_code"] == FATAL_EXIT_CODE
    assert given_up["last_line"] == "Fatal: not authorized to write t.out"
    assert not [e for e in logged if e["event"] in ("worker exited; restarting", "worker restarted")]
