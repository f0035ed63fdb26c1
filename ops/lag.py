"""Consumer lag per stage group and partition: committed offset, log-end offset, offset lag, time
lag, whether the partition is stuck, and the group's live members and state.

Derived from the broker, never stored: the committed offsets of each stage's consumer group
(OffsetFetch) against the log-end offsets (high watermarks) of its input topic, as Kafka's
kafka-consumer-groups tool computes them. On transactional topics a commit marker occupies the
offset after each transaction; workers commit their consumer position, which steps past it, so a
drained partition shows lag 0. Time lag is the age of the oldest unconsumed record (its
timestamp, set by the producing host's clock) when this host reads it; it is never negative: a
timestamp ahead of this host's clock (clock skew between hosts) reads as 0, and how far ahead it
is is reported (`clock_ahead_s`). A partition is stuck when its committed offset has not moved
for `stuck_after_s` while its lag is above zero; that needs one earlier observation, kept in a
small history file.

A group's live members come from DescribeGroups, and with its lag give its state:
- "ok": it has members and no partition is stuck;
- "stuck": it has members, but a partition behind has not moved for `stuck_after_s`;
- "down": no member, and input waits (lag > 0): nothing will process it (the workers are
  stopped, crashed, or given up by their supervisor);
- "idle": no member and nothing to read.

A stage keeping state in a changelog (`stages.<name>.changelog`; fusion's joins) also shows its
open joins and the age of the oldest, from the latest state per key of that changelog, read to
its end (read_committed, as a restoring worker reads it). It holds the open joins and fusion's
dedup window, so it is small. A state value with a `first_ms` (fusion's `Join`) is an open join;
others (fusion's `Emitted` markers) are not.

A worker holding its input after too many dead letters (`tensorline_dlq_paused`) is not seen
here: its partitions read as behind, then stuck. The dashboard reads workers' metrics and shows it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from tensorline.config import PipelineConfig, changelog_topics
from tensorline.engine import clients
from tensorline.engine.plugins import BUILTIN, PER_MODEL_KINDS

# Far above a healthy batch (seconds), short enough to page before a backlog grows for long.
DEFAULT_STUCK_AFTER_S = 120.0
HISTORY_DIR = Path(".tensorline/lag")
# A changelog holds open joins plus the dedup window: read in well under this on a local broker.
# Past it the stage's open joins show as unknown rather than holding up the lag.
CHANGELOG_READ_S = 5.0
OK, STUCK, DOWN, IDLE = "ok", "stuck", "down", "idle"


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    log_end: int
    time_lag_s: float | None = None  # age of the oldest unconsumed record, >= 0; None when caught up
    stuck: bool = False
    clock_ahead_s: float | None = None  # how far that record's timestamp is ahead of this host's clock

    @property
    def lag(self) -> int:
        return max(0, self.log_end - (self.committed or 0))

    def to_dict(self) -> dict:
        return {"partition": self.partition, "committed": self.committed, "log_end": self.log_end,
                "lag": self.lag, "time_lag_s": self.time_lag_s, "stuck": self.stuck,
                "clock_ahead_s": self.clock_ahead_s}


@dataclass(frozen=True)
class GroupLag:
    stage: str
    group: str
    topic: str
    partitions: tuple[PartitionLag, ...]
    members: int  # live members of the group (DescribeGroups)
    open_joins: int | None = None  # None: the stage keeps no changelog, or it was not read in time
    oldest_open_join_s: float | None = None  # None: no open join

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def state(self) -> str:
        """ok, stuck, down or idle (see the module docstring)."""
        if not self.members:
            return DOWN if self.total else IDLE
        return STUCK if any(p.stuck for p in self.partitions) else OK

    @property
    def time_lag_s(self) -> float | None:
        ages = [p.time_lag_s for p in self.partitions if p.time_lag_s is not None]
        return max(ages) if ages else None

    @property
    def clock_ahead_s(self) -> float | None:
        ahead = [p.clock_ahead_s for p in self.partitions if p.clock_ahead_s is not None]
        return max(ahead) if ahead else None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "group": self.group, "topic": self.topic, "lag": self.total,
                "time_lag_s": self.time_lag_s, "clock_ahead_s": self.clock_ahead_s,
                "stuck": any(p.stuck for p in self.partitions),
                "members": self.members, "state": self.state, "open_joins": self.open_joins,
                "oldest_open_join_s": self.oldest_open_join_s, "partitions": [p.to_dict() for p in self.partitions]}


def _stage_groups(cfg: PipelineConfig) -> list[tuple[str, str, str, str]]:
    """(stage, stage label, consumer group, input topic) of every stage, one per model for per-model stages."""
    out = []
    for name, stage in cfg.stages.items():
        topic = cfg.topic(stage.input).name
        if stage.kind in PER_MODEL_KINDS:
            out += [(name, f"{name}.{m.name}", cfg.group_id(name, m.name), topic) for m in stage.models]
        else:
            out.append((name, name, cfg.group_id(name), topic))
    return out


def groups(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(stage label, consumer group, input topic) of every stage, one per model for per-model stages."""
    return [(label, group, topic) for _, label, group, topic in _stage_groups(cfg)]


