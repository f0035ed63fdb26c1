"""Files -> Avro tensor records on the pipeline's raw topic.

Each item becomes a Record, with a trace id and the ingest time in its headers, keyed by its
record id: records spread evenly over the raw topic's partitions and the stages keep the key, so
every worker of a stage has work (`[producer] key = "study"` keys them by study, volume or archive
instead: one study in order on one partition). Backpressure: at most IN_FLIGHT_BYTES may be sent
and not yet acknowledged; beyond that the producer waits for the oldest sends, so a slow broker
slows the producer instead of growing memory. Bad files are reported with their name and reason
and sent to the DLQ (with the file's bytes) or skipped, as the pipeline says; the run goes on and
ends with a summary.
`--watch` keeps publishing new files; the files already sent are remembered in a state file, so
a restart does not send them again (after a crash, at most the last unflushed file is resent).
A record id sent before (in the state files of this pipeline's producers, in the results topic
read once at start, or earlier in the run: the same image in another file, or a file produced
again) is counted and named in the summary, since fusion drops such records (`SentBefore`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tensorline import logs
from tensorline.config import PRODUCER_KEY_CHOICES, PipelineConfig
from tensorline.engine import clients
from tensorline.producers.sources import BadFile, SourceItem, expand, read
from tensorline.schemas import Record, encode_record
from tensorline.engine.runtime import INGEST_MS, TRACE_ID, dead_letter_headers

RAW = "raw"  # the topic key producers write to
# The item's source (file path, '#frame=N' for one of many) as a header, carried by every stage to
# its outputs and dead letters: it names the file of a dead letter whose bytes do not decode (cut
# to fit the size limit, or not Avro). A decodable message says it in its `source` field.
SOURCE = "tl.source"
# Unacknowledged bytes allowed: 64 MiB holds four of the largest records; beyond it, send() waits.
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# A bad file larger than this goes to the DLQ without its bytes (the headers still name it).
DLQ_MAX_FILE_BYTES = 8 * 1024 * 1024
# A new file is read once its size has not changed for this long (it may still be written).
SETTLE_S = 1.0
WATCH_INTERVAL_S = 1.0
PROGRESS_INTERVAL_S = 0.5
LOG_INTERVAL_S = 5.0
# The results topic is read for at most this long at start to find record ids already fused: a
# local broker reads some 10^5 results in a few seconds; past it, the ids read so far are used.
RESULTS_READ_S = 10.0
# Records sent again named in the summary, with where each was seen before.
SENT_BEFORE_EXAMPLES = 3


def partition_key(item: SourceItem, key: str) -> bytes:
    """The Kafka key of an item's record under `[producer] key` (config.PRODUCER_KEY_CHOICES): its
    record id, or its study (a NIfTI volume, an .npz archive; an image alone: its record id)."""
    if key not in PRODUCER_KEY_CHOICES:
        raise ValueError(f"a producer key is one of {', '.join(PRODUCER_KEY_CHOICES)}, not {key!r}")
    return (item.study if key == "study" else item.record_id).encode()


@dataclass
class Summary:
    sent: int = 0
    bytes: int = 0
    files: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad files by reason, skipped
    dead: Counter = field(default_factory=Counter)     # bad files by reason, sent to the DLQ
    seconds: float = 0.0
    sent_before: int = 0  # records whose record id was sent before (see SentBefore)
    notes: list[str] = field(default_factory=list)  # lines after `line()`: records sent before, checks skipped

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        bad = ", ".join(f"{k}={v}" for k, v in sorted((self.skipped + self.dead).items())) or "none"
        return (f"sent {self.sent} records from {self.files} files ({self.bytes / 1e6:.1f} MB, {rate:.1f} rec/s); "
                f"bad files: {bad} ({sum(self.dead.values())} to the DLQ, {sum(self.skipped.values())} skipped)")


class SentFiles:
    """The files already published, remembered across restarts: one line per file, after one JSON
    line per record the file sent (record id, source, send time in epoch ms)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seen: set[str] = set()
        self.ids: dict[str, tuple[str, int]] = {}  # record id -> (source, sent at, epoch ms)
        self._cut = False  # the file ends inside a line (a crash while writing): start a new one
        if path and path.exists():
            text = path.read_text()
            self._cut = bool(text) and not text.endswith("\n")
            for line in text.split("\n"):
                if line.startswith("{"):
                    try:
                        r = json.loads(line)
                        self.ids[r["id"]] = (r["source"], r["ms"])
                    except (ValueError, KeyError, TypeError):  # a line cut by a crash
                        continue
                elif line:
                    self.seen.add(line)

    @staticmethod
    def key(file: Path) -> str:
        st = file.stat()
        return hashlib.sha1(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def __contains__(self, file: Path) -> bool:
        return self.key(file) in self.seen

    def add(self, file: Path, records: Iterable[tuple[str, str, int]] = ()) -> None:
        """Remember `file` as sent, with its (record id, source, sent at ms) records."""
        k = self.key(file)
        self.seen.add(k)
        lines = [json.dumps({"id": rid, "source": source, "ms": ms}) for rid, source, ms in records] + [k]
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write("\n" * self._cut + "\n".join(lines) + "\n")
            self._cut = False


@dataclass(frozen=True)
class Repeat:
    """A record sent again: its id, its source now, and where the id was seen before."""

    record_id: str
    source: str
    before: str


class SentBefore:
    """Record ids sent before, and the records of this run that repeat one.

    Known ids come from this pipeline's producer state files, from the results topic (keyed by
    record id; read once, at start, within a time budget) and from the records sent earlier in
    the run. Fusion drops a record whose id it emitted within `fusion.dedup_window_ms`
    (`on_duplicate = "drop"`) or fuses it again (`"reprocess"`); nothing else would tell the
    user, so the run's summary says how many there were and names a few.
    """

    # How an id was seen before, as the examples say it ({} is the topic or the earlier source).
    RESULTS, EARLIER_RUN, THIS_RUN = "a result in {}", "{}, an earlier run", "{}, this run"

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.seen: dict[str, tuple[str, str, int]] = {}  # record id -> (how, where, when in epoch ms)
        self.count = 0
        self.past_window = 0  # of `count`, seen longer than fusion.dedup_window_ms ago
        self.examples: list[Repeat] = []
        self.notes: list[str] = []  # checks that were skipped or partial
        self.unsaved: list[tuple[str, str, int]] = []  # (record id, source, sent at ms) not yet in the state

    def load_results(self, timeout_s: float = RESULTS_READ_S) -> None:
        """The record ids in the results topic, read for at most `timeout_s` (0: not read)."""
        if self.cfg.fusion is None:
            return
        topic = self.cfg.topic(self.cfg.fusion.output).name
        if timeout_s <= 0:
            self.notes.append(f"record ids not checked against the results topic {topic} (--check-results 0)")
            return
        n = 0
        try:
            for rec in clients.read_range(self.cfg, topic, timeout_s=timeout_s):
                if rec.key is not None:
                    self._saw(rec.key.decode(errors="replace"), self.RESULTS, topic, rec.timestamp)
                    n += 1
        except clients.UnknownTopicOrPartition:
            self.notes.append(f"record ids not checked against the results topic {topic}: it does not exist")
        except clients.ReadTimeout:
            self.notes.append(f"record ids checked against the first {n} results of {topic} only: "
                              f"it was not read to its end in {timeout_s:g} s (--check-results)")

    def load_state(self, ids: dict[str, tuple[str, int]]) -> None:
        """The records a producer state file says were sent, naming their file."""
        for rid, (source, ms) in ids.items():
            self._saw(rid, self.EARLIER_RUN, source, ms)

    def _saw(self, rid: str, how: str, where: str, ms: int) -> None:
        """Remember a sighting, naming a file over a topic; the latest time counts for the window."""
        known = self.seen.get(rid)
        if known is None or how != self.RESULTS:
            self.seen[rid] = (how, where, max(ms, known[2] if known else ms))
        elif ms > known[2]:
            self.seen[rid] = (*known[:2], ms)

    def check(self, record_id: str, source: str, now_ms: int) -> None:
        """Count the record if its id was seen before; then remember it as sent now."""
        known = self.seen.get(record_id)
        if known is not None:
            how, where, at_ms = known
            self.count += 1
            if self.cfg.fusion is not None and now_ms - at_ms >= self.cfg.fusion.dedup_window_ms:
                self.past_window += 1
            if len(self.examples) < SENT_BEFORE_EXAMPLES:
                self.examples.append(Repeat(record_id, source, how.format(where)))
        self.seen[record_id] = (self.THIS_RUN, source, now_ms)
        self.unsaved.append((record_id, source, now_ms))

    def to_save(self) -> list[tuple[str, str, int]]:
        """The records checked since the last call, for the state file once they are durable."""
        records, self.unsaved = self.unsaved, []
        return records

    def lines(self, sent: int) -> list[str]:
        """What the summary says: the records sent before, with examples, then the notes."""
        if not self.count:
            return list(self.notes)
        fusion = self.cfg.fusion
        if fusion is None:
            then = "the pipeline has no [fusion] to drop them: every stage processes them again"
        elif fusion.on_duplicate != "drop":
            then = f"fusion fuses them again, one more result each (fusion.on_duplicate = {fusion.on_duplicate})"
        elif self.past_window == 0:
            then = "fusion drops them (fusion.on_duplicate = drop)"
        else:
            old = f"seen more than fusion.dedup_window_ms ({fusion.dedup_window_ms} ms) ago"
            then = (f"fusion fuses them again, {old}" if self.past_window == self.count else
                    f"fusion drops {self.count - self.past_window} of them (fusion.on_duplicate = drop) and fuses "
                    f"{self.past_window} again, {old}")
        head = f"{self.count} of {sent} records were sent before (same record id): {then}; e.g."
        examples = [f"  {e.record_id} from {e.source} (before: {e.before})" for e in self.examples]
        return [head, *examples, *self.notes]


class Publisher:
    """Sends items to the raw topic with rate control, progress and bad-file handling."""

    def __init__(self, cfg: PipelineConfig, *, rate: float | None = None, limit: int | None = None,
                 progress: bool | None = None, producer=None, sent_before: SentBefore | None = None,
                 key: str | None = None):
        self.cfg = cfg
        self.key = key or cfg.producer.key  # see partition_key
        self.sent_before = sent_before
        self.topic = cfg.topic(RAW).name
        self.dlq = cfg.topic(cfg.dlq).name
        self.rate, self.limit = rate, limit
        self.producer = producer or clients.producer(cfg)
        self._in_flight: deque = deque()  # (future, bytes), oldest first
        self._in_flight_bytes = 0
        self.summary = Summary()
        self.log = logs.get(stage="producer", topic=self.topic)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._started = time.monotonic()
        self._last_report = 0.0

    @property
    def done(self) -> bool:
        return self.limit is not None and self.summary.sent >= self.limit

    def publish_file(self, path: Path) -> None:
        """Every item of one file; a bad file goes to the DLQ or is skipped, never stops the run."""
        try:
            for item in read(path, max_bytes=self.cfg.max_message_bytes):
                if self.done:
                    return
                self.send(item)
        except BadFile as e:
            self._bad_file(path, e)
        self.summary.files += 1

    def send(self, item: SourceItem) -> None:
        self._throttle()
        record = Record(record_id=item.record_id, source=item.source, ingest_ts_ms=int(time.time() * 1000),
                        tensors=item.tensors, stage="producer", attributes=item.attributes, label=item.label)
        value = encode_record(record)
        headers = [(TRACE_ID, uuid.uuid4().hex.encode()), (INGEST_MS, str(record.ingest_ts_ms).encode()),
                   (SOURCE, item.source.encode(errors="replace"))]
        self._wait_for_room(len(value))
        future = self.producer.send(self.topic, key=partition_key(item, self.key), value=bytes(value), headers=headers)
        self._in_flight.append((future, len(value)))
        self._in_flight_bytes += len(value)
        if self.sent_before is not None:
            self.sent_before.check(item.record_id, item.source, record.ingest_ts_ms)
            self.summary.sent_before = self.sent_before.count
        self.summary.sent += 1
        self.summary.bytes += len(value)
        self._report()

    def _wait_for_room(self, size: int) -> None:
        """Backpressure: wait for the oldest sends until `size` more bytes fit in flight."""
        while self._in_flight and (self._in_flight[0][0].is_done or self._in_flight_bytes + size > IN_FLIGHT_BYTES):
            future, n = self._in_flight.popleft()
            future.get()  # raises the send's error, if any
            self._in_flight_bytes -= n

    def _bad_file(self, path: Path, error: BadFile) -> None:
        self.log.warning("bad file", file=str(path), reason=error.reason, detail=str(error))
        if self.cfg.on_bad_file == "skip":
            self.summary.skipped[error.reason] += 1
            return
        size = path.stat().st_size
        value = path.read_bytes() if size <= DLQ_MAX_FILE_BYTES else None
        headers = dead_letter_headers("producer", error, topic=self.topic)
        headers += [("tl.dlq.file", str(path).encode()), ("tl.dlq.reason", error.reason.encode())]
        if value is None:
            headers.append(("tl.dlq.value_omitted", f"file of {size} bytes".encode()))
        self.producer.send(self.dlq, key=str(path).encode(), value=value, headers=headers)
        self.summary.dead[error.reason] += 1

    def _throttle(self) -> None:
        if self.rate:
            ahead = self.summary.sent / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def _report(self, final: bool = False) -> None:
        now = time.monotonic()
        self.summary.seconds = now - self._started
        interval = PROGRESS_INTERVAL_S if self.progress else LOG_INTERVAL_S
        if not final and now - self._last_report < interval:
            return
        self._last_report = now
        s = self.summary
        rate, mbps = s.sent / max(s.seconds, 1e-9), s.bytes / 1e6 / max(s.seconds, 1e-9)
        if self.progress:
            end = "\n" if final else ""
            print(f"\r{self.topic}: {s.sent} records  {rate:7.1f} rec/s  {mbps:6.2f} MB/s  "
                  f"bad files {sum((s.skipped + s.dead).values())}  sent before {s.sent_before}",
                  end=end, file=sys.stderr, flush=True)
        elif not final:
            self.log.info("producing", sent=s.sent, records_per_s=round(rate, 1), mb_per_s=round(mbps, 2),
                          sent_before=s.sent_before)

    def close(self) -> Summary:
        self.producer.flush()
        self._wait_for_room(IN_FLIGHT_BYTES)
        self.producer.close()
        self._report(final=True)
        return self.summary


def _settled(files: Iterable[Path], sizes: dict[Path, tuple[int, float]]) -> Iterator[Path]:
    """Files whose size has not changed for SETTLE_S (others are remembered and tried later)."""
    now = time.monotonic()
    for f in files:
        size = f.stat().st_size
        last = sizes.get(f)
        if last is None or last[0] != size:
            sizes[f] = (size, now)
        elif now - last[1] >= SETTLE_S:
            yield f


def produce(cfg: PipelineConfig, sources: list[str], *, rate: float | None = None, watch: bool = False,
            limit: int | None = None, state: Path | None = None, progress: bool | None = None,
            stop: Callable[[], bool] = lambda: False, check_results_s: float = RESULTS_READ_S,
            key: str | None = None) -> Summary:
    """Publish the files under `sources` (and, with `watch`, new ones until `stop()`), keyed by
    `key` ("record_id" or "study"; default: the pipeline's `[producer] key`).

    Record ids sent before are counted in the summary (`SentBefore`): against the state files of
    this pipeline's producers, the results topic (read for at most `check_results_s`) and the run.
    """
    sent = SentFiles(state)
    sent_before = SentBefore(cfg)
    sent_before.load_results(check_results_s)
    for other in _state_files(cfg, state):
        sent_before.load_state(SentFiles(other).ids)
    sent_before.load_state(sent.ids)
    publisher = Publisher(cfg, rate=rate, limit=limit, progress=progress, sent_before=sent_before, key=key)
    sizes: dict[Path, tuple[int, float]] = {}
    try:
        while True:
            files = [f for f in expand(sources) if f not in sent]
            ready = list(_settled(files, sizes)) if watch else files
            for f in ready:
                if publisher.done or stop():
                    break
                publisher.publish_file(f)
                publisher.producer.flush()  # durable before it is marked sent
                sent.add(f, sent_before.to_save())
            if not watch or publisher.done or stop():
                break
            time.sleep(WATCH_INTERVAL_S)
    finally:
        summary = publisher.close()
    summary.notes = sent_before.lines(summary.sent)
    publisher.log.info("producer done", summary=summary.line(), sent_before=summary.sent_before,
                       sent_before_examples=[e.record_id for e in sent_before.examples])
    return summary


def state_file(cfg: PipelineConfig, sources: list[str]) -> Path:
    """Where a producer of these sources remembers what it sent."""
    digest = hashlib.sha1(json.dumps(sorted(str(Path(s).resolve()) for s in sources)).encode()).hexdigest()[:12]
    return Path(".tensorline") / "producers" / f"{cfg.name}-{digest}.sent"


def _state_files(cfg: PipelineConfig, state: Path | None) -> list[Path]:
    """The state files of this pipeline's producers of other sources, beside `state` (`state_file`)."""
    if state is None:
        return []
    pattern = f"{glob.escape(cfg.name)}-{'?' * 12}.sent"
    return sorted(p for p in state.parent.glob(pattern) if p != state)
