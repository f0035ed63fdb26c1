"""Stacking: learning, the missing-model contract, and save/load."""

import json

import numpy as np
import pytest

from tensorline.fusion.stacking import VERSION, MissingModel, fit_stacker, load_stacker
from tensorline.fusion.strategies import BadScores

MODELS = ("a", "b")
CLASSES = ("normal", "benign", "malignant")


def _noisy(rows, rng):
    """Mix rows with Dirichlet noise, keeping them on the simplex."""
    return 0.8 * rows + 0.2 * rng.dirichlet(np.ones(rows.shape[-1]), size=rows.shape[0])


def complementary(n, seed):
    """Model a separates class 0 but guesses between 1 and 2; model b separates 2 but guesses 0/1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    q = rng.uniform(size=n)
    a = np.where((y == 0)[:, None], [0.9, 0.05, 0.05], np.stack([np.full(n, 0.04), 0.96 * q, 0.96 * (1 - q)], 1))
    b = np.where((y == 2)[:, None], [0.05, 0.05, 0.9], np.stack([0.96 * q, 0.96 * (1 - q), np.full(n, 0.04)], 1))
    return np.stack([_noisy(a, rng), _noisy(b, rng)], axis=1), y


def relabelled(n, seed):
    """Both models are right, but each reports the classes in its own rotated order."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    onehot = np.eye(3)[y]
    x = np.stack([_noisy(np.roll(onehot, 1, axis=1), rng), _noisy(np.roll(onehot, 2, axis=1), rng)], axis=1)
    return x, y


def accuracy(probabilities, y):
    return float((np.argmax(probabilities, axis=-1) == y).mean())


@pytest.fixture(scope="module")
def fitted():
    x, y = complementary(3000, seed=1)
    return fit_stacker(x, y, model_names=MODELS, classes=CLASSES)


def test_learns_a_separable_problem_the_fixed_rules_cannot():
    x, y = relabelled(1000, seed=2)
    stacker = fit_stacker(x, y, model_names=MODELS, classes=CLASSES)
    x_test, y_test = relabelled(1000, seed=3)
    assert accuracy(stacker.predict_proba(x_test, models=MODELS), y_test) >= 0.95
    assert accuracy(x_test.mean(axis=1), y_test) < 0.05  # soft vote reads the rotated columns


def test_two_noisy_models_with_different_errors_beat_each_alone(fitted):
    x, y = complementary(3000, seed=4)
    alone = [accuracy(x[:, m], y) for m in range(2)]
    assert max(alone) < 0.8
    stacked = accuracy(fitted.predict_proba(x, models=MODELS), y)
    assert stacked >= 0.95
    assert stacked > accuracy(x.mean(axis=1), y) + 0.1


def test_probabilities_and_batching(fitted):
    x, _ = complementary(50, seed=5)
    batch = fitted.predict_proba(x, models=MODELS)
    assert batch.shape == (50, 3)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0)
    single = np.stack([fitted.predict_proba(record, models=MODELS) for record in x])
    np.testing.assert_allclose(single, batch, rtol=1e-12)


def test_rows_are_matched_by_model_name(fitted):
    x, _ = complementary(20, seed=6)
    swapped = fitted.predict_proba(x[:, ::-1], models=("b", "a"))
    assert np.array_equal(swapped, fitted.predict_proba(x, models=MODELS))


def test_a_missing_model_raises_missing_model_naming_it(fitted):
    x, _ = complementary(1, seed=7)
    with pytest.raises(MissingModel, match="model\\(s\\) a;") as caught:
        fitted.predict_proba(x[0, 1:], models=("b",))
    assert caught.value.missing == ("a",)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("rows", "models", "error", "match"),
    [
        (slice(None), ("a", "c"), ValueError, "not fitted on model\\(s\\) \\['c'\\]"),
        (slice(None), ("a", "a"), ValueError, "duplicate"),
        (slice(None), ("a",), ValueError, "2 score rows but 1 model names"),
    ],
)
def test_predict_rejects_mislabelled_rows(fitted, rows, models, error, match):
    x, _ = complementary(1, seed=8)
    with pytest.raises(error, match=match) as caught:
        fitted.predict_proba(x[0, rows], models=models)
    assert not isinstance(caught.value, MissingModel)