class History:
    """When each partition's committed offset last moved (a JSON file, so one-shot runs see it)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seen: dict[str, list] = {}
        if path and path.exists():
            self.seen = json.loads(path.read_text())

    def unchanged_for(self, key: str, committed: int | None, now: float) -> float:
        last = self.seen.get(key)
        if last is None or last[0] != committed:
            self.seen[key] = [committed, now]
            return 0.0
        return now - last[1]

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.seen))


def history_file(cfg: PipelineConfig) -> Path:
    return HISTORY_DIR / f"{cfg.name}.json"


def time_lag(timestamp_ms: int, now_ms: float) -> tuple[float, float | None]:
    """(time lag s, clock ahead s) of the oldest unconsumed record read at `now_ms`: its age,
    clamped at 0; and when its timestamp is in this host's future (the producing host's clock is
    ahead), by how much, else None."""
    age_s = (now_ms - timestamp_ms) / 1000
    return (age_s, None) if age_s >= 0 else (0.0, -age_s)


def _oldest_timestamps(cfg: PipelineConfig, consumer, positions: dict[TopicPartition, int],
                       ends: dict[TopicPartition, int],
                       timeout_s: float = 5.0) -> dict[TopicPartition, tuple[int, float]]:
    """(timestamp ms, when it was read in epoch ms) of the first record at or after each position
    (before its end): one partition at a time, each read stopped at its first record. Ages are
    taken at the read, not before the group's offsets were fetched: with traffic flowing the
    record at a committed offset is often younger than the start of the measurement."""
    found: dict[TopicPartition, tuple[int, float]] = {}
    deadline = time.monotonic() + timeout_s
    for tp, offset in positions.items():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with closing(clients.read_range(cfg, tp.topic, partitions=[tp.partition], start={tp.partition: offset},
                                            end={tp.partition: ends[tp]}, timeout_s=left, client=consumer)) as read:
                first = next(read, None)
        except clients.ReadTimeout:
            continue
        if first is not None:
            found[tp] = (first.timestamp, time.time() * 1000)
    return found


def state_decoder(cfg: PipelineConfig, stage: str) -> Callable[[bytes], Any] | None:
    """The `deserialize_state` of `stage`'s kind (its class, as the engine finds it by kind, not
    instantiated: that would load its model), or None when the kind's is not a staticmethod."""
    target = BUILTIN.get(cfg.stages[stage].kind, cfg.stages[stage].kind)
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    if not isinstance(inspect.getattr_static(factory, "deserialize_state", None), staticmethod):
        return None
    return factory.deserialize_state


def changelog_state(cfg: PipelineConfig, stage: str, *, timeout_s: float = clients.READ_TIMEOUT_S,
                    client=None) -> dict[bytes, Any]:
    """The latest state per key of `stage`'s changelog, decoded by its kind; keys whose latest
    write is a tombstone are left out. Read to its end, read_committed (a `client` must be too).

    Raises KeyError when the stage keeps no changelog, or its topic does not exist yet (the stage
    never ran); ReadTimeout past `timeout_s`; ValueError when its kind cannot decode state here."""
    topic = cfg.topic(changelog_topics(cfg)[stage]).name
    decode = state_decoder(cfg, stage)
    if decode is None:
        raise ValueError(f"stages.{stage}.kind: {cfg.stages[stage].kind}'s deserialize_state is not a "
                         "staticmethod, so its state cannot be read outside a worker")
    latest: dict[bytes, bytes | None] = {}
    for rec in clients.read_range(cfg, topic, timeout_s=timeout_s, client=client):
        latest[rec.key] = rec.value
    return {k: decode(v) for k, v in latest.items() if v is not None}


