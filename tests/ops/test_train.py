"""Training the demo models: a one-epoch run on a few patches writes every model, card and the
stacker where the pipeline file says, the pipeline's own stages load and run them, and `ensure`
trains only what is missing."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tensorline import config
from tensorline.fusion.stacking import load_stacker
from tensorline.ops import train
from tensorline.producers import demo_data
from tensorline.schemas import Record
from tensorline.engine.plugins import load_stage
from tensorline.stages.base import Model

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline.toml"
FAST = {"epochs": 1, "limit": 120}  # patches per split: a few seconds, both classes in each split


def pipeline_in(folder: Path, strategy: str | None = None) -> config.PipelineConfig:
    """The repository's pipeline.toml with every model file (and the stacker) under `folder`."""
    cfg = config.load(PIPELINE)
    stages = {name: dataclasses.replace(s, models=tuple(dataclasses.replace(m, path=str(folder / Path(m.path).name))
                                                        for m in s.models))
              for name, s in cfg.stages.items()}
    fusion = dataclasses.replace(cfg.fusion, strategy=strategy or cfg.fusion.strategy,
                                 params={**cfg.fusion.params, "path": str(folder / "stacker.json")})
    return dataclasses.replace(cfg, stages=stages, fusion=fusion)


def model_configs(cfg: config.PipelineConfig) -> list[config.ModelConfig]:
    return [*cfg.stages["features"].models, *cfg.stages["detection"].models]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[config.PipelineConfig, dict]:
    cfg = pipeline_in(tmp_path_factory.mktemp("models"))
    return cfg, train.train(cfg, **FAST)


def test_every_model_has_its_file_and_card(trained):
    cfg, result = trained
    for m in model_configs(cfg):
        assert Path(m.path).is_file(), m.path
        card = json.loads(train.card_path(m).read_text())
        assert (card["name"], card["version"]) == (m.name, m.version)
        assert card["inputs"][0]["name"] == m.input and card["inputs"][0]["dtype"] == "float32"
        assert card["training"]["seed"] == 7 and card["training"]["epochs"] == 1
        assert card["training"]["splits"] == {"train": 120, "val": 120, "test": 120}
        assert "synthetic Gaussian blobs" in card["training"]["data"]
        for split in ("val", "test"):
            scores = card["scores"][split]
            assert 0.0 <= scores["accuracy"] <= 1.0 and scores["records"] == 120
            assert set(scores["per_class"]) == set(cfg.classes)
        assert card == result["models"][m.name]
    assert [c["outputs"]["classes"] for n, c in result["models"].items() if n != "backbone"] == [list(cfg.classes)] * 3


def test_the_stacker_and_fusion_numbers_are_written(trained):
    cfg, result = trained
    stacker = load_stacker(train.stacker_path(cfg), model_names=cfg.fusion.expected_models, classes=cfg.classes)
    assert stacker.n_samples == 240  # val's 120 and train's 120, cross-fitted
    assert set(result["fusion"]) == {*train.FUSION_STRATEGIES, "shrunk", "single", "chosen"}
    written = json.loads((train.stacker_path(cfg).parent / "fusion.card.json").read_text())
    assert written["strategies"] == result["fusion"]
    assert written["best_on_val"] in (*train.FUSION_STRATEGIES, "shrunk")
    assert written["chosen"] in (*train.HELD_BY_A_STACKER, f"single: {written['best_single_on_val']}")
    assert written["shrunk"]["toward"] == written["best_single_on_val"] and 0 <= written["shrunk"]["amount"] <= 1
    # chosen by cross-validation, grouped by source image, over the records held out from the
    # models that scored them: val's and train's (cross-fitted)
    cv = written["cross_validation"]
    images = result["models"]["cnn"]["training"]["source_images"]
    assert cv["source_images"] == sorted(images["train"] + images["val"])
    assert cv["records"] == {"train, cross-fitted": 120, "val": 120}
    assert (cv["by"], cv["folds"]) == ("source image", train.STACKER_FOLDS)


def test_the_pipeline_stages_load_the_models_with_their_shapes(trained):
    cfg, _ = trained
    backbone = Model(cfg.model("features", None))
    assert (backbone.input_shape, backbone.output_shape) == ((64, 64, 1), (train.EMBEDDING_DIM,))
    for m in cfg.stages["detection"].models:
        model = Model(m)
        expected_input = (train.EMBEDDING_DIM,) if m.input == "embedding" else (64, 64, 1)
        assert (model.input_shape, model.output_shape) == (expected_input, (len(cfg.classes),)), m.name


