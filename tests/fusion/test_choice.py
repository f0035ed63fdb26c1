"""Choosing the fusion: folds grouped by source image, the fallback to the single model, and the
linear forms a stacker file holds deciding as the strategies they stand for."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.fusion import choice
from tensorline.fusion.strategies import soft_vote, weighted_average


@pytest.mark.parametrize("seed", range(20))
def test_grouped_folds_never_put_a_source_image_on_both_sides(seed):
    rng = np.random.default_rng(seed)
    groups = rng.choice([f"image{i}" for i in range(rng.integers(2, 12))], rng.integers(20, 300))
    n_folds = int(rng.integers(2, 7))
    folds = choice.grouped_folds(groups, n_folds)
    assert len(folds) == len(groups)
    for g in set(groups):
        assert len(set(folds[groups == g])) == 1, g  # every record of an image in one fold
    assert len(set(folds)) == min(n_folds, len(set(groups)))  # every fold holds something


def test_grouped_folds_balance_records_and_need_two_groups():
    groups = ["a"] * 60 + ["b"] * 50 + ["c"] * 40 + ["d"] * 10
    folds = choice.grouped_folds(groups, 2)
    assert np.bincount(folds).tolist() == [70, 90]  # a, then b, c to the lighter fold (b's), d to a's
    assert choice.grouped_folds(["x", "y", "x"], 5).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="2 or more groups"):
        choice.grouped_folds(["x", "x"], 5)


def test_the_fallback_is_the_single_model_unless_a_fusion_beats_it():
    fusions = ("stacking", "soft_vote", "weighted_average")
    assert choice.choose({"stacking": 0.90, "soft_vote": 0.88, "weighted_average": 0.91, "single": 0.92},
                         fusions) == "single"
    assert choice.choose({"stacking": 0.92, "soft_vote": 0.88, "weighted_average": 0.91, "single": 0.92},
                         fusions) == "single"  # a tie is not a win
    assert choice.choose({"stacking": 0.90, "soft_vote": 0.95, "weighted_average": 0.93, "single": 0.92},
                         fusions) == "soft_vote"


def test_linear_stackers_decide_as_the_strategies_they_stand_for():
    rng = np.random.default_rng(3)
    scores = rng.dirichlet([1, 1, 1], (500, 3))  # 500 records, 3 models, 3 classes
    names, classes = ("a", "b", "c"), ("x", "y", "z")
    w = {"a": 0.5, "b": 0.2, "c": 0.3}
    expected = {
        "equal": [soft_vote(s).decision for s in scores],
        "weighted": [weighted_average(s, [w[n] for n in names]).decision for s in scores],
        "b alone": scores[:, 1].argmax(1).tolist(),
    }
    for key, weights in (("equal", dict.fromkeys(names, 1.0)), ("weighted", w), ("b alone", {"b": 1.0})):
        stacker = choice.linear_stacker(weights, names, classes)
        got = stacker.predict_proba(scores, models=names).argmax(1).tolist()
        assert got == expected[key], key
    with pytest.raises(ValueError, match="one positive"):
        choice.linear_stacker({}, names, classes)
