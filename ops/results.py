"""What happened to each record: its fused result, or the dead letters it became instead.

One row per result on the results topic (record id, source, fused decision and score, each
contributing model's scores from the detections topic, missing models, end-to-end latency) and
one per record that has dead letters but no result (each letter's stage and reason). A dead
letter of a record that also has a result (one model's output refused, the result partial) is
named on the result's row. `--follow` then prints every new result and dead letter as it commits.

End-to-end latency runs from the record's ingest time (the `tl.ingest_ms` header `produce` sets,
else the message's `ingest_ts_ms`) to the Kafka timestamp of the result (or dead letter): the
broker's append time when the topic has `message.timestamp.type = LogAppendTime`, else the
fusion worker's send time (CreateTime, the default). Both fall a little before the transaction
commits and the result becomes visible to a read_committed consumer; the commit time is recorded
nowhere. Each row names its clock (`latency_clock`). Producer and fusion hosts on different
clocks can make it negative (clock skew): shown as measured.

The row builders and formatters are pure (records in, rows and lines out); `rows` reads the
topics with `clients.read_range` to their end offsets, and with `follow` goes on with a plain
read_committed consumer without a group.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import ConfigError, PipelineConfig
from tensorline.engine import clients
from tensorline.engine.runtime import INGEST_MS, header, header_ms
from tensorline.ops import dlq
from tensorline.producers.publish import SOURCE
from tensorline.schemas import CodecError, Detection, decode, decode_detection, decode_result

# Kafka's names for a record's timestamp type (ConsumerRecord.timestamp_type 1; 0 or -1 otherwise).
LOG_APPEND_TIME, CREATE_TIME = "LogAppendTime", "CreateTime"
FUSED, PARTIAL, DEAD_LETTER, UNREADABLE = "fused", "partial", "dead letter", "unreadable"
# --follow waits at most this long in one poll, so Ctrl-C or `stop()` is noticed within it.
FOLLOW_POLL_MS = 500
# --follow keeps the detections (and dead letters) of at most this many record ids, the latest,
# for results still to come: a result comes within fusion.join_timeout_ms (15 s) of its first
# detection when fusion keeps up, which this covers at over 6,000 records/s; ids that never get
# a result (detections dropped as duplicates) leave it oldest first. ~300 bytes per id.
FOLLOW_PENDING_IDS = 100_000
# The dead-letter message shown in the table is cut to this many characters (JSON and CSV: whole).
MESSAGE_CHARS = 120

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class NoResultsTopic(RuntimeError):
    """The pipeline's results topic does not exist on the cluster."""


@dataclass(frozen=True)
class Refusal:
    """One dead letter of a record: the stage that refused it, why, and whether it was redriven."""

    stage: str
    reason: str
    message: str
    redriven: bool = False

    def text(self, chars: int | None = MESSAGE_CHARS) -> str:
        message = self.message if chars is None or len(self.message) <= chars else self.message[:chars - 1] + "…"
        redriven = " [redriven]" if self.redriven else ""
        return f"{self.stage}: {self.reason}{redriven}" + (f" ({message})" if message else "")


@dataclass(frozen=True)
class Row:
    """What happened to one record, as `results` shows it."""

    record_id: str | None
    source: str | None
    outcome: str  # FUSED, PARTIAL, DEAD_LETTER or UNREADABLE (a result that does not decode)
    timestamp_ms: int  # the Kafka timestamp of the result or dead letter
    topic: str
    partition: int
    offset: int
    decision: str | None = None
    score: float | None = None  # the fused score of the decision
    scores: Mapping[str, float] = field(default_factory=dict)  # fused, per class
    strategy: str | None = None
    models: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # model -> class -> score
    missing: tuple[str, ...] = ()
    dead_letters: tuple[Refusal, ...] = ()
    latency_ms: int | None = None
    latency_clock: str | None = None  # LOG_APPEND_TIME or CREATE_TIME: where latency_ms ends
    label: str | None = None  # ground truth, when the file carried one
    error: str | None = None  # why an UNREADABLE result does not decode

    def to_dict(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "source": self.source, "outcome": self.outcome,
                "decision": self.decision, "score": self.score, "scores": dict(self.scores),
                "strategy": self.strategy, "models": {m: dict(s) for m, s in self.models.items()},
                "missing": list(self.missing),
                "dead_letters": [{"stage": r.stage, "reason": r.reason, "message": r.message, "redriven": r.redriven}
                                 for r in self.dead_letters],
                "latency_ms": self.latency_ms, "latency_clock": self.latency_clock, "label": self.label,
                "error": self.error, "timestamp_ms": self.timestamp_ms, "topic": self.topic,
                "partition": self.partition, "offset": self.offset}


