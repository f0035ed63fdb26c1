"""Scaling benchmark: one CPU-bound stage on 1 and then 2 worker processes, and how a group shares
partitions among workers of unequal capacity.

Throughput: the features stage (a Keras CNN backbone on 64x64x1 float32 images) as `Supervisor`
worker processes on the project's own broker; each run has its own namespace (pipeline name: its
own topics and consumer group). Every worker first joins, holds its partitions (no cooperative
move pending) and warms up on records of its own; the stream is then produced inside one
transaction, which read_committed workers cannot see, and committing it releases the whole backlog
at once: no worker starts alone, no producer competes with the measured window.
rps = records / (first tl.features.received_ms -> last tl.features.produced_ms).
Each worker count runs as is (TensorFlow sizes its thread pools to the cores) and with
TF_NUM_INTRAOP_THREADS=1 / TF_NUM_INTEROP_THREADS=1 (TensorFlow reads both at start-up; the
tf.config.threading getters still say 0, and OMP_NUM_THREADS alone changes nothing).
What the two cores went to in the window comes from /proc (workers, broker, this process, and
other sessions on a shared machine); the backbone alone in this process is the reference.

Shares: `assign` on its own for a few capacities, then one stage with two workers declaring
capacity 3 (device cpu) and 1 (device gpu:0, which runs on the CPU of a CPU-only machine) on an
8-partition topic: the assignment read from the group description, and the records each worker
processed from its "worker stopped" log line.

Measured capacity against kafka-python's CooperativeStickyAssignor: one stage of two workers whose
model really differs in speed (the model-free Scale stage with params.work, 128x128 matrix products
per record: 16 on the cpu worker, 48 on the gpu:0 one, both on this CPU) and no declared capacity,
on 12 partitions. First a warm-up backlog (as many records as each worker needs for its first
MIN_MEASURED_BUSY_S of processing at an even split) during which the workers measure their
capacity and the group places again; once it is settled, a timed stream released at once. The
same run, records and warm-up with every worker on the cooperative-sticky assignor (patched into
the worker process by `sticky_worker`) is the baseline; the runs go measured, sticky, sticky,
measured, and vs_sticky is the mean rate of the measured runs over that of the sticky ones.
Records per worker come from each worker's Prometheus counter, read before and after the timed
stream.

Every namespace is new to the broker (`run_name`, checked empty); a run whose outputs are not
exactly the records sent, or whose window is empty, is not reported: its figures print as n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from kafka import TopicPartition
from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

from tensorline import config, logs
from tensorline.engine import clients
from tensorline.ops import supervisor
from tensorline.ops.supervisor import Supervisor, specs
from tensorline.engine.assignor import MIN_MEASURED_BUSY_S, REMEASURE_EVERY_S, assign
from tensorline.schemas import Record, encode_record
from tensorline.engine.plugins import pin_device
from tensorline.stages.base import Model
from tensorline.engine.runtime import INGEST_MS
from tensorline.engine.worker import group_id

from _common import (IMAGE, MAX_BATCH, MAX_DELAY_MS, STREAM_TIMEOUT_S, WORKER_START_S, Measured, build_backbone,
                     committed, cpu_seconds, images, machine_busy_seconds, machine_load, local_broker, ms, produce,
                     record, require_fresh, run_name, wait_for)

N_STREAM = 2400  # ~5 s for one worker at ~500 rec/s on 2 cores: a batch boundary is noise
N_WARMUP = 128  # ~32 per partition: every worker's first model calls (oneDNN set-up) fall outside the window
PARTITIONS = 4  # the pipeline default
CAP_PARTITIONS = 8
N_CAP = 800  # the capacity phase measures placement, not speed: a short stream
CAPACITY = {"cpu": 3.0, "gpu:0": 1.0}  # the "fast" worker is the cpu one; gpu:0 also runs on the CPU here
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
# The stream's transaction stays open while the workers start and warm up: minutes on a busy machine.
TRANSACTION_TIMEOUT_MS = 300_000
PURE_CASES = ((12, {"a": 3, "b": 1}), (12, {"a": 2, "b": 1, "c": 1}), (8, {"a": 3, "b": 1}), (10, {"a": 3, "b": 1}))
# Measured capacity vs sticky: 12 partitions, so 3:1 is 9:3 exactly.
MEASURED_PARTITIONS = 12
# 128x128 products per record (~0.12 ms of a core each): the cpu worker ~2 ms, the gpu:0 one ~6 ms,
# so the model, not the Kafka path (~0.3 ms of worker and broker per record), sets each one's
# speed. At 1 and 3 ms a loaded machine gave measured vs sticky 1.14-1.35 from run to run.
WORK = {"cpu": 16, "gpu:0": 48}
FAST = "cpu"
# The warm-up: at an even split the fast worker gets half, and needs MIN_MEASURED_BUSY_S of model
# time at ~2 ms per record (more on a loaded machine, when its calls also wait for a core).
N_MEASURE_WARMUP = 5_000
N_MEASURE_TIMED = 4_000
# Measured, sticky, sticky, measured: the load of other work on a shared machine drifts over
# minutes (load average 6 to 11 within one pair), and this order cancels a steady drift.
ALLOCATION_RUNS = ("measured", "sticky", "sticky", "measured")
# The group counts as settled once its assignment has not changed for this long (the workers
# compare their measurement with what they advertised every REMEASURE_EVERY_S).
SETTLED_S = 2 * REMEASURE_EVERY_S + 2
# One core per worker's "model": OpenBLAS would otherwise run each product on every core.
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

PIPELINE = """\
[pipeline]
name = "{name}"
bootstrap = "{bootstrap}"
delivery = "exactly_once"
[topics]
input = {{ partitions = {partitions} }}
output = {{ partitions = {partitions} }}
dlq = {{ partitions = 1 }}

