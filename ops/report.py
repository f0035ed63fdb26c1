"""The evaluation report: per model and fused, precision, recall, F1 and support per class, plus
accuracy and macro/micro averages, over the records that carry ground truth, each score with its
95 % bootstrap interval, and the fused result against each model on the same records (is it
better, or only higher?); the fused result's partial results are also scored apart.

`classification_report` and `evaluate` are pure (labels in, numbers out; the statistics are
`ops.evaluation`'s); `build` reads the detections and results topics (read_committed), joins
each model's decision and the fused one by record id, and counts the detections fusion dropped
as duplicates (`duplicates_dropped`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import PipelineConfig
from tensorline.engine import clients
from tensorline.fusion.stage import Join
from tensorline.ops import dlq, evaluation, lag, topics
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
    """The report over the pipeline's detections and results topics: `evaluate` of each model's
    decision and the fused one per record id (the first of each, as replays may repeat them)."""
    assert cfg.fusion is not None, f"{cfg.path}: the report needs a [fusion] section"
    by_model: dict[str, dict[str, tuple[str, str]]] = {}
    detections = topics.read_all(cfg, cfg.topic(cfg.fusion.input).name)
    for rec in detections:
        d = decode_detection(rec.value)
        if d.label is not None:
            decision = d.classes[max(range(len(d.scores)), key=d.scores.__getitem__)]
            by_model.setdefault(d.model.name, {}).setdefault(d.record_id, (d.label, decision))
    fused: dict[str, Decided] = {}
    seen: set[str] = set()
    partial = 0
    results = [decode_result(rec.value) for rec in topics.read_all(cfg, cfg.topic(cfg.fusion.output).name)]
    for r in results:
        if r.record_id in seen:  # replays may repeat a record; count each once
            continue
        seen.add(r.record_id)
        partial += r.partial
        if r.label is not None:
            fused[r.record_id] = Decided(r.label, r.decision, r.partial)
    return {**evaluate(by_model, fused, cfg.classes), "records": len(seen), "partial": partial,
            "duplicates_dropped": duplicates_dropped(cfg, detections, results)}


@dataclass(frozen=True)
class Decided:
    """One record's fused decision, its ground truth, and whether a model was missing from it."""

    label: str
    decision: str
    partial: bool = False