# -- rows from records (pure) ---------------------------------------------------------------------

def clock(rec: ConsumerRecord) -> str:
    """Which clock a record's Kafka timestamp is: the broker's (LogAppendTime) or its producer's."""
    return LOG_APPEND_TIME if rec.timestamp_type == 1 else CREATE_TIME


def latency(rec: ConsumerRecord, ingest_ts_ms: int | None = None) -> int | None:
    """Ingest (the `tl.ingest_ms` header, else `ingest_ts_ms`) to the record's Kafka timestamp, in ms."""
    ingest = header_ms(list(rec.headers or []), INGEST_MS)
    ingest = ingest if ingest is not None else ingest_ts_ms
    return None if ingest is None or rec.timestamp is None or rec.timestamp < 0 else rec.timestamp - ingest


def _latency(rec: ConsumerRecord, ingest_ts_ms: int | None) -> dict[str, Any]:
    ms = latency(rec, ingest_ts_ms)
    return {"latency_ms": ms, "latency_clock": None if ms is None else clock(rec)}


def result_row(rec: ConsumerRecord) -> Row:
    """The row of one results-topic record (UNREADABLE, keyed by its Kafka key, if it does not decode)."""
    where = {"timestamp_ms": rec.timestamp, "topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
    try:
        r = decode_result(rec.value or b"")
    except CodecError as e:
        key = None if rec.key is None else rec.key.decode(errors="replace")
        return Row(record_id=key, source=_text(rec, SOURCE), outcome=UNREADABLE, error=f"{type(e).__name__}: {e}",
                   **where)
    scores = {c: _f32(x) for c, x in zip(r.classes, r.scores)}
    return Row(record_id=r.record_id, source=r.source, outcome=PARTIAL if r.partial else FUSED,
               decision=r.decision, score=scores.get(r.decision), scores=scores, strategy=r.strategy,
               models={m: {} for m in r.contributors}, missing=r.missing, label=r.label,
               **_latency(rec, r.ingest_ts_ms), **where)


def letter_row(rec: ConsumerRecord, redriven: Collection[str] = frozenset()) -> Row:
    """The row of one dead letter. Its record id and source come from its bytes when they decode
    as a pipeline message; else the source from the `tl.source` header `produce` sets (bytes cut
    to fit or not Avro), or the file a producer could not read (`tl.dlq.file`)."""
    letter = dlq.to_letter(rec, redriven)
    record_id = source = ingest = None
    if letter.stage != "producer" and rec.value:  # a producer's dead letter holds a file's bytes
        try:
            _, datum = decode(rec.value)
            record_id, source = datum.get("record_id"), datum.get("source")
            if isinstance(datum.get("ingest_ts_ms"), datetime):
                ingest = (datum["ingest_ts_ms"] - _EPOCH) // timedelta(milliseconds=1)
        except CodecError:
            pass
    return Row(record_id=record_id, source=source or _text(rec, SOURCE) or letter.file, outcome=DEAD_LETTER,
               timestamp_ms=rec.timestamp, topic=rec.topic, partition=rec.partition, offset=rec.offset,
               dead_letters=(Refusal(letter.stage, letter.reason, letter.message, letter.redriven),),
               **_latency(rec, ingest))


def _f32(x: float) -> float:
    """A float32 score as the shortest decimal that is that float32 (0.1, not 0.10000000149011612)."""
    return float(str(np.float32(x)))


def _text(rec: ConsumerRecord, name: str) -> str | None:
    value = header(list(rec.headers or []), name)
    return value.decode(errors="replace") if value else None


def combine(results: Sequence[Row], letters: Sequence[Row]) -> list[Row]:
    """Result rows, each naming the dead letters of its record id, and one row per other record
    id (or undecodable dead letter) with its dead letters; oldest first."""
    by_id: dict[str, list[Row]] = defaultdict(list)
    alone: list[Row] = []
    for row in letters:
        (by_id[row.record_id] if row.record_id is not None else alone).append(row)
    resulted = {r.record_id for r in results if r.outcome != UNREADABLE}
    rows = [with_refusals(r, [x for letter in by_id.get(r.record_id or "", []) for x in letter.dead_letters])
            if r.outcome != UNREADABLE else r for r in results]
    for rid, found in by_id.items():
        if rid not in resulted:
            rows.append(replace(found[-1], dead_letters=tuple(x for letter in found for x in letter.dead_letters),
                                source=next((f.source for f in found if f.source), None)))
    return sorted([*rows, *alone], key=lambda r: (r.timestamp_ms, r.topic, r.partition, r.offset))


def with_refusals(row: Row, refusals: Iterable[Refusal]) -> Row:
    return replace(row, dead_letters=(*row.dead_letters, *refusals))


def with_models(row: Row, detections: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]]) -> Row:
    """The row with each contributing model's scores: of that model's detections of the record
    ((Kafka timestamp, class -> score), in topic order), the last one not later than the result
    (a record fused again has newer ones), else the last."""
    models = {}
    for model in row.models:
        found = detections.get(model, ())
        before = [scores for ts, scores in found if ts <= row.timestamp_ms]
        models[model] = dict(before[-1] if before else found[-1][1]) if found else {}
    return replace(row, models=models)


