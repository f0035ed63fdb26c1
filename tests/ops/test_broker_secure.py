"""`broker start --secure` and `acls apply` against real Kafka: a SASL_SSL/SCRAM broker of this
module's own, a pipeline running end to end under `tensorline up` with one principal per stage,
the preprocess principal refused outside its own topics, a wrong password failing at start with
one line, and no secret in any log or output of the module's runs (the last test)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern,
                         ResourcePatternFilter, ResourceType)
from kafka.errors import KafkaError, TopicAuthorizationFailedError

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import broker
from tensorline.schemas import Record, encode_record

from tests.conftest import wait_for

# The first test pays for the module's broker start (BROKER_START_S) on top of its own time.
pytestmark = [pytest.mark.broker, pytest.mark.timeout(900)]

# Every stdout and stderr of the module's CLI runs, grepped for secrets by the last test.
OUTPUTS: list[str] = []
RECORDS = 30
# Python, kafka-python, TLS and SCRAM (4096 PBKDF2 rounds) for each of two workers on a loaded 2-core machine.
START_S = 180.0
# The broker's JVM reached its acceptors 2.5 min after launch at a load of 12 on 2 cores (the
# launcher's default 90 s then expired); about 15 s on a quiet machine.
BROKER_START_S = 300.0


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    """A --secure single broker on a free port, and a folder for the module's runs; stopped at the end."""
    data_dir = tmp_path_factory.mktemp("secure-broker")
    try:
        st = broker.start(data_dir, broker.free_port(), secure=True, timeout=BROKER_START_S, with_parent=True)
        yield data_dir, st, tmp_path_factory.mktemp("secure-runs")
    finally:
        broker.stop(data_dir)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tensorline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    OUTPUTS.extend([done.stdout, done.stderr])
    return done


def write_pipeline(secure, namespace: str) -> Path:
    """preprocess (raw -> preprocessed) and features (-> features), Scale stages, a results topic
    no stage writes; the credentials file is the broker's own (acls apply adds the stages' there)."""
    data_dir, st, runs = secure
    folder = runs / namespace
    folder.mkdir()
    stages = "".join(f'[stages.{s}]\nkind = "tensorline.stages.testing:Scale"\ninput = "{i}"\noutput = "{o}"\n'
                     f"max_batch = 8\nmax_delay_ms = 20\n"
                     for s, i, o in (("preprocess", "raw", "preprocessed"), ("features", "preprocessed", "features")))
    path = folder / "pipeline.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{st.bootstrap}"\n[topics]\n'
                    + "".join(f"{t} = {{ partitions = 2 }}\n" for t in ("raw", "preprocessed", "features"))
                    + "results = { partitions = 1 }\ndlq = { partitions = 1 }\n" + stages
                    + f'[security]\nssl_cafile = "{data_dir / "tls" / "ca.pem"}"\n'
                      f'credentials_file = "{data_dir / broker.CREDENTIALS_FILE}"\n')
    assert cli("topics", "create", "-c", str(path)).returncode == 0, OUTPUTS[-1]
    return path


def applied(path: Path) -> list[dict]:
    done = cli("acls", "apply", "--json", "-c", str(path))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_data_dir_started_without_secure_or_a_weak_admin_password_is_refused(tmp_path, monkeypatch):
    (tmp_path / "plain" / "kraft").mkdir(parents=True)
    with pytest.raises(broker.BrokerError, match="started without --secure"):
        broker.start(tmp_path / "plain", secure=True)
    monkeypatch.setenv("TENSORLINE_KAFKA_PASSWORD_ADMIN", 'short"quote')
    with pytest.raises(broker.BrokerError, match="16 or more of"):
        broker.start(tmp_path / "new", secure=True)
    assert not (tmp_path / "new").exists()


def test_a_secure_broker_keeps_its_secrets_owner_only_and_says_how_to_reach_it(secure):
    data_dir, st, _ = secure
    for private in ("credentials.toml", "server.properties", "tls/broker.pem", "tls/ca.key"):
        assert stat.S_IMODE(os.stat(data_dir / private).st_mode) == 0o600, private
    props = (data_dir / "server.properties").read_text()
    for line in ("listeners=SASL_SSL://", "sasl.enabled.mechanisms=SCRAM-SHA-512",
                 "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                 "allow.everyone.if.no.acl.found=false", "super.users=User:admin",
                 "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT"):
        assert line in props
    status = json.loads(cli("broker", "status", "--json", "--data-dir", str(data_dir)).stdout)
    assert status["running"] and status["security"] == {
        "protocol": "SASL_SSL", "mechanism": "SCRAM-SHA-512", "admin": "admin",
        "ssl_cafile": str(data_dir / "tls" / "ca.pem"), "credentials_file": str(data_dir / "credentials.toml")}
    again = broker.start(data_dir)  # a secure data dir stays secure, and start stays idempotent
    assert again.pid == st.pid and again.security == status["security"]