def test_predict_rejects_bad_scores(fitted):
    with pytest.raises(BadScores, match="2 classes, stacker has 3"):
        fitted.predict_proba(np.full((2, 2), 0.5), models=MODELS)
    with pytest.raises(BadScores, match="NaN"):
        fitted.predict_proba([[0.5, np.nan, 0.5], [0.2, 0.3, 0.5]], models=MODELS)
    with pytest.raises(BadScores, match="2-D or batched 3-D"):
        fitted.predict_proba(np.zeros(3), models=MODELS)


def test_fit_is_deterministic():
    x, y = complementary(500, seed=9)
    first = fit_stacker(x, y, model_names=MODELS, classes=CLASSES)
    second = fit_stacker(x, y, model_names=MODELS, classes=CLASSES)
    assert np.array_equal(first.weights, second.weights)
    assert np.array_equal(first.bias, second.bias)


def test_fit_records_its_sample_count():
    x, y = complementary(10_000, seed=10)
    stacker = fit_stacker(x, y, model_names=MODELS, classes=CLASSES)
    assert stacker.n_samples == 10_000


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"y": np.zeros(30, dtype=int)}, "no training samples for class\\(es\\) \\['benign', 'malignant'\\]"),
        ({"y": np.full(30, 3)}, "outside 0..2"),
        ({"y": np.zeros(30)}, "integer class indices"),
        ({"l2": 0.0}, "l2 must be positive"),
        ({"model_names": ("a",)}, "model_names must be 2 distinct strings"),
        ({"classes": ("x", "x", "y")}, "classes must be 3 distinct strings"),
    ],
)
def test_fit_rejects_bad_input(change, match):
    x, y = complementary(30, seed=11)
    arguments = {"y": y, "model_names": MODELS, "classes": CLASSES} | change
    with pytest.raises(ValueError, match=match):
        fit_stacker(x, **arguments)


def test_save_load_round_trip_gives_identical_predictions(fitted, tmp_path):
    path = tmp_path / "stacker.json"
    fitted.save(path)
    loaded = load_stacker(path, model_names=("b", "a"), classes=CLASSES)
    x, _ = complementary(200, seed=12)
    assert np.array_equal(loaded.predict_proba(x, models=MODELS), fitted.predict_proba(x, models=MODELS))
    document = json.loads(path.read_text())
    assert document["version"] == VERSION
    assert document["model_names"] == list(MODELS)
    assert document["n_samples"] == 3000
    assert document["l2"] == fitted.l2
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("models", "classes", "match"),
    [
        (("a", "c"), CLASSES, "missing \\['c'\\], unexpected \\['b'\\]"),
        (MODELS, ("normal", "malignant", "benign"), "classes .* do not match"),
    ],
)
def test_load_rejects_a_stacker_fitted_on_other_models_or_classes(fitted, tmp_path, models, classes, match):
    path = tmp_path / "stacker.json"
    fitted.save(path)
    with pytest.raises(ValueError, match=match):
        load_stacker(path, model_names=models, classes=classes)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"version": VERSION + 1}, "not a tensorline.stacker file of version"),
        ({"bias": [0.0, 0.0]}, "malformed stacker file: .*do not fit"),
        ({"weights": None}, "malformed stacker file"),
    ],
)
def test_load_rejects_malformed_files(fitted, tmp_path, edit, match):
    path = tmp_path / "stacker.json"
    fitted.save(path)
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ValueError, match=match):
        load_stacker(path, model_names=MODELS, classes=CLASSES)
