"""Worker processes of one stage or of the whole pipeline: start, restart, stop together.

Each worker is a `tensorline run` process pinned to one device (round-robin over the stage's
device list). A worker that exits on its own is restarted with exponential backoff; one that
crashes more than `max_restarts` times within `window_s` is in a crash loop and is given up
(logged as an error). SIGTERM/Ctrl-C stops every worker cleanly: SIGTERM, then SIGKILL after
`stop_timeout_s`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tensorline import logs
from tensorline.config import PipelineConfig
from tensorline.engine.plugins import PER_MODEL_KINDS

# First restart after 1 s, doubling to at most 30 s: fast for a blip, gentle for a broken host.
BACKOFF_S = (1.0, 30.0)
# Five crashes in a minute is a crash loop, not bad luck: stop restarting and say so.
MAX_RESTARTS = 5
WINDOW_S = 60.0
# A worker finishes its batch in flight on SIGTERM; half a minute covers a slow GPU batch.
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    stage: str
    model: str | None
    device: str
    index: int

    @property
    def label(self) -> str:
        return ".".join(p for p in (self.stage, self.model, str(self.index)) if p)


@dataclass
class _Running:
    spec: WorkerSpec
    proc: subprocess.Popen
    crashes: list[float] = field(default_factory=list)
    restart_at: float | None = None
    given_up: bool = False


def specs(cfg: PipelineConfig, stage: str, *, model: str | None = None, workers: int | None = None,
          devices: tuple[str, ...] | None = None) -> list[WorkerSpec]:
    """The workers of one stage (every model of a per-model stage unless `model` is given)."""
    sc = cfg.stages[stage]
    n = workers or sc.workers
    devs = devices or sc.devices
    models: list[str | None] = [None]
    if sc.kind in PER_MODEL_KINDS:
        models = [model] if model else [m.name for m in sc.models]
    return [WorkerSpec(stage, m, devs[i % len(devs)], i) for m in models for i in range(n)]


def pipeline_specs(cfg: PipelineConfig) -> list[WorkerSpec]:
    """Every stage's workers, as the pipeline file gives them."""
    return [s for stage in cfg.stages for s in specs(cfg, stage)]


class Supervisor:
    def __init__(self, config_path: str, workers: list[WorkerSpec], *, log_dir: Path | None = None,
                 env: dict[str, str] | None = None, max_restarts: int = MAX_RESTARTS, window_s: float = WINDOW_S):
        self.config_path, self.specs = config_path, workers
        self.log_dir, self.env = log_dir, env or dict(os.environ)
        self.max_restarts, self.window_s = max_restarts, window_s
        self.running: list[_Running] = []
        self.log = logs.get(stage="supervisor")
        self.stopping = False

    def _spawn(self, spec: WorkerSpec) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tensorline.cli", "run", spec.stage, "-c", self.config_path,
               "--device", spec.device]
        if spec.model:
            cmd += ["--model", spec.model]
        err = open(self.log_dir / f"{spec.label}.log", "a") if self.log_dir else None
        return subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if err else None, stderr=err, start_new_session=True)

    def start(self) -> None:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            self.running.append(_Running(spec, self._spawn(spec)))
            self.log.info("worker started", worker=spec.label, device=spec.device, pid=self.running[-1].proc.pid)

    def check(self) -> None:
        """Restart workers that exited; give up on crash loops."""
        now = time.monotonic()
        for w in self.running:
            if w.given_up or self.stopping:
                continue
            if w.restart_at is not None:
                if now >= w.restart_at:
                    w.proc, w.restart_at = self._spawn(w.spec), None
                    self.log.info("worker restarted", worker=w.spec.label, pid=w.proc.pid)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            w.crashes = [t for t in w.crashes if now - t < self.window_s] + [now]
            if len(w.crashes) > self.max_restarts:
                w.given_up = True
                self.log.error("worker in a crash loop: not restarted", worker=w.spec.label, exit_code=code,
                               crashes=len(w.crashes), window_s=self.window_s)
                continue
            delay = min(BACKOFF_S[0] * 2 ** (len(w.crashes) - 1), BACKOFF_S[1])
            w.restart_at = now + delay
            self.log.warning("worker exited; restarting", worker=w.spec.label, exit_code=code, in_s=delay)

    @property
    def alive(self) -> int:
        return sum(1 for w in self.running if w.proc.poll() is None)

    @property
    def given_up(self) -> list[WorkerSpec]:
        return [w.spec for w in self.running if w.given_up]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.stopping = True
        for w in self.running:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for w in self.running:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker did not stop in time: killed", worker=w.spec.label)
                w.proc.kill()
                w.proc.wait()

    def run_forever(self, interval_s: float = 0.5, until: Callable[[], bool] = lambda: False) -> int:
        """Supervise until SIGTERM/SIGINT (or `until()`); 1 when every worker was given up."""
        stop = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.append(1))
        self.start()
        try:
            while not stop and not until():
                self.check()
                if self.running and len(self.given_up) == len(self.running):
                    return 1
                time.sleep(interval_s)
            return 0
        finally:
            self.stop()