def test_acls_apply_twice_changes_nothing_and_removes_what_the_plan_lacks(secure, namespace):
    path = write_pipeline(secure, namespace)
    first = {a["principal"]: a for a in applied(path)}
    assert set(first) == {"ops", "producer", "preprocess", "features"}
    assert first["preprocess"]["password_generated"] and len(first["preprocess"]["created"]) == 6
    assert {a["principal"]: (len(a["created"]), len(a["deleted"])) for a in applied(path)} == {
        p: (0, 0) for p in first}
    cfg = config.load(path)
    admin = clients.admin(cfg)
    try:  # a grant the plan does not have: preprocess reading the results topic
        stray = ACL(f"User:{namespace}.preprocess", "*", ACLOperation.READ, ACLPermissionType.ALLOW,
                    ResourcePattern(ResourceType.TOPIC, cfg.topic("results").name, ACLResourcePatternType.LITERAL))
        assert not admin.create_acls([stray])["failed"]
    finally:
        admin.close()
    third = {a["principal"]: a for a in applied(path)}
    assert third["preprocess"]["deleted"] == [{"principal": f"User:{namespace}.preprocess", "resource": "TOPIC",
                                               "name": cfg.topic("results").name, "operation": "READ",
                                               "pattern": "LITERAL"}]
    assert not third["preprocess"]["created"] and third["preprocess"]["kept"] == 6


def produce(cfg: config.PipelineConfig, n: int) -> None:
    producer = clients.producer(cfg)
    try:
        for i in range(n):
            record = Record(record_id=f"r{i}", source="test", ingest_ts_ms=int(time.time() * 1000), stage="raw",
                            tensors={"x": np.full((2, 2), i, np.float32)})
            producer.send(cfg.topic("raw").name, key=record.record_id.encode(), value=encode_record(record))
        producer.flush()
    finally:
        producer.close()


def ids(cfg: config.PipelineConfig, key: str) -> list[bytes]:
    return sorted(r.key for r in clients.read_range(cfg, cfg.topic(key).name))


@pytest.mark.timeout(600)
def test_the_pipeline_runs_end_to_end_each_stage_as_its_own_principal(secure, namespace):
    path = write_pipeline(secure, namespace)
    applied(path)
    cfg = config.load(path)
    folder = path.parent
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(folder / "state")}
    with open(folder / "up.log", "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "tensorline.cli", "up", "-c", str(path)], env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        produce(cfg.as_principal("producer"), RECORDS)
        ops = cfg.as_principal("ops")
        expected = sorted(f"r{i}".encode() for i in range(RECORDS))
        wait_for(lambda: up.poll() is not None or len(ids(ops, "features")) >= RECORDS, START_S,
                 "every record through preprocess and features", every_s=1.0)
        assert up.poll() is None, (folder / "up.log").read_text()[-3000:]
        lag = cli("lag", "--json", "-c", str(path), env={"TENSORLINE_STATE_DIR": str(folder / "state")})
        assert lag.returncode == 0, lag.stderr
        assert {g["stage"] for g in json.loads(lag.stdout)["stages"]} == {"preprocess", "features"}
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    assert ids(ops, "features") == expected  # each once, read_committed, read as ops
    workers = sorted((folder / "state" / "logs").rglob("*.log"))
    assert workers and all("worker started" in w.read_text() for w in workers)


def test_the_preprocess_principal_is_refused_the_features_topic_and_the_results_topic(secure, namespace):
    path = write_pipeline(secure, namespace)
    applied(path)
    pre = config.load(path).as_principal("preprocess")
    reader = clients.consumer(pre, None)
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=pre.topic("features").name):
            reader.end_offsets([TopicPartition(pre.topic("features").name, 0)])
    finally:
        reader.close()
    writer = clients.producer(pre)
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=pre.topic("results").name):
            writer.send(pre.topic("results").name, b"not mine").get(timeout=60)
        writer.send(pre.topic("preprocessed").name, b"mine").get(timeout=60)  # its own output it may write
    finally:
        writer.close(timeout=5)
    ops = clients.producer(pre.as_principal("ops"))
    try:  # ops may write nowhere, so the broker refuses it even a producer id
        with pytest.raises(KafkaError, match="ClusterAuthorizationFailed"):
            ops.send(pre.topic("raw").name, b"ops only reads").get(timeout=60)
    finally:
        ops.close(timeout=5)