def test_one_demo_patch_runs_through_preprocess_features_and_each_detection_model(trained):
    cfg, result = trained
    split = demo_data.build()["test"]
    raw = Record(record_id="r0", source="demo", ingest_ts_ms=0, tensors={"image": split.images[0]}, stage="raw",
                 attributes=split.attrs[0], label=str(split.labels[0]))
    records = load_stage(cfg, "features").process(load_stage(cfg, "preprocess").process([raw]))
    assert records[0].tensors["embedding"].shape == (train.EMBEDDING_DIM,)
    # The models read different views of the image: the repository's pipeline configures three.
    assert {"image_full", "image_equalized", "image_local"} <= set(records[0].tensors)
    assert len({m.input for m in model_configs(cfg)} - {"embedding"}) == 3
    for m in cfg.stages["detection"].models:
        detection = load_stage(cfg, "detection", m.name).process(records)[0]
        assert detection.classes == cfg.classes and sum(detection.scores) == pytest.approx(1.0, abs=1e-5)


def test_ensure_trains_only_what_is_missing_and_the_same_seed_gives_the_same_models(tmp_path, capsys, caplog):
    cfg = pipeline_in(tmp_path, strategy="stacking")
    assert train.stacker_path(cfg) in train.required_files(cfg)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        train.ensure(cfg, own=tmp_path, **FAST)
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "over 13 held-out images (val and train, cross-fitted)" in err
    # the demo's screen: no TensorFlow warning (its retracing one, from the cross-fitted models)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tensorflow")] == []
    files = train.required_files(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    cards = {m.name: train.card_path(m).read_text() for m in model_configs(cfg)}

    train.ensure(cfg, own=tmp_path, **FAST)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert capsys.readouterr().err == ""

    Path(cfg.model("detection", "blob").path).unlink()
    train.ensure(cfg, own=tmp_path, **FAST)
    assert "blob.keras is missing" in capsys.readouterr().err
    assert {m.name: train.card_path(m).read_text() for m in model_configs(cfg)} == cards


@pytest.mark.parametrize("sigma", train.BLOB_SIGMAS[1:-1])
def test_the_blob_filters_answer_a_bright_blob_most_at_its_own_scale_and_a_flat_patch_not_at_all(sigma):
    bank = train.log_filters()[:, :, 0, :]
    assert bank.shape == (train.BLOB_KERNEL, train.BLOB_KERNEL, len(train.BLOB_SIGMAS))
    np.testing.assert_allclose(bank.sum((0, 1)), 0, atol=1e-6)
    np.testing.assert_allclose(np.abs(bank).sum((0, 1)), 1, atol=1e-5)
    r = np.arange(train.BLOB_KERNEL) - train.BLOB_KERNEL // 2
    blob = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    at_centre = (bank * blob[..., None]).sum((0, 1))  # each filter's response at the blob's centre
    assert at_centre.argmax() == train.BLOB_SIGMAS.index(sigma) and at_centre.max() > 0
    assert ((bank * -blob[..., None]).sum((0, 1)) < 0).all()  # a dark blob answers negative


def test_the_blob_detector_applies_the_filters_in_1d_passes_with_the_same_result():
    import keras
    import tensorflow as tf

    images = np.random.default_rng(3).standard_normal((4, 64, 64, 1)).astype(np.float32)
    whole = tf.nn.conv2d(images, train.log_filters(), 1, "SAME").numpy()
    column, row, sums = train.separable_log_filters()
    passes = tf.nn.conv2d(tf.nn.depthwise_conv2d(tf.nn.conv2d(images, column, 1, "SAME"), row, (1, 1, 1, 1), "SAME"),
                          sums, 1, "SAME").numpy()
    np.testing.assert_allclose(passes, whole, atol=1e-5)
    model = train._blob(config.load(PIPELINE), images)  # the same filters, wired into the model
    bank = keras.Model(model.input, model.get_layer("log_filters").output)
    np.testing.assert_allclose(bank(images).numpy(), whole, atol=1e-5)


def test_rewindowed_attrs_are_narrower_windows_inside_each_patch(tmp_path):
    split = demo_data.build()["val"]
    attrs = train.rewindowed_attrs(split, np.random.default_rng(0))
    for image, before, after in zip(split.images[:50], split.attrs[:50], attrs[:50]):
        values = image * float(before.get("rescale_slope", 1)) + float(before.get("rescale_intercept", 0))
        lo, hi = np.percentile(values, train.WINDOW_PERCENTILES)
        assert lo <= float(after["window_center"]) <= hi
        assert 0 < float(after["window_width"]) <= train.WINDOW_WIDTH[1] * (hi - lo) + 1e-3
        assert {k: v for k, v in after.items() if not k.startswith("window_")} == \
               {k: v for k, v in before.items() if not k.startswith("window_")}


@pytest.mark.parametrize("stage, name, tensor", [("detection", "cnn", "image"), ("detection", "logreg", "image_full"),
                                                  ("features", "backbone", "embedding")])
def test_a_model_input_the_pipeline_does_not_give_it_is_rejected_before_training(tmp_path, stage, name, tensor):
    cfg = pipeline_in(tmp_path)  # the preprocess views are "full", "equalized" and "local": no "image"
    models = tuple(dataclasses.replace(m, input=tensor) if m.name == name else m for m in cfg.stages[stage].models)
    stages = {**cfg.stages, stage: dataclasses.replace(cfg.stages[stage], models=models)}
    with pytest.raises(ValueError, match=f"stages.{stage}.models.{name}.input"):
        train.train(dataclasses.replace(cfg, stages=stages))
    assert not any(tmp_path.iterdir())


def test_a_detection_model_without_a_recipe_is_rejected_before_training(tmp_path):
    cfg = pipeline_in(tmp_path)
    svm = config.ModelConfig("svm", str(tmp_path / "svm.keras"), input="embedding")
    stages = {**cfg.stages, "detection": dataclasses.replace(cfg.stages["detection"], models=(svm,))}
    with pytest.raises(ValueError, match="no training recipe for svm"):
        train.train(dataclasses.replace(cfg, stages=stages))
    assert not any(tmp_path.iterdir())


@pytest.fixture
def trainer(monkeypatch) -> list[config.PipelineConfig]:
    """`train.train` replaced by a recorder: the pipelines it would have trained."""
    calls: list[config.PipelineConfig] = []
    summary = {"seconds": 0.0, "configured": "stacking", "chosen": "stacking",
               "cross_validation": {"source_images": ["a", "b"], "records": {"val": 2}}}
    monkeypatch.setattr(train, "train", lambda cfg, **kw: calls.append(cfg) or {"summary": summary})
    return calls


def with_model_path(cfg: config.PipelineConfig, name: str, path: Path) -> config.PipelineConfig:
    models = tuple(dataclasses.replace(m, path=str(path)) if m.name == name else m for m in cfg.stages["detection"].models)
    return dataclasses.replace(cfg, stages={**cfg.stages, "detection": dataclasses.replace(cfg.stages["detection"],
                                                                                          models=models)})


def write_all(cfg: config.PipelineConfig) -> None:
    for path in train.written_files(cfg):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"trained before")