[stages.features]
input = "input"
output = "output"
max_batch = {max_batch}
max_delay_ms = {max_delay_ms}
devices = {devices}
{capacity}
[stages.features.models.backbone]
path = "{model}"
"""


MEASURED_PIPELINE = """\
[pipeline]
name = "{name}"
bootstrap = "{bootstrap}"
delivery = "exactly_once"
[topics]
input = {{ partitions = {partitions} }}
output = {{ partitions = {partitions} }}
dlq = {{ partitions = 1 }}

[stages.scale]
kind = "tensorline.stages.testing:Scale"
input = "input"
output = "output"
max_batch = {max_batch}
max_delay_ms = {max_delay_ms}
devices = {devices}
[stages.scale.params]
work = {work}
"""


@dataclass
class Run:
    """One throughput run: its records/s and where the CPU went meanwhile."""

    label: str
    workers: int
    rps: float | None  # None: not measured (see Measured)
    window_s: float
    cpu: dict[str, float]  # cores used during the window: per worker, broker, this process
    stats: list[dict]  # each worker's "worker stopped" counters


# -- namespaces and workers ------------------------------------------------------------------
def pipeline(folder: Path, bootstrap: str, label: str, *, partitions: int, devices: tuple[str, ...] = ("cpu",),
             capacity: dict[str, float] | None = None) -> config.PipelineConfig:
    """A pipeline file of its own under folder/<name>, named after `label` and new to the broker
    (topics created and checked empty, its group not there yet)."""
    name = run_name(f"{label}-")
    home = folder / name
    home.mkdir()
    declared = ""
    if capacity:
        declared = "capacity = { " + ", ".join(f'"{d}" = {c}' for d, c in capacity.items()) + " }"
    path = home / "pipeline.toml"
    path.write_text(PIPELINE.format(name=name, bootstrap=bootstrap, partitions=partitions, max_batch=MAX_BATCH,
                                    max_delay_ms=MAX_DELAY_MS, devices=json.dumps(list(devices)),
                                    capacity=declared, model=folder / "backbone.keras"))
    cfg = config.load(path)
    clients.create_topics(cfg)
    require_fresh(cfg)
    return cfg


def supervise(cfg: config.PipelineConfig, n: int, env: dict[str, str]) -> Supervisor:
    """n workers of the features stage, round-robin over its devices, logs beside the pipeline file."""
    home = Path(cfg.path).parent
    sup = Supervisor(cfg.path, specs(cfg, "features", workers=n), log_dir=home / "logs",
                     env={**os.environ, "TENSORLINE_STATE_DIR": str(home / "state"), "TF_CPP_MIN_LOG_LEVEL": "2",
                          **env})
    sup.start()
    return sup


def alive(sup: Supervisor) -> None:
    """Raise with the log tail of a worker that exited: a benchmark does not restart workers."""
    for w in sup.running:
        if w.proc.poll() is not None:
            tail = (sup.log_dir / f"{w.spec.label}.log").read_text()[-3000:]
            raise RuntimeError(f"worker {w.spec.label} exited with {w.proc.returncode}:\n{tail}")


def stop(sup: Supervisor) -> list[dict]:
    """SIGTERM every worker; each one's 'worker stopped' counters, in spec order."""
    sup.stop()
    stats = []
    for w in sup.running:
        found = {}
        for line in (sup.log_dir / f"{w.spec.label}.log").read_text().splitlines():
            if '"worker stopped"' in line:
                found = json.loads(line)
        stats.append({"device": w.spec.device, "label": w.spec.label, **found})
    return stats


