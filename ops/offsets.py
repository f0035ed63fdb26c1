"""The committed-offset history of consumer groups, read from Kafka's `__consumer_offsets` topic.

Every offset commit is a record there: the key names the group, topic and partition, the value
starts with the committed offset. Read from the beginning with read_committed, so transactional
commits that were aborted (a zombie's, a failed transaction's) are left out and what remains is
what the group coordinator applied, in log order. A group's committed offset for a partition
should never move backwards; when it does, the records between the two commits are read again
(duplicates downstream). The topic is compacted: on a long-lived broker only the latest commits
of old segments survive, so the history is complete only for recent activity (a test's broker).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from tensorline.config import PipelineConfig
from tensorline.engine import clients

OFFSETS_TOPIC = "__consumer_offsets"
# Key versions 0 and 1 are OffsetCommit keys; 2 is group metadata, 3 and up are the records of
# the KIP-848 group coordinator (consumer group metadata, assignments): not offsets.
OFFSET_COMMIT_KEY_VERSIONS = (0, 1)

GroupPartition = tuple[str, str, int]  # (group, topic, partition)


class BadOffsetsRecord(ValueError):
    """A `__consumer_offsets` record that does not parse as its version says."""


@dataclass(frozen=True)
class OffsetCommit:
    group: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Regression:
    """A committed offset lower than the one committed before it (`index`: its place in the history)."""

    group: str
    topic: str
    partition: int
    previous: int
    offset: int
    index: int

    def __str__(self) -> str:
        return (f"group {self.group} {self.topic}/{self.partition}: committed offset {self.previous} "
                f"then {self.offset} (commit #{self.index})")


def _string(buf: bytes, at: int) -> tuple[str, int]:
    """A Kafka STRING (int16 length, UTF-8 bytes) at `at`, and the position after it."""
    (n,) = struct.unpack_from(">h", buf, at)
    if n < 0 or at + 2 + n > len(buf):
        raise BadOffsetsRecord(f"string of length {n} at byte {at} of a {len(buf)}-byte key")
    return buf[at + 2:at + 2 + n].decode(), at + 2 + n


def parse(key: bytes | None, value: bytes | None) -> OffsetCommit | None:
    """The offset commit a `__consumer_offsets` record holds; None for other record types
    (group metadata, KIP-848 records) and for tombstones (an expired or deleted offset)."""
    if key is None or value is None or len(key) < 2:
        return None
    try:
        (version,) = struct.unpack_from(">h", key, 0)
        if version not in OFFSET_COMMIT_KEY_VERSIONS:
            return None
        group, at = _string(key, 2)
        topic, at = _string(key, at)
        (partition,) = struct.unpack_from(">i", key, at)
        # Every value version (0-4) starts with int16 version, int64 offset.
        _, offset = struct.unpack_from(">hq", value, 0)
    except struct.error as e:
        raise BadOffsetsRecord(f"offset commit record key={key!r}: {e}") from None
    return OffsetCommit(group, topic, partition, offset)


def history_of(commits: Iterable[OffsetCommit], groups: Iterable[str] | None = None) -> dict[GroupPartition, list[int]]:
    """Per (group, topic, partition), the committed offsets in the order given (of `groups` only, if given)."""
    wanted = None if groups is None else set(groups)
    out: dict[GroupPartition, list[int]] = {}
    for c in commits:
        if wanted is None or c.group in wanted:
            out.setdefault((c.group, c.topic, c.partition), []).append(c.offset)
    return out


def history(cfg: PipelineConfig, groups: Iterable[str] | None = None, *,
            timeout_s: float = clients.READ_TIMEOUT_S) -> dict[GroupPartition, list[int]]:
    """The committed offsets of `groups` (every group if None) on the cluster of `cfg`, in log
    order, read to the last stable offset of each partition of the offsets topic."""
    records = clients.read_range(cfg, OFFSETS_TOPIC, isolation_level="read_committed", timeout_s=timeout_s)
    commits = (parse(r.key, r.value) for r in records)
    return history_of((c for c in commits if c is not None), groups)


def regressions(hist: dict[GroupPartition, list[int]]) -> list[Regression]:
    """Every commit lower than the commit before it, for the same group, topic and partition."""
    return [Regression(group, topic, partition, seq[i - 1], seq[i], i)
            for (group, topic, partition), seq in sorted(hist.items())
            for i in range(1, len(seq)) if seq[i] < seq[i - 1]]
