"""Consumer lag per stage group and partition: committed offset, log-end offset, offset lag, time
lag, whether the partition is stuck, and the group's live members and state.

Derived from the broker, never stored: the committed offsets of each stage's consumer group
(OffsetFetch) against the log-end offsets (high watermarks) of its input topic, as Kafka's
kafka-consumer-groups tool computes them. On transactional topics a commit marker occupies the
offset after each transaction; workers commit their consumer position, which steps past it, so a
drained partition shows lag 0. Time lag is the age of the oldest unconsumed record (its
timestamp). A partition is stuck when its committed offset has not moved for `stuck_after_s`
while its lag is above zero; that needs one earlier observation, kept in a small history file.

A group's live members come from DescribeGroups, and with its lag give its state:
- "ok": it has members and no partition is stuck;
- "stuck": it has members, but a partition behind has not moved for `stuck_after_s`;
- "down": no member, and input waits (lag > 0): nothing will process it (the workers are
  stopped, crashed, or given up by their supervisor);
- "idle": no member and nothing to read.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from kafka import TopicPartition

from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.engine.plugins import PER_MODEL_KINDS

# Far above a healthy batch (seconds), short enough to page before a backlog grows for long.
DEFAULT_STUCK_AFTER_S = 120.0
HISTORY_DIR = Path(".tensorline/lag")
OK, STUCK, DOWN, IDLE = "ok", "stuck", "down", "idle"


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    log_end: int
    time_lag_s: float | None = None  # age of the oldest unconsumed record; None when caught up
    stuck: bool = False

    @property
    def lag(self) -> int:
        return max(0, self.log_end - (self.committed or 0))

    def to_dict(self) -> dict:
        return {"partition": self.partition, "committed": self.committed, "log_end": self.log_end,
                "lag": self.lag, "time_lag_s": self.time_lag_s, "stuck": self.stuck}


@dataclass(frozen=True)
class GroupLag:
    stage: str
    group: str
    topic: str
    partitions: tuple[PartitionLag, ...]
    members: int  # live members of the group (DescribeGroups)

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

    def to_dict(self) -> dict:
        return {"stage": self.stage, "group": self.group, "topic": self.topic, "lag": self.total,
                "time_lag_s": self.time_lag_s, "stuck": any(p.stuck for p in self.partitions),
                "members": self.members, "state": self.state, "partitions": [p.to_dict() for p in self.partitions]}


def groups(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(stage label, consumer group, input topic) of every stage, one per model for per-model stages."""
    out = []
    for name, stage in cfg.stages.items():
        topic = cfg.topic(stage.input).name
        if stage.kind in PER_MODEL_KINDS:
            out += [(f"{name}.{m.name}", cfg.group_id(name, m.name), topic) for m in stage.models]
        else:
            out.append((name, cfg.group_id(name), topic))
    return out


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


def _oldest_timestamps(cfg: PipelineConfig, consumer, positions: dict[TopicPartition, int],
                       ends: dict[TopicPartition, int], timeout_s: float = 5.0) -> dict[TopicPartition, int]:
    """The timestamp (ms) of the first record at or after each position (before its end): one
    partition at a time, each read stopped at its first record."""
    found: dict[TopicPartition, int] = {}
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
            found[tp] = first.timestamp
    return found


def measure(cfg: PipelineConfig, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
            history: History | None = None) -> list[GroupLag]:
    """The lag of every stage group, now."""
    admin = clients.admin(cfg)
    consumer = clients.consumer(cfg, None, isolation_level="read_uncommitted", enable_auto_commit=False)
    now = time.time()
    try:
        result = []
        stage_groups = groups(cfg)
        described = admin.describe_groups([g for _, g, _ in stage_groups])
        for stage, group, topic in stage_groups:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            end = consumer.end_offsets(tps)
            offsets = admin.list_group_offsets({group: None}).get(group, {})
            committed = {tp: offsets[tp].offset for tp in tps if tp in offsets and offsets[tp].offset >= 0}
            behind = {tp: committed.get(tp, 0) for tp in tps if end[tp] > committed.get(tp, 0)}
            oldest = _oldest_timestamps(cfg, consumer, behind, end)
            parts = []
            for tp in tps:
                c = committed.get(tp)
                age = (now * 1000 - oldest[tp]) / 1000 if tp in oldest else None
                idle = history.unchanged_for(f"{group}/{tp.topic}/{tp.partition}", c, now) if history else 0.0
                parts.append(PartitionLag(tp.partition, c, end[tp], age, idle >= stuck_after_s and tp in behind))
            members = len((described.get(group) or {}).get("members") or [])
            result.append(GroupLag(stage, group, topic, tuple(parts), members))
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
            lines.append(f"{g.stage:<20}{p.partition:>10}{committed:>12}{p.log_end:>10}{p.lag:>8}{age:>12}  "
                         f"{'STUCK' if p.stuck else ''}")
        age = "-" if g.time_lag_s is None else f"{g.time_lag_s:.1f}"
        lines.append(f"{g.stage + ' total':<20}{'':>10}{'':>12}{'':>10}{g.total:>8}{age:>12}  "
                     f"{g.state.upper()} ({g.members} member{'' if g.members == 1 else 's'})")
    return "\n".join(lines)
