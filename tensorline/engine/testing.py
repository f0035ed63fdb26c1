"""An in-memory Source and Sink: a whole stage runs in-process on the same runtime code, without a
broker (unit tests, and the in-memory tier of bench/stages)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from tensorline.engine.runtime import Message, Output


class MemorySource:
    """Messages served in order; `positions` is just past each partition's last record."""

    def __init__(self, messages: Iterable[Message]):
        self.messages = list(messages)
        self.next = 0
        self.evicted_flag = False  # set by a test: the group has dropped this member
        self.held: set[tuple[str, int]] = set()

    def set_rebalance_listener(self, revoked: Callable[[set[tuple[str, int]]], None],
                               assigned: Callable[[set[tuple[str, int]]], None],
                               lost: Callable[[set[tuple[str, int]]], None]) -> None:
        self.revoked, self.assigned, self.lost = revoked, assigned, lost

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        got = self.messages[self.next:self.next + max_records]
        self.next += len(got)
        if not got and self.next > 0:
            time.sleep(min(timeout_s, 0.005))  # as a consumer waits, instead of spinning on the GIL
        return got

    def keepalive(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def positions(self, batch: Sequence[Message]) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for m in batch:
            out[(m.topic, m.partition)] = max(out.get((m.topic, m.partition), 0), m.offset + 1)
        return out

    def idle_positions(self) -> dict[tuple[str, int], int]:
        return {}

    def rewind(self, batch: Sequence[Message]) -> None:
        self.next = min(self.messages.index(m) for m in batch)

    def evicted(self) -> bool:
        return self.evicted_flag

    def hold(self, partitions: set[tuple[str, int]]) -> None:
        self.held |= partitions

    def release(self, partitions: set[tuple[str, int]]) -> None:
        self.held -= partitions

    def close(self) -> None:
        pass


class MemorySink:
    """Keeps what each committed batch produced; aborted batches leave nothing behind."""

    transactional = True

    def __init__(self) -> None:
        self.committed: list[Output] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self._open: list[Output] = []

    def begin(self) -> None:
        self._open = []

    def send(self, output: Output) -> None:
        self._open.append(output)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self.committed.extend(self._open)
        self.offsets.update(offsets)
        self._open = []

    def abort(self) -> None:
        self._open = []

    def close(self) -> None:
        pass

    def topic(self, name: str) -> list[Output]:
        return [o for o in self.committed if o.topic == name]
