"""Choosing the fusion that generalises: folds grouped by source image for cross-validation, the
one-standard-error rule that takes the simplest candidate the folds cannot tell from the best
(passing the best single model through is one), a weighting shrunk toward that model, and the
linear forms a stacker file can hold besides a fitted stacker (a strategy's weighting, one model
passed through).

Pure: arrays and names in, folds, a choice or a `Stacker` out (`ops.train` runs the
cross-validation and writes the file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tensorline.fusion.stacking import Stacker

# The logits of a linear form are this times the weighted mean of the scores: its decision is the
# weighting's (ties to the lowest class, as argmax), its scores a softmax that keeps the order;
# at 4 a mean score of 0.9 of two classes reads 0.96.
PASS_SCALE = 4.0
# The name of the single-model fallback among the candidates.
SINGLE = "single"
# The name of the weighting shrunk toward the single model, and the amounts tried: a tenth apart
# from 0 (the weighting) to 1 (the model alone); finer steps only fit the records' noise.
SHRUNK = "shrunk"
SHRINK_AMOUNTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def grouped_folds(groups: Sequence[object] | np.ndarray, n_folds: int) -> np.ndarray:
    """A fold index per record such that every record of a group is in one fold: no group on both
    sides of any fold. Groups go, largest first (then by name), to the fold holding the fewest
    records so far; with fewer groups than `n_folds`, there is one fold per group."""
    keys = np.asarray(groups).astype(str)
    names, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    n = min(n_folds, len(names))
    if n < 2:
        raise ValueError(f"cross-validation by group needs 2 or more groups, got {len(names)}: {names.tolist()}")
    sizes = np.zeros(n, np.int64)
    fold_of = np.empty(len(names), np.int64)
    for g in sorted(range(len(names)), key=lambda g: (-counts[g], names[g])):
        fold_of[g] = int(np.argmin(sizes))
        sizes[fold_of[g]] += counts[g]
    return fold_of[inverse]


def choose(fold_scores: Mapping[str, Sequence[float]], simplest_first: Sequence[str]) -> str:
    """The one-standard-error rule: of `simplest_first` (candidates, the one fitting least first),
    the first whose cross-validated score is within one standard error of the best candidate's.

    `fold_scores` holds each candidate's score on every fold (the same folds for all). The best
    is the one with the highest mean; a candidate is within reach when its mean shortfall from the
    best, fold by fold, is at most that shortfall's standard error over the folds. A candidate that
    fits more than a simpler one must beat it by more than the folds' noise: on a validation split
    of a few images the ranking of close candidates is mostly the images', and what was fitted to
    it (a weighting, a stacker, the pick of one model) carries that into production."""
    scores = {c: np.asarray(fold_scores[c], np.float64) for c in simplest_first}
    if len({len(v) for v in scores.values()}) != 1 or len(next(iter(scores.values()))) < 2:
        raise ValueError(f"choose needs 2 or more folds, the same for every candidate; got "
                         f"{ {c: len(v) for c, v in scores.items()} }")
    best = max(simplest_first, key=lambda c: scores[c].mean())
    for candidate in simplest_first:
        shortfall = scores[best] - scores[candidate]
        if shortfall.mean() <= shortfall.std(ddof=1) / np.sqrt(len(shortfall)):
            return candidate
    return best  # unreachable: the best's own shortfall is 0


def shrink(weights: Mapping[str, float], single: str, amount: float) -> dict[str, float]:
    """`weights`, normalised to sum to 1, moved `amount` of the way to `single` alone:
    (1 - amount) * w + amount * [m == single]. 0 keeps the weighting, 1 is the single model."""
    total = sum(weights.values())
    if not 0.0 <= amount <= 1.0 or single not in weights or min(weights.values()) < 0 or not total > 0:
        raise ValueError(f"shrink needs non-negative weights with one positive, naming {single!r}, and an "
                         f"amount in [0, 1]; got {dict(weights)}, {amount}")
    # Normalised first: (1 - amount) * w would underflow to 0 for a subnormal weight.
    return {m: (1.0 - amount) * (w / total) + (amount if m == single else 0.0) for m, w in weights.items()}


def best_amount(score: Callable[[float], float], amounts: Sequence[float] = SHRINK_AMOUNTS) -> float:
    """The amount of shrinkage with the best `score`; a tie goes to the larger amount (nearer the
    single model: a fusion earns its weight)."""
    return max(amounts, key=lambda a: (score(a), a))


def linear_stacker(weights: Mapping[str, float], model_names: Sequence[str], classes: Sequence[str], *,
                   n_samples: int = 0) -> Stacker:
    """A stacker whose class logits are PASS_SCALE times the `weights`-weighted mean of the models'
    scores (models not named weigh 0): weighted_average's decision as a stacker; equal weights are
    soft_vote's; one model alone passes that model's decision through."""
    w = np.array([float(weights.get(m, 0.0)) for m in model_names])
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with one positive, got {dict(weights)}")
    k = len(classes)
    matrix = PASS_SCALE * (w / w.sum())[:, None, None] * np.eye(k)[None]
    return Stacker(weights=matrix, bias=np.zeros(k), model_names=tuple(model_names), classes=tuple(classes),
                   l2=0.0, n_samples=n_samples)
