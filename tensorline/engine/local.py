"""The files a local broker started by `tensorline broker start` keeps in its data dir (pid,
bootstrap address): how clients find it when no bootstrap is configured. The launcher that
writes them is `tensorline.ops.broker`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(".tensorline/broker")
DATA_DIR_ENV = "TENSORLINE_BROKER_DIR"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    bootstrap: str | None
    pid: int | None
    data_dir: str
    log: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def data_dir_default() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


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


def status(data_dir: Path | None = None) -> BrokerStatus:
    """Whether the broker of `data_dir` runs, and its bootstrap address."""
    data_dir = (data_dir or data_dir_default()).resolve()
    pid = read_pid(data_dir)
    running = pid is not None and pid_alive(pid, data_dir)
    bootstrap = (data_dir / "bootstrap").read_text().strip() if running and (data_dir / "bootstrap").exists() else None
    return BrokerStatus(running, bootstrap, pid if running else None, str(data_dir), str(data_dir / "broker.log"))


def local_bootstrap(data_dir: Path | None = None) -> str | None:
    """The bootstrap address of the local broker, when it runs."""
    return status(data_dir).bootstrap
