"""The evaluation report: per model and fused, precision, recall, F1 and support per class, plus
accuracy and macro/micro averages, over the records that carry ground truth.

`classification_report` is pure (labels in, numbers out); `build` reads the detections and
results topics (read_committed) and applies it to each model and to the fused result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensorline.config import PipelineConfig
from tensorline.ops import topics
from tensorline.schemas import decode_detection, decode_result


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
    for rec in topics.read_all(cfg, cfg.topic(cfg.fusion.input).name):
        d = decode_detection(rec.value)
        if d.label is not None:
            truth, pred = by_model.setdefault(d.model.name, ([], []))
            truth.append(d.label)
            pred.append(d.classes[max(range(len(d.scores)), key=d.scores.__getitem__)])
    truth, pred, partial = [], [], 0
    seen: set[str] = set()
    for rec in topics.read_all(cfg, cfg.topic(cfg.fusion.output).name):
        r = decode_result(rec.value)
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
    }


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
    lines.append(f"records with a result: {report['records']}   partial results: {report['partial']}")
    return "\n".join(lines)
