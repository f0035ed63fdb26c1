"""The local broker launcher against a real Kafka: start, idempotence, stale pid recovery, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from tensorline.ops import broker

from tests.conftest import wait_for


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory):
    """A second broker of this module's own, so killing it cannot hurt other tests."""
    data_dir = tmp_path_factory.mktemp("own-broker")
    st = broker.start(data_dir, broker.free_port(), with_parent=True)
    yield data_dir, st
    broker.stop(data_dir)


def test_start_answers_and_writes_bootstrap(own_broker):
    data_dir, st = own_broker
    assert st.running and st.pid and st.bootstrap
    assert (data_dir / "bootstrap").read_text() == st.bootstrap
    admin = KafkaAdminClient(bootstrap_servers=st.bootstrap)
    try:
        assert admin.describe_cluster()["brokers"][0]["broker_id"] == 1
    finally:
        admin.close()


def test_start_is_idempotent(own_broker):
    data_dir, st = own_broker
    again = broker.start(data_dir, int(st.bootstrap.rsplit(":", 1)[1]))
    assert again.pid == st.pid and again.bootstrap == st.bootstrap


def test_status_json_from_cli(own_broker):
    data_dir, st = own_broker
    out = subprocess.run([sys.executable, "-m", "tensorline.cli", "broker", "status", "--json",
                          "--data-dir", str(data_dir)], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert status["running"] is True
    assert status["bootstrap"] == st.bootstrap and status["pid"] == st.pid


def test_killed_broker_is_recovered_with_its_data(own_broker):
    data_dir, st = own_broker
    port = int(st.bootstrap.rsplit(":", 1)[1])
    admin = KafkaAdminClient(bootstrap_servers=st.bootstrap)
    admin.create_topics([NewTopic("survives-kill", 1, 1)])
    admin.close()
    os.kill(st.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while broker.status(data_dir).running and time.monotonic() < deadline:
        time.sleep(0.1)  # poll of the loop's condition
    assert not broker.status(data_dir).running  # the pid file is stale now
    restarted = broker.start(data_dir, port)
    assert restarted.running and restarted.pid != st.pid
    admin = KafkaAdminClient(bootstrap_servers=restarted.bootstrap)
    try:
        assert "survives-kill" in admin.list_topics()
    finally:
        admin.close()


def test_stop_waits_for_exit_and_clears_state(tmp_path):
    st = broker.start(tmp_path, broker.free_port())
    stopped = broker.stop(tmp_path)
    assert not stopped.running and stopped.pid is None
    assert not os.path.exists(f"/proc/{st.pid}/cmdline") or not broker.pid_alive(st.pid, tmp_path)
    assert not (tmp_path / "broker.pid").exists() and not (tmp_path / "bootstrap").exists()
    assert "shut down completed" in (tmp_path / "broker.log").read_text().lower() or \
        "shutdown" in (tmp_path / "broker.log").read_text().lower()


def test_port_in_use_is_a_clear_error(tmp_path, own_broker):
    _, st = own_broker
    with pytest.raises(broker.BrokerError, match="in use"):
        broker.start(tmp_path, int(st.bootstrap.rsplit(":", 1)[1]))


def test_cluster_ids_never_start_with_a_dash(tmp_path, monkeypatch):
    ids = iter([b"\xf8" + bytes(15), bytes(16)])  # urlsafe base64 of 0xf8... starts with "-"
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: type("U", (), {"bytes": next(ids)})())
    assert not broker._cluster_id(tmp_path).startswith("-")
    assert (tmp_path / "cluster.id").read_text() == "AAAAAAAAAAAAAAAAAAAAAA"


def test_a_broker_started_with_its_parent_stops_when_the_parent_is_killed(tmp_path):
    """A test session's broker (`with_parent`) must not outlive a pytest killed by SIGKILL: it
    used to run on, holding its ports and half a GiB, until someone found it."""
    script = (f"import signal; from tensorline.ops import broker; "
              f"from pathlib import Path; broker.start(Path({str(tmp_path)!r}), broker.free_port(), with_parent=True); "
              f"print('started', flush=True); signal.pause()")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        st = broker.status(tmp_path)
        assert st.running and st.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not broker.pid_alive(st.pid, tmp_path), 120, "the broker gone with its parent")
    finally:
        parent.kill()
        parent.wait()
        broker.stop(tmp_path)
