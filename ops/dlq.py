"""The dead-letter topic: counts by stage and reason, the records themselves, and redrive.

A dead letter keeps the original key and bytes and says in `tl.dlq.*` headers which stage
refused it, why and where it came from (topic/partition/offset/timestamp; partition -1 when it
never was on a topic). Why is `tl.dlq.reason`, the word dead letters are grouped and filtered by:
a stage's own (`non_finite`, `not_probabilities`, `bad_shape`, ...), a producer's bad file
(`empty_file`, `not_dicom`, ...), else the error's class (a codec error such as `UnknownMagicByte`);
dead letters written before that header existed fall back to `tl.dlq.error`, the class.

Redrive sends matching dead letters back to their original topic and partition, original key,
bytes and headers (minus `tl.dlq.*`), exactly once, however often and with whatever filters it
runs. A consumer group cannot remember that: its committed offset is one position per partition,
so a record skipped by one filter would be lost to a later redrive with another filter, and one
group per filter would redrive a record matching two filters twice. Instead each redriven dead
letter is remembered individually: a marker record (key "dlq-partition:offset:timestamp", value
where it went) on `<dlq topic>.redriven` (compacted, then deleted after the DLQ's retention; a
marker outlives its dead letter as it is written later), produced in the same transaction as the
records sent back. Redrive first initialises its transactional producer (`<pipeline>.dlq-redrive`),
which fences any other redrive of the pipeline and completes its open transaction; it then reads
the markers (read_committed), so everything redriven before is known, and sends only the rest.
A record redriven and dead-lettered again is a new dead letter (a new offset), redrivable again.

Producer bad files (stage "producer") never were on a topic: their value is the file's bytes. They
are redriven only if those bytes parse now (the reader was fixed or a decoder installed), as the
records the producer would publish; a file kept without its bytes (too large) is reported only.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import PipelineConfig, TopicConfig, changelog_topics
from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.producers.publish import Publisher
from tensorline.producers.sources import BadFile, SourceItem, read
from tensorline.engine.runtime import header

PREFIX = "tl.dlq."
REDRIVEN_SUFFIX = ".redriven"
# Dead letters per redrive transaction: large enough to amortise a commit, small enough that an
# interrupted redrive repeats little work (none is sent twice either way).
REDRIVE_BATCH = 100


@dataclass(frozen=True)
class Letter:
    """One dead letter, decoded from its headers; `record` is the Kafka record itself."""

    dlq_partition: int
    dlq_offset: int
    dlq_timestamp_ms: int
    stage: str
    reason: str
    error: str
    message: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    value_size: int
    file: str | None
    redriven: bool
    record: ConsumerRecord = field(repr=False, compare=False)

    @property
    def marker(self) -> str:
        """The key of this dead letter's redrive marker (the timestamp guards against a recreated DLQ)."""
        return f"{self.dlq_partition}:{self.dlq_offset}:{self.dlq_timestamp_ms}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "record"}


def _text(headers: list, name: str, default: str = "") -> str:
    value = header(headers, name)
    return default if value is None else value.decode(errors="replace")


def _int(headers: list, name: str) -> int:
    try:
        return int(_text(headers, name, "-1"))
    except ValueError:
        return -1


def to_letter(rec: ConsumerRecord, redriven: Collection[str] = frozenset()) -> Letter:
    """The dead letter in a DLQ record (`redriven`: the markers of those redriven so far)."""
    h = list(rec.headers or [])
    letter = Letter(
        dlq_partition=rec.partition, dlq_offset=rec.offset, dlq_timestamp_ms=rec.timestamp,
        stage=_text(h, PREFIX + "stage", "?"), reason=_text(h, PREFIX + "reason") or _text(h, PREFIX + "error", "?"),
        error=_text(h, PREFIX + "error", "?"), message=_text(h, PREFIX + "message"),
        topic=_text(h, PREFIX + "topic", "?"), partition=_int(h, PREFIX + "partition"),
        offset=_int(h, PREFIX + "offset"), timestamp_ms=_int(h, PREFIX + "timestamp_ms"),
        key=None if rec.key is None else rec.key.decode(errors="backslashreplace"),
        value_size=0 if rec.value is None else len(rec.value), file=_text(h, PREFIX + "file") or None,
        redriven=False, record=rec)
    return replace(letter, redriven=letter.marker in redriven)


