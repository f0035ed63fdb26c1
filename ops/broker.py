"""The project's own Kafka broker (KRaft mode, no ZooKeeper), run on the machine's Java: a single
node by default, or a local cluster of N nodes (`start(nodes=3)`) to see what replication and
broker failures do to a pipeline.

The jars come from Maven Central (`ops/kafka/pom.xml`, resolved once into a cache folder); the
broker lives under a data dir with its storage, config, log, pid and bootstrap files (a
cluster: one folder per node, `node-1`, ..., each its node's own, and `nodes.json` with their
ports). Every node is broker and controller at once; the controllers are a quorum of all nodes.
Start is idempotent, starts only the nodes that are not running, and recovers from a stale pid
left by a killed one; stop waits for the exit.

`start(secure=True)` (`--secure`) makes the client listener SASL_SSL with SCRAM-SHA-512: a local
CA and broker certificate made on first start (`ops/tls.py`, under `tls/`), an admin super user
created when the storage is formatted (its password from $TENSORLINE_KAFKA_PASSWORD_ADMIN, else
generated, kept in `credentials.toml`, owner-only), Kafka's StandardAuthorizer denying whatever no
ACL allows (`tensorline acls apply` grants the pipeline's principals theirs). The KRaft controller
listener stays on 127.0.0.1 without TLS, authenticated (SASL PLAIN, the admin alone): no
unauthenticated principal is a super user anywhere. A data dir stays as first started: secure or not.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from tensorline.config import ADMIN_PRINCIPAL, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_SASL_MECHANISM, password_env
from tensorline.engine.local import (CREDENTIALS_FILE, DATA_DIR_ENV, DEFAULT_DATA_DIR, NODES_FILE,  # noqa: F401
                                     SECURITY_FILE, BrokerStatus, NodeStatus, data_dir_default, local_bootstrap,
                                     node_dir, pid_alive, read_nodes, read_pid, read_security, status)
from tensorline.ops import signals, tls

KAFKA_VERSION = "4.1.1"  # keep in step with ops/kafka/pom.xml and docker/compose.yaml
DEFAULT_PORT = 9092
LIBS_ENV = "TENSORLINE_KAFKA_LIBS"
JVM_OPTS_ENV = "TENSORLINE_BROKER_JVM_OPTS"  # space-separated, replace JVM_OPTS (e.g. a bigger heap)
# Generous: a first start on a cold 2-core machine (JIT, storage format) takes about 10 s.
START_TIMEOUT_S = 90.0
# The broker flushes and closes its logs on SIGTERM; 30 s is plenty for a single node, and for
# the nodes of a local cluster stopped together.
STOP_TIMEOUT_S = 30.0
# A local cluster's nodes share the machine; more than a few only split its cores further (and
# node folders stay one digit: node-1 is no prefix of another).
MAX_NODES = 9
# Copies of every partition on a cluster, at most; writes need 2 of the 3 in sync, so one node
# may fail without losing an acknowledged record or stopping writes (Kafka's usual production
# choice, and what `clients.create_topics` gives the pipeline's topics).
MAX_REPLICATION = 3
PORT_WAIT_S = 5.0
# C1 only (TieredStopAtLevel=1): a fresh broker's C2 compiler took ~0.2 core for the first tens
# of seconds of every new load on a 2-core machine, as much as the broker's own work; without it
# the broker spent 0.26 instead of 0.45-0.51 ms CPU per record in bench/stages. A long-running
# production broker, on its own hosts, is configured by its operators, not by this launcher.
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]

# One node's settings. Internal topics (group offsets, transaction state) replicated on min(3,
# nodes) nodes with min ISR 2 from three nodes on, 1 on a single node, so transactions and group
# offsets work there; few internal partitions so the first group or transaction does not wait
# for 50 partitions to be created; no initial rebalance delay so a lone test worker starts at
# once; no auto-created topics so a typo in a topic name is an error, not a new empty topic.
# The listeners' names and protocols are in one place (LISTENERS) so another protocol can
# replace PLAINTEXT there.
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
{listeners}
log.dirs={log_dir}
num.partitions=1
auto.create.topics.enable=false
message.max.bytes={max_message_bytes}
replica.fetch.max.bytes={max_message_bytes}
default.replication.factor={replication}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=8
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
"""

LISTENERS = """\
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"""