def scored(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """`classification_report` with its bootstrap intervals ("intervals": see `evaluation.intervals`)."""
    return {**classification_report(truth, pred, classes), "intervals": evaluation.intervals(truth, pred, classes)}


def evaluate(by_model: Mapping[str, Mapping[str, tuple[str, str]]], fused: Mapping[str, Decided],
             classes: Sequence[str]) -> dict[str, Any]:
    """The scores (with intervals) of each model ({record id: (label, decision)}) and of the fused
    result over the records with a label; the fused result's also over its complete and its
    partial results apart ("fused_complete", "fused_partial": what missing models cost); and
    "comparisons": the fused result against each model on the records both decided (joined by
    record id), `evaluation.paired` with a = fused, b = the model."""
    ids = sorted(fused)
    report: dict[str, Any] = {
        "models": {m: scored([t for t, _ in d.values()], [p for _, p in d.values()], classes)
                   for m, d in sorted(by_model.items())},
        "fused": scored([fused[i].label for i in ids], [fused[i].decision for i in ids], classes),
    }
    for key, partial in (("fused_complete", False), ("fused_partial", True)):
        part = [i for i in ids if fused[i].partial == partial]
        report[key] = scored([fused[i].label for i in part], [fused[i].decision for i in part], classes)
    comparisons = {}
    for m, decided in sorted(by_model.items()):
        both = [i for i in ids if i in decided]
        comparisons[m] = evaluation.paired([fused[i].label for i in both], [fused[i].decision for i in both],
                                           [decided[i][1] for i in both], classes)
    report["comparisons"] = comparisons
    return report


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


def _ci(value: float, ci: list[float] | None) -> str:
    """0.951 (0.939-0.962): a score and its interval, or the score alone without one."""
    return f"{value:.3f}" if ci is None else f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, scores) per model, FUSED, and FUSED's complete and partial results apart when it
    has partial ones."""
    rows = [*report["models"].items(), ("FUSED", report["fused"])]
    if report.get("fused_partial", {}).get("records"):
        rows += [("  complete", report["fused_complete"]), ("  partial", report["fused_partial"])]
    return rows


def format_comparison(name: str, c: dict[str, Any]) -> str:
    """One paired comparison of the fused result against model `name`, in words."""
    lo, hi = c["interval"]
    return (f"FUSED vs {name}: macro F1 {c['f1_macro_diff']:+.3f} ({int(c['level'] * 100)}% CI {lo:+.3f} to "
            f"{hi:+.3f}), McNemar p {c['mcnemar_p']:.2g} ({c['only_a_right']} only FUSED right, "
            f"{c['only_b_right']} only {name}): {c['verdict']}")


def format_table(report: dict[str, Any]) -> str:
    """The report as text, one block per model and one for the fused result (scikit-learn style,
    with 95 % bootstrap intervals), then the fused result against each model."""
    lines = []
    for name, rep in _rows(report):
        ci = rep.get("intervals") or {}
        per_class_ci = ci.get("per_class") or {}
        title = f"FUSED, {name.strip()} results" if name.startswith(" ") else name
        lines.append(f"{title}  (n={rep['records']})")
        lines.append(f"  {'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'95% CI':>16}{'support':>10}")
        for c, v in rep["per_class"].items():
            interval = per_class_ci.get(c)
            shown = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
            lines.append(f"  {c:<12}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{shown:>16}"
                         f"{v['support']:>10d}")
        for label, key in (("accuracy", "accuracy"), ("macro f1", "f1_macro")):
            interval = ci.get(key)
            shown = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
            lines.append(f"  {label:<12}{'':>20}{rep[key]:>10.3f}{shown:>16}")
        lines.append(f"  {'micro f1':<12}{'':>20}{rep['f1_micro']:>10.3f}")
        lines.append("")
    for name, c in (report.get("comparisons") or {}).items():
        if c is not None:
            lines.append(format_comparison(name, c))
    lines.append(_totals(report))
    return "\n".join(lines)


def _totals(report: dict[str, Any]) -> str:
    return (f"records with a result: {report['records']}   partial results: {report['partial']}\n"
            f"duplicates dropped: {report['duplicates_dropped']}")


def best_model(report: dict[str, Any]) -> str | None:
    """The model with the highest macro-F1 (ties: the first by name), None without models."""
    models = report["models"]
    return max(models, key=lambda m: models[m]["f1_macro"]) if models else None


def format_summary(report: dict[str, Any]) -> str:
    """The report in one table: a row per model and one for the fused result, with accuracy and
    macro F1 (each with its 95 % bootstrap interval), each class's F1 and n; above it, the fused
    result against the best model on the same records (`format_table` has the rest)."""
    classes = list(report["fused"]["per_class"])
    rows = _rows(report)
    width = max(len("model"), *(len(name) for name, _ in rows)) + 2
    cls_width = {c: max(11, len(c) + 5) for c in classes}
    head = (f"{'model':<{width}}{'accuracy (95% CI)':>21}{'macro F1 (95% CI)':>21}"
            + "".join(f"{'F1 ' + c:>{cls_width[c]}}" for c in classes) + f"{'n':>7}")
    lines = [_totals(report)]
    best = best_model(report)
    comparison = (report.get("comparisons") or {}).get(best) if best else None
    if comparison is not None:
        lo, hi = comparison["interval"]
        lines.append(f"FUSED vs the best model ({best}): macro F1 {comparison['f1_macro_diff']:+.3f} "
                     f"({lo:+.3f} to {hi:+.3f}), McNemar p {comparison['mcnemar_p']:.2g}: {comparison['verdict']}")
    lines += ["", head]
    for name, rep in rows:
        ci = rep.get("intervals") or {}
        lines.append(f"{name:<{width}}{_ci(rep['accuracy'], ci.get('accuracy')):>21}"
                     f"{_ci(rep['f1_macro'], ci.get('f1_macro')):>21}"
                     + "".join(f"{rep['per_class'][c]['f1']:>{cls_width[c]}.3f}" for c in classes)
                     + f"{rep['records']:>7}")
    return "\n".join(lines)
