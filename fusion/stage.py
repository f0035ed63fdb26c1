"""fusion: its own consumer group on the detections topic; joins every model's output per record
and emits one fused result.

The join lives in the engine's state store (`tensorline.engine.state`), one key per record id in
the store of its detections partition: an open `Join` (the detections so far, written with a
time-to-live of `join_timeout_ms`, or `deadline_ms` in deadline mode) or, once emitted, an
`Emitted` marker kept for `dedup_window_ms`. The store changelogs every write to the compacted
`<pipeline>.fusion-changelog` topic in the same transaction as the results and the consumed
offsets, so the committed offset may move past detections whose join is still open, and a
crash loses nothing; an aborted transaction or a failed half of a bisection rolls the store back
to exactly what was committed before it. A join past its time-to-live is emitted partial,
naming the missing models; an emitted marker past the window is tombstoned, so the changelog
holds the open joins and the window, not history. Outputs for a record already emitted
(late, or the record sent again) are duplicates: counted (`tensorline_duplicates_total`), logged
at most every ten seconds, and dropped or, with `on_duplicate = "reprocess"`, joined anew.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorline import logs
from tensorline.engine import metrics
from tensorline.config import CHANGELOG, ModelConfig, PipelineConfig, StageConfig
from tensorline.fusion.stacking import MissingModel, Stacker, load_stacker
from tensorline.fusion.strategies import STRATEGIES, Fused, fuse, soft_vote, threshold, weighted_average
from tensorline.schemas import Detection, FusedResult, decode_detection, encode_result
from tensorline.stages.base import RecordStage, check_probabilities
from tensorline.engine.runtime import DeadLetter, Headers, Message, Output, now_ms, trace_headers

# Duplicates are logged at most this often (with the count since the last line), not once each.
DUPLICATE_LOG_S = 10.0
# The age of the oldest open join (a metric) is measured at most this often: a scan of the joins.
OLDEST_JOIN_EVERY_S = 1.0


@dataclass(frozen=True)
class Join:
    """The detections received so far for one record (model -> the detection's bytes as sent), the
    trace headers of the latest, and when the first and the latest arrived."""

    record_id: str
    first_ms: int
    received_ms: int
    detections: dict[str, bytes]
    headers: Headers


@dataclass(frozen=True)
class Emitted:
    """The record's result was emitted at `at_ms`: later outputs for it are duplicates."""

    at_ms: int


def serialize_state(value: Join | Emitted) -> bytes:
    if isinstance(value, Emitted):
        return json.dumps({"emitted": value.at_ms}).encode()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return json.dumps({"record_id": value.record_id, "first_ms": value.first_ms, "received_ms": value.received_ms,
                       "detections": {m: b64(d) for m, d in value.detections.items()},
                       "headers": [[k, b64(v)] for k, v in value.headers]}).encode()


def deserialize_state(data: bytes) -> Join | Emitted:
    obj = json.loads(data)
    if "emitted" in obj:
        return Emitted(obj["emitted"])
    return Join(obj["record_id"], obj["first_ms"], obj["received_ms"],
                {m: base64.b64decode(d) for m, d in obj["detections"].items()},
                [(k, base64.b64decode(v)) for k, v in obj["headers"]])


@dataclass(frozen=True)
class Item:
    """One detection output as the fusion stage holds it."""

    partition: int
    headers: Headers
    value: bytes
    detection: Detection


def combine(record_id: str, detections: dict[str, Detection], expected: tuple[str, ...], classes: tuple[str, ...],
            strategy: str, params: dict[str, Any], stacker: Stacker | None) -> FusedResult:
    """The fused result of one record's detections (model -> Detection) through the strategy (pure)."""
    models = [m for m in expected if m in detections]
    scores = np.array([detections[m].scores for m in models], np.float64)
    used = strategy
    fused: Fused
    if strategy == "stacking":
        assert stacker is not None
        try:
            probs = stacker.predict_proba(scores, models=models)
            fused = Fused(scores=probs, decision=int(np.argmax(probs)))
        except MissingModel:
            fused, used = soft_vote(scores), "soft_vote"  # the stacker needs every model
    elif strategy == "weighted_average":
        weights = params.get("weights", {})
        fused = weighted_average(scores, [float(weights.get(m, 1.0)) for m in models])
    elif strategy == "threshold":
        fused = threshold(scores, positive_class=classes.index(params.get("positive_class", classes[-1])),
                          threshold=float(params.get("threshold", 0.5)), mode=params.get("mode", "any"),
                          k=params.get("k"))
    else:
        fused = fuse(strategy, scores)
    first = detections[models[0]]
    missing = tuple(m for m in expected if m not in detections)
    return FusedResult(record_id=record_id, source=first.source, ingest_ts_ms=first.ingest_ts_ms,
                       strategy=used, classes=classes, scores=tuple(map(float, fused.scores)),
                       decision=classes[fused.decision], contributors=tuple(models), missing=missing,
                       partial=bool(missing), attributes=first.attributes, label=first.label)


class Fusion(RecordStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        assert pipeline.fusion is not None
        self.cfg = pipeline.fusion
        self.classes = pipeline.classes
        self.strategy = self.cfg.strategy
        if self.strategy not in STRATEGIES and self.strategy not in ("stacking",):
            raise ValueError(f"{pipeline.path}: fusion.strategy: expected one of "
                             f"{', '.join(sorted([*STRATEGIES, 'stacking']))}, got {self.strategy!r}")
        self.stacker = None
        if self.strategy == "stacking":
            if "path" not in self.params:
                raise ValueError(f"{pipeline.path}: fusion.params.path: the stacking strategy needs its fitted file")
            self.stacker = load_stacker(self.params["path"], model_names=self.cfg.expected_models, classes=self.classes)
        self.results_topic = pipeline.topic(self.cfg.output).name
        self.changelog_topic = pipeline.topic(stage.changelog or CHANGELOG).name
        self.expected = frozenset(self.cfg.expected_models)
        self.needed = self.cfg.quorum if self.cfg.emit == "quorum" else len(self.cfg.expected_models)
        self.timeout_ms = self.cfg.deadline_ms if self.cfg.emit == "deadline" else self.cfg.join_timeout_ms
        self.state: Any = None  # the runtime's StateStore
        self.counts: Counter[str] = Counter()
        self.log = logs.get(stage="fusion")
        self._duplicates_logged = (0.0, 0)  # when, and the count then
        self._oldest_measured = 0.0

    serialize_state = staticmethod(serialize_state)
    deserialize_state = staticmethod(deserialize_state)

    # -- input -----------------------------------------------------------------------------
    def decode(self, message: Message) -> Item:
        return Item(message.partition, list(message.headers), message.value, decode_detection(message.value))

    def check(self, item: Item) -> None:
        """Every detection, from whatever client, is one of the expected models' probability
        vectors over the pipeline's classes (as fusion.scores says: softmax or sigmoid)."""
        d = item.detection
        if d.model.name not in self.expected:
            raise DeadLetter(f"record {d.record_id}: model {d.model.name!r} is not in fusion.expected_models "
                             f"({', '.join(self.cfg.expected_models)})", reason="unknown_model")
        if d.classes != self.classes:
            raise DeadLetter(f"record {d.record_id}: model {d.model.name} scores classes {list(d.classes)}, "
                             f"the pipeline's are {list(self.classes)}", reason="wrong_classes")
        check_probabilities(d.record_id, d.model.name, d.scores, len(self.classes), self.cfg.scores)

    def process(self, items: list[Item]) -> list[list[Output]]:
        now = now_ms()
        return [self._add(item, now) for item in items]

    def _add(self, item: Item, now: int) -> list[Output]:
        d, p = item.detection, item.partition
        key = d.record_id.encode()
        current = self.state.get(p, key)
        if isinstance(current, Emitted):
            if self.cfg.on_duplicate == "drop":
                return self._duplicate(d, "emitted")
            current = None  # reprocess: a new join
        if current is not None and d.model.name in current.detections:
            return self._duplicate(d, "joined")
        first = now if current is None else current.first_ms
        join = Join(d.record_id, first, now, {**(current.detections if current else {}), d.model.name: item.value},
                    item.headers)
        if len(join.detections) >= self.needed:
            return self._emit(p, join, "quorum", now)
        self.state.put(p, key, join, expires_ms=first + self.timeout_ms)
        return []

    def expire(self, partition: int, key: bytes, value: Join | Emitted, now_ms: int) -> list[Output]:
        """A join past its timeout is emitted partial; an emitted marker past the window goes."""
        if isinstance(value, Join):
            self.counts["timed_out"] += 1
            return self._emit(partition, value, "deadline" if self.cfg.emit == "deadline" else "timeout", now_ms)
        self.state.delete(partition, key)
        return []

    def tick(self) -> list[Output]:
        """No outputs of its own (timeouts come through `expire`); keeps the join gauges fresh."""
        if time.monotonic() - self._oldest_measured >= OLDEST_JOIN_EVERY_S and self.state is not None:
            self._oldest_measured = time.monotonic()
            firsts = [v.first_ms for p in self.state.partitions for _, v in self.state.items(p) if isinstance(v, Join)]
            metrics.OPEN_JOINS.labels(self.name, "").set(len(firsts))
            metrics.OLDEST_JOIN_SECONDS.labels(self.name, "").set((now_ms() - min(firsts)) / 1000 if firsts else 0)
        return []

    def _emit(self, partition: int, join: Join, cause: str, now: int) -> list[Output]:
        """The result of a closed join; the record is remembered as emitted for the dedup window.
        `cause`: why it closed before every model reported ("quorum", "timeout", "deadline")."""
        detections = {m: decode_detection(b) for m, b in join.detections.items()}
        result = combine(join.record_id, detections, self.cfg.expected_models, self.classes, self.strategy,
                         dict(self.params), self.stacker)
        self.counts["partial" if result.partial else "complete"] += 1
        if result.partial:
            metrics.PARTIAL_RESULTS.labels(self.name, "", cause).inc()
        self.state.put(partition, join.record_id.encode(), Emitted(now), expires_ms=now + self.cfg.dedup_window_ms)
        return [Output(self.results_topic, join.record_id.encode(), encode_result(result),
                       trace_headers(self.name, join.headers, join.received_ms))]

    def _duplicate(self, d: Detection, cause: str) -> list[Output]:
        self.counts["duplicate"] += 1
        metrics.DUPLICATES.labels(self.name, "", cause).inc()
        logged_at, logged_count = self._duplicates_logged
        if time.monotonic() - logged_at >= DUPLICATE_LOG_S:
            self.log.warning("outputs for records already emitted or joined: dropped (on_duplicate = drop)",
                             since_last=self.counts["duplicate"] - logged_count, total=self.counts["duplicate"],
                             example_record_id=d.record_id, model=d.model.name, cause=cause)
            self._duplicates_logged = (time.monotonic(), self.counts["duplicate"])
        return []
