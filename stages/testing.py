"""Testing helpers: an in-memory Source and Sink, so a whole stage runs in-process without a
broker, and `Scale`, a model-free stage for runtime tests (also on Kafka, as kind
"tensorline.stages.testing:Scale", with `scale_pipeline_body` for its pipeline file)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import RecordStage, tensor
from tensorline.stages.runtime import Message, Output


class Scale(RecordStage):
    """Multiplies tensor "x" by params.factor. A record with attribute "poison" makes the batch
    raise (as a model would on input it cannot take); params.sleep_s makes each batch slow."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.factor = float(self.params.get("factor", 2.0))
        self.sleep_s = float(self.params.get("sleep_s", 0.0))
        self.batch_sizes: list[int] = []

    def check(self, item: Record) -> None:
        tensor(item, "x", (0, 1, 2, 3))

    def process(self, items: list[Record]) -> list[Record]:
        self.batch_sizes.append(len(items))
        time.sleep(self.sleep_s)
        if any("poison" in r.attributes for r in items):
            raise ValueError("poisoned record in batch")
        return [replace(r, tensors={"x": r.tensors["x"] * self.factor}, stage=self.name) for r in items]


def scale_pipeline_body(*, partitions: int = 3, **params: float) -> str:
    """The topics and stage tables (no [pipeline] header) of one Scale stage from `in` to `out`,
    with its params: for tests that run it on a real broker."""
    extra = "".join(f"{k} = {v}\n" for k, v in params.items())
    return f"""
[topics]
in = {{ partitions = {partitions} }}
out = {{ partitions = {partitions} }}
dlq = {{ partitions = 1 }}
[stages.scale]
kind = "tensorline.stages.testing:Scale"
input = "in"
output = "out"
max_batch = 8
max_delay_ms = 20
[stages.scale.params]
{extra}"""


class MemorySource:
    """Messages served in order; `positions` is just past each partition's last record."""

    def __init__(self, messages: Iterable[Message]):
        self.messages = list(messages)
        self.next = 0

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
