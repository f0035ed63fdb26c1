"""Files -> Avro tensor records on the pipeline's raw topic.

Each item becomes a Record keyed by its study/volume (one study stays in order on one
partition), with a trace id and the ingest time in its headers. Backpressure: at most
IN_FLIGHT_BYTES may be sent and not yet acknowledged; beyond that the producer waits for the
oldest sends, so a slow broker slows the producer instead of growing memory. Bad files are reported with their name and reason and sent to the DLQ (with the
file's bytes) or skipped, as the pipeline says; the run goes on and ends with a summary.
`--watch` keeps publishing new files; the files already sent are remembered in a state file, so
a restart does not send them again (after a crash, at most the last unflushed file is resent).
"""

from __future__ import annotations

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
from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.producers.sources import BadFile, SourceItem, expand, read
from tensorline.schemas import Record, encode_record
from tensorline.engine.runtime import INGEST_MS, TRACE_ID, dead_letter_headers

RAW = "raw"  # the topic key producers write to
# Unacknowledged bytes allowed: 64 MiB holds four of the largest records; beyond it, send() waits.
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# A bad file larger than this goes to the DLQ without its bytes (the headers still name it).
DLQ_MAX_FILE_BYTES = 8 * 1024 * 1024
# A new file is read once its size has not changed for this long (it may still be written).
SETTLE_S = 1.0
WATCH_INTERVAL_S = 1.0
PROGRESS_INTERVAL_S = 0.5
LOG_INTERVAL_S = 5.0


@dataclass
class Summary:
    sent: int = 0
    bytes: int = 0
    files: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad files by reason, skipped
    dead: Counter = field(default_factory=Counter)     # bad files by reason, sent to the DLQ
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        bad = ", ".join(f"{k}={v}" for k, v in sorted((self.skipped + self.dead).items())) or "none"
        return (f"sent {self.sent} records from {self.files} files ({self.bytes / 1e6:.1f} MB, {rate:.1f} rec/s); "
                f"bad files: {bad} ({sum(self.dead.values())} to the DLQ, {sum(self.skipped.values())} skipped)")


class SentFiles:
    """The files already published, remembered across restarts (one line per file)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seen: set[str] = set()
        if path and path.exists():
            self.seen = set(path.read_text().split("\n")) - {""}

    @staticmethod
    def key(file: Path) -> str:
        st = file.stat()
        return hashlib.sha1(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def __contains__(self, file: Path) -> bool:
        return self.key(file) in self.seen

    def add(self, file: Path) -> None:
        k = self.key(file)
        self.seen.add(k)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(k + "\n")


class Publisher:
    """Sends items to the raw topic with rate control, progress and bad-file handling."""

    def __init__(self, cfg: PipelineConfig, *, rate: float | None = None, limit: int | None = None,
                 progress: bool | None = None, producer=None):
        self.cfg = cfg
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
        headers = [(TRACE_ID, uuid.uuid4().hex.encode()), (INGEST_MS, str(record.ingest_ts_ms).encode())]
        self._wait_for_room(len(value))
        future = self.producer.send(self.topic, key=item.key.encode(), value=bytes(value), headers=headers)
        self._in_flight.append((future, len(value)))
        self._in_flight_bytes += len(value)
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
                  f"bad files {sum((s.skipped + s.dead).values())}", end=end, file=sys.stderr, flush=True)
        elif not final:
            self.log.info("producing", sent=s.sent, records_per_s=round(rate, 1), mb_per_s=round(mbps, 2))

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
            stop: Callable[[], bool] = lambda: False) -> Summary:
    """Publish the files under `sources` (and, with `watch`, new ones until `stop()`)."""
    sent = SentFiles(state)
    publisher = Publisher(cfg, rate=rate, limit=limit, progress=progress)
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
                sent.add(f)
            if not watch or publisher.done or stop():
                break
            time.sleep(WATCH_INTERVAL_S)
    finally:
        summary = publisher.close()
    publisher.log.info("producer done", summary=summary.line())
    return summary


def state_file(cfg: PipelineConfig, sources: list[str]) -> Path:
    """Where a producer of these sources remembers what it sent."""
    digest = hashlib.sha1(json.dumps(sorted(str(Path(s).resolve()) for s in sources)).encode()).hexdigest()[:12]
    return Path(".tensorline") / "producers" / f"{cfg.name}-{digest}.sent"
