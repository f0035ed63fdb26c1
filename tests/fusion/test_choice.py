"""Choosing the fusion: folds grouped by source image, the one-standard-error rule, the
weighting shrunk toward it, and the linear forms a stacker file holds deciding as the strategies
they stand for."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


ORDER = ("soft_vote", "single", "weighted_average", "shrunk", "stacking")


def test_the_single_model_is_chosen_when_it_beats_every_fusion_on_every_fold():
    folds = {"soft_vote": [0.80, 0.85, 0.82], "single": [0.90, 0.93, 0.91], "weighted_average": [0.84, 0.86, 0.85],
             "shrunk": [0.88, 0.90, 0.89], "stacking": [0.86, 0.80, 0.83]}
    assert choice.choose(folds, ORDER) == "single"


def test_a_fitted_fusion_must_beat_the_simpler_ones_by_more_than_the_folds_noise():
    # shrunk is best on average (0.880 against 0.870) but loses a fold: the mean shortfall of the
    # soft vote (0.010) is within its standard error (std of [-0.02, 0.03, 0.02] / sqrt 3 = 0.0153)
    folds = {"soft_vote": [0.90, 0.85, 0.86], "single": [0.86, 0.84, 0.80], "weighted_average": [0.89, 0.86, 0.86],
             "shrunk": [0.88, 0.88, 0.88], "stacking": [0.87, 0.85, 0.85]}
    assert choice.choose(folds, ORDER) == "soft_vote"
    # the same gain on every fold is no noise: shrunk is chosen
    folds["soft_vote"] = [0.87, 0.87, 0.87]
    folds["weighted_average"] = [0.87, 0.86, 0.87]
    assert choice.choose(folds, ORDER) == "shrunk"


def test_a_tie_goes_to_the_simplest():
    assert choice.choose({c: [0.9, 0.8] for c in ORDER}, ORDER) == "soft_vote"
    assert choice.choose({c: [0.9, 0.8] for c in ORDER}, ORDER[::-1]) == "stacking"


def test_choose_needs_two_folds_for_every_candidate():
    with pytest.raises(ValueError, match="2 or more folds"):
        choice.choose({"a": [0.9], "b": [0.8]}, ("a", "b"))
    with pytest.raises(ValueError, match="2 or more folds"):
        choice.choose({"a": [0.9, 0.8], "b": [0.8]}, ("a", "b"))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.lists(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=k, max_size=k), min_size=1, max_size=5)))
def test_the_choice_is_the_first_candidate_within_one_standard_error_of_the_best(rows):
    order = tuple(f"c{i}" for i in range(len(rows)))
    folds = dict(zip(order, rows))
    chosen = choice.choose(folds, order)
    best = max(order, key=lambda c: np.mean(folds[c]))

    def within(c: str) -> bool:
        d = np.asarray(folds[best]) - np.asarray(folds[c])
        return d.mean() <= d.std(ddof=1) / np.sqrt(len(d))
    assert within(chosen)
    assert not any(within(c) for c in order[:order.index(chosen)])
    assert order.index(chosen) <= order.index(best)


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


@settings(deadline=None)  # arithmetic only; a busy machine is no failure
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
       st.data(), st.floats(0.0, 1.0))
def test_shrink_moves_a_weighting_toward_the_single_model(raw, data, amount):
    weights = {f"m{i}": w for i, w in enumerate(raw)}
    single = data.draw(st.sampled_from(sorted(weights)))
    total = sum(raw)
    got = choice.shrink(weights, single, amount)
    assert set(got) == set(weights) and min(got.values()) >= 0 and sum(got.values()) == pytest.approx(1.0)
    for m, w in weights.items():  # (1 - amount) * the normalised weighting + amount * the single model
        assert got[m] == pytest.approx((1 - amount) * (w / total) + (amount if m == single else 0.0))
    assert got[single] >= weights[single] / total - 1e-12  # never further from the single model
    assert choice.shrink(weights, single, 1.0) == {m: float(m == single) for m in weights}
    assert choice.shrink(weights, single, 0.0) == pytest.approx({m: w / total for m, w in weights.items()})


def test_shrink_keeps_subnormal_weights():
    # Found by the test above in a loop run: (1 - amount) * 5e-324 underflows to 0 before the
    # division by the total, and the weights summed to 0.5.
    assert choice.shrink({"a": 5e-324}, "a", 0.5) == {"a": 1.0}
    assert choice.shrink({"a": 5e-324, "b": 5e-324}, "b", 0.5) == {"a": 0.25, "b": 0.75}


def test_shrink_rejects_what_is_no_weighting():
    for weights, single, amount in (({"a": 1.0}, "a", 1.5), ({"a": 1.0}, "b", 0.5), ({"a": -1.0, "b": 2.0}, "b", 0.5),
                                    ({"a": 0.0}, "a", 0.5)):
        with pytest.raises(ValueError, match="shrink needs"):
            choice.shrink(weights, single, amount)


def test_the_best_amount_of_shrinkage_and_ties_toward_the_single_model():
    assert choice.best_amount(lambda a: -abs(a - 0.3)) == 0.3
    assert choice.best_amount(lambda a: 0.9) == 1.0  # nothing gained by fusing: the single model
    assert choice.best_amount(lambda a: 0.9 if a <= 0.5 else 0.8) == 0.5
    assert choice.best_amount(lambda a: a, amounts=(0.0, 0.25)) == 0.25


def test_a_shrunk_weighting_decides_as_weighted_average_with_its_weights():
    rng = np.random.default_rng(4)
    scores = rng.dirichlet([1, 1], (300, 3))
    names, classes = ("a", "b", "c"), ("x", "y")
    w = choice.shrink({"a": 0.2, "b": 0.5, "c": 0.3}, "a", 0.4)
    got = choice.linear_stacker(w, names, classes).predict_proba(scores, models=names).argmax(1).tolist()
    assert got == [weighted_average(s, [w[n] for n in names]).decision for s in scores]
