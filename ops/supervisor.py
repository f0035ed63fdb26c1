"""Worker processes of one stage or of the whole pipeline: start, restart, stop together.

Each worker is a `tensorline run` process pinned to one device (round-robin over the stage's
device list). A worker that exits on its own is restarted with exponential backoff; one that
crashes more than `max_restarts` times within `window_s` is in a crash loop and is given up, and
one that exits with `FATAL_EXIT_CODE` (a fatal error: not authorized, fenced) is given up at
once; either is logged as an error with the worker's last log line. When every worker of a stage
(of one model's group, for per-model stages) is given up, `run_forever` stops the pipeline and
returns 1, unless told to keep going. SIGTERM/Ctrl-C stops every worker cleanly: SIGTERM, then
SIGKILL after `stop_timeout_s`.

Workers do not outlive their supervisor: on Linux the kernel sends them SIGTERM when it dies
(PR_SET_PDEATHSIG), and every worker also stops by itself when its parent is no longer the
supervisor pid it was given (`SUPERVISOR_PID_ENV`). One supervisor per consumer group on a
host: it holds `<state>/supervisors/<group>.lock` (flock) while it runs, and refuses to start,
naming the pids, when another supervisor holds one of its groups or live workers of them hold
worker slots (`<state>/workers/<group>.<index>.lock`).

Each worker's stderr and stdout go to `<log_dir>/<worker>.log`; without a `log_dir` that is
`<state>/logs/<pipeline>/`, and the supervisor copies new lines to its own stderr as they come
(a file, not a pipe: a worker whose supervisor died can still write its last lines).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tensorline import config, logs
from tensorline.config import PipelineConfig
from tensorline.engine.errors import FATAL_EXIT_CODE
from tensorline.engine.plugins import PER_MODEL_KINDS
from tensorline.engine.worker import STATE_DIR_ENV, SUPERVISOR_PID_ENV, group_id
from tensorline.ops import signals

# First restart after 1 s, doubling to at most 30 s: fast for a blip, gentle for a broken host.
BACKOFF_S = (1.0, 30.0)
# Five crashes in a minute is a crash loop, not bad luck: stop restarting and say so.
MAX_RESTARTS = 5
WINDOW_S = 60.0
# A worker finishes its batch in flight on SIGTERM; half a minute covers a slow GPU batch.
STOP_TIMEOUT_S = 30.0
# The last line of a worker's log is looked for in this much of its end.
LAST_LINE_BYTES = 8192


class AlreadyRunning(RuntimeError):
    """Another supervisor, or live workers on this host, already run a group this one would start."""


_PREEXEC = signals.with_parent()


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
    log_from: int  # where this run's lines start in the worker's log file
    echoed: int  # how far the log file was copied to the supervisor's stderr
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


def _slot_holders(state: Path, groups: list[str]) -> dict[str, list[str]]:
    """group -> pids (or slot files, when no pid is written) of live workers holding its slots."""
    found: dict[str, list[str]] = {}
    for path in sorted((state / "workers").glob("*.lock")):
        group, _, index = path.name.removesuffix(".lock").rpartition(".")
        if group not in groups or not index.isdigit():
            continue
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                continue
            except BlockingIOError:
                handle.seek(0)
                try:
                    pid = json.loads(handle.read() or "{}").get("pid")
                except ValueError:  # being written
                    pid = None
        found.setdefault(group, []).append(str(pid) if pid else str(path))
    return found


def _hold(state: Path, groups: list[str]) -> list[IO]:
    """Lock `<state>/supervisors/<group>.lock` for every group, or raise AlreadyRunning saying who
    runs them: another supervisor, or live workers with none (orphans where PDEATHSIG is missing)."""
    folder = state / "supervisors"
    folder.mkdir(parents=True, exist_ok=True)
    held: list[IO] = []
    others: dict[str, list[str]] = {}  # supervisor pid -> its groups
    for group in groups:
        handle = open(folder / f"{group}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(handle)
        except BlockingIOError:
            handle.seek(0)
            others.setdefault(handle.read().strip() or "unknown", []).append(group)
            handle.close()
    problem = None
    if others:
        who = "; ".join(f"{', '.join(found)} by pid {pid}" for pid, found in others.items())
        pids = " ".join(p for p in others if p.isdigit())
        problem = (f"already supervised on this host: {who}. Stop that supervisor first "
                   f"(kill {pids}: its workers stop with it)")
    elif orphans := _slot_holders(state, groups):
        holders = [p for found in orphans.values() for p in found]
        shown = ", ".join(f"pid {p}" if p.isdigit() else f"a process holding {p}" for p in holders)
        problem = (f"live workers of {', '.join(orphans)} already run on this host without a supervisor "
                   f"(orphans of a killed supervisor, or started by hand): {shown}. Stop them with "
                   f"kill {' '.join(p for p in holders if p.isdigit())} (SIGTERM: each finishes its batch and "
                   f"leaves its group), then start again")
    if problem:
        for handle in held:
            handle.close()
        raise AlreadyRunning(problem)
    for handle in held:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return held


class Supervisor:
    def __init__(self, config_path: str, workers: list[WorkerSpec], *, log_dir: Path | None = None,
                 env: dict[str, str] | None = None, max_restarts: int = MAX_RESTARTS, window_s: float = WINDOW_S):
        self.config_path, self.specs = config_path, workers
        self.env = env or dict(os.environ)
        self.cfg = config.load(config_path)
        self.state_dir = Path(self.env.get(STATE_DIR_ENV, ".tensorline"))  # the workers' own (same cwd)
        self.echo = log_dir is None
        self.log_dir = log_dir or self.state_dir / "logs" / self.cfg.name
        self.max_restarts, self.window_s = max_restarts, window_s
        self.running: list[_Running] = []
        self.log = logs.get(stage="supervisor")
        self.stopping = False
        self._locks: list[IO] = []
        self._reported: set[str] = set()

    def _log_path(self, spec: WorkerSpec) -> Path:
        return self.log_dir / f"{spec.label}.log"

    def _spawn(self, spec: WorkerSpec) -> tuple[subprocess.Popen, int]:
        """Start the worker, its output appended to its log file; and where that output starts."""
        cmd = [sys.executable, "-m", "tensorline.cli", "run", spec.stage, "-c", str(self.config_path),
               "--device", spec.device]
        if spec.model:
            cmd += ["--model", spec.model]
        with open(self._log_path(spec), "ab") as out:
            proc = subprocess.Popen(cmd, env={**self.env, SUPERVISOR_PID_ENV: str(os.getpid())},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    preexec_fn=_PREEXEC)
            return proc, out.tell()

    def start(self) -> None:
        """Claim the groups (AlreadyRunning if another supervisor or live workers have them), start the workers."""
        self._locks = _hold(self.state_dir, sorted({group_id(self.cfg, s.stage, s.model) for s in self.specs}))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            proc, start = self._spawn(spec)
            self.running.append(_Running(spec, proc, start, start))
            self.log.info("worker started", worker=spec.label, device=spec.device, pid=proc.pid,
                          log=str(self._log_path(spec)))

    def _echo(self) -> None:
        """Copy the workers' new complete log lines to our stderr (when they have no log_dir of their own)."""
        if not self.echo:
            return
        for w in self.running:
            try:
                with open(self._log_path(w.spec), "rb") as f:
                    if f.seek(0, os.SEEK_END) < w.echoed:  # truncated by hand
                        w.echoed = 0
                    f.seek(w.echoed)
                    chunk = f.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            if end:
                sys.stderr.write(chunk[:end].decode(errors="replace"))
                w.echoed += end
        sys.stderr.flush()

    def _last_line(self, w: _Running) -> str | None:
        """The worker's last log line of its latest run (a traceback's last line says what failed)."""
        try:
            with open(self._log_path(w.spec), "rb") as f:
                f.seek(max(w.log_from, f.seek(0, os.SEEK_END) - LAST_LINE_BYTES))
                lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1] if lines else None

    def check(self) -> None:
        """Restart workers that exited; give up on crash loops and fatal errors."""
        self._echo()
        now = time.monotonic()
        for w in self.running:
            if w.given_up or self.stopping:
                continue
            if w.restart_at is not None:
                if now >= w.restart_at:
                    (w.proc, w.log_from), w.restart_at = self._spawn(w.spec), None
                    self.log.info("worker restarted", worker=w.spec.label, pid=w.proc.pid)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            context = {"worker": w.spec.label, "exit_code": code, "last_line": self._last_line(w),
                       "log": str(self._log_path(w.spec))}
            if code == FATAL_EXIT_CODE:
                w.given_up = True
                self.log.error("worker stopped on a fatal error: not restarted", **context)
                continue
            w.crashes = [t for t in w.crashes if now - t < self.window_s] + [now]
            if len(w.crashes) > self.max_restarts:
                w.given_up = True
                self.log.error("worker in a crash loop: not restarted", crashes=len(w.crashes),
                               window_s=self.window_s, **context)
                continue
            delay = min(BACKOFF_S[0] * 2 ** (len(w.crashes) - 1), BACKOFF_S[1])
            w.restart_at = now + delay
            self.log.warning("worker exited; restarting", in_s=delay, **context)

    @property
    def alive(self) -> int:
        return sum(1 for w in self.running if w.proc.poll() is None)

    @property
    def given_up(self) -> list[WorkerSpec]:
        return [w.spec for w in self.running if w.given_up]

    @property
    def down(self) -> list[str]:
        """The stages (stage.model for per-model stages: one group each) whose every worker was given up."""
        stages: dict[str, list[bool]] = {}
        for w in self.running:
            stages.setdefault(".".join(p for p in (w.spec.stage, w.spec.model) if p), []).append(w.given_up)
        return [stage for stage, given_up in stages.items() if all(given_up)]

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
        self._echo()
        for handle in self._locks:
            handle.close()
        self._locks = []

    def run_forever(self, interval_s: float = 0.5, until: Callable[[], bool] = lambda: False, *,
                    keep_going: bool = False) -> int:
        """Supervise until SIGTERM/SIGINT (or `until()`): 0. 1 as soon as every worker of a stage was
        given up (with `keep_going`, once every worker of every stage was): a stage gone is not a
        pipeline running."""
        stop: list[int] = []
        previous = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop and not until():
                self.check()
                for stage in set(self.down) - self._reported:
                    self._reported.add(stage)
                    if keep_going:
                        self.log.error("stage down: every worker given up; the other stages go on (--keep-going)",
                                       stage=stage)
                if self.down and not keep_going:
                    self.log.error("stage down: every worker given up; stopping the pipeline (--keep-going "
                                   "keeps the other stages running)", stages=self.down)
                    return 1
                if self.running and len(self.given_up) == len(self.running):
                    return 1
                time.sleep(interval_s)
            return 0
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