def assignment(admin, group: str, members: int) -> dict[str, list[int]] | None:
    """client id -> partitions, once the group is Stable with `members` members, each holding some
    partitions and no cooperative move pending (None before that)."""
    try:
        info = admin.describe_groups([group]).get(group, {})
    except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
        return None  # a fresh broker creates its offsets topic at the first group: not yet
    if info.get("group_state") != "Stable" or len(info.get("members", [])) != members:
        return None
    held = {}
    for m in info["members"]:
        a = m.get("member_assignment") or {}
        if not isinstance(a, dict) or json.loads(a.get("user_data") or "{}").get("pending", False):
            return None
        held[m["client_id"]] = sorted(p for t in a.get("assigned_partitions", []) for p in t["partitions"])
    return held if all(held.values()) else None


def cpu_snapshot(sup: Supervisor, broker_pid: int) -> dict[str, float]:
    """CPU seconds so far of each worker, the broker, this process and the whole machine."""
    snap = {w.spec.label: cpu_seconds(w.proc.pid) for w in sup.running}
    snap["broker"] = cpu_seconds(broker_pid)
    snap["bench"] = sum(os.times()[:2])
    snap["machine"] = machine_busy_seconds()
    return snap


# -- throughput ------------------------------------------------------------------------------
def encoded(batch: np.ndarray, prefix: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of one record per image, keyed by record id so outputs can be told apart."""
    return [record(i, image, prefix, key=f"{prefix}{i}".encode())[:2] for i, image in enumerate(batch)]


def ceiling_rps(model: Model, batch: np.ndarray) -> float:
    """Records/s of the backbone alone in this process on max_batch slices (TensorFlow's own
    threads): what one worker would do with no Kafka, no codec and no broker beside it."""
    slices = [batch[i:i + MAX_BATCH] for i in range(0, len(batch), MAX_BATCH)]
    for b in (slices[0], slices[-1]):  # first calls of each batch shape
        model(b)
    started = time.perf_counter()
    for b in slices:
        model(b)
    return len(batch) / (time.perf_counter() - started)


def release(cfg: config.PipelineConfig, stream: list[tuple[bytes, bytes]], partitions: int, prefix: bytes,
            check, what: str, at_release=lambda: None) -> tuple[dict[bytes, object], float]:
    """Send `stream` to the input inside one transaction, which read_committed workers cannot see,
    and commit it (the whole backlog appears at once, `at_release` just before); the outputs whose
    key starts with `prefix`, by key, once there is one per record, and the seconds that took."""
    producer = clients.producer(cfg, transactional_id=f"{cfg.name}.bench-stream",
                                transaction_timeout_ms=TRANSACTION_TIMEOUT_MS)
    producer.init_transactions()
    producer.begin_transaction()
    topic = cfg.topic("input").name
    for key, value in stream:
        producer.send(topic, key=key, value=value, headers=[(INGEST_MS, str(int(time.time() * 1000)).encode())])
    producer.flush()
    outputs = clients.consumer(cfg, None)
    out_topic = cfg.topic("output").name
    tps = [TopicPartition(out_topic, p) for p in range(partitions)]
    outputs.assign(tps)
    outputs.seek_to_beginning(*tps)
    try:
        at_release()
        started = time.monotonic()
        producer.commit_transaction()
        producer.close()
        seen: dict[bytes, object] = {}
        deadline = time.monotonic() + STREAM_TIMEOUT_S
        while len(seen) < len(stream):
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {len(seen)} of {len(stream)} outputs after {STREAM_TIMEOUT_S:.0f} s")
            for batch in outputs.poll(timeout_ms=100).values():
                seen.update((r.key, r) for r in batch if r.key.startswith(prefix))
        return seen, time.monotonic() - started
    finally:
        outputs.close()


def run_key(label: str, n: int) -> str:
    """The measurement of one throughput run (see Measured)."""
    return f"{label} x{n}"


def throughput(folder: Path, bootstrap: str, broker_pid: int, label: str, n: int, env: dict[str, str],
               stream: list[tuple[bytes, bytes]], measured: Measured) -> Run:
    cfg = pipeline(folder, bootstrap, f"{label}-{n}w", partitions=PARTITIONS)
    admin = clients.admin(cfg)
    group = group_id(cfg, "features", None)
    sup = supervise(cfg, n, env)
    try:
        check = lambda: alive(sup)  # noqa: E731
        wait_for(lambda: assignment(admin, group, n) is not None, WORKER_START_S, f"{n} workers to join", check)
        produce(cfg, "input", images(N_WARMUP, IMAGE, seed=2), prefix="w", unique_keys=True)
        wait_for(lambda: committed(admin, group) >= N_WARMUP, WORKER_START_S, "the warm-up records", check)

        snapshots = []
        seen, elapsed = release(cfg, stream, PARTITIONS, b"r", check, f"{label}, {n} workers",
                                lambda: snapshots.append(cpu_snapshot(sup, broker_pid)))
        before, after = snapshots[0], cpu_snapshot(sup, broker_pid)
    finally:
        stats = stop(sup)
        admin.close()
    key = run_key(label, n)
    measured.count(key, len(stream), len(seen), "outputs")
    if set(seen) != {k for k, _ in stream}:
        measured.refuse(key, f"{len(set(seen) - {k for k, _ in stream})} outputs of records this run did not send")
    first = min(ms(r, "tl.features.received_ms") for r in seen.values())
    last = max(ms(r, "tl.features.produced_ms") for r in seen.values())
    window = (last - first) / 1000
    if window <= 0:
        measured.refuse(key, f"the first record received and the last produced are {window:.3f} s apart")
    cpu = {k: (after[k] - before[k]) / elapsed for k in before}
    return Run(label, n, len(seen) / window if window > 0 else None, window, cpu, stats)


# -- shares ----------------------------------------------------------------------------------
def pure_shares() -> list[str]:
    lines = [f"{'partitions':>10}  {'capacities':<24}{'assigned':<24}{'ideal (exact)':<24}"]
    for n, caps in PURE_CASES:
        got = assign(range(n), caps, {})
        total = sum(caps.values())
        lines.append(f"{n:>10}  {str(caps):<24}{str({m: len(ps) for m, ps in got.items()}):<24}"
                     f"{str({m: str(Fraction(n * c, total)) for m, c in caps.items()}):<24}")
    return lines


@dataclass
class Shares:
    held: dict[str, list[int]]  # device -> partitions, from the group description
    records: dict[str, int]  # device -> records processed ("worker stopped")
    per_partition: dict[int, int]  # records on each input partition
    leader_line: str


def capacity_shares(folder: Path, bootstrap: str, measured: Measured) -> Shares:
    devices = tuple(CAPACITY)
    cfg = pipeline(folder, bootstrap, "capacity", partitions=CAP_PARTITIONS, devices=devices, capacity=CAPACITY)
    admin = clients.admin(cfg)
    group = group_id(cfg, "features", None)
    sup = supervise(cfg, len(devices), {})
    try:
        check = lambda: alive(sup)  # noqa: E731
        wait_for(lambda: assignment(admin, group, len(devices)) is not None, WORKER_START_S,
                 "both workers to join", check)
        by_client = assignment(admin, group, len(devices)) or {}
        produce(cfg, "input", images(N_CAP, IMAGE, seed=3), prefix="c", unique_keys=True)
        wait_for(lambda: committed(admin, group) >= N_CAP, STREAM_TIMEOUT_S, f"{N_CAP} records", check)
        offsets = admin.list_group_offsets(group).get(group, {})
        # A still-pending assignment is not read above; check it did not change while processing.
        unchanged = assignment(admin, group, len(devices)) == by_client
    finally:
        stats = stop(sup)
        admin.close()
    held = {device: ps for client, ps in by_client.items() for device in devices if client.endswith(f".{device}")}
    records = {s["device"]: s.get("records_in", 0) for s in stats}
    per_partition = {tp.partition: o.offset for tp, o in offsets.items()}
    measured.count("capacity offsets", N_CAP, sum(per_partition.values()), "records committed")
    measured.count("capacity records", N_CAP, sum(records.values()), "records processed by the workers")
    placements = []  # (timestamp, members) of every placement either worker made as group leader
    for s in stats:
        for line in (sup.log_dir / f"{s['label']}.log").read_text().splitlines():
            if '"partitions assigned"' in line and '"members"' in line:
                event = json.loads(line)
                placements.append((event.get("timestamp", ""), json.dumps(event["members"])))
    leader = max(placements)[1] if placements else "(not logged)"
    if not unchanged:
        leader += "  (the assignment changed while the stream was processed)"
    return Shares(held, records, per_partition, leader)


# -- measured capacity vs cooperative-sticky -------------------------------------------------
class StickySupervisor(Supervisor):
    """The same worker processes, each running `sticky_worker`: kafka-python's assignor instead
    of the capacity one, and nothing else changed."""

    def _spawn(self, spec: supervisor.WorkerSpec) -> tuple[subprocess.Popen, int]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--sticky-worker", spec.stage,
               "-c", str(self.config_path), "--device", spec.device]
        with open(self._log_path(spec), "ab") as out:
            proc = subprocess.Popen(cmd, env={**self.env, supervisor.SUPERVISOR_PID_ENV: str(os.getpid())},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    preexec_fn=supervisor._PREEXEC)
            return proc, out.tell()


def sticky_worker(argv: list[str]) -> int:
    """`tensorline run` with kafka-python's CooperativeStickyAssignor in place of CapacityAssignor."""
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

    from tensorline import cli
    from tensorline.engine import worker

    def baseline(capacity: float | None = None, *, log=None) -> CooperativeStickyAssignor:
        assignor = CooperativeStickyAssignor()
        assignor.watch = lambda consumer, stop: None  # nothing measured, nothing to watch
        return assignor

    worker.CapacityAssignor = baseline
    return cli.main(["run", *argv])


@dataclass
class Allocation:
    """One stage of a fast and a slow worker, on the capacity assignor (measured) or the sticky one."""

    mode: str
    key: str  # its measurement's name (see Measured)
    rps: float | None
    window_s: float
    warmup_s: float  # the warm-up backlog sent -> committed: measuring and placing again included
    held: dict[str, list[int]]  # device -> partitions during the timed stream
    records: dict[str, int]  # device -> records of the timed stream it processed
    changed: bool  # the assignment changed during the timed stream
    placements: list[str]  # every placement the leader logged ("partitions assigned")
    load: str  # the machine's load average when the run started


def scale_records(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of n small records (a 16-float tensor "x"): the stage's work is its params.work."""
    x = np.ones(16, np.float32)
    return [(f"{prefix}{i}".encode(),
             bytes(encode_record(Record(record_id=f"{prefix}{i}", source="bench", ingest_ts_ms=int(time.time() * 1000),
                                        tensors={"x": x}, stage="input"))))
            for i in range(n)]


def measured_pipeline(folder: Path, bootstrap: str, mode: str) -> config.PipelineConfig:
    name = run_name(f"alloc-{mode}-")
    home = folder / name
    home.mkdir()
    work = "{ " + ", ".join(f'"{d}" = {w}' for d, w in WORK.items()) + " }"
    path = home / "pipeline.toml"
    path.write_text(MEASURED_PIPELINE.format(name=name, bootstrap=bootstrap, partitions=MEASURED_PARTITIONS,
                                             max_batch=MAX_BATCH, max_delay_ms=MAX_DELAY_MS,
                                             devices=json.dumps(list(WORK)), work=work))
    cfg = config.load(path)
    clients.create_topics(cfg)
    require_fresh(cfg)
    return cfg


def records_in(cfg: config.PipelineConfig, group: str) -> dict[str, float]:
    """device -> records each worker has consumed and committed (its Prometheus counter)."""
    found = {}
    for slot in (Path(cfg.path).parent / "state" / "workers").glob(f"{group}.*.lock"):
        info = json.loads(slot.read_text() or "{}")
        if info.get("group") != group or not info.get("metrics"):
            continue
        text = urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=10).read().decode()
        counts = re.findall(r'^tensorline_records_in_total\{[^}]*\} ([0-9.e+]+)$', text, re.M)
        found[info["device"]] = sum(float(c) for c in counts)
    return found


def settled(admin, group: str, check) -> dict[str, list[int]]:
    """The group's assignment (client id -> partitions) once it is Stable, with no move pending,
    and has not changed for SETTLED_S."""
    last, since = None, time.monotonic()
    deadline = since + STREAM_TIMEOUT_S
    while True:
        check()
        now = assignment(admin, group, len(WORK))
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= SETTLED_S:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} not settled after {STREAM_TIMEOUT_S:.0f} s: {last}")
        time.sleep(0.5)  # poll of the group's state


