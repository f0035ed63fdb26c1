"""Fusion on worker processes while its group changes under a stream: scale up, SIGKILL and
restart, scale down; every record is fused exactly once (read_committed), none partial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import TopicPartition

from tensorline.config import CHANGELOG
from tensorline.engine import clients, worker
from tensorline.engine.state import StateStore
from tensorline.fusion.stage import Emitted, deserialize_state, serialize_state
from tensorline.schemas import Detection, ModelRef, decode_result, encode_detection

pytestmark = pytest.mark.broker
MODELS = ("cnn", "mlp", "logreg")
PARTITIONS = 4
BLOCK = 40  # records per block
BLOCKS = 10
N = BLOCK * BLOCKS
# A process's start (imports, group join) on a busy 2-core machine, and a dead member's
# partitions moving after its 10 s session timeout, with room.
STEP_S = 60.0
# Far beyond the test: a record's outputs held up by a kill and a rebalance must still be joined
# in full, so any partial result is a defect, not a slow machine.
BODY = f"""
[topics]
detections = {{ partitions = {PARTITIONS} }}
results = {{ partitions = {PARTITIONS} }}
dlq = {{ partitions = 1 }}
[fusion]
input = "detections"
output = "results"
expected_models = ["cnn", "mlp", "logreg"]
max_batch = 32
max_delay_ms = 5
join_timeout_ms = 300000
"""


def segment(k: int) -> list[tuple[str, str]]:
    """The stream's k-th piece: cnn for block k, mlp for block k-1, logreg for block k-2, so each
    piece completes one block and leaves the next two open (joins open across every event)."""
    return [(f"r{b * BLOCK + i}", model) for b, model in ((k, "cnn"), (k - 1, "mlp"), (k - 2, "logreg"))
            if 0 <= b < BLOCKS for i in range(BLOCK)]


class Results:
    """The results topic read_committed from the beginning, as it grows."""

    def __init__(self, cfg):
        topic = cfg.topic("results").name
        self.consumer = clients.consumer(cfg, None)
        self.consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        self.consumer.seek_to_beginning()
        self.seen = []

    def count(self) -> int:
        for batch in self.consumer.poll(timeout_ms=200).values():
            self.seen.extend(decode_result(r.value) for r in batch)
        return len(self.seen)


def events(log: Path, event: str) -> list[dict]:
    """The runtime's JSON log lines with this event (the group leader's assignor logs its own
    "partitions assigned", with members instead of partitions)."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
        if line.startswith("{") and f'"{event}"' in line:
            entry = json.loads(line)
            if entry.get("event") == event and "partitions" in entry:
                out.append(entry)
    return out


