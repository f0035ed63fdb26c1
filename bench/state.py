"""State benchmark: the fusion stage's restore time and changelog size after 10,000 and after
100,000 records fused. The changelog should hold the open joins and the dedup window, not
history, so both should be about the same (ratios near 1; the goal is at most 1.5).

One broker for the run (the project's own, in a temp dir); each size is a pipeline of its own
(unique name: fresh topics and group). Per size:
1. bulk: N records' detections (3 models, softmax scores over the pipeline's classes), sent in
   blocks model by model so joins stay open across batches, as a real stream's do: each record
   writes its changelog key about three times, then a tombstone once its dedup window passes;
2. the fusion stage runs in this process (`worker.run` on a thread) until every bulk record is
   fused;
3. tail: the same steady stream for both sizes (TAIL_RATE records/s for TAIL_S seconds) with
   OPEN_JOINS records missing one model, which stay open. Meanwhile the bulk's markers expire
   and are tombstoned, segments roll, and the broker's log cleaner compacts;
4. the worker stops and the changelog is restored as a fresh worker restores it
   (`worker.read_changelog` + `StateStore.restore`, the runtime's `_restore`), median of
   RESTORE_REPEATS.

The broker's log cleaner never touches a topic's active segment, and it keeps tombstones for
`delete.retention.ms` (one day by default): with the topic defaults (7-day, 1 GiB segments)
restore would read the whole history. The bench sets the changelog's configs after creation
(CHANGELOG_CONFIGS); it says whether the cleaner ran on the changelog (from the broker's log)
and how many offsets were written against how many records restore read. These are bench
settings, squeezed so a minute-long run shows steady state (Kafka 5 will refuse segment.ms under a
minute, KIP-1030), not production ones: there, delete.retention.ms must outlast a restore's read.
At a few thousand records a restore's time is mostly a consumer's start (about 0.2 s here).
A size whose results are not exactly one per record sent is not reported: its ratios print n/a.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from tensorline import config, logs
from tensorline.config import CHANGELOG
from tensorline.engine import clients, worker
from tensorline.engine.state import StateStore
from tensorline.fusion.stage import deserialize_state, serialize_state
from tensorline.schemas import Detection, ModelRef, encode_detection

from _common import Measured, local_broker, machine_load, require_fresh, run_name, wait_for

SIZES = (10_000, 100_000)
MODELS = ("cnn", "mlp", "logreg")
CLASSES = ("normal", "nodule")
PARTITIONS = 3
# Records per block whose detections go model by model: twice max_batch, so a record's three
# detections land in different batches and its key is written three times (join, join, emitted).
BLOCK = 1000
MAX_BATCH = 500
# A few seconds: the bulk's emitted markers expire (and are tombstoned) early in the tail.
DEDUP_WINDOW_MS = 3_000
# Longer than the run: the tail's open joins stay open until restore.
JOIN_TIMEOUT_MS = 600_000
OPEN_JOINS = 1000  # the live state restore must read: several times what the tail adds between cleaner passes
TAIL_RATE = 100  # records/s, each with its three detections
TAIL_S = 20.0  # the window and delete.retention.ms many times over, and several cleaner passes
RESTORE_REPEATS = 5
FUSE_TIMEOUT_S = 1200.0  # 100,000 records at ~150 records/s on a busy 2-core machine, with room
# The changelog as the bench sets it (see the module docstring): segments roll every second (the
# active one is never cleaned), the cleaner takes the log at 1 % dirty, tombstones go a second
# after they were first cleaned. Kafka 4 refuses segment.bytes under 1 MiB, so time rolls them.
CHANGELOG_CONFIGS = {
    "segment.ms": "1000",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "1000",
    "min.compaction.lag.ms": "0",
}

PIPELINE = """\
[pipeline]
name = "{name}"
bootstrap = "{bootstrap}"
[topics]
detections = {{ partitions = {partitions} }}
results = {{ partitions = {partitions} }}
dlq = {{ partitions = 1 }}
[fusion]
input = "detections"
output = "results"
expected_models = {models}
max_batch = {max_batch}
join_timeout_ms = {join_timeout_ms}
dedup_window_ms = {dedup_window_ms}
"""


@dataclass
class Run:
    size: int
    fuse_s: float
    restore_s: list[float]
    records: int          # changelog records restore read (data records, read_committed)
    keys: int             # keys restored
    offsets: int          # offsets the changelog's partitions have (records written + transaction markers)
    log_bytes: int        # the changelog's size on disk
    cleaner_passes: int   # cleaner passes over the changelog's partitions (broker log)
    last_pass_age_s: float | None  # the last pass began this long before the restore


def detection(rid: str, model: str, p: float) -> bytes:
    d = Detection(record_id=rid, source="bench", ingest_ts_ms=int(time.time() * 1000), model=ModelRef(model, "1"),
                  classes=CLASSES, scores=(1.0 - p, p), label=CLASSES[int(p > 0.5)])
    return bytes(encode_detection(d))


def send(producer, topic: str, pairs) -> None:
    for rid, model in pairs:
        p = zlib.crc32(f"{rid}/{model}".encode()) % 1000 / 1000
        producer.send(topic, key=rid.encode(), value=detection(rid, model, p))


def bulk_pairs(n: int):
    for start in range(0, n, BLOCK):
        ids = [f"b{i}" for i in range(start, min(n, start + BLOCK))]
        for model in MODELS:
            yield from ((rid, model) for rid in ids)


class ResultCount:
    """Results committed on the results topic so far (read_committed, no group)."""

    def __init__(self, cfg: config.PipelineConfig):
        topic = cfg.topic("results").name
        self.consumer = clients.consumer(cfg, None)
        self.consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        self.consumer.seek_to_beginning()
        self.n = 0

    def __call__(self) -> int:
        for batch in self.consumer.poll(timeout_ms=100, max_records=10_000).values():
            self.n += len(batch)
        return self.n

    def close(self) -> None:
        self.consumer.close()


def set_changelog_configs(cfg: config.PipelineConfig) -> None:
    admin = clients.admin(cfg)
    try:
        topic = cfg.topic(CHANGELOG).name
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=CHANGELOG_CONFIGS)])
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])["topic"][topic]
        wrong = {k: got.get(k, {}).get("value") for k, v in CHANGELOG_CONFIGS.items() if got.get(k, {}).get("value") != v}
        if wrong:
            raise RuntimeError(f"{topic}: configs not applied: {wrong}")
    finally:
        admin.close()


def log_bytes(cfg: config.PipelineConfig, topic: str) -> int:
    admin = clients.admin(cfg)
    try:
        total = 0
        for broker_dirs in admin.describe_log_dirs([topic]):
            for log_dir in broker_dirs.get("log_dirs", broker_dirs.get("results", [])):
                for t in log_dir.get("topics", []):
                    if t.get("name") == topic:
                        total += sum(p.get("partition_size", 0) for p in t.get("partitions", []))
        return total
    finally:
        admin.close()


def cleaner_passes(broker_log: Path, topic: str) -> tuple[int, float | None]:
    """The log cleaner's passes over `topic`'s partitions as the broker logged them, and when the
    last began (epoch seconds; the broker logs local time)."""
    pattern = re.compile(rf"^\[([\d-]+ [\d:]+),(\d+)\].*Beginning cleaning of log {re.escape(topic)}-\d+ ")
    try:
        lines = broker_log.read_text(errors="replace").splitlines()
    except OSError:
        return -1, None
    found = [m for m in map(pattern.match, lines) if m]
    if not found:
        return 0, None
    last = found[-1]
    return len(found), time.mktime(time.strptime(last.group(1), "%Y-%m-%d %H:%M:%S")) + int(last.group(2)) / 1000


def restore_once(cfg: config.PipelineConfig, topic: str) -> tuple[float, int, int]:
    """What a fresh worker's `_restore` does for every partition: (seconds, records, keys)."""
    store = StateStore(serialize_state, deserialize_state)
    parts = set(range(PARTITIONS))
    started = time.monotonic()
    by_partition: dict[int, list] = {p: [] for p in parts}
    for rec in worker.read_changelog(cfg, topic, parts):
        by_partition[rec.partition].append(rec)
    records = sum(store.restore(p, recs) for p, recs in by_partition.items())
    seconds = time.monotonic() - started
    return seconds, records, sum(store.count(p) for p in parts)