def allocation(folder: Path, bootstrap: str, mode: str, n: int, stream: list[tuple[bytes, bytes]],
               measured: Measured) -> Allocation:
    """One run of the fast/slow stage: join, warm up (and measure), settle, then the timed stream."""
    load = machine_load()
    cfg = measured_pipeline(folder, bootstrap, mode)
    admin = clients.admin(cfg)
    group = group_id(cfg, "scale", None)
    home = Path(cfg.path).parent
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(home / "state"), **ONE_BLAS_THREAD}
    sup = (Supervisor if mode == "measured" else StickySupervisor)(
        cfg.path, specs(cfg, "scale", workers=len(WORK)), log_dir=home / "logs", env=env)
    sup.start()
    device = lambda client: next(d for d in WORK if client.endswith(f".{d}"))  # noqa: E731
    try:
        check = lambda: alive(sup)  # noqa: E731
        wait_for(lambda: assignment(admin, group, len(WORK)) is not None, WORKER_START_S,
                 "both workers to join", check)
        started = time.monotonic()
        produce_raw(cfg, scale_records(N_MEASURE_WARMUP, "w"))
        wait_for(lambda: committed(admin, group) >= N_MEASURE_WARMUP, STREAM_TIMEOUT_S, "the warm-up records", check)
        warmup_s = time.monotonic() - started
        held = {device(c): ps for c, ps in settled(admin, group, check).items()}
        before = records_in(cfg, group)
        seen, _ = release(cfg, stream, MEASURED_PARTITIONS, b"m", check, f"{mode} allocation")
        after = records_in(cfg, group)
        changed = {device(c): ps for c, ps in (assignment(admin, group, len(WORK)) or {}).items()} != held
    finally:
        stop(sup)
        admin.close()
    key = f"allocation {mode} {n}"
    measured.count(key, len(stream), len(seen), "outputs")
    if set(seen) != {k for k, _ in stream}:
        measured.refuse(key, f"{len(set(seen) - {k for k, _ in stream})} outputs of records this run did not send")
    records = {d: int(after.get(d, 0) - before.get(d, 0)) for d in WORK}
    measured.count(f"{key} records", len(stream), sum(records.values()), "records counted by the workers")
    first = min(ms(r, "tl.scale.received_ms") for r in seen.values())
    last = max(ms(r, "tl.scale.produced_ms") for r in seen.values())
    window = (last - first) / 1000
    if window <= 0:
        measured.refuse(key, f"the first record received and the last produced are {window:.3f} s apart")
    placements = []
    for w in sup.running:
        for line in (sup.log_dir / f"{w.spec.label}.log").read_text().splitlines():
            if '"partitions assigned"' in line and '"members"' in line:
                event = json.loads(line)
                placements.append(f"{event.get('timestamp', '')} " + ", ".join(
                    f"{v['capacity']}: {v['partitions']}" for v in event["members"].values()))
    return Allocation(mode, key, len(seen) / window if window > 0 else None, window, warmup_s, held, records, changed,
                      sorted(placements), load)


