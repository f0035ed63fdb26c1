"""Failover benchmark: exactly-once, and how long each stage stalls, through broker failures.

A chain of model-free Scale stages (in -> s1 -> s2 -> s3) under `tensorline up`, on a local
cluster of three brokers (`broker.start(nodes=3)`: topics replicated 3 times, min ISR 2,
producers with acks=all), on fresh topics and groups. A plain producer sends records with unique
ids at a steady rate; meanwhile:
1. the broker leading the most of the pipeline's partitions is SIGKILLed, and restarted once
   every stage committed records that came after the kill, and `--down-s` seconds after the
   kill at the earliest (the pipeline runs on two brokers meanwhile);
2. later, every broker of the cluster is SIGKILLed, and the cluster restarted `--down-s` later.
The workers are left alone: they must reconnect by themselves. When every group's lag is 0 the
pipeline is stopped (SIGTERM) and checked: every stage's output topic, read_committed, holds each
input record exactly once (by id).

A stage's stall after an event is the longest gap between the Kafka timestamps (set by its
worker's producer at send) of consecutive committed outputs of that stage, from the event to
the next one, less the time the cluster could not serve at all (for the whole-cluster kill:
from the kill until every node answered again). A stage that was not held up shows its usual
gap, a fraction of a second.

    python bench/failover.py [--records N] [--rate R] [--down-s S] [--cluster-down-s S] [--workers W]
                             [--folder DIR]

ends with one line `bench failover: records= missing= duplicates= stall_s_max= stall_s_p50=`;
goal: 0 missing, 0 duplicates, longest stall at most twice the workers' session timeout.
tests/ops/test_broker_cluster.py runs a short version of the same scenario (`run`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import broker, topics
from tensorline.schemas import decode_record

from _common import UpRun, scale_chain, worker_procs

STAGES = ("s1", "s2", "s3")
PARTITIONS = 4  # per topic: the leaders spread over the three brokers
SLEEP_S = 0.02  # per Scale batch: a batch is often in flight when a broker dies
NODES = 3
# The workers' session timeout (engine/clients.py); the goal is a longest stall within twice it.
SESSION_TIMEOUT_S = 10.0
STALL_GOAL_S = 2 * SESSION_TIMEOUT_S
# Python + kafka-python start and a group join, on a loaded 2-core machine, with room to spare.
START_TIMEOUT_S = 120.0
# Draining the backlog the failures leave, at the stages' pace, after the cluster is back.
DRAIN_TIMEOUT_S = 240.0

Log = Callable[[str], None]


def pipeline_file(name: str, bootstrap: str, stages: tuple[str, ...], workers: int) -> str:
    """The chain in -> s1 -> ... of Scale stages, `workers` each, PARTITIONS per topic."""
    return scale_chain(name, bootstrap, stages, workers=workers, partitions=PARTITIONS, sleep_s=SLEEP_S)


def leaders(cfg: config.PipelineConfig) -> Counter:
    """node id -> how many of the pipeline's partitions it leads."""
    admin = clients.admin(cfg)
    try:
        found = admin.describe_topics([t.name for t in cfg.topics.values()])
    finally:
        admin.close()
    return Counter(p["leader_id"] for t in found for p in t["partitions"] if p["leader_id"] >= 0)


@dataclass
class Event:
    """A failure injected (or a node restarted) at `at` (time.time()); `unavailable_s` of it
    the cluster could not serve at all."""
    what: str
    at: float
    unavailable_s: float = 0.0
    stalls: dict[str, float] = field(default_factory=dict)  # stage -> stall (s), less unavailable_s
    gaps: dict[str, float] = field(default_factory=dict)  # stage -> longest output gap (s)

    def line(self, started: float) -> str:
        stalls = " ".join(f"{s}={v:.1f}" for s, v in self.stalls.items())
        gaps = " ".join(f"{s}={v:.1f}" for s, v in self.gaps.items())
        return (f"  {self.what} at {self.at - started:.1f} s (cluster unavailable {self.unavailable_s:.1f} s): "
                f"stall_s {stalls} (longest output gap {gaps})")


