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

Every namespace is new to the broker (`run_name`, checked empty); a run whose outputs are not
exactly the records sent, or whose window is empty, is not reported: its figures print as n/a.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from kafka import TopicPartition
from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

from tensorline import config, logs
from tensorline.engine import clients
from tensorline.ops.supervisor import Supervisor, specs
from tensorline.engine.assignor import assign
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
        tps = [TopicPartition(out_topic, p) for p in range(PARTITIONS)]
        outputs.assign(tps)
        outputs.seek_to_beginning(*tps)

        before, started = cpu_snapshot(sup, broker_pid), time.monotonic()
        producer.commit_transaction()  # the backlog appears at once
        producer.close()
        seen: dict[bytes, object] = {}
        deadline = time.monotonic() + STREAM_TIMEOUT_S
        while len(seen) < len(stream):
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}, {n} workers: {len(seen)} of {len(stream)} outputs "
                                   f"after {STREAM_TIMEOUT_S:.0f} s")
            for batch in outputs.poll(timeout_ms=100).values():
                seen.update((r.key, r) for r in batch if r.key.startswith(b"r"))
        after, elapsed = cpu_snapshot(sup, broker_pid), time.monotonic() - started
        outputs.close()
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


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    pin_device("cpu")
    logs.configure(json=True, level="warning")  # the supervisor's start/stop lines are not the report
    print(f"before the bench: {machine_load()}")
    with local_broker() as (folder, status):
        build_backbone().save(folder / "backbone.keras")
        batch = images(N_STREAM, IMAGE, seed=1)
        ceiling = ceiling_rps(Model(config.ModelConfig("backbone", str(folder / "backbone.keras"))), batch)
        stream = encoded(batch, "r")
        measured = Measured()
        runs = [throughput(folder, status.bootstrap, status.pid, label, n, env, stream, measured)
                for label, env in (("as-is", {}), ("1-thread", ONE_THREAD)) for n in (1, 2)]
        shares = capacity_shares(folder, status.bootstrap, measured)
    report(measured, runs, shares, ceiling)


def report(m: Measured, runs: list[Run], shares: Shares, ceiling: float) -> None:
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
    print(f"after the bench: {machine_load()}")
    for reason in m.reasons():
        print(reason)
    rps_1, rps_2 = by["as-is", 1].rps, by["as-is", 2].rps
    one, two = run_key("as-is", 1), run_key("as-is", 2)
    print(f"bench scaling: speedup_2_workers={m.ratio(rps_2, rps_1, one, two)} "
          f"rps_1={m.value(rps_1, one, fmt='.1f')} rps_2={m.value(rps_2, two, fmt='.1f')} "
          f"share_fast={m.ratio(len(shares.held.get(fast, [])), total_p, fmt='.3f')} "
          f"share_fast_ideal={CAPACITY[fast] / sum(CAPACITY.values()):.2f} "
          f"records_share_fast={m.ratio(shares.records.get(fast, 0), total_r, 'capacity records', fmt='.3f')}")


if __name__ == "__main__":
    main()
