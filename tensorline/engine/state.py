"""The state store of stateful stages: keys per input partition, changelogged in the worker's
transaction, rolled back on abort without reading the topic again.

Each input partition has its own keys (values are the stage's objects, serialized by the stage's
codec only when written to the changelog). A write applies at once to the partition's current
view and is logged for undo: `commit` forgets the undo log (the transaction that carried the
changelog records committed), `abort` and `rollback` replay it backwards, to the last commit or to
a savepoint (the runtime takes one before each model call, so a failed half of a bisection drops
its own writes and nothing else). `flush` turns the writes not yet sent into changelog records
(key, serialized value or a tombstone, partition = the input partition), which the runtime sends in
the same transaction as the outputs and the consumed offsets: Kafka Streams' design.

Time-to-live: a key written with `expires_ms` is handed back by `expired(now)` once that time has
passed; the stage decides (fusion emits a timed-out join as partial, deletes an old dedup marker),
so the compacted changelog holds about the live keys, not history.

Restore reads a partition's changelog to its end into the current view; the runtime does it in
its main loop with the partition paused, never inside a rebalance callback.

Threads: one thread at a time owns the store. The model thread while a stage's `process` runs
(the runtime starts a stateful stage's batch only when no other is in flight), the worker's main
thread otherwise (flush, commit, abort, expiry, restore); the hand-over is the model call's future.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

EXPIRES_MS = "tl.state.expires_ms"


@dataclass(frozen=True, slots=True)
class Entry:
    value: Any
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    """One changelog record, as `flush` writes it and `restore` reads it: in the changelog
    partition of the input partition whose state it holds; a tombstone has value None."""

    partition: int
    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]


class StateStore:
    def __init__(self, serialize: Callable[[Any], bytes], deserialize: Callable[[bytes], Any]):
        self.serialize, self.deserialize = serialize, deserialize
        self.partitions: dict[int, dict[bytes, Entry]] = {}
        self._undo: list[tuple[int, bytes, Entry | None]] = []  # the entry before each write
        self._unsent: dict[tuple[int, bytes], None] = {}         # written, not yet in a changelog record
        self._expiry: list[tuple[int, int, bytes]] = []          # (expires_ms, partition, key), lazily checked

    # -- what a stage uses -----------------------------------------------------------------
    def get(self, partition: int, key: bytes) -> Any:
        entry = self.partitions[partition].get(key)
        return None if entry is None else entry.value

    def put(self, partition: int, key: bytes, value: Any, expires_ms: int | None = None) -> None:
        self._write(partition, key, Entry(value, expires_ms))

    def delete(self, partition: int, key: bytes) -> None:
        if key in self.partitions[partition]:
            self._write(partition, key, None)

    def count(self, partition: int) -> int:
        return len(self.partitions[partition])

    def items(self, partition: int) -> Iterator[tuple[bytes, Any]]:
        return ((k, e.value) for k, e in list(self.partitions[partition].items()))

    def _write(self, partition: int, key: bytes, entry: Entry | None) -> None:
        keys = self.partitions[partition]
        self._undo.append((partition, key, keys.get(key)))
        self._set(keys, partition, key, entry)
        self._unsent[(partition, key)] = None

    def _set(self, keys: dict[bytes, Entry], partition: int, key: bytes, entry: Entry | None) -> None:
        if entry is None:
            keys.pop(key, None)
            return
        keys[key] = entry
        if entry.expires_ms is not None:
            heapq.heappush(self._expiry, (entry.expires_ms, partition, key))

    # -- what the runtime uses -------------------------------------------------------------
    def savepoint(self) -> int:
        return len(self._undo)

    def rollback(self, savepoint: int = 0) -> None:
        """Undo every write since `savepoint` (0: since the last commit)."""
        while len(self._undo) > savepoint:
            partition, key, before = self._undo.pop()
            keys = self.partitions.get(partition)
            if keys is not None:
                self._set(keys, partition, key, before)

    def flush(self) -> list[ChangelogRecord]:
        """Changelog records for the writes not yet sent (the latest value of each key)."""
        changes = []
        for partition, key in self._unsent:
            keys = self.partitions.get(partition)
            if keys is None:
                continue
            entry = keys.get(key)
            if entry is None:
                changes.append(ChangelogRecord(partition, key, None, []))
            else:
                headers = [] if entry.expires_ms is None else [(EXPIRES_MS, str(entry.expires_ms).encode())]
                changes.append(ChangelogRecord(partition, key, self.serialize(entry.value), headers))
        self._unsent.clear()
        return changes

    def commit(self) -> None:
        """The transaction holding every flushed write committed: they are the state now."""
        self._undo.clear()

    def abort(self) -> None:
        """The transaction aborted: back to the state of the last commit."""
        self.rollback(0)
        self._unsent.clear()

    def expired(self, now_ms: int) -> list[tuple[int, bytes, Any]]:
        """Keys whose time-to-live has passed: (partition, key, value), oldest first. They stay in
        the store until the stage writes or deletes them."""
        out, seen = [], set()
        while self._expiry and self._expiry[0][0] <= now_ms:
            expires, partition, key = heapq.heappop(self._expiry)
            entry = self.partitions.get(partition, {}).get(key)
            if entry is not None and entry.expires_ms == expires and (partition, key) not in seen:
                seen.add((partition, key))
                out.append((partition, key, entry.value))
        return out

    def restore(self, partition: int, records: Iterable[ChangelogRecord]) -> int:
        """The partition's state from its changelog read to the end; returns the records read."""
        keys: dict[bytes, Entry] = {}
        self.partitions[partition] = keys
        n = 0
        for rec in records:
            n += 1
            if rec.value is None:
                keys.pop(rec.key, None)
                continue
            expires = next((v for k, v in rec.headers if k == EXPIRES_MS), None)
            keys[rec.key] = Entry(self.deserialize(rec.value), int(expires) if expires else None)
        for key, entry in keys.items():
            if entry.expires_ms is not None:
                heapq.heappush(self._expiry, (entry.expires_ms, partition, key))
        return n

    def drop(self, partitions: Iterable[int]) -> None:
        """Partitions gone to another worker (their changelog keeps their state)."""
        for p in partitions:
            self.partitions.pop(p, None)
        self._undo = [u for u in self._undo if u[0] in self.partitions]
        self._unsent = {k: None for k in self._unsent if k[0] in self.partitions}