@dataclass
class Outcome:
    records: int
    stages: tuple[str, ...]
    missing: dict[str, list[str]] = field(default_factory=dict)  # topic -> ids absent
    duplicates: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # topic -> id -> (p, o)s
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    send_errors: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def n_missing(self) -> int:
        return sum(len(ids) for ids in self.missing.values())

    @property
    def n_duplicates(self) -> int:
        return sum(len(where) - 1 for dups in self.duplicates.values() for where in dups.values())

    def stalls(self) -> list[float]:
        """Each stage's stall after each event (the restart of the killed node included)."""
        return [v for e in self.events for v in e.stalls.values()]

    @property
    def clean(self) -> bool:
        return not (self.error or self.n_missing or self.n_duplicates or self.send_errors)

    def line(self) -> str:
        stalls = self.stalls()
        worst = f"{max(stalls):.1f}" if stalls else "n/a"
        p50 = f"{statistics.median(stalls):.1f}" if stalls else "n/a"
        return (f"bench failover: records={self.records} missing={self.n_missing} "
                f"duplicates={self.n_duplicates} stall_s_max={worst} stall_s_p50={p50}")

    def problems(self) -> list[str]:
        out = [f"  scenario cut short: {self.error}"] if self.error else []
        out += [f"  the bench's producer failed to send: {e}" for e in self.send_errors[:10]]
        for topic, ids in self.missing.items():
            out.append(f"  {topic}: {len(ids)} missing: {', '.join(sorted(ids)[:20])}")
        for topic, dups in self.duplicates.items():
            shown = "; ".join(f"{rid} at (partition, offset) {w}" for rid, w in sorted(dups.items())[:20])
            out.append(f"  {topic}: {len(dups)} ids more than once: {shown}")
        return out

    def report(self, started: float = 0.0, *, notes: bool = True) -> str:
        """The summary line, the problems, each event with its stalls, then (`notes`) the run's log."""
        return "\n".join([self.line(), *self.problems(), *(e.line(started) for e in self.events),
                          *(f"  note: {n}" for n in self.notes if notes)])