def open_joins(state: dict[bytes, Any], now_ms: float) -> tuple[int, float | None]:
    """(open joins, age in seconds of the oldest; None without one) in a stage's state."""
    firsts = [v.first_ms for v in state.values() if isinstance(getattr(v, "first_ms", None), int)]
    return len(firsts), (now_ms - min(firsts)) / 1000 if firsts else None


def _open_joins_by_stage(cfg: PipelineConfig, now: float) -> dict[str, tuple[int | None, float | None]]:
    """stage -> (open joins, oldest age s) of every stage keeping a changelog; (None, None) when
    its state could not be read in CHANGELOG_READ_S or decoded here."""
    stages = changelog_topics(cfg)
    if not stages:
        return {}
    reader = clients.consumer(cfg, None, isolation_level="read_committed", enable_auto_commit=False)
    out: dict[str, tuple[int | None, float | None]] = {}
    try:
        for stage in stages:
            try:
                out[stage] = open_joins(changelog_state(cfg, stage, timeout_s=CHANGELOG_READ_S, client=reader),
                                        now * 1000)
            except clients.UnknownTopicOrPartition:  # no changelog topic yet: the stage never ran
                out[stage] = (0, None)
            except (clients.ReadTimeout, ValueError, ImportError):  # slow, undecodable, or a plugin not here
                out[stage] = (None, None)
    finally:
        reader.close()
    return out


def measure(cfg: PipelineConfig, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
            history: History | None = None) -> list[GroupLag]:
    """The lag of every stage group, now."""
    admin = clients.admin(cfg)
    consumer = clients.consumer(cfg, None, isolation_level="read_uncommitted", enable_auto_commit=False)
    now = time.time()
    try:
        result = []
        stage_groups = _stage_groups(cfg)
        described = clients.with_coordinator(lambda: admin.describe_groups([g for _, _, g, _ in stage_groups]))
        joins = _open_joins_by_stage(cfg, now)
        for name, stage, group, topic in stage_groups:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            end = consumer.end_offsets(tps)
            offsets = clients.with_coordinator(lambda: admin.list_group_offsets({group: None})).get(group, {})
            committed = {tp: offsets[tp].offset for tp in tps if tp in offsets and offsets[tp].offset >= 0}
            behind = {tp: committed.get(tp, 0) for tp in tps if end[tp] > committed.get(tp, 0)}
            oldest = _oldest_timestamps(cfg, consumer, behind, end)
            parts = []
            for tp in tps:
                c = committed.get(tp)
                age, ahead = time_lag(*oldest[tp]) if tp in oldest else (None, None)
                idle = history.unchanged_for(f"{group}/{tp.topic}/{tp.partition}", c, now) if history else 0.0
                parts.append(PartitionLag(tp.partition, c, end[tp], age, idle >= stuck_after_s and tp in behind, ahead))
            members = len((described.get(group) or {}).get("members") or [])
            n_open, oldest = joins.get(name, (None, None))
            result.append(GroupLag(stage, group, topic, tuple(parts), members, n_open, oldest))
        if history:
            history.save()
        return result
    finally:
        consumer.close()
        admin.close()


def format_table(lags: list[GroupLag]) -> str:
    head = f"{'STAGE':<20}{'PARTITION':>10}{'COMMITTED':>12}{'LOG-END':>10}{'LAG':>8}{'TIME-LAG-S':>12}  STATE"
    lines = [head]
    for g in lags:
        for p in g.partitions:
            age = "-" if p.time_lag_s is None else f"{p.time_lag_s:.1f}"
            committed = "-" if p.committed is None else str(p.committed)
            ahead = "" if p.clock_ahead_s is None else f"timestamp {p.clock_ahead_s:.1f} s ahead (clock skew)"
            lines.append(f"{g.stage:<20}{p.partition:>10}{committed:>12}{p.log_end:>10}{p.lag:>8}{age:>12}  "
                         f"{'STUCK ' if p.stuck else ''}{ahead}".rstrip())
        age = "-" if g.time_lag_s is None else f"{g.time_lag_s:.1f}"
        lines.append(f"{g.stage + ' total':<20}{'':>10}{'':>12}{'':>10}{g.total:>8}{age:>12}  "
                     f"{g.state.upper()} ({g.members} member{'' if g.members == 1 else 's'})")
        if g.open_joins is not None:
            oldest = "" if g.oldest_open_join_s is None else f", oldest {g.oldest_open_join_s:.1f} s"
            lines.append(f"{g.stage + ' open joins':<20}{g.open_joins:>10}{oldest}")
    return "\n".join(lines)
