"""The files a local broker started by `tensorline broker start` keeps in its data dir (pid,
bootstrap address): how clients find it when no bootstrap is configured. The launcher that
writes them is `tensorline.ops.broker`.

A single broker keeps them in the data dir itself; a local cluster (`broker start --nodes N`)
keeps one folder per node (`node-1`, ...) with its own pid file, and in the data dir the list of
its nodes (`nodes.json`) and the bootstrap address of all of them. A broker started with
`--secure` keeps in the data dir what clients need to reach it (`security.json`: protocol,
mechanism, the admin's name, where its CA and the admin's credentials file are; no secret).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(".tensorline/broker")
DATA_DIR_ENV = "TENSORLINE_BROKER_DIR"
NODES_FILE = "nodes.json"  # a cluster's nodes: [{"node_id", "port", "controller_port"}, ...]
SECURITY_FILE = "security.json"  # a --secure broker's: {"protocol", "mechanism", "admin", "ssl_cafile", "credentials_file"}
CREDENTIALS_FILE = "credentials.toml"  # a --secure broker's admin password (owner-only)


@dataclass(frozen=True)
class NodeStatus:
    """One node of a local cluster."""
    node_id: int
    running: bool
    bootstrap: str
    pid: int | None
    data_dir: str
    log: str


@dataclass(frozen=True)
class BrokerStatus:
    """The local broker, or a local cluster: running while any of its nodes runs (clients can
    reach it), `nodes` saying which (empty for a single broker)."""
    running: bool
    bootstrap: str | None
    pid: int | None
    data_dir: str
    log: str
    nodes: tuple[NodeStatus, ...] = ()
    security: dict | None = None  # a --secure broker's security.json (no secret in it)

    @property
    def nodes_running(self) -> int:
        return sum(n.running for n in self.nodes) if self.nodes else int(self.running)

    def to_json(self) -> str:
        out = asdict(self)
        if not self.nodes:  # a single broker's status reads as it always has
            del out["nodes"]
        if self.security is None:
            del out["security"]
        return json.dumps(out)


def data_dir_default() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def node_dir(data_dir: Path, node_id: int) -> Path:
    return data_dir / f"node-{node_id}"


def pid_alive(pid: int, data_dir: Path) -> bool:
    """True when `pid` is a live Kafka broker of this data dir (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "kafka.Kafka" in cmdline and str(data_dir.resolve()) in cmdline


def read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def read_nodes(data_dir: Path) -> list[dict] | None:
    """A cluster's nodes as its launcher recorded them, None for a single broker's data dir."""
    try:
        return json.loads((data_dir / NODES_FILE).read_text())
    except FileNotFoundError:
        return None


def read_security(data_dir: Path) -> dict | None:
    """A --secure broker's security.json, None for a broker without security."""
    try:
        return json.loads((data_dir / SECURITY_FILE).read_text())
    except FileNotFoundError:
        return None


def status(data_dir: Path | None = None) -> BrokerStatus:
    """Whether the broker (or a node of the cluster) of `data_dir` runs, and its bootstrap address."""
    data_dir = (data_dir or data_dir_default()).resolve()
    nodes = read_nodes(data_dir)
    if nodes is not None:
        return _cluster_status(data_dir, nodes)
    pid = read_pid(data_dir)
    running = pid is not None and pid_alive(pid, data_dir)
    bootstrap = (data_dir / "bootstrap").read_text().strip() if running and (data_dir / "bootstrap").exists() else None
    return BrokerStatus(running, bootstrap, pid if running else None, str(data_dir), str(data_dir / "broker.log"),
                        security=read_security(data_dir))


def _cluster_status(data_dir: Path, nodes: list[dict]) -> BrokerStatus:
    found = []
    for node in nodes:
        folder = node_dir(data_dir, node["node_id"])
        pid = read_pid(folder)
        running = pid is not None and pid_alive(pid, folder)
        found.append(NodeStatus(node["node_id"], running, f"127.0.0.1:{node['port']}", pid if running else None,
                                str(folder), str(folder / "broker.log")))
    running = any(n.running for n in found)
    # Every node's address, the stopped ones too: a client retries them, and one started while a
    # node is down still reaches it once it is back.
    bootstrap = ",".join(n.bootstrap for n in found) if running else None
    return BrokerStatus(running, bootstrap, None, str(data_dir), str(data_dir / "node-*" / "broker.log"), tuple(found),
                        read_security(data_dir))


def local_bootstrap(data_dir: Path | None = None) -> str | None:
    """The bootstrap address of the local broker (every node of a local cluster), when it runs."""
    return status(data_dir).bootstrap