class Failover(UpRun):
    """One run of the scenario on the running cluster under `data_dir`, in `folder` (pipeline
    file, state dir, the log of `up` and its workers)."""

    source = "failover"

    def __init__(self, data_dir: Path, folder: Path, *, name: str, records: int, rate: float, down_s: float,
                 cluster_down_s: float | None = None, stages: tuple[str, ...] = STAGES, workers: int = 1,
                 log: Log = print):
        self.data_dir, self.down_s, self.stages = data_dir, down_s, stages
        self.cluster_down_s = down_s if cluster_down_s is None else cluster_down_s
        bootstrap = broker.status(data_dir).bootstrap
        if not bootstrap:
            raise RuntimeError(f"no cluster running under {data_dir}")
        super().__init__(folder, pipeline_file(name, bootstrap, stages, workers), records=records, rate=rate,
                         log=log, env={config.BOOTSTRAP_ENV: bootstrap})
        self.outcome = Outcome(records, stages, notes=self.notes, send_errors=self.send_errors)

    # -- the pipeline ----------------------------------------------------------------------
    def joined(self) -> bool:
        """Every stage's group Stable, its members owning every partition of its input."""
        admin = clients.admin(self.cfg)
        try:
            groups = admin.describe_groups([self.cfg.group_id(s) for s in self.stages])
        except Exception:  # a coordinator loading or moving: ask again
            return False
        finally:
            admin.close()
        for info in groups.values():
            owned = sum(len(t["partitions"]) for m in info.get("members", [])
                        for t in (m.get("member_assignment") or {}).get("assigned_partitions", []))
            if info.get("group_state") != "Stable" or owned != PARTITIONS:
                return False
        return True

    def committed(self) -> dict[str, int]:
        """group -> the sum of its committed offsets (-1 while its coordinator cannot say)."""
        admin = clients.admin(self.cfg)
        try:
            out = {}
            for stage in self.stages:
                group = self.cfg.group_id(stage)
                try:
                    offsets = admin.list_group_offsets(group).get(group, {})
                except Exception:  # the coordinator moving or loading
                    out[group] = -1
                    continue
                out[group] = sum(o.offset for o in offsets.values() if o.offset > 0)
            return out
        finally:
            admin.close()

    def input_ends(self) -> dict[str, int]:
        """group -> the sum of its input topic's log-end offsets, now."""
        from kafka import TopicPartition

        consumer = clients.consumer(self.cfg, None)
        try:
            out = {}
            for stage in self.stages:
                topic = self.cfg.topic(self.cfg.stages[stage].input).name
                tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
                out[self.cfg.group_id(stage)] = sum(consumer.end_offsets(tps).values())
            return out
        finally:
            consumer.close()

    # -- failures --------------------------------------------------------------------------
    def kill_leader(self) -> int:
        """SIGKILL the node leading the most of the pipeline's partitions; its id."""
        counts = leaders(self.cfg)
        node_id, led = counts.most_common(1)[0]
        node = next(n for n in broker.status(self.data_dir).nodes if n.node_id == node_id)
        self._kill([node])
        self.outcome.events.append(Event(f"SIGKILL node {node_id} (leader of {led} of {sum(counts.values())} "
                                         f"partitions)", time.time()))
        self.note(f"SIGKILL node {node_id} (pid {node.pid}), leading {led} partitions; leaders were {dict(counts)}")
        return node_id

    def restart(self, what: str) -> float:
        """Start the nodes that are not running; seconds until every node answered."""
        began = time.monotonic()
        st = broker.start(self.data_dir)
        took = time.monotonic() - began
        self.note(f"{what}: every node answers after {took:.1f} s ({st.nodes_running} running)")
        return took

    def kill_cluster(self) -> None:
        """SIGKILL every node, wait `cluster_down_s`, start them all again."""
        nodes = [n for n in broker.status(self.data_dir).nodes if n.running]
        killed_at = time.time()
        self._kill(nodes)
        event = Event(f"SIGKILL every node ({len(nodes)})", killed_at)
        self.outcome.events.append(event)
        self.note(f"SIGKILL every node: pids {[n.pid for n in nodes]}")
        time.sleep(self.cluster_down_s)  # the outage itself: what the workers ride through
        self.restart("cluster restarted")
        event.unavailable_s = time.time() - killed_at

    def _kill(self, nodes) -> None:
        for n in nodes:
            os.kill(n.pid, signal.SIGKILL)
        for n in nodes:
            while broker.pid_alive(n.pid, Path(n.data_dir)):
                time.sleep(0.05)

    # -- the run ---------------------------------------------------------------------------
    def scenario(self, whole_cluster: bool) -> None:
        self.start_up()
        self.wait_for(self.joined, START_TIMEOUT_S, "every group with its workers owning partitions")
        self.note("every group joined; sending")
        producer = threading.Thread(target=self.produce, name="failover-producer", daemon=True)
        producer.start()
        self.wait_for(lambda: self.sent >= self.records // 5, START_TIMEOUT_S, "a fifth of the records sent")
        ends = self.input_ends()
        node_id = self.kill_leader()
        killed = time.monotonic()
        # The pipeline runs on the other brokers until every stage committed past the end its
        # input had at the kill (records that came after it: commits in flight at the kill do not
        # count), and for `down_s` at least.
        self.wait_for(lambda: all(self.committed()[g] > o for g, o in ends.items()), DRAIN_TIMEOUT_S,
                      "every stage committing on the brokers left")
        self.note(f"every stage committed again, {time.monotonic() - killed:.1f} s after the kill")
        time.sleep(max(0.0, killed + self.down_s - time.monotonic()))
        self.outcome.events.append(Event(f"restart node {node_id}", time.time()))
        self.restart(f"node {node_id} restarted")
        if whole_cluster:
            self.wait_for(lambda: self.sent >= self.records * 3 // 5, self.records / self.rate + START_TIMEOUT_S,
                          "three fifths of the records sent")
            self.kill_cluster()
        self.wait_for(lambda: not producer.is_alive(), self.records / self.rate + DRAIN_TIMEOUT_S,
                      "every record sent")
        self.note("every record sent")
        self.wait_for(self.drained, DRAIN_TIMEOUT_S, "every group's lag 0")
        self.note("every group's lag is 0")

    def check(self) -> None:
        """Each stage's output, read_committed: every id once; and the stalls from its timestamps."""
        want = {f"r{i}" for i in range(self.records)}
        ends = [e.at for e in self.outcome.events[1:]] + [time.time()]
        for stage in self.stages:
            topic = self.cfg.topic(stage).name
            where: dict[str, list[tuple[int, int]]] = {}
            stamps = []
            for r in topics.read_all(self.cfg, topic):
                where.setdefault(decode_record(r.value).record_id, []).append((r.partition, r.offset))
                stamps.append(r.timestamp / 1000)
            missing = sorted(want - where.keys())
            dups = {rid: w for rid, w in where.items() if len(w) > 1}
            if missing:
                self.outcome.missing[topic] = missing
            if dups:
                self.outcome.duplicates[topic] = dups
            self.note(f"{topic}: {len(where)} ids, {len(stamps)} records, {len(missing)} missing, "
                      f"{len(dups)} duplicated")
            stamps.sort()
            for event, end in zip(self.outcome.events, ends):
                gap = longest_gap(stamps, event.at, end)
                event.gaps[stage] = gap
                event.stalls[stage] = max(0.0, gap - event.unavailable_s)

    def run(self, whole_cluster: bool = True) -> Outcome:
        try:
            self.scenario(whole_cluster)
        except (TimeoutError, RuntimeError) as e:
            self.outcome.error = str(e)
            self.note(f"scenario cut short: {e}")
        try:
            self.stop_up()
            if broker.status(self.data_dir).nodes_running < NODES:  # cut short while a node was down
                self.restart("nodes restarted for the checks")
            self.check()
        finally:
            self.cleanup()
        self.outcome.seconds = time.time() - self.started
        return self.outcome

    def cleanup(self) -> None:
        """Whatever this run started and is still running: the supervisor, then its workers."""
        self.kill_up()
        for pid in (w.pid for w in worker_procs(self.path)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    """The longest time between consecutive `stamps` (sorted) that reaches into [start, end):
    the gap open at `start` counts whole, from the last stamp before it."""
    before = [s for s in stamps if s < start][-1:]
    inside = [s for s in stamps if start <= s < end]
    points = before + inside
    if not inside:
        return end - (before[0] if before else start)
    return max(b - a for a, b in zip(points, points[1:])) if len(points) > 1 else 0.0


def run(data_dir: Path, folder: Path, *, records: int, rate: float, down_s: float, whole_cluster: bool = True,
        cluster_down_s: float | None = None, stages: tuple[str, ...] = STAGES, workers: int = 1,
        name: str | None = None, log: Log = print) -> Outcome:
    """The scenario once on the running cluster under `data_dir`, on fresh topics and groups."""
    failover = Failover(data_dir, folder, name=name or f"failover{uuid.uuid4().hex[:8]}", records=records,
                        rate=rate, down_s=down_s, cluster_down_s=cluster_down_s, stages=stages, workers=workers,
                        log=log)
    outcome = failover.run(whole_cluster)
    log(outcome.report(failover.started, notes=False))  # the notes were logged as they came
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=20.0, help="records per second sent (default 20)")
    parser.add_argument("--down-s", type=float, default=20.0,
                        help="seconds a killed node (then the whole cluster) stays down (default 20)")
    parser.add_argument("--cluster-down-s", type=float, help="seconds the whole cluster stays down (default: --down-s)")
    parser.add_argument("--workers", type=int, default=1, help="workers per stage (default 1)")
    parser.add_argument("--folder", type=Path, help="run in this (new) folder and keep it: the cluster's and the "
                                                    "workers' logs (default: a temporary folder, removed)")
    args = parser.parse_args()
    one, five, _ = os.getloadavg()
    print(f"before the bench: load average {one:.1f} (5 min: {five:.1f}) on {os.cpu_count()} cores")
    with (contextlib.nullcontext(str(args.folder)) if args.folder
          else tempfile.TemporaryDirectory(prefix="tensorline-failover-")) as tmp:
        folder = Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        data_dir = folder / "cluster"
        broker.start(data_dir, broker.free_port_range(NODES), nodes=NODES)
        try:
            outcome = run(data_dir, folder, records=args.records, rate=args.rate, down_s=args.down_s,
                          cluster_down_s=args.cluster_down_s, workers=args.workers)
        finally:
            broker.stop(data_dir)
    one, five, _ = os.getloadavg()
    print(f"after the bench: load average {one:.1f} (5 min: {five:.1f}); "
          f"goal: 0 missing, 0 duplicates, stall_s_max <= {STALL_GOAL_S:.0f}")
    print(outcome.line())
    sys.exit(0 if outcome.clean and max(outcome.stalls(), default=0) <= STALL_GOAL_S else 1)


if __name__ == "__main__":
    main()
