"""Fusion strategies: one record's per-model scores in, one fused result out.

`scores` is a float array of shape (n_models, n_classes), one row per model that contributed
to the record. A missing model is expressed by leaving its row out: the caller passes only the
rows present and, where a strategy takes weights, one weight per passed row in the same order.

Sums over models run in sorted order, so a result is bit-identical whatever order the models'
rows arrive in from the join. Argmax ties go to the lowest class index unless a strategy says
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from types import MappingProxyType
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Mode = Literal["any", "all", "at_least"]


class BadScores(ValueError):
    """The scores array itself is unusable: wrong shape, empty, or not finite."""


@dataclass(frozen=True, eq=False)
class Fused:
    """One record's fused result; the arrays are read-only.

    scores: (n_classes,) float64, what each strategy documents. decision: the fused class index.
    votes: per-class model counts (majority_vote, threshold), else None.
    winner: index of the passed row chosen (max_confidence), else None.
    """

    scores: NDArray[np.float64]
    decision: int
    votes: NDArray[np.int64] | None = None
    winner: int | None = None

    def __post_init__(self) -> None:
        self.scores.setflags(write=False)
        if self.votes is not None:
            self.votes.setflags(write=False)


def check_scores(scores: ArrayLike, *, ndim: int = 2) -> NDArray[np.float64]:
    """Return `scores` as float64 with shape (..., n_models, n_classes), or raise BadScores."""
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadScores(f"scores are not a numeric array: {exc}") from exc
    if array.ndim != ndim:
        raise BadScores(f"scores must be {ndim}-D (..., n_models, n_classes), got shape {array.shape}")
    if array.shape[-2] == 0:
        raise BadScores(f"no models: scores have zero model rows, shape {array.shape}")
    if array.shape[-1] == 0:
        raise BadScores(f"no classes: scores have zero columns, shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(array[index]) else "infinite"
        raise BadScores(f"{kind} score at index {index} (..., model row, class)")
    return array


def _sorted_sum(array: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sum over axis 0 in sorted order, so the result does not depend on the row order."""
    return np.sort(array, axis=0).sum(axis=0)


def _argmax(values: NDArray[np.float64]) -> int:
    """Index of the largest value; ties go to the lowest index."""
    return int(np.argmax(values))


def weighted_average(scores: ArrayLike, weights: ArrayLike) -> Fused:
    """Weighted mean of the rows; weights are normalised to sum to one, so any scale works.

    Weights must be finite and non-negative with at least one positive.
    """
    array = check_scores(scores)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (array.shape[0],):
        raise ValueError(f"weights need one entry per passed model row ({array.shape[0]}), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"negative weights at rows {np.flatnonzero(w < 0).tolist()}: {w.tolist()}")
    if not (w > 0).any():
        raise ValueError(f"all weights are zero: {w.tolist()}; at least one model needs a positive weight")
    normalised = w / _sorted_sum(w)
    fused = _sorted_sum(array * normalised[:, None])
    return Fused(scores=fused, decision=_argmax(fused))


def soft_vote(scores: ArrayLike) -> Fused:
    """Mean of the rows; the decision is its argmax."""
    array = check_scores(scores)
    fused = _sorted_sum(array) / array.shape[0]
    return Fused(scores=fused, decision=_argmax(fused))


def majority_vote(scores: ArrayLike) -> Fused:
    """Hard vote: each model votes its argmax; scores are the vote fractions.

    A model whose own row ties votes its lowest tied class. Tied vote counts go to the tied
    class with the highest summed score, then to the lowest class index.
    """
    array = check_scores(scores)
    n_models, n_classes = array.shape
    votes = np.bincount(np.argmax(array, axis=1), minlength=n_classes)
    tied = votes == votes.max()
    decision = _argmax(np.where(tied, _sorted_sum(array), -np.inf))
    return Fused(scores=votes / n_models, decision=decision, votes=votes)


def threshold(
    scores: ArrayLike,
    *,
    positive_class: int,
    threshold: float,
    mode: Mode = "any",
    k: int | None = None,
) -> Fused:
    """Decide `positive_class` when any / all / at least `k` models score it >= `threshold`.

    Otherwise decide the argmax of the mean of the other classes (the other class for two).
    Scores are, per class, the fraction of models scoring that class >= threshold; the decision
    is the rule, not their argmax. `k` larger than the passed rows means the rule cannot fire
    (a record with too many missing models is decided negative rather than rejected).
    """
    array = check_scores(scores)
    n_models, n_classes = array.shape
    if n_classes < 2:
        raise ValueError(f"threshold needs at least two classes, got {n_classes}")
    if isinstance(positive_class, bool) or not isinstance(positive_class, Integral):
        raise ValueError(f"positive_class must be a class index, got {positive_class!r}")
    if not 0 <= positive_class < n_classes:
        raise ValueError(f"positive_class {positive_class} out of range for {n_classes} classes")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    if mode == "at_least":
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"mode 'at_least' needs an integer k >= 1, got k={k!r}")
        needed = int(k)
    elif mode in ("any", "all"):
        if k is not None:
            raise ValueError(f"k is only used with mode 'at_least', got mode {mode!r} and k={k!r}")
        needed = 1 if mode == "any" else n_models
    else:
        raise ValueError(f"unknown mode {mode!r}; valid: 'any', 'all', 'at_least'")
    votes = (array >= threshold).sum(axis=0)
    if votes[positive_class] >= needed:
        decision = int(positive_class)
    else:
        others = _sorted_sum(array)
        others[positive_class] = -np.inf
        decision = _argmax(others)
    return Fused(scores=votes / n_models, decision=decision, votes=votes)


def max_confidence(scores: ArrayLike) -> Fused:
    """The row with the highest single score wins outright (ties: lowest row index)."""
    array = check_scores(scores)
    winner = _argmax(array.max(axis=1))
    fused = array[winner].copy()
    return Fused(scores=fused, decision=_argmax(fused), winner=winner)


STRATEGIES: Mapping[str, Callable[..., Fused]] = MappingProxyType(
    {
        "weighted_average": weighted_average,
        "soft_vote": soft_vote,
        "majority_vote": majority_vote,
        "threshold": threshold,
        "max_confidence": max_confidence,
    }
)


def fuse(name: str, scores: ArrayLike, **params: object) -> Fused:
    """Run the strategy called `name` with its keyword parameters."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown fusion strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}") from None
    return strategy(scores, **params)
