"""The statistics behind the report: bootstrap intervals of known cases, the paired comparison, and
McNemar's exact test on a known table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorline.ops import evaluation
from tensorline.ops.report import classification_report

CLASSES = ("normal", "nodule")


def test_all_correct_gives_one_one_for_every_score_even_when_a_resample_misses_a_class():
    truth = ["normal", "nodule", "normal"]  # 3 records: 2 of 27 resamples hold no nodule
    got = evaluation.intervals(truth, truth, CLASSES)
    assert got["accuracy"] == [1.0, 1.0] and got["f1_macro"] == [1.0, 1.0]
    assert got["per_class"] == {"normal": [1.0, 1.0], "nodule": [1.0, 1.0]}
    assert evaluation.intervals([], [], CLASSES) is None


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q, by hand."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_accuracy_interval_of_90_right_in_100_is_the_binomial_one():
    # Resampling 100 records of which 90 are right: the right ones drawn are Binomial(100, 0.9), so
    # the 95 % interval is its 2.5 % and 97.5 % quantiles over 100: [0.84, 0.95].
    truth = ["nodule"] * 50 + ["normal"] * 50
    pred = ["nodule"] * 45 + ["normal"] * 5 + ["normal"] * 45 + ["nodule"] * 5
    low, high = evaluation.intervals(truth, pred, CLASSES, resamples=20_000)["accuracy"]
    assert (binomial_quantile(100, 0.9, 0.025) / 100, binomial_quantile(100, 0.9, 0.975) / 100) == (0.84, 0.95)
    assert low == pytest.approx(0.84, abs=0.01) and high == pytest.approx(0.95, abs=0.01)


def test_scores_of_a_confusion_match_the_report_by_hand():
    truth = ["nodule", "nodule", "nodule", "normal", "normal"]
    pred = ["nodule", "nodule", "normal", "nodule", "normal"]
    t, p = evaluation.class_indices(truth, CLASSES), evaluation.class_indices(pred, CLASSES)
    confusion = np.bincount(t * 3 + p, minlength=9).reshape(3, 3)
    s = evaluation.scores(confusion, 2)
    rep = classification_report(truth, pred, CLASSES)
    assert s["accuracy"] == pytest.approx(rep["accuracy"]) == pytest.approx(0.6)
    assert s["f1"].tolist() == pytest.approx([0.5, 2 / 3])
    assert s["f1_macro"] == pytest.approx(rep["f1_macro"])


def test_the_same_seed_gives_the_same_interval_and_a_narrower_one_with_more_records():
    rng = np.random.default_rng(1)
    truth = [CLASSES[i] for i in rng.integers(0, 2, 400)]
    pred = [t if rng.random() < 0.85 else CLASSES[1 - CLASSES.index(t)] for t in truth]
    first = evaluation.intervals(truth, pred, CLASSES)
    assert first == evaluation.intervals(truth, pred, CLASSES)
    small = evaluation.intervals(truth[:100], pred[:100], CLASSES)
    width = lambda i: i["f1_macro"][1] - i["f1_macro"][0]  # noqa: E731
    assert width(first) < width(small)
    point = classification_report(truth, pred, CLASSES)["f1_macro"]
    assert first["f1_macro"][0] < point < first["f1_macro"][1]


def test_mcnemar_exact_on_a_known_table():
    # 1 record only a got right, 8 only b: p = 2 * (C(9,0) + C(9,1)) / 2^9 = 20/512.
    assert evaluation.mcnemar_exact(1, 8) == pytest.approx(20 / 512) == evaluation.mcnemar_exact(8, 1)
    assert evaluation.mcnemar_exact(0, 0) == 1.0 and evaluation.mcnemar_exact(5, 5) == 1.0
    assert evaluation.mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_paired_comparison_says_better_only_when_the_difference_is_clear():
    rng = np.random.default_rng(2)
    truth = [CLASSES[i] for i in rng.integers(0, 2, 600)]
    flip = lambda t, rate: [x if rng.random() >= rate else CLASSES[1 - CLASSES.index(x)] for x in t]  # noqa: E731
    good, poor = flip(truth, 0.05), flip(truth, 0.25)
    better = evaluation.paired(truth, good, poor, CLASSES)
    assert better["verdict"] == "better" and better["interval"][0] > 0 and better["mcnemar_p"] < 1e-6
    assert better["f1_macro_diff"] == pytest.approx(classification_report(truth, good, CLASSES)["f1_macro"]
                                                    - classification_report(truth, poor, CLASSES)["f1_macro"])
    assert evaluation.paired(truth, poor, good, CLASSES)["verdict"] == "worse"
    same = evaluation.paired(truth, good, good, CLASSES)
    assert (same["f1_macro_diff"], same["interval"], same["verdict"]) == (0.0, [0.0, 0.0], "not distinguishable")
    assert (same["only_a_right"], same["only_b_right"], same["mcnemar_p"]) == (0, 0, 1.0)
    # one record apart on 600: no verdict either way
    close = list(good)
    close[0] = truth[0] if good[0] != truth[0] else CLASSES[1 - CLASSES.index(truth[0])]
    assert evaluation.paired(truth, close, good, CLASSES)["verdict"] == "not distinguishable"
    with pytest.raises(ValueError, match="600 labels but 599"):
        evaluation.paired(truth, good[:-1], good, CLASSES)