def test_produce_writes_the_raw_topic_as_the_producer_principal(secure, namespace):
    path = write_pipeline(secure, namespace)
    applied(path)
    np.save(path.parent / "image.npy", np.ones((4, 4), np.float32))
    done = cli("produce", str(path.parent / "image.npy"), "-c", str(path),
               env={"TENSORLINE_STATE_DIR": str(path.parent / "state")})
    assert done.returncode == 0, done.stderr
    assert len(ids(config.load(path).as_principal("ops"), "raw")) == 1


def test_a_stage_refused_its_input_stops_with_one_clear_error_instead_of_idling(secure, namespace):
    """kafka-python hides a topic the principal may not read and only logs it; the worker idled
    for good. Its READ ACL on the input taken away, preprocess stops: exit 3, one line naming the topic."""
    path = write_pipeline(secure, namespace)
    applied(path)
    cfg = config.load(path)
    admin = clients.admin(cfg)
    try:
        read_input = ACLFilter(f"User:{namespace}.preprocess", "*", ACLOperation.READ, ACLPermissionType.ALLOW,
                               ResourcePatternFilter(ResourceType.TOPIC, cfg.topic("raw").name,
                                                     ACLResourcePatternType.LITERAL))
        [(_, deleted, _)] = admin.delete_acls([read_input])
        assert len(deleted) == 1, deleted
    finally:
        admin.close()
    done = cli("run", "preprocess", "-c", str(path), timeout=180,
               env={"TENSORLINE_STATE_DIR": str(path.parent / "state")})
    assert done.returncode == 3, done.stderr
    assert f"not authorized to read {cfg.topic('raw').name}" in done.stderr and "acls apply" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wrong_password_fails_at_start_with_one_clear_error(secure, namespace):
    path = write_pipeline(secure, namespace)
    applied(path)
    started = time.monotonic()
    done = cli("run", "preprocess", "-c", str(path), timeout=90,
               env={"TENSORLINE_KAFKA_PASSWORD_PREPROCESS": "not-the-password-at-all",
                    "TENSORLINE_STATE_DIR": str(path.parent / "state")})
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    bootstrap = secure[1].bootstrap
    assert f"principal User:{namespace}.preprocess could not authenticate at {bootstrap}" in lines[0]
    assert "$TENSORLINE_KAFKA_PASSWORD_PREPROCESS" in lines[0] and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60  # no retry until a bootstrap timeout


def test_the_dashboard_and_check_read_as_ops_and_show_no_secret(secure, namespace):
    from tensorline.ops import dashboard

    path = write_pipeline(secure, namespace)
    applied(path)
    with dashboard.Dashboard(config.load(path).as_principal("ops"), interval_s=1.0) as board:
        def sampled() -> dict | None:
            with urllib.request.urlopen(board.url + "api/state", timeout=10) as response:
                body = response.read().decode()
            OUTPUTS.append(body)
            state = json.loads(body)
            return state if state["ok"] is not None else None
        state = wait_for(sampled, 120, "a first sample of the pipeline, read as ops")
    assert state["ok"] and state["error"] is None, state["error"]
    assert {s["stage"] for s in state["stages"]} == {"preprocess", "features"}
    checked = json.loads(cli("check", "--json", "-c", str(path)).stdout)  # check describes the topics as ops too
    topics = [c for c in checked["checks"] if c["key"].startswith("topics")]
    assert topics and all(c["status"] == "ok" for c in topics), topics


def test_no_secret_in_any_log_or_output(secure):
    """Last: every log of the broker and of the module's workers, the pipeline files and every
    output captured above, against every password (those two files hold them by design)."""
    data_dir, _, runs = secure
    passwords = [v.encode() for v in config.read_credentials(data_dir / broker.CREDENTIALS_FILE).values()]
    assert len(passwords) >= 1 + 4  # the admin's, and four principals for each pipeline of the module
    holders = {data_dir / broker.CREDENTIALS_FILE, data_dir / "server.properties"}
    files = [f for f in [*data_dir.rglob("*"), *runs.rglob("*")] if f.is_file() and f not in holders]
    assert any(f.name == "broker.log" for f in files) and any(f.name == "up.log" for f in files)
    found = [(f, p) for f in files for p in passwords if p in f.read_bytes()]
    found += [(i, p) for i, out in enumerate(OUTPUTS) for p in passwords if p.decode() in out]
    assert not found
