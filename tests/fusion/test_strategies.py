"""Fusion strategies: hand-computed cases and properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tensorline.fusion.strategies import (
    STRATEGIES,
    BadScores,
    fuse,
    majority_vote,
    max_confidence,
    soft_vote,
    threshold,
    weighted_average,
)

THREE = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])


# --- weighted_average -------------------------------------------------------------------------


def test_weighted_average_normalises_weights_and_ties_go_to_lowest_class():
    # Binary fractions, so the tie is exact in floating point.
    fused = weighted_average([[0.875, 0.125], [0.375, 0.625]], [1.0, 3.0])
    assert fused.scores.tolist() == [0.5, 0.5]
    assert fused.decision == 0


def test_weighted_average_by_hand():
    fused = weighted_average([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], [2.0, 6.0])
    np.testing.assert_allclose(fused.scores, [0.4, 0.3, 0.3])
    assert fused.decision == 0
    assert fused.scores.dtype == np.float64


def test_weighted_average_one_model_is_its_own_scores():
    row = [0.12, 0.33, 0.55]
    fused = weighted_average([row], [7.0])
    assert fused.scores.tolist() == row
    assert fused.decision == 2


def test_weighted_average_with_a_missing_model_uses_the_rows_passed():
    # Models a, b, c with weights 1, 2, 1; c is missing for this record.
    fused = weighted_average([[0.9, 0.1], [0.3, 0.7]], [1.0, 2.0])
    np.testing.assert_allclose(fused.scores, [0.5, 0.5])
    assert fused.decision == 0
    fused = weighted_average([[0.9, 0.1], [0.2, 0.8]], [1.0, 2.0])
    np.testing.assert_allclose(fused.scores, [1.3 / 3, 1.7 / 3])
    assert fused.decision == 1


def test_weighted_average_zero_weight_drops_a_row():
    fused = weighted_average([[0.9, 0.1], [0.3, 0.7]], [0.0, 5.0])
    np.testing.assert_allclose(fused.scores, [0.3, 0.7])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0], "negative"),
        ([0.0, 0.0], "all weights are zero"),
        ([1.0], "one entry per passed model row"),
        ([1.0, np.nan], "finite"),
    ],
)
def test_weighted_average_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average([[0.5, 0.5], [0.1, 0.9]], weights)


# --- soft_vote --------------------------------------------------------------------------------


def test_soft_vote_is_the_mean():
    fused = soft_vote(THREE)
    np.testing.assert_allclose(fused.scores, [1.3 / 3, 1.7 / 3])
    assert fused.decision == 1


def test_soft_vote_all_scores_equal():
    fused = soft_vote(np.full((3, 4), 0.25))
    assert fused.scores.tolist() == [0.25] * 4
    assert fused.decision == 0


# --- majority_vote ----------------------------------------------------------------------------


def test_majority_vote_counts_argmaxes():
    fused = majority_vote([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1]])
    assert fused.votes.tolist() == [1, 2, 0]
    np.testing.assert_allclose(fused.scores, [1 / 3, 2 / 3, 0.0])
    assert fused.decision == 1


def test_majority_vote_tie_broken_by_summed_score():
    fused = majority_vote([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    assert fused.votes.tolist() == [1, 1, 0]
    assert fused.decision == 1


def test_majority_vote_full_tie_goes_to_lowest_tied_class_not_an_unvoted_one():
    # Classes 0 and 1 tie on votes and sums; class 2 has the largest sum but no vote.
    fused = majority_vote([[0.5, 0.1, 0.4], [0.1, 0.5, 0.4]])
    assert fused.decision == 0


def test_majority_vote_all_scores_equal_and_one_model():
    fused = majority_vote(np.full((3, 4), 0.25))
    assert fused.votes.tolist() == [3, 0, 0, 0]
    assert fused.decision == 0
    fused = majority_vote([[0.1, 0.9]])
    assert fused.scores.tolist() == [0.0, 1.0]
    assert fused.decision == 1


# --- threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "k", "decision"),
    [("any", None, 0), ("all", None, 1), ("at_least", 1, 0), ("at_least", 2, 1), ("at_least", 4, 1)],
)
def test_threshold_modes(mode, k, decision):
    fused = threshold(THREE, positive_class=0, threshold=0.5, mode=mode, k=k)
    assert fused.decision == decision
    assert fused.votes.tolist() == [1, 2]
    np.testing.assert_allclose(fused.scores, [1 / 3, 2 / 3])


def test_threshold_is_inclusive_and_all_fires_when_every_model_agrees():
    fused = threshold([[0.5, 0.5], [0.9, 0.1]], positive_class=0, threshold=0.5, mode="all")
    assert fused.decision == 0
    assert fused.scores.tolist() == [1.0, 0.5]


def test_threshold_many_classes_falls_back_to_best_other_class():
    scores = [[0.3, 0.5, 0.2], [0.3, 0.1, 0.6]]
    assert threshold(scores, positive_class=0, threshold=0.4).decision == 2
    # The positive class has the highest mean, but the rule did not fire: tie among the others -> 1.
    scores = [[0.35, 0.33, 0.32], [0.35, 0.32, 0.33]]
    assert threshold(scores, positive_class=0, threshold=0.5).decision == 1


def test_threshold_positive_class_need_not_be_zero():
    fused = threshold(THREE, positive_class=1, threshold=0.75, mode="any")
    assert fused.decision == 1
    assert fused.votes.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"positive_class": 2, "threshold": 0.5}, "out of range"),
        ({"positive_class": 0, "threshold": float("nan")}, "finite"),
        ({"positive_class": 0, "threshold": 0.5, "mode": "most"}, "unknown mode"),
        ({"positive_class": 0, "threshold": 0.5, "mode": "at_least"}, "needs an integer k"),
        ({"positive_class": 0, "threshold": 0.5, "mode": "at_least", "k": 0}, "needs an integer k"),
        ({"positive_class": 0, "threshold": 0.5, "mode": "any", "k": 2}, "only used with mode 'at_least'"),
    ],
)
def test_threshold_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        threshold(THREE, **params)


def test_threshold_needs_two_classes():
    with pytest.raises(ValueError, match="at least two classes"):
        threshold([[1.0], [1.0]], positive_class=0, threshold=0.5)


# --- max_confidence ---------------------------------------------------------------------------


def test_max_confidence_tie_goes_to_lowest_row():
    fused = max_confidence([[0.6, 0.4], [0.1, 0.9], [0.9, 0.1]])
    assert fused.winner == 1
    assert fused.decision == 1
    assert fused.scores.tolist() == [0.1, 0.9]


def test_max_confidence_all_equal():
    fused = max_confidence(np.full((2, 3), 1 / 3))
    assert (fused.winner, fused.decision) == (0, 0)


# --- validation, registry, result --------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (np.zeros((0, 3)), "no models"),
        (np.zeros((2, 0)), "no classes"),
        ([0.2, 0.8], "2-D"),
        (np.zeros((1, 2, 2)), "2-D"),
        ([[0.2, np.nan], [0.5, 0.5]], r"NaN score at index \(0, 1\)"),
        ([[0.2, 0.8], [np.inf, 0.5]], r"infinite score at index \(1, 0\)"),
        ([[0.2, 0.8], [0.5]], "not a numeric array"),
    ],
)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_rejects_bad_scores(name, scores, match):
    params = {"weighted_average": {"weights": [1.0, 1.0]}, "threshold": {"positive_class": 0, "threshold": 0.5}}
    with pytest.raises(BadScores, match=match):
        fuse(name, scores, **params.get(name, {}))


def test_fuse_dispatches_and_rejects_unknown_names():
    assert fuse("threshold", THREE, positive_class=0, threshold=0.5, mode="all").decision == 1
    with pytest.raises(ValueError, match="unknown fusion strategy 'median'; valid: majority_vote, max_confidence"):
        fuse("median", THREE)


def test_fused_arrays_are_read_only():
    fused = majority_vote(THREE)
    with pytest.raises(ValueError):
        fused.scores[0] = 1.0
    with pytest.raises(ValueError):
        fused.votes[0] = 1


# --- properties -------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def scores_and_weights(draw, min_classes=1):
    n_models = draw(st.integers(1, 5))
    n_classes = draw(st.integers(min_classes, 5))
    scores = draw(arrays(np.float64, (n_models, n_classes), elements=st.floats(0, 1)))
    weights = draw(arrays(np.float64, n_models, elements=st.floats(0.01, 100)))
    return scores, weights


def _clear_top(values, gap=1e-9):
    """True when the largest value beats the runner-up by more than rounding."""
    top = np.sort(values)[::-1]
    return len(top) == 1 or top[0] - top[1] > gap


@PROPERTY
@given(scores_and_weights())
def test_equal_weights_is_soft_vote(case):
    scores, _ = case
    weighted = weighted_average(scores, np.full(len(scores), 2.5))
    soft = soft_vote(scores)
    np.testing.assert_allclose(weighted.scores, soft.scores, rtol=1e-12, atol=1e-15)
    if _clear_top(soft.scores):
        assert weighted.decision == soft.decision


@PROPERTY
@given(scores_and_weights())
def test_averages_stay_within_the_rows(case):
    scores, weights = case
    low, high = scores.min(axis=0) - 1e-12, scores.max(axis=0) + 1e-12
    for fused in (weighted_average(scores, weights), soft_vote(scores)):
        assert np.all((low <= fused.scores) & (fused.scores <= high))


@PROPERTY
@given(scores_and_weights(min_classes=2), st.randoms(use_true_random=False))
def test_row_order_does_not_change_the_result(case, random):
    scores, weights = case
    order = list(range(len(scores)))
    random.shuffle(order)
    pairs = [
        (weighted_average(scores, weights), weighted_average(scores[order], weights[order])),
        (soft_vote(scores), soft_vote(scores[order])),
        (majority_vote(scores), majority_vote(scores[order])),
        (
            threshold(scores, positive_class=1, threshold=0.5, mode="at_least", k=2),
            threshold(scores[order], positive_class=1, threshold=0.5, mode="at_least", k=2),
        ),
    ]
    for original, permuted in pairs:
        assert np.array_equal(original.scores, permuted.scores)
        assert original.decision == permuted.decision


@PROPERTY
@given(scores_and_weights())
def test_majority_vote_decides_some_models_argmax(case):
    scores, _ = case
    fused = majority_vote(scores)
    assert fused.decision in set(np.argmax(scores, axis=1).tolist())
    assert fused.votes.sum() == len(scores)
    assert fused.votes[fused.decision] == fused.votes.max()


@PROPERTY
@given(scores_and_weights(min_classes=2), st.floats(0, 1))
def test_threshold_modes_agree_with_at_least(case, level):
    scores, _ = case
    n = len(scores)
    run = lambda **kw: threshold(scores, positive_class=0, threshold=level, **kw).decision  # noqa: E731
    assert run(mode="any") == run(mode="at_least", k=1)
    assert run(mode="all") == run(mode="at_least", k=n)
    assert run(mode="at_least", k=n + 1) != 0
    assert (run(mode="any") == 0) == bool((scores[:, 0] >= level).any())


@PROPERTY
@given(scores_and_weights())
def test_max_confidence_returns_a_row_holding_the_global_max(case):
    scores, _ = case
    fused = max_confidence(scores)
    assert fused.scores.tolist() == scores[fused.winner].tolist()
    assert fused.scores.max() == scores.max()
    assert fused.scores[fused.decision] == scores.max()
