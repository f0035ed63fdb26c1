"""Join bookkeeping: emit modes, deadlines, late and duplicate outputs, the open-join cap."""

from __future__ import annotations

from tensorline.config import FusionConfig
from tensorline.fusion.join import Joins
from tensorline.schemas import Detection, ModelRef


def det(rid: str, model: str, p: float = 0.7) -> Detection:
    return Detection(record_id=rid, source="s", ingest_ts_ms=1, model=ModelRef(model, "1"),
                     classes=("normal", "nodule"), scores=(1 - p, p))


def joins(emit: str = "all", **kw) -> Joins:
    return Joins(FusionConfig(input="d", output="r", expected_models=("a", "b", "c"), emit=emit,
                              quorum=kw.pop("quorum", 3), **kw))


def test_all_waits_for_every_model():
    j = joins()
    assert j.add(0, det("r1", "a"), [], 0).outcome == "open"
    assert j.add(0, det("r1", "b"), [], 1).outcome == "open"
    done = j.add(0, det("r1", "c"), [], 2)
    assert done.outcome == "ready" and set(done.join.detections) == {"a", "b", "c"}
    assert "r1" not in j.open and "r1" in j.emitted


def test_quorum_emits_at_k_and_the_rest_are_late():
    j = joins("quorum", quorum=2)
    j.add(0, det("r1", "a"), [], 0)
    done = j.add(0, det("r1", "c"), [], 1)
    assert done.outcome == "ready" and j.missing(done.join) == ("b",)
    assert j.add(0, det("r1", "b"), [], 2).outcome == "late"


def test_deadline_closes_partial_joins_only_in_deadline_mode():
    j = joins("deadline", deadline_ms=100)
    j.add(0, det("r1", "a"), [], 1000)
    j.add(0, det("r2", "a"), [], 1050)
    assert j.due(1099) == []
    [due] = j.due(1100)
    assert due.record_id == "r1" and list(j.open) == ["r2"]
    assert joins("all", deadline_ms=1).due(10**9) == []


def test_duplicate_output_is_kept_once():
    j = joins()
    j.add(0, det("r1", "a", 0.9), [], 0)
    assert j.add(0, det("r1", "a", 0.1), [], 1).outcome == "duplicate"
    assert j.open["r1"].detections["a"].scores[1] == 0.9


def test_cap_closes_the_oldest_joins():
    j = joins(max_open_joins=2)
    for rid in ("r1", "r2", "r3"):
        j.add(0, det(rid, "a"), [], 0)
    [old] = j.over_cap()
    assert old.record_id == "r1" and list(j.open) == ["r2", "r3"] and "r1" in j.emitted


def test_emitted_memory_is_bounded():
    j = joins("quorum", quorum=1, max_emitted=2)
    for rid in ("r1", "r2", "r3"):
        j.add(0, det(rid, "a"), [], 0)
    assert list(j.emitted) == ["r2", "r3"]


def test_drop_partitions_forgets_only_theirs():
    j = joins()
    j.add(0, det("r1", "a"), [], 0)
    j.add(1, det("r2", "a"), [], 0)
    j.drop_partitions({1})
    assert list(j.open) == ["r1"]