def source_matches(source: str | None, wanted: str, cwd: str | None = None) -> bool:
    """Whether a record's source (a path as `produce` was given it, maybe with '#frame=N') is the
    file or under the folder `wanted`: the same path relative to `cwd` (default: the current
    folder), or `wanted` names its last path components (`img.png`, `scans/img.png`). A `wanted`
    with '#' matches that one item of a file only."""
    if not source:
        return False
    if source == wanted:
        return True
    path, sep, item = source.partition("#")
    want_path, want_sep, want_item = wanted.partition("#")
    if want_sep and (not sep or item != want_item):
        return False
    here = cwd or os.getcwd()
    have, want = os.path.normpath(os.path.join(here, path)), os.path.normpath(os.path.join(here, want_path))
    if have == want or have.startswith(want.rstrip(os.sep) + os.sep):
        return True
    tail = PurePath(os.path.normpath(want_path)).parts
    return (not os.path.isabs(want_path) and tail != (".",)
            and PurePath(os.path.normpath(path)).parts[-len(tail):] == tail)


def matches(row: Row, record_id: str | None = None, source: str | None = None, cwd: str | None = None) -> bool:
    return ((record_id is None or row.record_id == record_id)
            and (source is None or source_matches(row.source, source, cwd)))


# -- formatting (pure) ---------------------------------------------------------------------------

TABLE_HEADER = f"{'RECORD ID':<40}  {'OUTCOME':<11}  {'DECISION':<10}  {'SCORE':>6}  {'LATENCY':>10}  SOURCE  DETAILS"


def format_row(row: Row) -> str:
    """One table line; after the source: each model's score of the fused decision, the missing
    models and the dead letters."""
    score = "-" if row.score is None else f"{row.score:.3f}"
    lat = "-" if row.latency_ms is None else f"{row.latency_ms} ms"
    details = []
    if row.models:
        details.append("models " + " ".join(
            f"{m}={s[row.decision]:.3f}" if row.decision in s else f"{m}=?" for m, s in row.models.items()))
    if row.missing:
        details.append("missing " + " ".join(row.missing))
    details += [r.text() for r in row.dead_letters]
    if row.error:
        details.append(row.error)
    return (f"{row.record_id or '-':<40}  {row.outcome:<11}  {row.decision or '-':<10}  {score:>6}  {lat:>10}  "
            f"{row.source or '-'}  {'; '.join(details)}").rstrip()


def csv_columns(classes: Sequence[str], models: Sequence[str]) -> list[str]:
    """The CSV header: fixed columns, the fused score per class, then each model's score per class."""
    return ["record_id", "source", "outcome", "decision", "score", *(f"score.{c}" for c in classes),
            *(f"{m}.{c}" for m in models for c in classes), "missing", "dead_letter_stage", "dead_letter_reason",
            "dead_letter_message", "latency_ms", "latency_clock", "label", "error", "timestamp_ms", "topic",
            "partition", "offset"]