def produce_raw(cfg: config.PipelineConfig, records: list[tuple[bytes, bytes]]) -> None:
    """Send (key, value) records to the input as fast as possible, stamped with their ingest time."""
    producer = clients.producer(cfg)
    topic = cfg.topic("input").name
    for key, value in records:
        producer.send(topic, key=key, value=value, headers=[(INGEST_MS, str(int(time.time() * 1000)).encode())])
    producer.flush()
    producer.close()


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    if sys.argv[1:2] == ["--sticky-worker"]:  # a worker process of StickySupervisor
        sys.exit(sticky_worker(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocation-only", action="store_true",
                        help="only the measured-capacity vs cooperative-sticky runs (no summary line)")
    args = parser.parse_args()
    pin_device("cpu")
    logs.configure(json=True, level="warning")  # the supervisor's start/stop lines are not the report
    print(f"before the bench: {machine_load()}")
    measured = Measured()
    with local_broker() as (folder, status):
        allocation_stream = scale_records(N_MEASURE_TIMED, "m")
        if args.allocation_only:
            allocations = [allocation(folder, status.bootstrap, mode, i, allocation_stream, measured)
                           for i, mode in enumerate(ALLOCATION_RUNS, 1)]
            report_allocations(measured, allocations)
            print(f"after the bench: {machine_load()}")
            return
        build_backbone().save(folder / "backbone.keras")
        batch = images(N_STREAM, IMAGE, seed=1)
        ceiling = ceiling_rps(Model(config.ModelConfig("backbone", str(folder / "backbone.keras"))), batch)
        stream = encoded(batch, "r")
        runs = [throughput(folder, status.bootstrap, status.pid, label, n, env, stream, measured)
                for label, env in (("as-is", {}), ("1-thread", ONE_THREAD)) for n in (1, 2)]
        shares = capacity_shares(folder, status.bootstrap, measured)
        allocations = [allocation(folder, status.bootstrap, mode, i, allocation_stream, measured)
                       for i, mode in enumerate(ALLOCATION_RUNS, 1)]
    report(measured, runs, shares, ceiling, allocations)


def report_allocations(m: Measured, allocations: list[Allocation]) -> dict[str, str]:
    """The fast/slow table; the summary line's figures (n/a where a measurement was refused)."""
    print(f"measured capacity vs cooperative-sticky: one Scale stage, {MEASURED_PARTITIONS} partitions, "
          f"work per record {WORK} (128x128 products; {FAST} is the fast worker, both on this CPU), "
          f"{N_MEASURE_WARMUP} warm-up records then {N_MEASURE_TIMED} timed, released at once")
    print(f"{'run':<12}{'rec/s':>9}{'window s':>10}{'warm-up s':>11}   partitions and records of the "
          f"timed stream per worker; load at the start")
    for a in allocations:
        per = "; ".join(f"{d}: {len(a.held.get(d, []))} partitions, {a.records.get(d, 0)} records" for d in WORK)
        print(f"{a.key.removeprefix('allocation '):<12}{m.value(a.rps, a.key, fmt='.1f'):>9}{a.window_s:>10.2f}"
              f"{a.warmup_s:>11.1f}   {per}; {a.load}"
              + ("  (the assignment changed during the timed stream)" if a.changed else ""))
    runs = {mode: [a for a in allocations if a.mode == mode] for mode in ("measured", "sticky")}
    for a in runs["measured"]:
        for line in a.placements:
            print(f"  {a.key.removeprefix('allocation ')}: leader's placement (capacity: partitions) {line}")
    keys = {mode: [a.key for a in runs[mode]] for mode in runs}
    rps = {mode: sum(a.rps or 0.0 for a in runs[mode]) / len(runs[mode]) for mode in runs}

    def fast_share(mode: str, of: str) -> str:
        counts = [(len(a.held.get(FAST, [])), sum(len(ps) for ps in a.held.values())) if of == "partitions" else
                  (a.records.get(FAST, 0), sum(a.records.values())) for a in runs[mode]]
        names = keys[mode] + ([f"{k} records" for k in keys[mode]] if of == "records" else [])
        return m.ratio(sum(c for c, _ in counts), sum(t for _, t in counts), *names, fmt=".3f")

    figures = {"measured_share_fast": fast_share("measured", "partitions"),
               "measured_records_share_fast": fast_share("measured", "records"),
               "vs_sticky": m.ratio(rps["measured"], rps["sticky"], *keys["measured"], *keys["sticky"])}
    print(f"  fast worker's share in the measured runs: partitions {figures['measured_share_fast']}, records "
          f"{figures['measured_records_share_fast']} (sticky: partitions {fast_share('sticky', 'partitions')}, "
          f"records {fast_share('sticky', 'records')}); work {WORK[FAST]}:{WORK['gpu:0']}, so ideal "
          f"{WORK['gpu:0'] / sum(WORK.values()):.2f}")
    print(f"  mean rec/s measured {rps['measured']:.1f} vs sticky {rps['sticky']:.1f}: {figures['vs_sticky']}")
    for reason in m.reasons():
        print(reason)
    return figures


def report(m: Measured, runs: list[Run], shares: Shares, ceiling: float, allocations: list[Allocation]) -> None:
    """The tables and the summary line; a figure resting on a refused measurement prints n/a."""
    print(f"stream: {N_STREAM} records of {IMAGE} float32 on {PARTITIONS} partitions, features stage, "
          f"max_batch={MAX_BATCH}, exactly_once; each worker warmed up on its own partitions first")
    print(f"{'threads':<10}{'workers':>8}{'rec/s':>9}{'window s':>10}{'vs 1':>7}   "
          f"cores busy in the window: workers | broker | bench | other sessions = machine")
    by = {(r.label, r.workers): r for r in runs}
    ours = ("broker", "bench", "machine")
    for r in runs:
        workers = sum(v for k, v in r.cpu.items() if k not in ours)
        per = " + ".join(f"{v:.2f}" for k, v in r.cpu.items() if k not in ours)
        others = max(0.0, r.cpu["machine"] - workers - r.cpu["broker"] - r.cpu["bench"])
        key, one = run_key(r.label, r.workers), run_key(r.label, 1)
        print(f"{r.label:<10}{r.workers:>8}{m.value(r.rps, key, fmt='.1f'):>9}{r.window_s:>10.2f}"
              f"{m.ratio(r.rps, by[r.label, 1].rps, key, one):>7}   "
              f"{workers:.2f} ({per}) | {r.cpu['broker']:.2f} | {r.cpu['bench']:.2f} | {others:.2f} "
              f"= {r.cpu['machine']:.2f} of {os.cpu_count()}")
    print(f"  backbone alone in the bench process (TensorFlow's threads, no Kafka): {ceiling:.1f} rec/s")
    for r in runs:
        for s in r.stats:
            if s.get("batches"):
                print(f"  {r.label} x{r.workers} {s['label']}: {s['records_in']} records in {s['batches']} batches "
                      f"(mean {s['records_in'] / s['batches']:.1f}), {s['batch_seconds']:.1f} s in batches")
    print("assign() alone, no previous owners:")
    for line in pure_shares():
        print(f"  {line}")
    fast = next(iter(CAPACITY))
    total_p = sum(len(ps) for ps in shares.held.values())
    total_r = sum(shares.records.values())
    print(f"real broker: one stage, {CAP_PARTITIONS} partitions, {N_CAP} records, declared capacity "
          f"{CAPACITY} (both run on the CPU)")
    print(f"  leader's placement: {shares.leader_line}")
    for device in CAPACITY:
        ps = shares.held.get(device, [])
        on_mine = sum(shares.per_partition.get(p, 0) for p in ps)
        print(f"  {device:<6} capacity {CAPACITY[device]:.0f}: partitions {ps} ({len(ps)}/{total_p}, "
              f"ideal {CAPACITY[device] / sum(CAPACITY.values()):.2f}); records processed "
              f"{shares.records.get(device, 0)} "
              f"(on its partitions: {on_mine})")
    print(f"  records per input partition: {dict(sorted(shares.per_partition.items()))}")
    allocated = report_allocations(m, allocations)
    print(f"after the bench: {machine_load()}")
    rps_1, rps_2 = by["as-is", 1].rps, by["as-is", 2].rps
    one, two = run_key("as-is", 1), run_key("as-is", 2)
    print(f"bench scaling: speedup_2_workers={m.ratio(rps_2, rps_1, one, two)} "
          f"rps_1={m.value(rps_1, one, fmt='.1f')} rps_2={m.value(rps_2, two, fmt='.1f')} "
          f"share_fast={m.ratio(len(shares.held.get(fast, [])), total_p, fmt='.3f')} "
          f"share_fast_ideal={CAPACITY[fast] / sum(CAPACITY.values()):.2f} "
          f"records_share_fast={m.ratio(shares.records.get(fast, 0), total_r, 'capacity records', fmt='.3f')} "
          + " ".join(f"{k}={v}" for k, v in allocated.items()))


if __name__ == "__main__":
    main()
