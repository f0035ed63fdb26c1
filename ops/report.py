"""The evaluation report: per model and fused, precision, recall, F1 and support per class, plus
accuracy and macro/micro averages, over the records that carry ground truth.

`classification_report` is pure (labels in, numbers out); `build` reads the detections and
results topics (read_committed) and applies it to each model and to the fused result, and counts
the detections fusion dropped as duplicates (`duplicates_dropped`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.fusion.stage import Join
from tensorline.ops import dlq, lag, topics
from tensorline.schemas import FusedResult, decode_detection, decode_result

FUSION = "fusion"  # the fusion stage's name: its consumer group and its dead letters' tl.dlq.stage


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, accuracy, macro and micro F1 (zero where undefined)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    per_class = {}
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": tp + fn}
    n = len(y_true)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    # Micro-averaged F1 over single-label classes equals accuracy when every label is a class.
    tp_all = sum(t == p and t in per_class for t, p in zip(y_true, y_pred))
    fp_all = sum(t != p and p in per_class for t, p in zip(y_true, y_pred))
    fn_all = sum(t != p and t in per_class for t, p in zip(y_true, y_pred))
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "f1_macro": sum(v["f1"] for v in per_class.values()) / len(per_class) if per_class else 0.0,
        "f1_micro": _f1(micro_p, micro_r),
        "per_class": per_class,
        "records": n,
    }


def build(cfg: PipelineConfig) -> dict[str, Any]:
    """The report over the pipeline's detections and results topics."""
    assert cfg.fusion is not None, f"{cfg.path}: the report needs a [fusion] section"
    by_model: dict[str, tuple[list[str], list[str]]] = {}
    detections = topics.read_all(cfg, cfg.topic(cfg.fusion.input).name)
    for rec in detections:
        d = decode_detection(rec.value)
        if d.label is not None:
            truth, pred = by_model.setdefault(d.model.name, ([], []))
            truth.append(d.label)
            pred.append(d.classes[max(range(len(d.scores)), key=d.scores.__getitem__)])
    truth, pred, partial = [], [], 0
    seen: set[str] = set()
    results = [decode_result(rec.value) for rec in topics.read_all(cfg, cfg.topic(cfg.fusion.output).name)]
    for r in results:
        if r.record_id in seen:  # replays may repeat a record; count each once
            continue
        seen.add(r.record_id)
        partial += r.partial
        if r.label is not None:
            truth.append(r.label)
            pred.append(r.decision)
    return {
        "models": {m: classification_report(t, p, cfg.classes) for m, (t, p) in sorted(by_model.items())},
        "fused": classification_report(truth, pred, cfg.classes),
        "records": len(seen),
        "partial": partial,
        "duplicates_dropped": duplicates_dropped(cfg, detections, results),
    }


def duplicates_dropped(cfg: PipelineConfig, detections: list[ConsumerRecord], results: list[FusedResult]) -> int:
    """The detections fusion dropped as duplicates, from the topics (true after workers stopped).

    Every detection fusion consumed (below its group's committed offsets) and did not dead-letter
    (no fusion dead letter names its offset) is, for its (record id, model), in a result that
    lists the model as a contributor, in a join still open (the fusion changelog's latest state
    for the record), or dropped as a duplicate (the record sent again, or an output late for a
    record already emitted: fusion's `tensorline_duplicates_total`). So per (record id, model),
    dropped = consumed - contributed - open, the sum over pairs being the count. A replay of fusion
    (its offsets moved back) re-reads detections this sees once; results repeated by a replay or
    by at-least-once delivery count at most the detections, never below zero.
    """
    assert cfg.fusion is not None
    topic = cfg.topic(cfg.fusion.input).name
    consumed = _committed(cfg, cfg.group_id(FUSION), topic)
    try:
        dead = {(x.partition, x.offset) for x in dlq.letters(cfg, stage=FUSION) if x.topic == topic}
    except KeyError:  # no DLQ topic
        dead = set()
    expected = set(cfg.fusion.expected_models)
    counts: Counter[tuple[str, str]] = Counter()
    for rec in detections:
        if rec.offset < consumed.get(rec.partition, 0) and (rec.partition, rec.offset) not in dead:
            d = decode_detection(rec.value)
            if d.model.name in expected:
                counts[d.record_id, d.model.name] += 1
    for r in results:
        counts.subtract((r.record_id, m) for m in r.contributors)
    counts.subtract(_open_joins(cfg))
    return sum(n for n in counts.values() if n > 0)


def _committed(cfg: PipelineConfig, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (none: it never committed); the
    coordinator may be coming up (a fresh broker): see `clients.with_coordinator`."""
    admin = clients.admin(cfg)
    try:
        offsets = clients.with_coordinator(lambda: admin.list_group_offsets({group: None})).get(group, {})
    finally:
        admin.close()
    return {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset >= 0}


def _open_joins(cfg: PipelineConfig) -> Counter[tuple[str, str]]:
    """(record id, model) of every detection in a join fusion holds open: the latest state per key
    of its changelog (read_committed, as a restoring worker reads it)."""
    try:
        state = lag.changelog_state(cfg, FUSION)
    except KeyError:  # no changelog yet: fusion never ran
        return Counter()
    return Counter((j.record_id, m) for j in state.values() if isinstance(j, Join) for m in j.detections)


def format_table(report: dict[str, Any]) -> str:
    """The report as text, one block per model and one for the fused result (scikit-learn style)."""
    lines = []
    for name, rep in [*report["models"].items(), ("FUSED", report["fused"])]:
        lines.append(f"{name}  (n={rep['records']})")
        lines.append(f"  {'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for c, v in rep["per_class"].items():
            lines.append(f"  {c:<12}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>10d}")
        lines.append(f"  {'accuracy':<12}{'':>20}{rep['accuracy']:>10.3f}")
        lines.append(f"  {'macro f1':<12}{'':>20}{rep['f1_macro']:>10.3f}")
        lines.append(f"  {'micro f1':<12}{'':>20}{rep['f1_micro']:>10.3f}")
        lines.append("")
    lines.append(_totals(report))
    return "\n".join(lines)


def _totals(report: dict[str, Any]) -> str:
    return (f"records with a result: {report['records']}   partial results: {report['partial']}\n"
            f"duplicates dropped: {report['duplicates_dropped']}")


def format_summary(report: dict[str, Any]) -> str:
    """The report in one table: a row per model and one for the fused result, with accuracy, macro
    F1 and each class's F1 (`format_table` has precision and recall per class)."""
    classes = list(report["fused"]["per_class"])
    rows = [*report["models"].items(), ("FUSED", report["fused"])]
    width = max(len("model"), *(len(name) for name, _ in rows)) + 2
    head = f"{'model':<{width}}{'accuracy':>10}{'macro F1':>10}" + "".join(f"{'F1 ' + c:>{max(12, len(c) + 5)}}"
                                                                           for c in classes) + f"{'n':>7}"
    lines = [_totals(report), "", head]
    for name, rep in rows:
        lines.append(f"{name:<{width}}{rep['accuracy']:>10.3f}{rep['f1_macro']:>10.3f}"
                     + "".join(f"{rep['per_class'][c]['f1']:>{max(12, len(c) + 5)}.3f}" for c in classes)
                     + f"{rep['records']:>7}")
    return "\n".join(lines)
