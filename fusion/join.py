"""The per-record join of detection outputs: which joins are open, and when one is ready to emit.

Pure bookkeeping with the clock passed in, so every emit rule is tested without Kafka or sleep.
Emit modes: "all" waits for every expected model; "quorum" emits at k of n; "deadline" emits
when all have reported or, partial, once `deadline_ms` has passed since the first output. In
every mode the number of open joins is capped: the oldest is emitted partial beyond the cap.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tensorline.config import FusionConfig
from tensorline.schemas import Detection

Headers = list[tuple[str, bytes]]


@dataclass
class OpenJoin:
    """The outputs collected so far for one record."""

    record_id: str
    partition: int
    first_ms: int
    detections: dict[str, Detection] = field(default_factory=dict)
    headers: Headers = field(default_factory=list)  # of the latest output, for the result's trace
    received_ms: int = 0


@dataclass(frozen=True)
class Added:
    """What adding one output did: "open", "ready" (join complete), "late" or "duplicate"."""

    outcome: str
    join: OpenJoin | None = None


class Joins:
    def __init__(self, cfg: FusionConfig):
        self.cfg = cfg
        self.expected = frozenset(cfg.expected_models)
        self.needed = cfg.quorum if cfg.emit == "quorum" else len(cfg.expected_models)
        self.open: OrderedDict[str, OpenJoin] = OrderedDict()  # oldest first
        self.emitted: OrderedDict[str, None] = OrderedDict()   # bounded memory of emitted ids

    def add(self, partition: int, detection: Detection, headers: Headers, now_ms: int,
            first_ms: int | None = None) -> Added:
        rid, model = detection.record_id, detection.model.name
        if rid in self.emitted:
            return Added("late")
        join = self.open.get(rid)
        if join is None:
            join = self.open[rid] = OpenJoin(rid, partition, now_ms if first_ms is None else first_ms)
        elif model in join.detections:
            return Added("duplicate", join)
        join.detections[model] = detection
        join.headers, join.received_ms = headers, now_ms
        if len(join.detections) >= self.needed:
            return Added("ready", self.close(rid))
        return Added("open", join)

    def close(self, record_id: str) -> OpenJoin:
        """Remove an open join, remembering its id as emitted."""
        join = self.open.pop(record_id)
        self.remember(record_id)
        return join

    def remember(self, record_id: str) -> None:
        self.emitted[record_id] = None
        while len(self.emitted) > self.cfg.max_emitted:
            self.emitted.popitem(last=False)

    def due(self, now_ms: int) -> list[OpenJoin]:
        """Joins past their deadline (deadline mode), closed and returned oldest first."""
        if self.cfg.emit != "deadline":
            return []
        late = [rid for rid, j in self.open.items() if now_ms - j.first_ms >= self.cfg.deadline_ms]
        return [self.close(rid) for rid in late]

    def over_cap(self) -> list[OpenJoin]:
        """The oldest joins beyond max_open_joins, closed and returned."""
        excess = len(self.open) - self.cfg.max_open_joins
        return [self.close(next(iter(self.open))) for _ in range(max(0, excess))]

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget joins of partitions this worker no longer owns (the changelog keeps them)."""
        for rid in [rid for rid, j in self.open.items() if j.partition in partitions]:
            del self.open[rid]

    def missing(self, join: OpenJoin) -> tuple[str, ...]:
        return tuple(m for m in self.cfg.expected_models if m not in join.detections)