def test_the_demo_trains_into_its_own_folder_when_a_model_there_is_missing(tmp_path, trainer):
    own = tmp_path / ".tensorline" / "models"
    cfg = pipeline_in(own, strategy="stacking")
    assert [key for key, _ in train.untrained(cfg, own=own)] == [
        "stages.features.models.backbone.path", "stages.detection.models.cnn.path",
        "stages.detection.models.logreg.path", "stages.detection.models.blob.path", "fusion.params.path"]
    train.ensure(cfg, own=own)
    assert trainer == [cfg]
    write_all(cfg)
    train.ensure(cfg, own=own)
    assert train.untrained(cfg, own=own) == [] and trainer == [cfg]  # nothing missing: no training


def test_a_model_missing_outside_the_demo_folder_is_an_error_and_nothing_is_trained(tmp_path, trainer):
    own = tmp_path / ".tensorline" / "models"
    mine = tmp_path / "mine" / "cnn.keras"
    cfg = with_model_path(pipeline_in(own, strategy="stacking"), "cnn", mine)
    with pytest.raises(config.MissingFile) as err:
        train.ensure(cfg, own=own)
    assert err.value.key == "stages.detection.models.cnn.path" and str(mine) in str(err.value)
    assert trainer == []


def test_the_demo_never_overwrites_a_model_outside_its_folder(tmp_path, trainer):
    own = tmp_path / ".tensorline" / "models"
    mine = tmp_path / "mine" / "blob.keras"
    cfg = with_model_path(pipeline_in(own, strategy="stacking"), "blob", mine)
    write_all(cfg)
    Path(cfg.model("detection", "cnn").path).unlink()  # a demo model is missing, the user's blob is not
    with pytest.raises(config.ConfigError) as err:
        train.ensure(cfg, own=own)
    assert err.value.key == "stages.detection.models.cnn.path" and f"overwrite '{mine}'" in str(err.value)
    assert trainer == [] and mine.read_bytes() == b"trained before"


