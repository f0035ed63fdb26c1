"""Chaos benchmark: exactly-once through worker SIGKILLs, supervisor SIGKILLs and a worker frozen
past its session timeout.

A chain of model-free Scale stages (in -> s1 -> s2 -> s3), each a consumer group of worker
processes run by `tensorline up`, on fresh topics and groups. A plain producer sends records with
unique ids at a steady rate; meanwhile a seeded schedule SIGKILLs workers, SIGKILLs the
supervisor (and starts `up` again), and once SIGSTOPs a worker while the other worker of its
group owns other partitions, until its session timeout has passed, the group has moved its
partitions to that other worker and that one committed past it there, then SIGCONTs it (the last
quarter of the stream waits for the freeze, so records flow while it is frozen and after). When
every group's lag is 0 the pipeline is stopped (SIGTERM) and checked:
- every stage's output topic, read_committed, holds each input record exactly once (by id);
- `__consumer_offsets` never shows a group's committed offset moving backwards (ops/offsets.py);
- no worker outlives its supervisor: orphans are workers of this run still alive ORPHAN_WAIT_S
  after the supervisor was killed, or after the stage was stopped (then killed by pid).

    python bench/chaos.py [--seed N] [--kills K] [--records N]

ends with one line `bench chaos: records= missing= duplicates= offset_regressions= orphans=
seconds=`. tests/ops/test_chaos.py runs the short version of the same scenario (`run`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kafka import TopicPartition

from tensorline.engine import clients
from tensorline.ops import offsets, topics
from tensorline.schemas import decode_record

from _common import UpRun, WorkerProc, alive, scale_chain, worker_procs

STAGES = ("s1", "s2", "s3")
WORKERS = 2  # per stage: a frozen worker's partitions have somewhere to go
PARTITIONS = 4  # per topic: two per worker, so both workers of a group own some
SLEEP_S = 0.05  # per Scale batch: a batch is often in flight when a signal lands
# The workers' session timeout (engine/clients.py): a frozen worker is evicted after it.
SESSION_TIMEOUT_S = 10.0
# A worker whose supervisor died should be gone well within this (its batch finished, committed).
ORPHAN_WAIT_S = 20.0
# Python + kafka-python start and a group join, on a loaded 2-core machine, with room to spare.
START_TIMEOUT_S = 90.0
# Draining the backlog a supervisor restart or a frozen worker leaves, at the stages' pace.
DRAIN_TIMEOUT_S = 180.0

Log = Callable[[str], None]


def pipeline_file(name: str, bootstrap: str) -> str:
    """The chain in -> s1 -> s2 -> s3 of Scale stages, WORKERS each, PARTITIONS per topic."""
    return scale_chain(name, bootstrap, STAGES, workers=WORKERS, partitions=PARTITIONS, sleep_s=SLEEP_S)


# -- the schedule ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    at: int  # fires once this many records were sent (and its preconditions hold)
    kind: str  # "kill" (a worker), "kill-supervisor", "stop" (SIGSTOP, then SIGCONT)
    stage: str = ""
    which: int = 0  # which worker of the stage, in client id order (kill: of those owning partitions)

    def __str__(self) -> str:
        target = f" {self.stage} worker #{self.which}" if self.stage else ""
        return f"{self.kind}{target} at record {self.at}"


def schedule(seed: int, *, kills: int, supervisor_kills: int, records: int) -> list[Event]:
    """The seeded events in firing order. The freeze comes early (a fifth of the stream in), so
    records keep flowing long after the frozen worker resumes; the kills spread over the stream."""
    rng = random.Random(seed)
    events = [Event(int(records * rng.uniform(0.15, 0.25)), "stop", rng.choice(STAGES), rng.randrange(WORKERS))]
    kinds = ["kill"] * kills + ["kill-supervisor"] * supervisor_kills
    rng.shuffle(kinds)
    for kind in kinds:
        at = int(records * rng.uniform(0.05, 0.85))
        events.append(Event(at, kind, rng.choice(STAGES), rng.randrange(WORKERS)) if kind == "kill"
                      else Event(at, kind))
    return sorted(events, key=lambda e: e.at)


# -- processes ---------------------------------------------------------------------------------

def slots(state_dir: Path) -> dict[int, dict]:
    """pid -> its worker slot file (group, member, device, slot index) under the state dir, for
    live workers (a dead worker's file stays behind until its slot is claimed again)."""
    out = {}
    for f in (state_dir / "workers").glob("*.lock"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if "pid" in info and alive(info["pid"]):
            out[info["pid"]] = {**info, "slot": int(f.name.rsplit(".", 2)[-2])}
    return out


def assigned_partitions(slot: dict) -> int | None:
    """How many partitions the worker says it owns (its own /metrics), None when it cannot say."""
    try:
        body = urllib.request.urlopen(f"http://{slot['metrics']}/metrics", timeout=2).read().decode()
    except (OSError, KeyError, ValueError):
        return None
    found = re.search(r"^tensorline_assigned_partitions\{[^}]*\} ([0-9.e+]+)$", body, re.M)
    return int(float(found.group(1))) if found else None


def client_id(slot: dict) -> str:
    return f"{slot['group']}.{slot['member']}.{slot['device']}"


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the run -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    records: int
    missing: dict[str, list[str]] = field(default_factory=dict)  # output topic -> ids absent
    duplicates: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)  # topic -> id -> (partition, offset)s
    regressions: list[offsets.Regression] = field(default_factory=list)
    orphans: list[tuple[str, int]] = field(default_factory=list)  # (when, pid)
    events: list[str] = field(default_factory=list)
    error: str = ""  # why the scenario was cut short, if it was
    seconds: float = 0.0

    @property
    def n_missing(self) -> int:
        return sum(len(ids) for ids in self.missing.values())

    @property
    def n_duplicates(self) -> int:
        return sum(len(where) - 1 for dups in self.duplicates.values() for where in dups.values())

    @property
    def clean(self) -> bool:
        return not (self.error or self.n_missing or self.n_duplicates or self.regressions or self.orphans)

    def line(self) -> str:
        return (f"bench chaos: records={self.records} missing={self.n_missing} duplicates={self.n_duplicates} "
                f"offset_regressions={len(self.regressions)} orphans={len(self.orphans)} seconds={self.seconds:.0f}")

    def problems(self) -> list[str]:
        """What went wrong, precisely: ids and where their copies are, offsets, pids."""
        out = [f"  scenario cut short: {self.error}"] if self.error else []
        for topic, ids in self.missing.items():
            out.append(f"  {topic}: {len(ids)} missing: {', '.join(sorted(ids)[:20])}")
        for topic, dups in self.duplicates.items():
            shown = "; ".join(f"{rid} at (partition, offset) {where}" for rid, where in sorted(dups.items())[:20])
            out.append(f"  {topic}: {len(dups)} ids more than once: {shown}")
        out += [f"  offset regression: {r}" for r in self.regressions]
        out += [f"  orphan: pid {pid} still alive {when}" for when, pid in self.orphans]
        return out

    def report(self) -> str:
        """The summary line, the problems, then every event of the run."""
        return "\n".join([self.line(), *self.problems(), *(f"  event: {e}" for e in self.events)])


class Chaos(UpRun):
    """One run of the scenario on a broker, in `folder` (pipeline file, state dir, the log of
    `up` and its workers)."""

    source = "chaos"

    def __init__(self, bootstrap: str, folder: Path, *, name: str, records: int, rate: float, log: Log = print):
        super().__init__(folder, pipeline_file(name, bootstrap), records=records, rate=rate, log=log)
        # The last quarter of the stream waits for the freeze: its first half is sent once a
        # worker is frozen, the second once it resumed, so records flow both while it is frozen
        # and after SIGCONT, however late the freeze comes.
        self.frozen, self.resumed = threading.Event(), threading.Event()
        self.gates = {records - records // 4: self.frozen, records - records // 8: self.resumed}
        self.outcome = Outcome(records, events=self.notes)
        self.admin = clients.admin(self.cfg)

    def gate(self, i: int) -> bool:
        """Hold record `i` until its gate (the freeze, the resume) is open."""
        event = self.gates.get(i)
        if event is None or event.is_set():
            return False
        event.wait()
        return True

    def assignment(self, group: str) -> dict[str, list[int]] | None:
        """client id -> partitions of a Stable group (None while it rebalances or is unknown)."""
        try:
            info = self.admin.describe_groups([group]).get(group, {})
        except Exception:  # the coordinator moving or loading: ask again
            return None
        if info.get("group_state") != "Stable":
            return None
        return {m["client_id"]: sorted(p for t in (m.get("member_assignment") or {}).get("assigned_partitions", [])
                                       for p in t["partitions"])
                for m in info.get("members", [])}

    def members(self, stage: str, *, all_own: bool = True) -> dict[int, tuple[str, list[int]]]:
        """pid -> (client id, partitions) of the stage's workers, once its group is Stable with
        WORKERS members, each a live worker of the current `up` whose own metrics agree with the
        group on how many partitions it owns, and each owning some (`all_own`) or one at least;
        else empty. (A killed worker stays a member, under the same client id as its successor,
        until its session times out.)"""
        held = self.assignment(self.cfg.group_id(stage)) or {}
        live = {client_id(s): (pid, s) for pid, s in slots(self.state_dir).items()}
        ours = {w.pid for w in self.supervised(stage)}
        if len(held) != WORKERS or not all(live.get(c, (0,))[0] in ours for c in held):
            return {}
        if not (all if all_own else any)(held.values()):
            return {}
        if any(assigned_partitions(live[c][1]) != len(parts) for c, parts in held.items()):
            return {}
        return {live[c][0]: (c, parts) for c, parts in held.items()}

    def supervised(self, stage: str) -> list[WorkerProc]:
        pid = self.up.pid if self.up else -1
        return [w for w in worker_procs(self.path) if w.stage == stage and w.ppid == pid]

    # -- the supervisor --------------------------------------------------------------------
    def orphans_after(self, when: str, pids: list[int]) -> None:
        """Workers of a gone supervisor: wait for them to exit; the ones that do not are orphans
        (recorded, then killed so the run goes on with its normal worker count)."""
        deadline = time.monotonic() + ORPHAN_WAIT_S
        pids = pids + [w.pid for w in worker_procs(self.path) if w.pid not in pids]
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if alive(p)]
        for pid in left:
            self.outcome.orphans.append((when, pid))
            signal_pid(pid, signal.SIGCONT)
            signal_pid(pid, signal.SIGKILL)
        self.note(f"{len(left)} orphan worker(s) {when}: {left}" if left
                  else f"every worker gone {when}")

    # -- events ----------------------------------------------------------------------------
    def kill(self, event: Event) -> None:
        """SIGKILL one worker of the stage that owns partitions, once the group is settled."""
        found: dict[int, tuple[str, list[int]]] = {}

        def ready() -> bool:
            nonlocal found
            found = self.members(event.stage, all_own=False)
            return bool(found)
        self.wait_for(ready, START_TIMEOUT_S, f"the workers of {event.stage} in a settled group")
        idle = [f"pid {p} ({c})" for p, (c, parts) in found.items() if not parts]
        if idle:
            self.note(f"{event.stage}: {', '.join(idle)} owns no partition in a Stable group")
        owners = sorted((p for p in found if found[p][1]), key=lambda p: found[p][0])
        pid = owners[event.which % len(owners)]
        signal_pid(pid, signal.SIGKILL)
        self.note(f"SIGKILL {event.stage} worker pid {pid} ({found[pid][0]}) owning partitions {found[pid][1]}")

    def kill_supervisor(self, event: Event) -> None:
        assert self.up is not None
        children = [w.pid for w in worker_procs(self.path) if w.ppid == self.up.pid]
        self.up.send_signal(signal.SIGKILL)
        self.up.wait()
        self.note(f"SIGKILL tensorline up (pid {self.up.pid}); its workers: {children}")
        self.up = None
        self.orphans_after("after the supervisor was killed", children)
        self.start_up()

    def stop(self, event: Event) -> None:
        """SIGSTOP one worker of a group whose two workers both own partitions; SIGCONT it once
        the other owns every partition and has committed past the frozen one on one of them."""
        group = self.cfg.group_id(event.stage)
        topic = self.cfg.topic(self.cfg.stages[event.stage].input).name
        found: dict[int, tuple[str, list[int]]] = {}

        def ready() -> bool:
            nonlocal found
            found = self.members(event.stage)
            return bool(found)
        self.wait_for(ready, START_TIMEOUT_S, f"both workers of {event.stage} owning partitions")
        pid = sorted(found, key=lambda p: found[p][0])[event.which % len(found)]
        victim_id, partitions = found[pid]
        held = {c for c, _ in found.values()}
        tps = [TopicPartition(topic, p) for p in partitions]
        before = self.committed(group, tps)
        signal_pid(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        self.frozen.set()
        self.note(f"SIGSTOP {event.stage} worker pid {pid} ({victim_id}) owning partitions {partitions}, "
                  f"committed {before}")
        try:
            self.wait_for(lambda: (self.assignment(group) or {}).keys() == held - {victim_id},
                          SESSION_TIMEOUT_S + START_TIMEOUT_S, f"{group} moving every partition off the frozen worker")
            # Frozen past its session timeout, whatever moved the partitions (as a stalled host would be).
            self.wait_for(lambda: time.monotonic() - frozen_at > SESSION_TIMEOUT_S, SESSION_TIMEOUT_S + 1,
                          "the session timeout to pass")
            self.note(f"{group}: the other worker owns every partition after {time.monotonic() - frozen_at:.1f} s")
            try:
                self.wait_for(lambda: any(o > before.get(p, -1) for p, o in self.committed(group, tps).items()),
                              30.0, "a commit past the frozen worker on one of its partitions")
            except TimeoutError as e:
                self.note(f"no commit on its partitions yet ({e}); resuming it anyway")
        finally:
            signal_pid(pid, signal.SIGCONT)
            self.resumed.set()
        self.note(f"SIGCONT pid {pid} after {time.monotonic() - frozen_at:.1f} s frozen; "
                  f"committed then {self.committed(group, tps)}")

    def committed(self, group: str, tps: list[TopicPartition]) -> dict[int, int]:
        """partition -> the group's committed offset there."""
        found = self.admin.list_group_offsets({group: None}).get(group, {})
        return {tp.partition: found[tp].offset for tp in tps if tp in found}

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> None:
        want = {f"r{i}" for i in range(self.records)}
        for stage in STAGES:
            topic = self.cfg.topic(stage).name
            where: dict[str, list[tuple[int, int]]] = {}
            for r in topics.read_all(self.cfg, topic):
                where.setdefault(decode_record(r.value).record_id, []).append((r.partition, r.offset))
            missing = sorted(want - where.keys())
            dups = {rid: w for rid, w in where.items() if len(w) > 1}
            if missing:
                self.outcome.missing[topic] = missing
            if dups:
                self.outcome.duplicates[topic] = dups
            self.note(f"{topic}: {len(where)} ids, {sum(map(len, where.values()))} records, "
                      f"{len(missing)} missing, {len(dups)} duplicated")
        hist = offsets.history(self.cfg, [self.cfg.group_id(s) for s in STAGES])
        self.outcome.regressions = offsets.regressions(hist)
        self.note(f"__consumer_offsets: {sum(map(len, hist.values()))} commits on {len(hist)} partitions, "
                  f"{len(self.outcome.regressions)} regressions")

    def run(self, plan: list[Event]) -> Outcome:
        """The scenario, then the checks; a scenario cut short (a worker that never comes back, a
        group that never drains) is reported as such, and the checks still run on what is there."""
        try:
            self.scenario(plan)
        except (TimeoutError, RuntimeError) as e:
            self.outcome.error = str(e)
            self.note(f"scenario cut short: {e}")
        finally:
            self.frozen.set()  # a producer waiting at a gate ends too
            self.resumed.set()
        try:
            self.stop_up()
            self.check()
        finally:
            self.cleanup()
        self.outcome.seconds = time.time() - self.started
        return self.outcome

    def scenario(self, plan: list[Event]) -> None:
        self.start_up()
        self.wait_for(lambda: all(self.members(s) for s in STAGES), START_TIMEOUT_S,
                      "every group with its workers owning partitions")
        self.note("every group joined; sending")
        if not any(e.kind == "stop" for e in plan):
            self.frozen.set()
            self.resumed.set()
        threading.Thread(target=self.produce, name="chaos-producer", daemon=True).start()
        for event in plan:
            self.wait_for(lambda: self.sent >= event.at, DRAIN_TIMEOUT_S, f"record {event.at} sent")
            self.note(f"event: {event}")
            {"kill": self.kill, "kill-supervisor": self.kill_supervisor, "stop": self.stop}[event.kind](event)
        self.wait_for(lambda: self.sent == self.records, self.records / self.rate + DRAIN_TIMEOUT_S,
                      "every record sent")
        self.note("every record sent")
        self.wait_for(self.drained, DRAIN_TIMEOUT_S, "every group's lag 0")
        self.note("every group's lag is 0; partitions per worker: " + "; ".join(
            f"{s} {sorted(parts for _, parts in self.members(s, all_own=False).values()) or '(unsettled)'}"
            for s in STAGES))

    def stop_up(self) -> None:
        """SIGTERM `up` (it stops its workers), then look for workers left behind."""
        children = [w.pid for w in worker_procs(self.path)]
        super().stop_up()
        self.orphans_after("after the stage was stopped", children)

    def cleanup(self) -> None:
        """Whatever this run started and is still running: the supervisor, then its workers."""
        self.kill_up()
        for w in worker_procs(self.path):
            signal_pid(w.pid, signal.SIGCONT)
            signal_pid(w.pid, signal.SIGKILL)
        self.admin.close()


def run(bootstrap: str, folder: Path, *, seed: int, kills: int, supervisor_kills: int, records: int,
        rate: float, name: str | None = None, log: Log = print) -> Outcome:
    """The scenario once, on fresh topics and groups (`name`, else a random one)."""
    plan = schedule(seed, kills=kills, supervisor_kills=supervisor_kills, records=records)
    chaos = Chaos(bootstrap, folder, name=name or f"chaos{seed}x{uuid.uuid4().hex[:6]}", records=records,
                  rate=rate, log=log)
    chaos.note(f"seed {seed}: {len(plan)} events: " + "; ".join(map(str, plan)))
    return chaos.run(plan)


def main() -> None:
    from _common import local_broker, machine_load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=8, help="worker SIGKILLs (default 8)")
    parser.add_argument("--supervisor-kills", type=int, default=2, help="supervisor SIGKILLs (default 2)")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0, help="records per second sent (default 20)")
    args = parser.parse_args()
    print(f"before the bench: {machine_load()}")
    with local_broker() as (folder, status):
        outcome = run(status.bootstrap, folder, seed=args.seed, kills=args.kills,
                      supervisor_kills=args.supervisor_kills, records=args.records, rate=args.rate)
        print("\n".join(outcome.problems()) or "every check passed")
    print(f"after the bench: {machine_load()}")
    print(outcome.line())
    sys.exit(0 if outcome.clean else 1)


if __name__ == "__main__":
    main()