# --secure: clients and brokers (replication) on SASL_SSL as the admin; the controllers among
# themselves and brokers to controllers on SASL_PLAINTEXT with PLAIN, whose only user is the
# admin (SCRAM credentials live in the metadata the controllers serve, so they cannot guard it).
# Nothing is allowed without an ACL but to the admin.
SECURE_LISTENERS = """\
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT
sasl.enabled.mechanisms={mechanism}
sasl.mechanism.inter.broker.protocol={mechanism}
listener.name.sasl_ssl.{mechanism_lower}.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \
required username="{admin}" password="{password}";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule \
required username="{admin}" password="{password}" user_{admin}="{password}";
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{admin}"""
# A password the launcher writes into properties and a format argument unquoted: URL-safe
# characters only (what `secrets.token_urlsafe` makes), long enough not to be guessed.
ADMIN_PASSWORD = re.compile(r"[A-Za-z0-9_.~-]{16,}")

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


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1 (for a cluster's client ports)."""
    for _ in range(100):
        base = free_port()
        if base + count <= 65535 and all(_port_free(base + i) for i in range(count)):
            return base
    raise BrokerError(f"no {count} consecutive free ports on 127.0.0.1 found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(bootstrap: str, settings: dict) -> bool:
    """True when the broker answers a metadata request (a client with `settings`: `Security.client`)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    host, port = bootstrap.rsplit(":", 1)
    try:  # a plain connect first: kafka-python logs every refused connection as an error
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **settings)
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


def replication(nodes: int) -> tuple[int, int]:
    """(replication factor, min in-sync replicas) for a cluster of `nodes` brokers: min(3, nodes)
    copies, of which 2 must be in sync from three nodes on (1 below: a write needs every copy)."""
    return min(MAX_REPLICATION, nodes), 2 if nodes >= MAX_REPLICATION else 1


@dataclass(frozen=True)
class Node:
    """One node's identity and ports: fixed at a cluster's first start (the controller quorum
    names every node's controller port), recorded in nodes.json."""
    node_id: int
    port: int
    controller_port: int

    @property
    def voter(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"


def _wait_ports_free(*ports: int) -> None:
    """A broker killed a moment ago may still be closing its sockets: give them a few seconds."""
    deadline = time.monotonic() + PORT_WAIT_S
    while not all(_port_free(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass(frozen=True)
class Security:
    """A --secure broker's settings: its admin's name and password, the mechanism, its TLS files."""
    admin: str
    password: str = field(repr=False)
    mechanism: str
    material: tls.Material

    def listeners(self, node: Node) -> str:
        return SECURE_LISTENERS.format(
            port=node.port, controller_port=node.controller_port, mechanism=self.mechanism,
            mechanism_lower=self.mechanism.lower(), admin=self.admin, password=self.password,
            keystore=self.material.keystore, truststore=self.material.ca_cert)

    def client(self) -> dict[str, str]:
        """kafka-python settings of the admin on the broker's listener."""
        return {"security_protocol": "SASL_SSL", "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.admin, "sasl_plain_password": self.password,
                "ssl_cafile": str(self.material.ca_cert)}


def _secure(data_dir: Path, make: bool) -> Security | None:
    """The data dir's security: made now when `make` and it has none (the TLS files, the admin's
    password), refused when `make` and the data dir holds a broker formatted without it."""
    found = read_security(data_dir)
    if found is None and not make:
        return None
    if found is None:
        if (data_dir / "kraft").exists() or (data_dir / NODES_FILE).exists():
            raise BrokerError(f"{data_dir} holds a broker started without --secure (its storage has no admin "
                              f"user); use another --data-dir or delete it to start over")
        password = os.environ.get(password_env(ADMIN_PRINCIPAL)) or secrets.token_urlsafe(24)
        if not ADMIN_PASSWORD.fullmatch(password):
            raise BrokerError(f"${password_env(ADMIN_PRINCIPAL)}: the admin password must be 16 or more of "
                              f"A-Z a-z 0-9 _ . ~ - (the launcher writes it into the broker's properties)")
        data_dir.mkdir(parents=True, exist_ok=True)
        material = tls.ensure(data_dir / "tls")
        tls.write_private(data_dir / CREDENTIALS_FILE, f'{ADMIN_PRINCIPAL} = "{password}"\n'.encode())
        found = {"protocol": "SASL_SSL", "mechanism": DEFAULT_SASL_MECHANISM, "admin": ADMIN_PRINCIPAL,
                 "ssl_cafile": str(material.ca_cert), "credentials_file": str(data_dir / CREDENTIALS_FILE)}
        (data_dir / SECURITY_FILE).write_text(json.dumps(found))
    with open(found["credentials_file"], "rb") as f:
        password = tomllib.load(f)[found["admin"]]
    return Security(found["admin"], password, found["mechanism"], tls.material(data_dir / "tls"))


def _write_config(folder: Path, node: Node, voters: list[Node], max_message_bytes: int,
                  security: Security | None = None) -> Path:
    """server.properties and log4j2.properties of one node, in its folder (the properties
    owner-only: a secure node's hold the admin's password)."""
    replication_factor, min_isr = replication(len(voters))
    props = folder / "server.properties"
    listeners = (security.listeners(node) if security else
                 LISTENERS.format(port=node.port, controller_port=node.controller_port))
    tls.write_private(props, SERVER_PROPERTIES.format(
        node_id=node.node_id, voters=",".join(v.voter for v in voters), listeners=listeners,
        log_dir=folder / "kraft", max_message_bytes=max_message_bytes,
        replication=replication_factor, min_isr=min_isr).encode())
    (folder / "log4j2.properties").write_text(LOG4J2_PROPERTIES.format(log_file=folder / "broker.log"))
    return props


def _format(folders: list[tuple[Path, Path]], cluster_id: str, security: Security | None = None) -> None:
    """Format the storage of every (folder, its server.properties) not formatted yet, together
    (one JVM start each: seconds on a loaded machine); a secure one with the admin's SCRAM
    credentials in its first metadata (kafka-storage format --add-scram)."""
    running = []
    scram = ["--add-scram", f"{security.mechanism}=[name={security.admin},password={security.password}]"] \
        if security else []
    for folder, props in folders:
        if (folder / "kraft" / "meta.properties").exists():
            continue
        log4j = f"-Dlog4j2.configurationFile={folder / 'log4j2.properties'}"
        fmt = java_command("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                           "-c", str(props), "--ignore-formatted", *scram, jvm=["-Xmx256m", log4j])
        running.append((folder, subprocess.Popen(fmt, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = [(folder, proc.communicate()[0]) for folder, proc in running]
    failed = [(folder, out) for (folder, out), (_, proc) in zip(failed, running) if proc.returncode != 0]
    if failed:
        text = "\n".join(f"formatting {folder / 'kraft'} failed:\n{out}" for folder, out in failed)
        raise BrokerError(text.replace(security.password, "***") if security else text)


def _launch(folder: Path, props: Path, with_parent: bool = False) -> subprocess.Popen:
    """Start the node's JVM (its pid in broker.pid); its storage is formatted."""
    log4j = f"-Dlog4j2.configurationFile={folder / 'log4j2.properties'}"
    jvm = os.environ[JVM_OPTS_ENV].split() if os.environ.get(JVM_OPTS_ENV) else JVM_OPTS
    cmd = java_command("kafka.Kafka", str(props), jvm=[*jvm, log4j])
    with open(folder / "broker.out", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=folder,
                                preexec_fn=signals.with_parent() if with_parent else None)
    (folder / "broker.pid").write_text(str(proc.pid))
    return proc


def _exited(folder: Path, proc: subprocess.Popen, what: str) -> BrokerError:
    (folder / "broker.pid").unlink(missing_ok=True)
    return BrokerError(f"{what} exited with code {proc.returncode} during start; "
                       f"{folder / 'broker.log'} ends with:\n{_log_tail(folder / 'broker.log')}\n"
                       f"{_log_tail(folder / 'broker.out', 10)}")


def start(data_dir: Path | None = None, port: int | None = None, *, nodes: int | None = None,
          secure: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          timeout: float = START_TIMEOUT_S, with_parent: bool = False) -> BrokerStatus:
    """Start the broker (formatting storage on first start) and wait until it answers.

    `nodes`: a local cluster of that many nodes (`port`, default 9092, and the ports after it);
    None is what the data dir holds, a single broker for a new one. A cluster's nodes that are not
    running are started (the others left alone), and start returns once every node answers and
    the cluster has every node registered. `secure`: SASL_SSL with SCRAM and ACLs (the module
    docstring); a data dir first started so stays so without it. `with_parent`: the nodes get
    SIGTERM when this thread ends, even by SIGKILL (a test session's broker); otherwise they
    outlive the command that started them, as `tensorline broker start` wants."""
    data_dir = (data_dir or data_dir_default()).resolve()
    recorded = read_nodes(data_dir)
    if nodes is None:
        nodes = len(recorded) if recorded is not None else 1
    if not 1 <= nodes <= MAX_NODES:
        raise BrokerError(f"--nodes {nodes}: a local cluster has 1 to {MAX_NODES} nodes")
    security = _secure(data_dir, secure)
    if recorded is not None or nodes > 1:
        return _start_cluster(data_dir, port, nodes, recorded, max_message_bytes, timeout, security, with_parent)
    port = DEFAULT_PORT if port is None else port
    current = status(data_dir)
    if current.running:
        return current
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "broker.pid").unlink(missing_ok=True)  # stale: its process is gone
    port_file = data_dir / "controller.port"
    if port_file.exists():
        controller_port = int(port_file.read_text())
    else:
        controller_port = free_port()
        port_file.write_text(str(controller_port))
    _wait_ports_free(port, controller_port)
    if not _port_free(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is in use by another process; pass --port N")
    if not _port_free(controller_port):
        raise BrokerError(f"controller port {controller_port} (from {port_file}) is in use; "
                          f"free it or delete {data_dir} to start over")
    node = Node(1, port, controller_port)
    props = _write_config(data_dir, node, [node], max_message_bytes, security)
    _format([(data_dir, props)], _cluster_id(data_dir), security)
    proc = _launch(data_dir, props, with_parent)
    bootstrap = f"127.0.0.1:{port}"
    settings = security.client() if security else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _exited(data_dir, proc, "the broker")
        if _answers(bootstrap, settings):
            (data_dir / "bootstrap").write_text(bootstrap)
            return status(data_dir)
        time.sleep(0.5)
    stop(data_dir)
    raise BrokerError(f"the broker did not answer on {bootstrap} within {timeout:.0f} s; see {data_dir / 'broker.log'}")


def _cluster_layout(data_dir: Path, port: int | None, nodes: int, recorded: list[dict] | None) -> list[Node]:
    """The nodes as recorded at the cluster's first start, or new ones: ports `port`, `port`+1,
    ... for clients, free ports for the controllers."""
    if recorded is not None:
        layout = [Node(**n) for n in recorded]
        if len(layout) != nodes:
            raise BrokerError(f"{data_dir} holds a cluster of {len(layout)} nodes, not {nodes}; "
                              f"use another --data-dir or delete it to start over")
        if port is not None and port != layout[0].port:
            raise BrokerError(f"the cluster under {data_dir} listens on ports "
                              f"{', '.join(str(n.port) for n in layout)}, not from {port}; delete it to start over")
        return layout
    if (data_dir / "kraft").exists():
        raise BrokerError(f"{data_dir} holds a single broker's data; use another --data-dir for a cluster "
                          f"or delete it to start over")
    base = DEFAULT_PORT if port is None else port
    taken = [p for p in range(base, base + nodes) if not _port_free(p)]
    if taken:
        raise BrokerError(f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 in use by another process: "
                          f"a cluster of {nodes} nodes listens on {base} to {base + nodes - 1}; pass --port N")
    controller_ports: list[int] = []
    while len(controller_ports) < nodes:  # distinct, and none of the client ports
        candidate = free_port()
        if candidate not in controller_ports and not base <= candidate < base + nodes:
            controller_ports.append(candidate)
    layout = [Node(i + 1, base + i, controller_ports[i]) for i in range(nodes)]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / NODES_FILE).write_text(json.dumps([asdict(n) for n in layout]))
    return layout


def _start_cluster(data_dir: Path, port: int | None, nodes: int, recorded: list[dict] | None,
                   max_message_bytes: int, timeout: float, security: Security | None,
                   with_parent: bool = False) -> BrokerStatus:
    layout = _cluster_layout(data_dir, port, nodes, recorded)
    running = {n.node_id for n in status(data_dir).nodes if n.running}
    cluster_id = _cluster_id(data_dir)
    started: dict[int, subprocess.Popen] = {}
    try:
        configs = {}
        for node in layout:
            if node.node_id in running:
                continue
            folder = node_dir(data_dir, node.node_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "broker.pid").unlink(missing_ok=True)  # stale: its process is gone
            _wait_ports_free(node.port, node.controller_port)
            busy = [p for p in (node.port, node.controller_port) if not _port_free(p)]
            if busy:
                raise BrokerError(f"node {node.node_id}'s port(s) {', '.join(map(str, busy))} (from "
                                  f"{data_dir / NODES_FILE}) in use by another process; free them or delete "
                                  f"{data_dir} to start over")
            configs[node.node_id] = (folder, _write_config(folder, node, layout, max_message_bytes, security))
        _format(list(configs.values()), cluster_id, security)
        for node_id, (folder, props) in configs.items():
            started[node_id] = _launch(folder, props, with_parent)
        # The nodes start together: a controller quorum needs a majority of them before any answers.
        (data_dir / "bootstrap").write_text(",".join(f"127.0.0.1:{n.port}" for n in layout))
        settings = security.client() if security else {}
        deadline = time.monotonic() + timeout
        waiting = {n.node_id: n for n in layout if n.node_id in started}
        while time.monotonic() < deadline:
            for node_id, proc in started.items():
                if proc.poll() is not None:
                    raise _exited(node_dir(data_dir, node_id), proc, f"node {node_id}")
            waiting = {i: n for i, n in waiting.items() if not _answers(f"127.0.0.1:{n.port}", settings)}
            if not waiting and _registered(f"127.0.0.1:{layout[0].port}", settings) >= nodes:
                return status(data_dir)
            time.sleep(0.5)
        raise BrokerError(f"node(s) {', '.join(map(str, waiting)) or '(all answered)'} of the cluster under "
                          f"{data_dir} did not answer, or not every node registered, within {timeout:.0f} s; "
                          f"see {data_dir / 'node-*' / 'broker.log'}")
    except BaseException:
        # What this call started, nothing it found running.
        _stop_nodes([node_dir(data_dir, node_id) for node_id in started], STOP_TIMEOUT_S)
        raise


def _registered(bootstrap: str, settings: dict) -> int:
    """How many brokers the cluster's metadata lists (0 when it does not answer)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **settings)
    except (KafkaError, OSError):
        return 0
    try:
        return len(admin.describe_cluster()["brokers"])
    except (KafkaError, OSError):
        return 0
    finally:
        admin.close()


def _cluster_id(data_dir: Path) -> str:
    """A stable KRaft cluster id (base64 of a UUID, as kafka-storage random-uuid makes)."""
    path = data_dir / "cluster.id"
    if not path.exists():
        cluster_id = "-"
        while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: never a leading dash
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(cluster_id)
    return path.read_text().strip()


def stop(data_dir: Path | None = None, timeout: float = STOP_TIMEOUT_S, *, node: int | None = None) -> BrokerStatus:
    """Stop the broker, or every node of a cluster together (`node`: that one only), cleanly
    (SIGTERM, then SIGKILL after `timeout`) and wait for the exit."""
    data_dir = (data_dir or data_dir_default()).resolve()
    recorded = read_nodes(data_dir)
    if recorded is None:
        if node is not None and node != 1:
            raise BrokerError(f"{data_dir} holds a single broker, not a cluster: it has no node {node}")
        _stop_nodes([data_dir], timeout)
        (data_dir / "bootstrap").unlink(missing_ok=True)
        return status(data_dir)
    ids = [n["node_id"] for n in recorded]
    if node is not None and node not in ids:
        raise BrokerError(f"the cluster under {data_dir} has nodes {ids}, not {node}")
    _stop_nodes([node_dir(data_dir, i) for i in ids if node in (None, i)], timeout)
    after = status(data_dir)
    if not after.running:
        (data_dir / "bootstrap").unlink(missing_ok=True)
    return status(data_dir)


def _stop_nodes(folders: list[Path], timeout: float) -> None:
    """SIGTERM every live broker of `folders` at once (a node stopped alone waits on a quorum
    its stopped peers no longer make), SIGKILL those left after `timeout`, wait for every exit."""
    live = {f: p for f in folders if (p := read_pid(f)) is not None and pid_alive(p, f)}
    for pid in live.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p, f) for f, p in live.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for f, pid in live.items():
        if pid_alive(pid, f):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid, f):
                time.sleep(0.1)
    for f in folders:
        (f / "broker.pid").unlink(missing_ok=True)