def marker_topic(cfg: PipelineConfig) -> str:
    return cfg.topic(cfg.dlq).name + REDRIVEN_SUFFIX


def redriven_markers(cfg: PipelineConfig) -> set[str]:
    """The markers of every dead letter redriven so far (none if no redrive ever ran)."""
    try:
        return {r.key.decode() for r in topics.read_all(cfg, marker_topic(cfg)) if r.value is not None}
    except KeyError:  # the marker topic does not exist yet
        return set()


def letters(cfg: PipelineConfig, reason: str | None = None, stage: str | None = None) -> list[Letter]:
    """The dead letters (read_committed, in DLQ order), those of `reason` and `stage` if given."""
    done = redriven_markers(cfg)
    return [letter for letter in (to_letter(r, done) for r in topics.read_all(cfg, cfg.topic(cfg.dlq).name))
            if (reason is None or letter.reason == reason) and (stage is None or letter.stage == stage)]


def counts(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Dead letters by (stage, reason): how many, and how many of them were redriven."""
    return tally(letters(cfg))


def tally(found: Iterable[Letter]) -> list[dict[str, Any]]:
    """`counts` of these dead letters, by (stage, reason), sorted."""
    total: Counter[tuple[str, str]] = Counter()
    redriven: Counter[tuple[str, str]] = Counter()
    for letter in found:
        total[(letter.stage, letter.reason)] += 1
        redriven[(letter.stage, letter.reason)] += letter.redriven
    return [{"stage": s, "reason": r, "count": n, "redriven": redriven[(s, r)]} for (s, r), n in sorted(total.items())]


def show(cfg: PipelineConfig, reason: str | None = None, stage: str | None = None,
         limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` matching dead letters: DLQ offset, stage, reason, message, origin, key,
    value size, and whether it was redriven."""
    found = letters(cfg, reason, stage)
    return [letter.to_dict() for letter in (found if limit is None else found[:limit])]


def format_counts(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'STAGE':<16}{'REASON':<32}{'COUNT':>8}{'REDRIVEN':>10}"]
    lines += [f"{r['stage']:<16}{r['reason']:<32}{r['count']:>8}{r['redriven']:>10}" for r in rows]
    lines.append(f"{'total':<48}{sum(r['count'] for r in rows):>8}{sum(r['redriven'] for r in rows):>10}")
    return "\n".join(lines)


def format_letters(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        origin = f"{r['topic']}/{r['partition']}@{r['offset']}" if r["partition"] >= 0 else f"{r['topic']} (never on it)"
        lines.append(f"dlq {r['dlq_partition']}@{r['dlq_offset']}  {r['stage']}  {r['reason']}"
                     f"{'  [redriven]' if r['redriven'] else ''}")
        lines.append(f"  origin {origin}  timestamp {r['timestamp_ms']}  key {r['key']!r}  value {r['value_size']} bytes"
                     + (f"  file {r['file']}" if r["file"] else ""))
        if r["message"]:
            lines.append(f"  {r['message'][:300]}")
    return "\n".join(lines) or "no dead letters match"


# -- redrive -------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What redrive does with one dead letter: send its record back, publish a file's items, or
    report why not (`why`)."""

    letter: Letter
    items: list[SourceItem] = field(default_factory=list)
    why: str | None = None


def _file_items(letter: Letter, max_bytes: int) -> list[SourceItem]:
    """The items a producer's bad file gives now; raises BadFile if it still is bad."""
    name = Path(letter.file or "file").name
    with tempfile.TemporaryDirectory(prefix="tl-redrive-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(letter.record.value)
        items = list(read(path, max_bytes=max_bytes))
    return [replace(i, source=i.source.replace(str(path), letter.file or name, 1)) for i in items]


def _plan(cfg: PipelineConfig, letter: Letter, partitions: dict[str, int]) -> _Plan:
    if letter.topic not in partitions:
        return _Plan(letter, why=f"origin topic {letter.topic!r} is not a Kafka topic of pipeline {cfg.name}")
    if letter.record.value is None:
        return _Plan(letter, why="the dead letter holds no bytes"
                     + (" (file too large to keep: publish it again with tensorline produce)" if letter.file else ""))
    if letter.partition < 0:
        if letter.file is None:
            return _Plan(letter, why="never was on a topic and names no file")
        try:
            return _Plan(letter, items=_file_items(letter, cfg.max_message_bytes))
        except BadFile as e:
            return _Plan(letter, why=f"the file is still bad: {e.reason}")
    if letter.partition >= partitions[letter.topic]:
        return _Plan(letter, why=f"{letter.topic} has no partition {letter.partition} any more")
    return _Plan(letter)


def _partitions(cfg: PipelineConfig, names: list[str]) -> dict[str, int]:
    """Partition counts of those of `names` that exist (asked of the admin client, which never
    creates a topic the way a producer's metadata request may)."""
    admin = clients.admin(cfg)
    try:
        return {d["name"]: len(d["partitions"]) for d in admin.describe_topics(names) if not d["error_code"]}
    finally:
        admin.close()


def original_headers(rec: ConsumerRecord) -> list[tuple[str, bytes]]:
    """The headers a dead letter's record came with (its `tl.dlq.*` ones dropped); a null value,
    which a foreign client may write and kafka-python cannot send, goes back as an empty one."""
    return [(k, b"" if v is None else v) for k, v in rec.headers or [] if not k.startswith(PREFIX)]


def _send(producer, publisher: Publisher, plan: _Plan, markers: str) -> int:
    """Send one dead letter's records and its marker (in the open transaction); records sent."""
    letter, rec = plan.letter, plan.letter.record
    if plan.items:
        for item in plan.items:
            publisher.send(item)
    else:
        producer.send(letter.topic, key=rec.key, value=rec.value, partition=letter.partition,
                      headers=original_headers(rec))
    where = {"topic": letter.topic, "partition": letter.partition, "records": max(1, len(plan.items)),
             "redriven_ms": int(time.time() * 1000)}
    producer.send(markers, key=letter.marker.encode(), value=json.dumps(where).encode())
    return max(1, len(plan.items))


def redrive(cfg: PipelineConfig, reason: str | None = None, stage: str | None = None) -> dict[str, Any]:
    """Send the matching dead letters not redriven yet back to their original topic, exactly once
    (see the module docstring). Returns counts and the dead letters that could not be redriven."""
    dlq = cfg.topic(cfg.dlq)
    markers = marker_topic(cfg)
    clients.create_topics(replace(cfg, topics={"dlq-redriven": TopicConfig(
        "dlq-redriven", markers, 1, dlq.retention_ms, cleanup_policy="compact,delete")}))
    producer = clients.producer(cfg, transactional_id=f"{cfg.name}.dlq-redrive")
    try:
        producer.init_transactions()  # fences any other redrive and completes its transaction
        found = letters(cfg, reason, stage)  # markers read after the fence: all earlier redrives count
        internal = {cfg.dlq, *changelog_topics(cfg).values()}  # not stage inputs: nothing is redriven there
        partitions = _partitions(cfg, [t.name for k, t in cfg.topics.items() if k not in internal])
        plans = [_plan(cfg, letter, partitions) for letter in found if not letter.redriven]
        todo = [p for p in plans if p.why is None]
        publisher = Publisher(cfg, producer=producer, progress=False)
        sent = 0
        for i in range(0, len(todo), REDRIVE_BATCH):
            producer.begin_transaction()
            try:
                sent += sum(_send(producer, publisher, p, markers) for p in todo[i:i + REDRIVE_BATCH])
                producer.commit_transaction()
            except BaseException:
                producer.abort_transaction()
                raise
    finally:
        producer.close()
    by_topic = Counter(p.letter.topic for p in todo)
    return {
        "matched": len(found), "already_redriven": sum(letter.redriven for letter in found),
        "redriven": len(todo), "records_sent": sent, "by_topic": dict(by_topic),
        "not_redriven": [{"dlq_partition": p.letter.dlq_partition, "dlq_offset": p.letter.dlq_offset,
                          "stage": p.letter.stage, "reason": p.letter.reason, "why": p.why}
                         for p in plans if p.why is not None],
    }


def format_redrive(result: dict[str, Any]) -> str:
    topics_ = ", ".join(f"{t}: {n}" for t, n in sorted(result["by_topic"].items())) or "none"
    lines = [f"{result['matched']} dead letters matched: {result['redriven']} redriven ({result['records_sent']} "
             f"records; {topics_}), {result['already_redriven']} redriven before, "
             f"{len(result['not_redriven'])} not redrivable"]
    lines += [f"  dlq {n['dlq_partition']}@{n['dlq_offset']} {n['stage']} {n['reason']}: {n['why']}"
              for n in result["not_redriven"]]
    return "\n".join(lines)
