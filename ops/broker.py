"""The project's own single-node Kafka broker (KRaft mode, no ZooKeeper), run on the machine's Java.

The jars come from Maven Central (`ops/kafka/pom.xml`, resolved once into a cache folder); the
broker lives under a data dir with its storage, config, log, pid and bootstrap files. Start is
idempotent and recovers from a stale pid left by a killed broker; stop waits for the exit.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from tensorline.config import DEFAULT_MAX_MESSAGE_BYTES
from tensorline.engine.local import (DATA_DIR_ENV, DEFAULT_DATA_DIR, BrokerStatus, pid_alive, read_pid,  # noqa: F401
                                     data_dir_default, local_bootstrap, status)

KAFKA_VERSION = "4.1.1"  # keep in step with ops/kafka/pom.xml and docker/compose.yaml
DEFAULT_PORT = 9092
LIBS_ENV = "TENSORLINE_KAFKA_LIBS"
JVM_OPTS_ENV = "TENSORLINE_BROKER_JVM_OPTS"  # space-separated, replace JVM_OPTS (e.g. a bigger heap)
# Generous: a first start on a cold 2-core machine (JIT, storage format) takes about 10 s.
START_TIMEOUT_S = 90.0
# The broker flushes and closes its logs on SIGTERM; 30 s is plenty for a single node.
STOP_TIMEOUT_S = 30.0
PORT_WAIT_S = 5.0
# C1 only (TieredStopAtLevel=1): a fresh broker's C2 compiler took ~0.2 core for the first tens
# of seconds of every new load on a 2-core machine, as much as the broker's own work; without it
# the broker spent 0.26 instead of 0.45-0.51 ms CPU per record in bench/stages. A long-running
# production broker, on its own hosts, is configured by its operators, not by this launcher.
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]

# Single-node settings. Replication factor and min ISR 1 so transactions and group offsets work
# on one broker; few internal partitions so the first group or transaction does not wait for 50
# partitions to be created; no initial rebalance delay so a lone test worker starts at once;
# no auto-created topics so a typo in a topic name is an error, not a new empty topic.
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
auto.create.topics.enable=false
message.max.bytes={max_message_bytes}
replica.fetch.max.bytes={max_message_bytes}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
"""

LOG4J2_PROPERTIES = """\
status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


def libs_dir() -> Path:
    """Where the broker jars live: $TENSORLINE_KAFKA_LIBS or a per-version user cache folder."""
    if os.environ.get(LIBS_ENV):
        return Path(os.environ[LIBS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tensorline" / f"kafka-{KAFKA_VERSION}"


def fetch(libs: Path | None = None) -> Path:
    """Resolve the broker and tools jars from Maven Central into `libs` (once)."""
    libs = libs or libs_dir()
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if not shutil.which("mvn"):
        raise BrokerError("Maven (mvn) is not on PATH: it fetches the Kafka broker jars from Maven Central")
    libs.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("tensorline.ops") / "kafka" / "pom.xml") as pom:
        cmd = ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BrokerError(f"fetching Kafka {KAFKA_VERSION} jars failed ({' '.join(cmd)}):\n"
                          f"{(done.stdout + done.stderr)[-2000:]}")
    marker.write_text(KAFKA_VERSION)
    return libs


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java:
        raise BrokerError("Java is not on PATH (Kafka 4 needs Java 17 or newer)")
    return java


def java_command(main_class: str, *args: str, libs: Path | None = None, jvm: list[str] | None = None) -> list[str]:
    """A command line running one of Kafka's classes (broker, storage or admin tools)."""
    libs = fetch(libs)
    return [_java(), *(jvm or ["-Xmx256m"]), "-cp", str(libs / "*"), main_class, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(bootstrap: str) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    host, port = bootstrap.rsplit(":", 1)
    try:  # a plain connect first: kafka-python logs every refused connection as an error
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    except (KafkaError, OSError):
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_config(data_dir: Path, port: int, max_message_bytes: int) -> Path:
    port_file = data_dir / "controller.port"
    if port_file.exists():
        controller_port = int(port_file.read_text())
    else:
        controller_port = free_port()
        port_file.write_text(str(controller_port))
    # A broker killed a moment ago may still be closing its sockets: give them a few seconds.
    deadline = time.monotonic() + PORT_WAIT_S
    while not (_port_free(port) and _port_free(controller_port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not _port_free(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is in use by another process; pass --port N")
    if not _port_free(controller_port):
        raise BrokerError(f"controller port {controller_port} (from {port_file}) is in use; "
                          f"free it or delete {data_dir} to start over")
    props = data_dir / "server.properties"
    props.write_text(SERVER_PROPERTIES.format(port=port, controller_port=controller_port,
                                              log_dir=data_dir / "kraft", max_message_bytes=max_message_bytes))
    (data_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES.format(log_file=data_dir / "broker.log"))
    return props


def start(data_dir: Path | None = None, port: int = DEFAULT_PORT, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float = START_TIMEOUT_S) -> BrokerStatus:
    """Start the broker (formatting storage on first start) and wait until it answers."""
    data_dir = (data_dir or data_dir_default()).resolve()
    current = status(data_dir)
    if current.running:
        return current
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "broker.pid").unlink(missing_ok=True)  # stale: its process is gone
    props = _write_config(data_dir, port, max_message_bytes)
    log4j = f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}"
    if not (data_dir / "kraft" / "meta.properties").exists():
        fmt = java_command("kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id(data_dir)}",
                           "-c", str(props), "--ignore-formatted", jvm=["-Xmx256m", log4j])
        done = subprocess.run(fmt, capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"formatting {data_dir / 'kraft'} failed:\n{done.stdout}{done.stderr}")
    jvm = os.environ[JVM_OPTS_ENV].split() if os.environ.get(JVM_OPTS_ENV) else JVM_OPTS
    cmd = java_command("kafka.Kafka", str(props), jvm=[*jvm, log4j])
    with open(data_dir / "broker.out", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=data_dir)
    (data_dir / "broker.pid").write_text(str(proc.pid))
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (data_dir / "broker.pid").unlink(missing_ok=True)
            raise BrokerError(f"the broker exited with code {proc.returncode} during start; "
                              f"{data_dir / 'broker.log'} ends with:\n{_log_tail(data_dir / 'broker.log')}\n"
                              f"{_log_tail(data_dir / 'broker.out', 10)}")
        if _answers(bootstrap):
            (data_dir / "bootstrap").write_text(bootstrap)
            return status(data_dir)
        time.sleep(0.5)
    stop(data_dir)
    raise BrokerError(f"the broker did not answer on {bootstrap} within {timeout:.0f} s; see {data_dir / 'broker.log'}")


def _cluster_id(data_dir: Path) -> str:
    """A stable KRaft cluster id (base64 of a UUID, as kafka-storage random-uuid makes)."""
    path = data_dir / "cluster.id"
    if not path.exists():
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: never a leading dash
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(cluster_id)
    return path.read_text().strip()


def stop(data_dir: Path | None = None, timeout: float = STOP_TIMEOUT_S) -> BrokerStatus:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after `timeout`) and wait for its exit."""
    data_dir = (data_dir or data_dir_default()).resolve()
    pid = read_pid(data_dir)
    if pid is not None and pid_alive(pid, data_dir):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid, data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid, data_dir):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid, data_dir):
                time.sleep(0.1)
    (data_dir / "broker.pid").unlink(missing_ok=True)
    (data_dir / "bootstrap").unlink(missing_ok=True)
    return status(data_dir)