def csv_values(row: Row, classes: Sequence[str], models: Sequence[str]) -> list[Any]:
    """The row's CSV fields, in `csv_columns` order (several dead letters joined with '; ')."""
    def blank(v: Any) -> Any:
        return "" if v is None else v
    return [blank(row.record_id), blank(row.source), row.outcome, blank(row.decision), blank(row.score),
            *(blank(row.scores.get(c)) for c in classes),
            *(blank(row.models.get(m, {}).get(c)) for m in models for c in classes),
            " ".join(row.missing), "; ".join(r.stage for r in row.dead_letters),
            "; ".join(r.reason for r in row.dead_letters), "; ".join(r.message for r in row.dead_letters),
            blank(row.latency_ms), blank(row.latency_clock), blank(row.label), blank(row.error), row.timestamp_ms,
            row.topic, row.partition, row.offset]


def lines(rows: Iterable[Row], fmt: str = "table", *, classes: Sequence[str] = (),
          models: Sequence[str] = ()) -> Iterator[str]:
    """The output lines: `fmt` "table" (a header, then one line per row), "json" (one JSON object
    per row) or "csv" (a header, then one line per row; `classes` and `models` name its score
    columns). Lazy, so --follow prints each row as it comes."""
    if fmt == "json":
        yield from (json.dumps(row.to_dict()) for row in rows)
        return
    if fmt == "csv":
        def line(values: list[Any]) -> str:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(values)
            return buf.getvalue()
        yield line(csv_columns(classes, models))
        yield from (line(csv_values(row, classes, models)) for row in rows)
        return
    yield TABLE_HEADER
    yield from (format_row(row) for row in rows)


# -- reading the topics --------------------------------------------------------------------------

def _topics(cfg: PipelineConfig) -> tuple[str, str, str]:
    """The results, detections and DLQ topic names."""
    if cfg.fusion is None:
        raise ConfigError(cfg.path, "fusion", "a [fusion] section (results are what fusion writes)")
    return cfg.topic(cfg.fusion.output).name, cfg.topic(cfg.fusion.input).name, cfg.topic(cfg.dlq).name


def _ends(reader, topic: str) -> dict[int, int] | None:
    """The log-end offsets of `topic` for `reader` (the last stable offsets under read_committed);
    None when it does not exist."""
    found = reader.partitions_for_topic(topic)
    if not found:
        return None
    return {tp.partition: o for tp, o in reader.end_offsets([TopicPartition(topic, p) for p in found]).items()}


class _Detections:
    """Each model's detections per record id ((Kafka timestamp, class -> score), in topic order),
    of the ids `keep` accepts; at most `max_ids` ids, the least recently added dropped first."""

    def __init__(self, keep: Callable[[str, str], bool], max_ids: int | None = None):
        self.keep, self.max_ids = keep, max_ids
        self.by_id: OrderedDict[str, dict[str, list[tuple[int, dict[str, float]]]]] = OrderedDict()

    def add(self, d: Detection, timestamp_ms: int) -> None:
        if not self.keep(d.record_id, d.source):
            return
        self.by_id.setdefault(d.record_id, {}).setdefault(d.model.name, []).append(
            (timestamp_ms, {c: _f32(x) for c, x in zip(d.classes, d.scores)}))
        self.by_id.move_to_end(d.record_id)
        while self.max_ids is not None and len(self.by_id) > self.max_ids:
            self.by_id.popitem(last=False)


def _read_detections(cfg: PipelineConfig, topic: str, reader, start: Mapping[int, int], end: Mapping[int, int],
                     *into: _Detections) -> None:
    """Add the detections of `topic` from `start` to `end` (per partition) to each of `into`."""
    todo = {p: e for p, e in end.items() if e > start.get(p, 0)}
    if not todo or not into:
        return
    for rec in clients.read_range(cfg, topic, partitions=todo, start={p: start.get(p, 0) for p in todo},
                                  end=todo, client=reader):
        try:
            d = decode_detection(rec.value or b"")
        except CodecError:  # fusion dead-letters it: it is in no result
            continue
        for detections in into:
            detections.add(d, rec.timestamp)


