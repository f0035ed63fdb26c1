"""fusion: its own consumer group on the detections topic; joins every model's output per record
and emits one fused result.

Crash safety and exactly-once: the open joins live in memory *and* in a changelog topic
(`<pipeline>.fusion-changelog`, compacted, co-partitioned with the detections topic), written in
the same transaction as the results and the consumed offsets. So the committed offset may move
past outputs whose join is still open: their state is durable in the changelog. Each changelog
record is one collected output (key "record/model", the original detection bytes), a tombstone
when its join is emitted, or an "emitted" marker (key "record") that makes later outputs for that
record late: counted and logged, never emitted twice. On assignment, a worker restores the joins
of its partitions by reading their changelog partitions to the end (read_committed); on an
aborted transaction it restores again, since its memory ran ahead of what was committed. This is
Kafka Streams' design; the alternative, holding offsets back to the oldest open join, would
re-read and need the emitted ids stored elsewhere anyway.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from tensorline import logs
from tensorline.engine import metrics
from tensorline.config import CHANGELOG, ModelConfig, PipelineConfig, StageConfig
from tensorline.fusion.join import Headers, Joins, OpenJoin
from tensorline.fusion.stacking import MissingModel, Stacker, load_stacker
from tensorline.fusion.strategies import STRATEGIES, Fused, fuse, soft_vote, threshold, weighted_average
from tensorline.schemas import Detection, FusedResult, decode_detection, encode_result
from tensorline.stages.base import RecordStage, check_probabilities
from tensorline.engine.runtime import DeadLetter, Message, Output, header, now_ms, trace_headers

FIRST_MS = "tl.join.first_ms"
EMITTED = "tl.join.emitted"
JOIN_RECORD = "tl.join.record"
JOIN_MODEL = "tl.join.model"


@dataclass(frozen=True)
class Item:
    """One detection output as the fusion stage holds it."""

    partition: int
    headers: Headers
    value: bytes
    detection: Detection


def combine(join: OpenJoin, expected: tuple[str, ...], classes: tuple[str, ...], strategy: str,
            params: dict[str, Any], stacker: Stacker | None) -> FusedResult:
    """The fused result of one join: its present models' scores through the strategy (pure)."""
    models = [m for m in expected if m in join.detections]
    scores = np.array([join.detections[m].scores for m in models], np.float64)
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
    first = join.detections[models[0]]
    missing = tuple(m for m in expected if m not in join.detections)
    return FusedResult(record_id=join.record_id, source=first.source, ingest_ts_ms=first.ingest_ts_ms,
                       strategy=used, classes=classes, scores=tuple(map(float, fused.scores)),
                       decision=classes[fused.decision], contributors=tuple(models), missing=missing,
                       partial=bool(missing), attributes=first.attributes, label=first.label)