def test_the_demo_checks_its_models_before_it_starts_anything(tmp_path, monkeypatch, trainer):
    from tensorline.ops import broker, demo, topics

    pipeline = PIPELINE.read_text().replace(".tensorline/models/cnn.keras", str(tmp_path / "mine" / "cnn.keras"))
    (tmp_path / "pipeline.toml").write_text(pipeline)
    monkeypatch.chdir(tmp_path)

    def started(*args, **kw):
        raise AssertionError("the demo started before checking its models")
    for module, name in ((broker, "start"), (broker, "local_bootstrap"), (topics, "reset")):
        monkeypatch.setattr(module, name, started)
    with pytest.raises(config.MissingFile, match="stages.detection.models.cnn.path"):
        demo.main("pipeline.toml")
    assert trainer == []


def test_cross_fitting_scores_each_training_record_once_by_models_that_never_saw_its_image(monkeypatch):
    cfg = config.load(PIPELINE)
    names = [m.name for m in cfg.stages["detection"].models]
    sources = np.repeat([f"img{i}" for i in range(7)], 5)
    ids = np.arange(len(sources), dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    split = train.Tensors({"image_x": ids}, np.zeros(len(sources), np.int64), sources)
    trained: list[set[str]] = []  # each fold's training images

    def fake_train(cfg, views, y, epochs, seed):
        seen = {sources[int(i)] for i in views["image_x"]["mix_a"][:, 0, 0, 0]}
        assert len(y) == len(views["image_x"]["plain"]) == len(views["image_x"]["mix_a"])
        trained.append(seen)
        return seen  # stands in for the fold's models

    def fake_scores(cfg, models, images):
        held = {sources[int(i)] for i in images["image_x"][:, 0, 0, 0]}
        assert not held & models, "a record scored by a model trained on its image"
        return {n: np.full((len(images["image_x"]), len(cfg.classes)), len(trained), np.float32) for n in names}

    monkeypatch.setattr(train, "_train_models", fake_train)
    monkeypatch.setattr(train, "_scores", fake_scores)
    out = train._cross_fit(cfg, {"image_x": {"plain": ids, "mix_a": ids}}, split, {}, 7, 5)
    assert out.shape == (len(sources), len(names), len(cfg.classes)) and len(trained) == 5
    # each image left out of exactly one fold, and each record scored by that fold's models
    assert all(sum(image not in t for t in trained) == 1 for image in set(sources))
    fold_of = {image: next(k for k, t in enumerate(trained, 1) if image not in t) for image in set(sources)}
    assert out[:, 0, 0].tolist() == [fold_of[image] for image in sources]
    # no folds, or one image: nothing to cross-fit
    assert train._cross_fit(cfg, {}, split, {}, 7, 1) is None
    one = train.Tensors({"image_x": ids}, np.zeros(len(sources), np.int64), np.full(len(sources), "img0"))
    assert train._cross_fit(cfg, {}, one, {}, 7, 5) is None


NAMES, VERSIONS = ("a", "b", "c"), {"a": "1", "b": "1", "c": "1"}


def hand_made(rng: np.random.Generator, n: int, right: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels, and each model's scores (n, 3 models, 2 classes): model m right on a share right[m] of
    the records, with a confidence drawn in [0.6, 1)."""
    y = rng.integers(0, 2, n)
    columns = []
    for name in NAMES:
        correct = rng.random(n) < right[name]
        p_true = rng.uniform(0.6, 1.0, n)
        p_nodule = np.where(correct == (y == 1), p_true, 1 - p_true)
        columns.append(np.stack([1 - p_nodule, p_nodule], 1))
    return y, np.stack(columns, 1)


def choose(cfg, y, scores, groups):
    half = len(y) // 2
    return train.choose_fusion(cfg, NAMES, VERSIONS, {"val": scores[:half], "test": scores[half:]},
                               {"val": y[:half], "test": y[half:]}, groups[:half], seed=0)


def test_the_fallback_passes_the_single_model_through_when_fusion_loses_on_validation():
    cfg = config.load(PIPELINE)
    rng = np.random.default_rng(0)
    y, scores = hand_made(rng, 800, {"a": 1.0, "b": 0.55, "c": 0.55})  # a is always right: nothing beats it
    groups = np.repeat(["img1", "img2", "img3", "img4"], 200)
    fusion, summary = choose(cfg, y, scores, groups)
    assert fusion["soft_vote"]["val"]["f1_macro"] < fusion["single"]["val"]["f1_macro"] == 1.0
    assert summary["chosen"] == "single: a" and summary["best_single_on_val"] == "a"
    # shrinking toward a gains nothing from b and c: the shrunk weighting is a alone, and no win
    assert summary["shrunk"] == {"toward": "a", "amount": 1.0, "weights": {"a": 1.0, "b": 0.0, "c": 0.0}}
    cv = summary["cross_validation"]
    assert (cv["by"], cv["folds"], cv["source_images"]) == ("source image", 2, ["img1", "img2"])
    assert cv["f1_macro_by_fold"]["single"] == [1.0, 1.0] and max(cv["f1_macro_by_fold"]["soft_vote"]) < 0.9
    # the stacker file decides as model a does, through the fusion stage's own combine
    assert fusion["chosen"]["test"]["f1_macro"] == fusion["single"]["test"]["f1_macro"] == 1.0
    held = summary["stacker_object"]
    assert held.predict_proba(scores[400:], models=NAMES).argmax(1).tolist() == scores[400:, 0].argmax(1).tolist()
    versus = summary["test_vs_best_single"]  # the file is model a: no difference on test
    assert (versus["model"], versus["f1_macro_diff"], versus["verdict"]) == ("a", 0.0, "not distinguishable")


def test_a_fusion_that_beats_every_model_out_of_fold_is_chosen():
    cfg = config.load(PIPELINE)
    rng = np.random.default_rng(1)
    y, scores = hand_made(rng, 2000, {"a": 0.8, "b": 0.8, "c": 0.8})  # independent errors: voting helps
    fusion, summary = choose(cfg, y, scores, np.repeat(["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"], 250))
    assert summary["chosen"] in train.HELD_BY_A_STACKER and summary["cross_validation"]["folds"] == 4
    assert fusion[summary["chosen"]]["val"]["f1_macro"] > fusion["single"]["val"]["f1_macro"] + 0.05
    assert fusion["chosen"]["test"]["f1_macro"] > max(fusion["single"]["test"]["f1_macro"], 0.85)
    assert summary["test_vs_best_single"]["verdict"] == "better" and summary["test_vs_best_single"]["interval"][0] > 0


def test_train_seeds_trains_each_model_seed_on_the_same_data_into_a_scratch_folder(monkeypatch, tmp_path, capsys):
    cfg = pipeline_in(tmp_path)
    calls = []

    def fake_train(c, *, seed, data_seed, epochs, limit, show):
        calls.append((seed, data_seed, limit, c.model("detection", "cnn").path))
        f1 = {"cnn": 0.90 + seed / 1000, "logreg": 0.85, "blob": 0.80}
        models = {n: {"scores": {"test": {"f1_macro": v}}, "training": {"seed": seed}} for n, v in f1.items()}
        fused = 0.93 if seed == 7 else 0.908
        return {"models": models, "fusion": {"chosen": {"test": {"f1_macro": fused}, "val": {"f1_macro": 0.9}},
                                             "single": {"test": {"f1_macro": f1["cnn"]}, "val": {"f1_macro": 0.9}}},
                "summary": {"chosen": "stacking" if seed == 7 else "single: cnn", "best_single_on_val": "cnn"}}
    monkeypatch.setattr(train, "train", fake_train)
    out = train.train_seeds(cfg, 2, seed=7, limit=50)
    assert [c[:3] for c in calls] == [(7, 7, 50), (8, 7, 50)]
    assert all(not c[3].startswith(str(tmp_path)) for c in calls)  # never the pipeline's own files
    rows = out["per_seed"]
    assert [r["gain"] for r in rows] == pytest.approx([0.93 - 0.907, 0.0])
    assert [r["chosen"] for r in rows] == ["stacking", "single: cnn"]
    s = out["over_seeds"]
    assert s["gain"]["mean"] == pytest.approx((0.023 + 0.0) / 2) and s["gain"]["min"] == pytest.approx(0.0)
    assert s["chosen"] == {"single: cnn": 1, "stacking": 1} and s["best_single"]["mean"] == pytest.approx(0.9075)
    printed = capsys.readouterr().out
    assert "gain over the best single model +0.012 mean, +0.000 min" in printed