def rows(cfg: PipelineConfig, *, record_id: str | None = None, source: str | None = None, limit: int | None = None,
         follow: bool = False, stop: Callable[[], bool] = lambda: False) -> Iterator[Row]:
    """The rows of the results and dead letters committed so far (read_committed, to the end
    offsets when reading starts), oldest first, those matching `record_id` and `source` (see
    `source_matches`); with `limit`, the last `limit` of them. With `follow`, then every new
    matching result or dead letter as it commits, until `stop()` (checked every FOLLOW_POLL_MS) or
    the caller closes the generator; a dead letter is then shown when it comes, so a record
    refused by one model and fused partial later has two rows."""
    results_topic, detections_topic, dlq_topic = _topics(cfg)

    def keep(rid: str | None, src: str | None) -> bool:
        return (record_id is None or rid == record_id) and (source is None or source_matches(src, source))

    reader = clients.consumer(cfg, None)  # read_committed, no group: nothing is committed anywhere
    detections_reader = clients.consumer(cfg, None)
    try:
        # The end offsets of results and dead letters first, then of detections: every detection
        # in a result read is then read too (fusion read it committed before committing the result).
        results_end = _ends(reader, results_topic)
        if results_end is None:
            raise NoResultsTopic(f"{cfg.path}: the results topic {results_topic} does not exist on "
                                 f"{clients.bootstrap(cfg)} (tensorline topics create)")
        dlq_end = _ends(reader, dlq_topic) or {}  # none: no dead letter yet
        detections_end = _ends(detections_reader, detections_topic) or {}
        found = [row for row in map(result_row, clients.read_range(cfg, results_topic, end=results_end, client=reader))
                 if keep(row.record_id, row.source)]
        redriven = dlq.redriven_markers(cfg)
        letters = [row for row in (letter_row(rec, redriven) for rec in clients.read_range(
                   cfg, dlq_topic, end=dlq_end, client=reader)) if keep(row.record_id, row.source)] if dlq_end else []
        shown = combine(found, letters)
        shown = shown if limit is None else shown[max(0, len(shown) - limit):]
        wanted = {r.record_id for r in shown if r.models}
        detections = _Detections(lambda rid, _: rid in wanted)
        # With follow, a result may yet come for detections committed before now (a join open,
        # fusion behind): the latest FOLLOW_PENDING_IDS ids' detections are kept.
        pending = _Detections(keep, FOLLOW_PENDING_IDS)
        _read_detections(cfg, detections_topic, detections_reader, {}, detections_end,
                         *([detections] if wanted else []), *([pending] if follow else []))
        for row in shown:
            yield with_models(row, detections.by_id.get(row.record_id or "", {})) if row.models else row
        if not follow:
            return
        tps = {TopicPartition(t, p): o for t, end in ((results_topic, results_end), (dlq_topic, dlq_end))
               for p, o in end.items()}
        reader.assign(list(tps))
        for tp, offset in tps.items():
            reader.seek(tp, offset)
        refused: OrderedDict[str, list[Refusal]] = OrderedDict()  # dead letters of ids without a result yet
        while not stop():
            batch = reader.poll(timeout_ms=FOLLOW_POLL_MS)
            new = sorted((r for rs in batch.values() for r in rs), key=lambda r: (r.timestamp, r.partition, r.offset))
            if any(r.topic == results_topic for r in new):  # their detections were committed before them
                end = _ends(detections_reader, detections_topic) or {}
                _read_detections(cfg, detections_topic, detections_reader, detections_end, end, pending)
                detections_end = {**detections_end, **end}
            for rec in new:
                row = result_row(rec) if rec.topic == results_topic else letter_row(rec, redriven)
                if not keep(row.record_id, row.source):
                    continue
                if row.record_id is None or row.outcome == UNREADABLE:
                    pass
                elif row.outcome == DEAD_LETTER:
                    refused.setdefault(row.record_id, []).extend(row.dead_letters)
                    while len(refused) > FOLLOW_PENDING_IDS:
                        refused.popitem(last=False)
                else:
                    row = with_refusals(with_models(row, pending.by_id.pop(row.record_id, {})),
                                        refused.pop(row.record_id, []))
                yield row
    finally:
        reader.close()
        detections_reader.close()