class Fusion(RecordStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None,
                 read_changelog: Callable[[set[int]], Iterable[Any]] | None = None):
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
        self.changelog_topic = pipeline.topic(CHANGELOG).name
        self.joins = Joins(self.cfg)
        self.owned: set[int] = set()
        self.counts: Counter[str] = Counter()
        self.log = logs.get(stage="fusion")
        if read_changelog is None:
            from tensorline.ops import topics

            def read_changelog(parts: set[int]) -> Iterable[Any]:
                return topics.read_all(pipeline, self.changelog_topic, partitions=parts)
        self.read_changelog = read_changelog

    # -- input -----------------------------------------------------------------------------
    def decode(self, message: Message) -> Item:
        return Item(message.partition, list(message.headers), message.value, decode_detection(message.value))

    def check(self, item: Item) -> None:
        """Every detection, from whatever client, is one of the expected models' probability
        vectors over the pipeline's classes (as fusion.scores says: softmax or sigmoid)."""
        d = item.detection
        if d.model.name not in self.joins.expected:
            raise DeadLetter(f"record {d.record_id}: model {d.model.name!r} is not in fusion.expected_models "
                             f"({', '.join(self.cfg.expected_models)})", reason="unknown_model")
        if d.classes != self.classes:
            raise DeadLetter(f"record {d.record_id}: model {d.model.name} scores classes {list(d.classes)}, "
                             f"the pipeline's are {list(self.classes)}", reason="wrong_classes")
        check_probabilities(d.record_id, d.model.name, d.scores, len(self.classes), self.cfg.scores)

    def process(self, items: list[Item]) -> list[list[Output]]:
        now = now_ms()
        out = []
        for item in items:
            d = item.detection
            added = self.joins.add(item.partition, d, item.headers, now)
            self.counts[added.outcome] += 1
            if added.outcome == "late":
                self.log.warning("output after its record was emitted: not emitted again",
                                 record_id=d.record_id, model=d.model.name)
                out.append([])
            elif added.outcome == "duplicate":
                out.append([])
            elif added.outcome == "ready":
                out.append(self._emit(added.join, "quorum"))
            else:
                key = f"{d.record_id}/{d.model.name}".encode()
                head = item.headers + [(FIRST_MS, str(added.join.first_ms).encode())]
                out.append([Output(self.changelog_topic, key, item.value, head, item.partition)])
        for join in self.joins.over_cap():
            self.counts["evicted"] += 1
            self.log.warning("open joins over max_open_joins: oldest emitted partial", record_id=join.record_id,
                             max_open_joins=self.cfg.max_open_joins)
            out[-1] = out[-1] + self._emit(join, "cap")
        for join in self.joins.due(now):  # under steady input the runtime's ticks wait; do them here
            out[-1] = out[-1] + self._emit(join, "deadline")
        metrics.OPEN_JOINS.labels(self.name, "").set(len(self.joins.open))
        return out

    def tick(self) -> list[Output]:
        due = self.joins.due(now_ms())
        if due:
            metrics.OPEN_JOINS.labels(self.name, "").set(len(self.joins.open))
        return [o for join in due for o in self._emit(join, "deadline")]

    def _emit(self, join: OpenJoin, cause: str) -> list[Output]:
        """The result of a closed join, and its changelog clean-up. `cause`: why it closed early
        ("quorum", "deadline", "cap"), counted when the result is partial."""
        result = combine(join, self.cfg.expected_models, self.classes, self.strategy, dict(self.params), self.stacker)
        self.counts["partial" if result.partial else "complete"] += 1
        if result.partial:
            metrics.PARTIAL_RESULTS.labels(self.name, "", cause).inc()
        rid = join.record_id
        outputs = [Output(self.results_topic, rid.encode(), encode_result(result),
                          trace_headers(self.name, join.headers, join.received_ms))]
        for model in join.detections:
            outputs.append(Output(self.changelog_topic, f"{rid}/{model}".encode(), None,
                                  [(JOIN_RECORD, rid.encode()), (JOIN_MODEL, model.encode())], join.partition))
        outputs.append(Output(self.changelog_topic, rid.encode(), b"emitted", [(EMITTED, b"1")], join.partition))
        return outputs

    # -- state -----------------------------------------------------------------------------
    def on_assigned(self, partitions: set[tuple[str, int]]) -> None:
        parts = {p for _, p in partitions}
        self.owned |= parts
        self._restore(parts)

    def on_revoked(self, partitions: set[tuple[str, int]]) -> None:
        parts = {p for _, p in partitions}
        self.owned -= parts
        self.joins.drop_partitions(parts)

    def aborted(self) -> None:
        self.joins = Joins(self.cfg)
        self._restore(self.owned)

    def _restore(self, parts: set[int]) -> None:
        """Rebuild the open joins and emitted ids of `parts` from their changelog partitions."""
        if not parts:
            return
        self.joins.drop_partitions(parts)
        for rec in self.read_changelog(parts):
            headers = list(rec.headers or [])
            if header(headers, EMITTED) is not None:
                self.joins.open.pop(rec.key.decode(), None)
                self.joins.remember(rec.key.decode())
            elif rec.value is None:
                rid, model = header(headers, JOIN_RECORD).decode(), header(headers, JOIN_MODEL).decode()
                join = self.joins.open.get(rid)
                if join is not None:
                    join.detections.pop(model, None)
                    if not join.detections:
                        del self.joins.open[rid]
            else:
                d = decode_detection(rec.value)
                first = int(header(headers, FIRST_MS) or now_ms())
                join = self.joins.open.setdefault(d.record_id, OpenJoin(d.record_id, rec.partition, first))
                join.detections[d.model.name] = d
                join.headers = [h for h in headers if h[0] != FIRST_MS]
                join.received_ms = max(join.received_ms, first)
        self.log.info("joins restored from the changelog", partitions=sorted(parts), open=len(self.joins.open))