def test_scale_up_kill_restart_scale_down_fuses_every_record_once(tmp_path, write_pipeline):
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, BODY)
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(tmp_path / "state")}
    procs: dict[str, subprocess.Popen] = {}
    ended: set[str] = set()  # stopped by the test

    def spawn(name: str) -> None:
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tensorline.cli", "run", "fusion", "-c", str(path), "--metrics-port", "0"],
                stdout=subprocess.DEVNULL, stderr=log, env=env)

    def tail(name: str) -> str:
        return "\n".join((tmp_path / f"{name}.log").read_text(errors="replace").splitlines()[-15:])

    def wait(condition, what: str, timeout: float = STEP_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, proc in procs.items():
                if name not in ended and proc.poll() is not None:
                    pytest.fail(f"worker {name} exited with {proc.returncode} while waiting for {what}:\n{tail(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout:.0f} s: {what}; worker logs:\n"
                            + "\n".join(f"--- {n}\n{tail(n)}" for n in procs))
            time.sleep(0.1)  # poll of the loop's condition

    def owns(name: str, n: int | None = None) -> bool:
        """The worker's latest assignment is non-empty (or exactly n partitions) and restored."""
        assigned = events(tmp_path / f"{name}.log", "partitions assigned")
        if not assigned:
            return False
        parts = assigned[-1]["partitions"]
        restored = {p for e in events(tmp_path / f"{name}.log", "state restored from the changelog")
                    for p in e["partitions"]}
        return (len(parts) == n if n is not None else bool(parts)) and {p for _, p in parts} <= restored

    producer = clients.producer(cfg)
    topic = cfg.topic("detections").name

    def send(k: int) -> None:
        for rid, model in segment(k):
            d = Detection(record_id=rid, source="t", ingest_ts_ms=int(time.time() * 1000),
                          model=ModelRef(model, "1"), classes=("normal", "nodule"),
                          scores=(0.25, 0.75) if model != "mlp" else (0.6, 0.4), label="nodule")
            producer.send(topic, key=rid.encode(), value=bytes(encode_detection(d)))
        producer.flush()

    results = Results(cfg)
    fused = lambda n: lambda: results.count() >= n  # noqa: E731
    group = worker.group_id(cfg, "fusion", None)
    admin = clients.admin(cfg)

    def committed(tp: TopicPartition) -> int:
        """The group's committed offset on a detections partition (0 before any commit)."""
        got = admin.list_group_offsets({group: [tp]}).get(group, {}).get(tp)
        return got.offset if got is not None and got.offset >= 0 else 0
    try:
        spawn("w1")
        wait(lambda: owns("w1", PARTITIONS), "w1 owning every partition")
        for k in range(3):
            send(k)
        wait(fused(BLOCK), "block 0 fused by w1")

        send(3)  # scale up mid-stream: w2 joins while w1 is on block 1
        spawn("w2")
        wait(lambda: owns("w2"), "w2 owning partitions, restored from the changelog")
        wait(fused(2 * BLOCK), "block 1 fused")

        send(4)  # SIGKILL mid-stream: w1 dies with joins open and its last records not committed
        procs["w1"].send_signal(signal.SIGKILL)
        procs["w1"].wait(10)
        ended.add("w1")
        w1_parts = [TopicPartition(topic, p) for _, p in events(tmp_path / "w1.log", "partitions assigned")[-1]["partitions"]]
        left_behind = {tp.partition: (committed(tp), end) for tp, end in results.consumer.end_offsets(w1_parts).items()
                       if committed(tp) < end}
        send(5)
        spawn("w1b")  # restarted: takes w1's slot, so its transactional id fences w1's transaction
        wait(fused(4 * BLOCK), "blocks 2 and 3 fused after the kill")
        wait(lambda: owns("w1b"), "w1b owning partitions")

        send(6)  # scale down mid-stream: w2 finishes and commits its batches, leaves the group
        procs["w2"].send_signal(signal.SIGTERM)
        ended.add("w2")
        wait(lambda: procs["w2"].poll() is not None, "w2 stopping on SIGTERM")
        assert procs["w2"].returncode == 0, tail("w2")
        for k in range(7, BLOCKS + 2):
            send(k)
        wait(lambda: owns("w1b", PARTITIONS), "w1b owning every partition")

        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

        def caught_up() -> bool:
            ends = results.consumer.end_offsets(tps)
            return results.count() >= N and all(committed(tp) >= ends[tp] for tp in tps)
        wait(caught_up, f"all {N} records fused and every detection committed", timeout=2 * STEP_S)
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        producer.close()
        admin.close()
        results.consumer.close()

    # Every worker has stopped (its last transaction committed or aborted): the whole topic.
    fused_all = [decode_result(r.value) for r in clients.read_range(cfg, cfg.topic("results").name)]
    counts = Counter(r.record_id for r in fused_all)
    missing = sorted(set(f"r{i}" for i in range(N)) - set(counts), key=lambda r: int(r[1:]))
    duplicates = {rid: c for rid, c in counts.items() if c > 1}
    partial = [(r.record_id, r.missing) for r in fused_all if r.partial]
    assert left_behind, "w1 had committed every detection sent when it was killed: not mid-stream"
    assert not missing, f"{len(missing)} records never fused: {missing[:20]}"
    assert not duplicates, f"{len(duplicates)} records fused more than once: {dict(list(duplicates.items())[:20])}"
    assert not partial, f"{len(partial)} partial results: {partial[:20]}"
    assert len(fused_all) == N

    # The state moved through the changelog: a worker took over a partition with joins in it.
    restores = [e for n in ("w2", "w1b") for e in events(tmp_path / f"{n}.log", "state restored from the changelog")]
    assert any(e["records"] > 0 for e in restores), restores
    # What a restore reads now: every record emitted, no join left open (an open one would be
    # emitted partial at its time-out, a duplicate).
    store = StateStore(serialize_state, deserialize_state)
    parts = set(range(PARTITIONS))
    by_partition: dict[int, list] = {p: [] for p in parts}
    for rec in worker.read_changelog(cfg, cfg.topic(CHANGELOG).name, parts):
        by_partition[rec.partition].append(rec)
    for p, recs in by_partition.items():
        store.restore(p, recs)
    state = {key.decode(): value for p in parts for key, value in store.items(p)}
    assert set(state) == {f"r{i}" for i in range(N)}
    assert all(isinstance(v, Emitted) for v in state.values()), \
        [k for k, v in state.items() if not isinstance(v, Emitted)][:20]