def run_size(folder: Path, bootstrap: str, broker_log: Path, size: int, measured: Measured) -> Run:
    name = run_name(f"bstate{size}n")
    path = folder / f"{name}.toml"
    path.write_text(PIPELINE.format(name=name, bootstrap=bootstrap, partitions=PARTITIONS, max_batch=MAX_BATCH,
                                    models="[" + ", ".join(f'"{m}"' for m in MODELS) + "]",
                                    join_timeout_ms=JOIN_TIMEOUT_MS, dedup_window_ms=DEDUP_WINDOW_MS))
    cfg = config.load(path)
    clients.create_topics(cfg)
    require_fresh(cfg)
    set_changelog_configs(cfg)
    detections, changelog = cfg.topic("detections").name, cfg.topic(CHANGELOG).name

    producer = clients.producer(cfg)
    sent_at = time.monotonic()
    send(producer, detections, bulk_pairs(size))
    producer.flush()
    print(f"  n={size}: {3 * size} detections sent in {time.monotonic() - sent_at:.1f} s", flush=True)

    stop = threading.Event()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            worker.run(cfg, "fusion", stop=stop, metrics_port=None)
        except BaseException as e:  # noqa: BLE001 - reported by the waits below
            failed.append(e)

    thread = threading.Thread(target=work, name=f"fusion-{size}", daemon=True)
    results = ResultCount(cfg)

    def check() -> None:
        if failed:
            raise RuntimeError(f"fusion worker failed: {failed[0]!r}") from failed[0]

    try:
        started = time.monotonic()
        thread.start()
        wait_for(lambda: results() >= size, FUSE_TIMEOUT_S, f"{size} results", check)
        fuse_s = time.monotonic() - started
        measured.count(f"n={size}", size, results(), "results after the bulk")
        print(f"  n={size}: fused in {fuse_s:.1f} s ({size / fuse_s:.0f} records/s)", flush=True)

        # Tail: the open joins, then a steady stream; the bulk's window passes and the cleaner runs.
        send(producer, detections, ((f"o{i}", m) for i in range(OPEN_JOINS) for m in MODELS[:2]))
        tail_start, i = time.monotonic(), 0
        while (elapsed := time.monotonic() - tail_start) < TAIL_S:
            due = int(elapsed * TAIL_RATE)
            send(producer, detections, ((f"t{j}", m) for j in range(i, due) for m in MODELS))
            i = max(i, due)
            producer.flush()
            check()
            time.sleep(0.05)  # pacing the stream, not waiting for a condition
        wait_for(lambda: results() >= size + i, FUSE_TIMEOUT_S, f"the tail's {i} results", check)
        measured.count(f"n={size}", size + i, results(), "results after the tail")
    finally:
        stop.set()
        thread.join(60)
        results.close()
        producer.close()
    check()

    passes, last_pass = cleaner_passes(broker_log, changelog)
    restore_at = time.time()
    runs = [restore_once(cfg, changelog) for _ in range(RESTORE_REPEATS)]
    _, records, keys = runs[-1]
    consumer = clients.consumer(cfg, None)
    try:
        ends = consumer.end_offsets([TopicPartition(changelog, p) for p in range(PARTITIONS)])
    finally:
        consumer.close()
    return Run(size, fuse_s, [s for s, _, _ in runs], records, keys, sum(ends.values()),
               log_bytes(cfg, changelog), passes, None if last_pass is None else restore_at - last_pass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="two record counts, small then large (default %(default)s)")
    args = parser.parse_args()
    small, large = (int(s) for s in args.sizes.split(","))
    logs.configure(json=False, level="warning")
    print(f"before the bench: {machine_load()}")
    print(f"fusion in-process, {PARTITIONS} partitions, max_batch {MAX_BATCH}, dedup_window_ms {DEDUP_WINDOW_MS}, "
          f"join_timeout_ms {JOIN_TIMEOUT_MS}; tail {TAIL_S:.0f} s at {TAIL_RATE} records/s with {OPEN_JOINS} "
          f"open joins; changelog configs {CHANGELOG_CONFIGS}")
    with local_broker() as (folder, status):
        os.environ[worker.STATE_DIR_ENV] = str(folder / "state")
        broker_log = folder / "broker" / "broker.log"
        measured = Measured()
        by = {n: run_size(folder, status.bootstrap, broker_log, n, measured) for n in (small, large)}
    print(f"{'records':>9}{'fused s':>9}{'restore s (median)':>20}{'restored records':>18}{'keys':>7}"
          f"{'offsets written':>17}{'log bytes':>11}{'cleaner passes':>16}")
    for r in by.values():
        print(f"{r.size:>9}{r.fuse_s:>9.1f}{statistics.median(r.restore_s):>20.3f}{r.records:>18}{r.keys:>7}"
              f"{r.offsets:>17}{r.log_bytes:>11}{r.cleaner_passes:>16}")
        age = "none" if r.last_pass_age_s is None else f"{r.last_pass_age_s:.1f} s before the restore"
        print(f"  restore seconds: {', '.join(f'{s:.3f}' for s in r.restore_s)}; last cleaner pass: {age}")
    compacted = all(r.cleaner_passes > 0 and r.records < r.offsets // 2 for r in by.values())
    if not compacted:
        print("compaction NOT seen on every changelog: restore read what was written (see cleaner passes and "
              "restored records against offsets written)")
    print(f"after the bench: {machine_load()}")
    for reason in measured.reasons():
        print(reason)
    s, b = by[small], by[large]
    restore_s, restore_b = statistics.median(s.restore_s), statistics.median(b.restore_s)
    tag = lambda n: f"{n // 1000}k" if n % 1000 == 0 else str(n)  # noqa: E731
    both = (f"n={small}", f"n={large}")
    print(f"bench state: restore_ratio_{tag(large)}_vs_{tag(small)}={measured.ratio(restore_b, restore_s, *both)} "
          f"changelog_ratio={measured.ratio(b.records, s.records, *both)} "
          f"restore_s_{tag(large)}={measured.value(restore_b, both[1], fmt='.3f')} "
          f"restore_s_{tag(small)}={measured.value(restore_s, both[0], fmt='.3f')} "
          f"changelog_records_{tag(small)}={s.records} "
          f"changelog_records_{tag(large)}={b.records} keys_{tag(small)}={s.keys} keys_{tag(large)}={b.keys} "
          f"compaction={'seen' if compacted else 'not_seen'}")


if __name__ == "__main__":
    main()
