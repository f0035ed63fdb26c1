"""How sure a score is: bootstrap confidence intervals over records, and paired comparisons of two
classifiers on the same records (the bootstrap of the difference in macro-F1, McNemar's exact test
on correctness). Pure: labels in, numbers out; the report applies them to the topics.

A resample draws n records with replacement (the same draws for every classifier compared on the
same records, so their difference is paired), from a fixed seed: the same records give the same
intervals on every run. Intervals are percentile intervals. Per-class F1 is 2tp / (2tp + fp + fn),
as `report.classification_report` computes it; a class neither present nor predicted in a
resample has no F1 there and is left out of that resample's macro average (otherwise a small set
drawn without one class would score 0.5 however right it is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# 2,000 resamples put a 95 % percentile interval's ends within about ±0.002 of where more would
# (for F1 around 0.9 on a thousand records); a report computes a dozen in well under a second.
RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
# Resamples drawn at a time: bounds the (chunk, n) index array to a few tens of MB.
MAX_CELLS = 4_000_000


def class_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Each label's index in `classes`; a label not among them gets len(classes) (a class of its own
    that no F1 is computed for, as `classification_report` ignores it)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index.get(str(x), len(classes)) for x in labels), np.int64, len(labels))


def resampled_confusions(truth: np.ndarray, preds: Sequence[np.ndarray], n_classes: int, *,
                         resamples: int = RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Per prediction vector, its confusion matrix in each resample, (resamples, K+1, K+1) counts
    [truth, prediction] (K+1: the labels outside the classes); every vector sees the same draws."""
    n, k1 = len(truth), n_classes + 1
    if n == 0:
        raise ValueError("no records to resample")
    codes = [truth * k1 + p for p in preds]
    out = [np.empty((resamples, k1, k1), np.int64) for _ in preds]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, MAX_CELLS // n))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, n, (b, n))
        offsets = (np.arange(b) * k1 * k1)[:, None]
        for code, conf in zip(codes, out):
            counts = np.bincount((code[draws] + offsets).ravel(), minlength=b * k1 * k1)
            conf[start:start + b] = counts.reshape(b, k1, k1)
    return out


def scores(confusion: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Accuracy, per-class F1 (NaN where a class is neither present nor predicted) and macro-F1 of
    confusion matrices (..., K+1, K+1)."""
    total = confusion.sum((-2, -1))
    correct = np.trace(confusion[..., :n_classes, :n_classes], axis1=-2, axis2=-1)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)[..., :n_classes]
    fp = confusion.sum(-2)[..., :n_classes] - tp
    fn = confusion.sum(-1)[..., :n_classes] - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)
        defined = np.isfinite(f1)
        macro = np.where(defined.any(-1), np.nansum(f1, -1) / np.maximum(defined.sum(-1), 1), np.nan)
        accuracy = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    return {"accuracy": accuracy, "f1": f1, "f1_macro": macro}


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central `level` percentile interval of the samples (NaNs left out), as [low, high]."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(np.asarray(samples, np.float64), [tail, 100 - tail])
    return [float(low), float(high)]


def intervals(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str], *, resamples: int = RESAMPLES,
              seed: int = SEED, level: float = LEVEL) -> dict[str, Any] | None:
    """Bootstrap intervals of accuracy, macro-F1 and each class's F1: {"accuracy": [lo, hi],
    "f1_macro": [lo, hi], "per_class": {class: [lo, hi] or None}, "level", "resamples"}; None
    without records."""
    if not truth:
        return None
    t, p = class_indices(truth, classes), class_indices(pred, classes)
    s = scores(resampled_confusions(t, [p], len(classes), resamples=resamples, seed=seed)[0], len(classes))
    per_class = {c: interval(s["f1"][:, i], level) if np.isfinite(s["f1"][:, i]).any() else None
                 for i, c in enumerate(classes)}
    return {"accuracy": interval(s["accuracy"], level), "f1_macro": interval(s["f1_macro"], level),
            "per_class": per_class, "level": level, "resamples": resamples}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: of the records exactly one classifier got right, `only_a`
    went to a and `only_b` to b; under "equally good" each is a fair coin (binomial, p = 1/2)."""
    n, low = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired(truth: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str], classes: Sequence[str], *,
           resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any] | None:
    """a against b on the same records (aligned by position): the difference in macro-F1 (a - b)
    with its bootstrap interval (the same draws for both), the share of resamples where a is not
    ahead, McNemar's exact test on which records each got right, and a verdict: "better" or
    "worse" when the interval of the difference excludes 0, else "not distinguishable"."""
    if len(truth) != len(pred_a) or len(truth) != len(pred_b):
        raise ValueError(f"{len(truth)} labels but {len(pred_a)} and {len(pred_b)} predictions")
    if not truth:
        return None
    k = len(classes)
    t, a, b = (class_indices(x, classes) for x in (truth, pred_a, pred_b))
    conf_a, conf_b = resampled_confusions(t, [a, b], k, resamples=resamples, seed=seed)
    diff = scores(conf_a, k)["f1_macro"] - scores(conf_b, k)["f1_macro"]
    k1 = k + 1
    full = [np.bincount(t * k1 + x, minlength=k1 * k1).reshape(k1, k1) for x in (a, b)]
    point = float(scores(full[0], k)["f1_macro"] - scores(full[1], k)["f1_macro"])
    low, high = interval(diff, level)
    right_a, right_b = (a == t) & (t < k), (b == t) & (t < k)
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    verdict = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
    return {"records": len(truth), "f1_macro_diff": point, "interval": [low, high],
            "share_not_ahead": float(np.mean(diff[np.isfinite(diff)] <= 0)),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b),
            "verdict": verdict, "level": level, "resamples": resamples}
