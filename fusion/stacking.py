"""Stacking: a multinomial logistic regression learned on the models' concatenated scores.

Unlike the fixed strategies it learns which model to trust for which class, so it needs every
model it was fitted on; a record with a model missing raises MissingModel and the caller falls
back to soft_vote. It is saved like a model: a small JSON file checked against the pipeline's
model names and classes when loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tensorline.fusion.strategies import BadScores, check_scores

FORMAT = "tensorline.stacker"
VERSION = 1
# Mean log-loss + l2/2·|W|²: negligible against a few thousand samples, yet keeps the weights
# finite when the training set is separable.
DEFAULT_L2 = 1e-3
# Newton converges in ~10 steps here; the cap only bounds a pathological fit.
MAX_NEWTON_STEPS = 100
# Stop when the predicted decrease of the objective (half the Newton decrement) is below this.
TOLERANCE = 1e-12


class MissingModel(ValueError):
    """A model the stacker was fitted on gave no scores for this record."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(f"stacker needs scores from model(s) {', '.join(self.missing)}; none were passed")


@dataclass(frozen=True, eq=False)
class Stacker:
    """A fitted stacker. weights[m, c, k] maps model m's score for class c to class k's logit."""

    weights: NDArray[np.float64]
    bias: NDArray[np.float64]
    model_names: tuple[str, ...]
    classes: tuple[str, ...]
    l2: float
    n_samples: int

    def __post_init__(self) -> None:
        shape = (len(self.model_names), len(self.classes), len(self.classes))
        if self.weights.shape != shape or self.bias.shape != shape[-1:]:
            raise ValueError(
                f"stacker weights {self.weights.shape} / bias {self.bias.shape} do not fit "
                f"{shape[0]} models and {shape[1]} classes"
            )
        if not (np.isfinite(self.weights).all() and np.isfinite(self.bias).all()):
            raise ValueError("stacker weights and bias must be finite")
        self.weights.setflags(write=False)
        self.bias.setflags(write=False)

    def predict_proba(self, scores: ArrayLike, *, models: Sequence[str]) -> NDArray[np.float64]:
        """Class probabilities for (n_models, n_classes) scores, or a (batch, ...) stack of them.

        `models` names the passed rows in order; any order works, but every fitted model must
        be there (else MissingModel) and no other.
        """
        array = np.asarray(scores, dtype=np.float64)
        if array.ndim not in (2, 3):
            raise BadScores(f"scores must be 2-D or batched 3-D, got shape {array.shape}")
        array = check_scores(array, ndim=array.ndim)
        if array.shape[-1] != len(self.classes):
            raise BadScores(f"scores have {array.shape[-1]} classes, stacker has {len(self.classes)}")
        rows = self._rows(models, array.shape[-2])
        logits = np.einsum("...mc,mck->...k", array[..., rows, :], self.weights) + self.bias
        return _softmax(logits)

    def _rows(self, models: Sequence[str], n_rows: int) -> list[int]:
        """Passed-row index of each fitted model, in fitted order."""
        names = list(models)
        if len(names) != n_rows:
            raise ValueError(f"{n_rows} score rows but {len(names)} model names: {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names: {names}")
        unknown = [name for name in names if name not in self.model_names]
        if unknown:
            raise ValueError(f"stacker was not fitted on model(s) {unknown}; it knows {list(self.model_names)}")
        missing = [name for name in self.model_names if name not in names]
        if missing:
            raise MissingModel(missing)
        return [names.index(name) for name in self.model_names]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the stacker as JSON; replaced atomically so a reader never sees half a file."""
        document = {
            "format": FORMAT,
            "version": VERSION,
            "model_names": list(self.model_names),
            "classes": list(self.classes),
            "l2": self.l2,
            "n_samples": self.n_samples,
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
        }
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(partial, target)


def load_stacker(path: str | os.PathLike[str], *, model_names: Sequence[str], classes: Sequence[str]) -> Stacker:
    """Read a saved stacker, checking it was fitted on these models (any order) and classes (this order)."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} file of version {VERSION}")
    try:
        stacker = Stacker(
            weights=np.asarray(document["weights"], dtype=np.float64),
            bias=np.asarray(document["bias"], dtype=np.float64),
            model_names=tuple(document["model_names"]),
            classes=tuple(document["classes"]),
            l2=float(document["l2"]),
            n_samples=int(document["n_samples"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed stacker file: {exc}") from exc
    expected, saved = set(model_names), set(stacker.model_names)
    if expected != saved:
        raise ValueError(
            f"{path}: stacker models {sorted(saved)} do not match the pipeline's {sorted(expected)} "
            f"(missing {sorted(expected - saved)}, unexpected {sorted(saved - expected)})"
        )
    if tuple(classes) != stacker.classes:
        raise ValueError(f"{path}: stacker classes {list(stacker.classes)} do not match the pipeline's {list(classes)}")
    return stacker


def fit_stacker(
    X: ArrayLike,
    y: ArrayLike,
    *,
    model_names: Sequence[str],
    classes: Sequence[str],
    l2: float = DEFAULT_L2,
) -> Stacker:
    """Fit on X (n_samples, n_models, n_classes) scores and y (n_samples,) class indices.

    Damped Newton on mean log-loss + l2/2·|W|² (the bias is not penalised): deterministic and
    exact; each step costs O(n_samples · (n_models · n_classes²)²).
    """
    x = check_scores(X, ndim=3)
    n_samples, n_models, n_classes = x.shape
    names, labels = _names(model_names, "model_names", n_models), _names(classes, "classes", n_classes)
    if n_classes < 2:
        raise ValueError(f"stacking needs at least two classes, got {n_classes}")
    if not (np.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be positive and finite, got {l2!r}")
    labels_y = np.asarray(y)
    if labels_y.shape != (n_samples,) or not np.issubdtype(labels_y.dtype, np.integer):
        raise ValueError(f"y must be {n_samples} integer class indices, got {labels_y.dtype} shape {labels_y.shape}")
    if n_samples and (labels_y.min() < 0 or labels_y.max() >= n_classes):
        raise ValueError(f"y holds class indices outside 0..{n_classes - 1}")
    absent = [labels[c] for c in np.flatnonzero(np.bincount(labels_y, minlength=n_classes) == 0)]
    if absent:
        raise ValueError(f"no training samples for class(es) {absent}")
    features = np.hstack([x.reshape(n_samples, n_models * n_classes), np.ones((n_samples, 1))])
    theta = _newton(features, labels_y, n_classes, l2)
    return Stacker(
        weights=theta[:-1].reshape(n_models, n_classes, n_classes),
        bias=theta[-1].copy(),
        model_names=names,
        classes=labels,
        l2=float(l2),
        n_samples=n_samples,
    )


def _names(values: Sequence[str], what: str, count: int) -> tuple[str, ...]:
    """Check `values` are `count` distinct strings."""
    names = tuple(values)
    if len(names) != count or len(set(names)) != count or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what} must be {count} distinct strings, got {list(names)}")
    return names


def _softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _newton(features: NDArray[np.float64], y: NDArray[np.integer], n_classes: int, l2: float) -> NDArray[np.float64]:
    """Minimise the penalised log-loss over theta (n_features + bias, n_classes).

    Softmax is unchanged by adding a constant to every class's bias, so the objective also
    carries ½(Σ bias)², which is zero at the optimum and makes the Hessian positive definite.
    """
    n_samples, n_features = features.shape
    size = n_features * n_classes
    onehot = np.eye(n_classes)[y]
    penalty = np.full((n_features, n_classes), l2)
    penalty[-1] = 0.0
    pin = np.zeros((n_features, n_classes))
    pin[-1] = 1.0

    def objective(theta: NDArray[np.float64]) -> float:
        logits = features @ theta
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        loss = (log_norm - logits[np.arange(n_samples), y]).mean()
        return float(loss + 0.5 * (penalty * theta**2).sum() + 0.5 * theta[-1].sum() ** 2)

    theta = np.zeros((n_features, n_classes))
    for _ in range(MAX_NEWTON_STEPS):
        p = _softmax(features @ theta)
        grad = features.T @ (p - onehot) / n_samples + penalty * theta + pin * theta[-1].sum()
        weighted = (features[:, :, None] * p[:, None, :]).reshape(n_samples, size)
        blocks = (weighted.T @ features).reshape(n_features, n_classes, n_features)
        hessian = np.einsum("ikj,kl->ikjl", blocks, np.eye(n_classes)).reshape(size, size)
        hessian -= weighted.T @ weighted
        hessian /= n_samples
        hessian += np.diag(penalty.ravel())
        hessian += np.outer(pin.ravel(), pin.ravel())
        step = np.linalg.solve(hessian, grad.ravel()).reshape(n_features, n_classes)
        decrement = float(grad.ravel() @ step.ravel())
        if decrement / 2 < TOLERANCE:
            break
        current, t = objective(theta), 1.0
        while objective(theta - t * step) > current - 0.25 * t * decrement and t > 1e-10:
            t /= 2
        theta = theta - t * step
    return theta
