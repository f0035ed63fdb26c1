"""The fusion stage on the runtime and its state store, in memory: emits, restore from the
changelog, duplicates, timeouts, failed batches and the changelog's size."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tensorline.config import CHANGELOG, parse
from tensorline.engine.state import ChangelogRecord
from tensorline.fusion.stage import Emitted, Fusion, deserialize_state
from tensorline.schemas import Detection, ModelRef, decode_result, encode_detection
from tensorline.engine.runtime import Message, Worker
from tensorline.engine.testing import MemorySink, MemorySource

MODELS = ("cnn", "mlp", "logreg")


def pipeline(**fusion):
    return parse({"pipeline": {"name": "f"}, "topics": {"det": {"partitions": 2}, "res": {}},
                  "fusion": {"input": "det", "output": "res", "expected_models": list(MODELS), **fusion}})


def message(offset: int, rid: str, model: str, p: float, partition: int = 0) -> Message:
    d = Detection(record_id=rid, source="s", ingest_ts_ms=5, model=ModelRef(model, "1"),
                  classes=("normal", "nodule"), scores=(1 - p, p), label="nodule")
    return Message("f.det", partition, offset, rid.encode(), bytes(encode_detection(d)), [], 0)


def changelog_reader(sink: MemorySink, threads: list | None = None):
    """Reads what `sink` committed to a changelog topic, as the worker's restore does on Kafka;
    notes the thread it runs on."""
    def read(topic, parts):
        if threads is not None:
            threads.append(threading.current_thread())
        return [ChangelogRecord(o.partition, o.key, o.value, o.headers) for o in sink.topic(topic) if o.partition in parts]
    return read


def worker(cfg, messages, sink=None, restore_from=None, stage=None, threads=None):
    sink = sink or MemorySink()
    stage = stage or Fusion(cfg, cfg.stages["fusion"], None)
    w = Worker(stage, MemorySource(messages), sink, output_topic="f.res", dlq_topic="f.dlq", max_batch=4,
               max_delay_ms=0, restore=changelog_reader(restore_from or sink, threads))
    w._on_assign({("f.det", 0), ("f.det", 1)})  # as the consumer's rebalance listener calls it
    return w, sink, stage


def run(cfg, messages, sink=None, restore_from=None, idle_s=0.0, stage=None):
    w, sink, stage = worker(cfg, messages, sink, restore_from, stage)
    w.run(until_idle_s=idle_s)
    return sink, stage


def results(sink):
    return [decode_result(o.value) for o in sink.topic("f.res")]


def test_all_mode_emits_once_per_record_with_the_soft_vote():
    msgs = [message(i * 3 + j, f"r{i}", m, p) for i in range(4) for j, (m, p) in enumerate(zip(MODELS, (0.9, 0.6, 0.3)))]
    sink, stage = run(pipeline(), msgs)
    res = results(sink)
    assert [r.record_id for r in res] == ["r0", "r1", "r2", "r3"]
    r = res[0]
    assert r.strategy == "soft_vote" and not r.partial and r.missing == () and r.contributors == MODELS
    assert r.scores == pytest.approx((0.4, 0.6), abs=1e-6) and r.decision == "nodule" and r.label == "nodule"
    assert stage.counts["complete"] == 4


def test_restart_restores_open_joins_from_the_changelog_and_emits_exactly_once():
    cfg = pipeline()
    first = [message(0, "r1", "cnn", 0.9), message(1, "r2", "cnn", 0.2), message(2, "r1", "mlp", 0.8),
             message(3, "r1", "logreg", 0.7)]
    sink, _ = run(cfg, first)
    assert [r.record_id for r in results(sink)] == ["r1"]
    # A new worker (after a crash) restores r2's open join and sees a late output for r1.
    rest = [message(4, "r2", "mlp", 0.1), message(5, "r1", "cnn", 0.5), message(6, "r2", "logreg", 0.3)]
    sink2, stage2 = run(cfg, rest, restore_from=sink)
    [r2] = results(sink2)
    assert r2.record_id == "r2" and r2.contributors == MODELS and r2.scores[1] == pytest.approx(0.2, abs=1e-6)
    assert stage2.counts["duplicate"] == 1


def test_deadline_mode_emits_partial_naming_the_missing_model():
    cfg = pipeline(emit="deadline", deadline_ms=1)
    sink, stage = run(cfg, [message(0, "r1", "cnn", 0.9), message(1, "r1", "mlp", 0.7)], idle_s=0.1)
    [r] = results(sink)
    assert r.partial and r.missing == ("logreg",) and r.contributors == ("cnn", "mlp")


def test_weighted_average_uses_the_configured_weights():
    cfg = pipeline(strategy="weighted_average", params={"weights": {"cnn": 3.0, "mlp": 1.0, "logreg": 0.0}})
    sink, _ = run(cfg, [message(i, "r", m, p) for i, (m, p) in enumerate(zip(MODELS, (0.9, 0.1, 0.5)))])
    [r] = results(sink)
    assert r.scores[1] == pytest.approx(0.7, abs=1e-6)


def test_unknown_model_and_bad_strategy_are_reported():
    cfg = pipeline()
    sink, _ = run(cfg, [message(0, "r", "rogue", 0.5)])
    [dead] = sink.topic("f.dlq")
    assert b"not in fusion.expected_models" in dict(dead.headers)["tl.dlq.message"]
    with pytest.raises(ValueError, match="fusion.strategy"):
        bad = pipeline(strategy="median")
        Fusion(bad, bad.stages["fusion"], None)


def latest_changelog(cfg, sink) -> dict[bytes, object]:
    latest = {}
    for o in sink.topic(cfg.topic(CHANGELOG).name):
        latest[o.key] = None if o.value is None else deserialize_state(o.value)
    return latest


def test_changelog_ends_with_one_emitted_marker_per_record():
    cfg = pipeline()
    msgs = [message(i * 3 + j, f"r{i}", m, 0.5) for i in range(2) for j, m in enumerate(MODELS)]
    sink, _ = run(cfg, msgs)
    latest = latest_changelog(cfg, sink)
    assert sorted(latest) == [b"r0", b"r1"] and all(isinstance(v, Emitted) for v in latest.values())
    assert np.all([o.partition == 0 for o in sink.topic(cfg.topic(CHANGELOG).name)])


def test_emitted_markers_are_tombstoned_after_the_dedup_window():
    cfg = pipeline(dedup_window_ms=1)
    msgs = [message(i * 3 + j, f"r{i}", m, 0.5) for i in range(3) for j, m in enumerate(MODELS)]
    sink, _ = run(cfg, msgs, idle_s=0.2)
    assert len(results(sink)) == 3
    assert latest_changelog(cfg, sink) == {b"r0": None, b"r1": None, b"r2": None}  # compaction drops them all


class FailsOn(Fusion):
    """Raises (a record error) on any batch holding the detection of `record`/`model`."""

    def __init__(self, cfg, record: str, model: str):
        super().__init__(cfg, cfg.stages["fusion"], None)
        self.poison = (record, model)

    def process(self, items):
        if any((i.detection.record_id, i.detection.model.name) == self.poison for i in items):
            raise ValueError("this detection breaks the model")
        return super().process(items)


def test_a_failed_half_of_a_bisection_drops_only_its_own_state_changes():
    """Issue 12 finding 1: a failing batch is bisected; the successful halves' joins (and those of
    earlier batches of the open transaction) must survive, and complete joins be emitted."""
    cfg = pipeline()
    msgs = [message(0, "a", "cnn", 0.9), message(1, "b", "cnn", 0.8), message(2, "a", "mlp", 0.7),
            message(3, "bad", "cnn", 0.5), message(4, "b", "mlp", 0.6), message(5, "a", "logreg", 0.4),
            message(6, "b", "logreg", 0.3), message(7, "c", "cnn", 0.2)]
    stage = FailsOn(cfg, "bad", "cnn")
    w, sink, _ = worker(cfg, msgs, stage=stage)
    w.commit_interval_s = 60.0  # one transaction spans every batch
    w.run(until_idle_s=0)
    assert sorted(r.record_id for r in results(sink)) == ["a", "b"]
    assert [d.key for d in sink.topic("f.dlq")] == [b"bad"]
    # after a restart, nothing is emitted twice and c's open join is still there
    sink2, stage2 = run(cfg, [message(8, "c", "mlp", 0.1), message(9, "c", "logreg", 0.1)], restore_from=sink)
    assert [r.record_id for r in results(sink2)] == ["c"]


def test_an_aborted_transaction_rolls_the_state_back_to_the_last_commit():
    from tests.engine.test_runtime import FailOnceSink

    cfg = pipeline()
    msgs = [message(i * 3 + j, f"r{i}", m, 0.5) for i in range(3) for j, m in enumerate(MODELS)]
    sink, _ = run(cfg, msgs, sink=FailOnceSink())  # the first commit fails: every batch read again
    assert sorted(r.record_id for r in results(sink)) == ["r0", "r1", "r2"]


def test_a_join_missing_a_model_is_emitted_partial_after_the_timeout():
    cfg = pipeline(join_timeout_ms=50)
    sink, stage = run(cfg, [message(0, "r1", "cnn", 0.9), message(1, "r1", "mlp", 0.7)], idle_s=0.3)
    [r] = results(sink)
    assert r.partial and r.missing == ("logreg",) and stage.counts["timed_out"] == 1
    assert isinstance(latest_changelog(cfg, sink)[b"r1"], Emitted)


def test_a_record_sent_again_is_counted_as_duplicate_or_reprocessed():
    cfg = pipeline()
    once = [message(i, "r", m, 0.5) for i, m in enumerate(MODELS)]
    again = [message(3 + i, "r", m, 0.5) for i, m in enumerate(MODELS)]
    sink, stage = run(cfg, once + again)
    assert len(results(sink)) == 1 and stage.counts["duplicate"] == 3
    sink, stage = run(pipeline(on_duplicate="reprocess"), once + again)
    assert len(results(sink)) == 2 and stage.counts["duplicate"] == 0


def test_restore_runs_in_the_worker_loop_with_the_partitions_held():
    cfg = pipeline()
    sink, _ = run(cfg, [message(0, "r1", "cnn", 0.9)])
    threads: list = []
    w, sink2, _ = worker(cfg, [message(1, "r1", "mlp", 0.7), message(2, "r1", "logreg", 0.3)], restore_from=sink)
    w._read_changelog = changelog_reader(sink, threads)
    assert w.source.held == {("f.det", 0), ("f.det", 1)} and threads == []  # the callback only marks them
    runner = threading.Thread(target=w.run, kwargs={"until_idle_s": 0}, name="worker-main")
    runner.start()
    runner.join(30)
    assert [t.name for t in threads] == ["worker-main"] and w.source.held == set()
    assert [r.record_id for r in results(sink2)] == ["r1"]


# --- issue 11, finding 6: detections that are not probabilities are never fused ------------------


def detection_message(offset: int, rid: str, model: str, scores, classes=("normal", "nodule")) -> Message:
    d = Detection(record_id=rid, source="s", ingest_ts_ms=5, model=ModelRef(model, "1"), classes=classes,
                  scores=tuple(scores))
    return Message("f.det", 0, offset, rid.encode(), bytes(encode_detection(d)), [], 0)


def dead_reasons(sink) -> dict[str, str]:
    """record key -> tl.dlq.reason of every dead letter."""
    return {d.key.decode(): dict(d.headers)["tl.dlq.reason"].decode() for d in sink.topic("f.dlq")}


def test_detections_that_are_not_probabilities_are_dead_letters_with_their_own_reason():
    cfg = pipeline(expected_models=["cnn"])
    bad = {"minus": (5, -2), "both": (0.9, 0.9), "hundred": (100, 0), "nan": (float("nan"), 0.5),
           "inf": (float("inf"), 0.0)}
    msgs = [detection_message(i, rid, "cnn", s) for i, (rid, s) in enumerate(bad.items())]
    msgs += [detection_message(len(msgs), "good", "cnn", (0.25, 0.75)),
             detection_message(len(msgs) + 1, "rogue", "rogue", (0.5, 0.5)),
             detection_message(len(msgs) + 2, "other", "cnn", (0.5, 0.5), classes=("a", "b"))]
    sink, _ = run(cfg, msgs)
    assert [r.record_id for r in results(sink)] == ["good"]
    assert dead_reasons(sink) == {"minus": "not_probabilities", "both": "not_probabilities",
                                  "hundred": "not_probabilities", "nan": "non_finite", "inf": "non_finite",
                                  "rogue": "unknown_model", "other": "wrong_classes"}
    both = next(d for d in sink.topic("f.dlq") if d.key == b"both")
    assert b"summing to 1.8" in dict(both.headers)["tl.dlq.message"]


def test_fusion_scores_sigmoid_takes_independent_class_scores_but_not_out_of_range_ones():
    cfg = pipeline(expected_models=["cnn"], scores="sigmoid")
    sink, _ = run(cfg, [detection_message(0, "both", "cnn", (0.9, 0.9)),
                        detection_message(1, "minus", "cnn", (5, -2))])
    assert [r.record_id for r in results(sink)] == ["both"]
    assert dead_reasons(sink) == {"minus": "not_probabilities"}


def test_fusion_scores_is_softmax_unless_the_pipeline_says_otherwise():
    assert pipeline().fusion.scores == "softmax"
    with pytest.raises(ValueError, match="fusion.scores: expected one of softmax, sigmoid"):
        pipeline(scores="logits")
