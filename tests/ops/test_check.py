"""`tensorline check`: the pipeline file, each model's shapes against the tensors the pipeline gives
it, the stacker against the expected models, and the topics on the real broker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorline import cli
from tensorline.ops import check

CLASSES = ("normal", "nodule")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Keras models: a backbone on 16x16 images (8-d embedding), heads on the image and on
    the embedding, and ones that do not fit (a 32x32 image, a 4-d embedding, three scores); two
    stackers, for cnn+mlp and for cnn+other."""
    import keras

    from tensorline.fusion.stacking import fit_stacker

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    layers = keras.layers

    def image_head(size: int, classes: int = 2):
        return keras.Sequential([keras.Input((size, size, 1)), layers.Conv2D(2, 3), layers.GlobalAveragePooling2D(),
                                 layers.Dense(classes, activation="softmax")])

    saved = {
        "backbone": keras.Sequential([keras.Input((16, 16, 1)), layers.Conv2D(4, 3, activation="relu"),
                                      layers.GlobalAveragePooling2D(), layers.Dense(8)]),
        "cnn": image_head(16),
        "cnn32": image_head(32),
        "cnn3": image_head(16, 3),
        "mlp": keras.Sequential([keras.Input((8,)), layers.Dense(2, activation="softmax")]),
        "mlp4": keras.Sequential([keras.Input((4,)), layers.Dense(2, activation="softmax")]),
    }
    for name, model in saved.items():
        model.save(folder / f"{name}.keras")
    rng = np.random.default_rng(0)
    scores = rng.dirichlet((1, 1), size=(40, 2))
    y = np.arange(40) % 2
    for name, fitted in (("stacker", ("cnn", "mlp")), ("other-stacker", ("cnn", "other"))):
        fit_stacker(scores, y, model_names=fitted, classes=CLASSES).save(folder / f"{name}.json")
    return folder


def body(folder, *, size: int = 16, cnn: str = "cnn", mlp: str = "mlp", stacker: str = "stacker",
         expected: str = '"cnn", "mlp"', detections: int = 2) -> str:
    """The pipeline file after its [pipeline] name and bootstrap: raw -> preprocess (two views) ->
    features (backbone on the full view) -> detection (cnn on the equalised view, mlp on the
    embedding) -> fusion by the stacker."""
    return f'''classes = ["normal", "nodule"]
[topics]
raw = {{ partitions = 2 }}
pre = {{ partitions = 2 }}
feat = {{ partitions = 2 }}
det = {{ partitions = {detections} }}
res = {{ partitions = 2 }}
dlq = {{ partitions = 1 }}
[stages.preprocess]
input = "raw"
output = "pre"
params = {{ size = {size}, views = ["full", "equalized"] }}
[stages.features]
input = "pre"
output = "feat"
[stages.features.models.backbone]
path = "{folder}/backbone.keras"
input = "image_full"
[stages.detection]
input = "feat"
output = "det"
[stages.detection.models.cnn]
path = "{folder}/{cnn}.keras"
input = "image_equalized"
[stages.detection.models.mlp]
path = "{folder}/{mlp}.keras"
input = "embedding"
[fusion]
input = "det"
output = "res"
expected_models = [{expected}]
strategy = "stacking"
params = {{ path = "{folder}/{stacker}.json" }}
'''


@pytest.fixture
def offline(tmp_path):
    """Write a pipeline file with no broker to check (its topics are left out)."""
    def write(text: str):
        path = tmp_path / "pipeline.toml"
        path.write_text(f'[pipeline]\nname = "offline"\n{text}')
        return path
    return write


def errors(report: check.Report) -> dict[str, str]:
    return {r.key: r.message for r in report.results if r.status == check.ERROR}


def test_a_clean_pipeline_passes_with_its_topics_on_the_broker(models, write_pipeline, tmp_path, capsys):
    path = tmp_path / "pipeline.toml"
    write_pipeline(path, body(models))
    assert cli.main(["check", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("check ok:") and not [line for line in lines if line.startswith("error")]
    by_key = {line.split(": ")[1]: line for line in lines[:-1]}
    assert by_key["stages.features.models.backbone.input"].startswith("ok")
    assert "'image_full' [16, 16, 1]" in by_key["stages.features.models.backbone.input"]
    assert "'embedding' [8]" in by_key["stages.detection.models.mlp.input"]
    assert by_key["stages.detection.models.cnn.scores"].startswith("ok")
    assert "stacker fitted on cnn, mlp" in by_key["fusion.params.path"]
    # Every topic, the fusion changelog too, and its co-partitioning with the detections.
    assert all(by_key[f"topics.{k}"].startswith("ok") for k in ("raw", "pre", "feat", "det", "res", "dlq"))
    assert "co-partitioned" in by_key["topics.fusion-changelog"]

    assert cli.main(["check", "-c", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["counts"]["error"] == 0 and doc["file"] == str(path)
    assert all(set(c) == {"status", "file", "key", "message"} for c in doc["checks"])


def test_a_model_whose_input_shape_does_not_match_is_caught(models, offline, capsys):
    path = offline(body(models, cnn="cnn32"))
    report = check.check(path, topics=False)
    assert not report.ok
    assert errors(report) == {"stages.detection.models.cnn.input": (
        f"model cnn ({models}/cnn32.keras) expects input [32, 32, 1], tensor 'image_equalized' is [16, 16, 1] (stage preprocess, view 'equalized', params.size = 16): "
        "every record would be a dead letter (bad_shape)")}
    assert cli.main(["check", "-c", str(path), "--no-topics"]) == 1
    out = capsys.readouterr().out
    assert f"error {path}: stages.detection.models.cnn.input: model cnn" in out
    assert out.splitlines()[-1].startswith("check FAILED: ")


def test_the_preprocess_size_and_the_embedding_size_are_checked_against_the_models(models, offline):
    report = check.check(offline(body(models, size=32, mlp="mlp4")), topics=False)
    found = errors(report)
    assert set(found) == {"stages.features.models.backbone.input", "stages.detection.models.cnn.input",
                          "stages.detection.models.mlp.input"}
    assert "tensor 'image_full' is [32, 32, 1] (stage preprocess, view 'full', params.size = 32)" \
        in found["stages.features.models.backbone.input"]
    assert "expects input [4], tensor 'embedding' is [8] (stage features's embedding)" \
        in found["stages.detection.models.mlp.input"]


def test_a_detection_model_must_give_one_score_per_class(models, offline):
    found = errors(check.check(offline(body(models, cnn="cnn3")), topics=False))
    assert found == {"stages.detection.models.cnn.scores": (
        f"model cnn ({models}/cnn3.keras) gives 3 scores (output [3]), pipeline.classes names 2 (normal, nodule)")}


def test_a_stacker_fitted_for_other_models_is_caught(models, offline):
    found = errors(check.check(offline(body(models, stacker="other-stacker")), topics=False))
    assert list(found) == ["fusion.params.path"]
    assert "stacker models ['cnn', 'other'] do not match the pipeline's ['cnn', 'mlp']" in found["fusion.params.path"]
    assert "missing ['mlp'], unexpected ['other']" in found["fusion.params.path"]


def test_expected_models_must_be_the_detection_models_fusion_reads(models, offline):
    found = errors(check.check(offline(body(models, expected='"cnn", "vit"', stacker="other-stacker")),
                               topics=False))
    assert "'vit': no detection stage writing topic 'det' serves it (served there: cnn, mlp)" \
        in found["fusion.expected_models"]
    assert "lacks 'mlp': each of them would be a dead letter (unknown_model)" in found["stages.detection.models.mlp"]


def test_a_missing_model_file_and_a_config_typo_are_errors_naming_file_and_key(models, offline, tmp_path, capsys):
    report = check.check(offline(body(models, mlp="gone")), topics=False)
    assert list(errors(report)) == ["stages.detection.models.mlp.path"]
    assert "no such file" in errors(report)["stages.detection.models.mlp.path"]

    path = offline(body(models).replace("[stages.features]\n", "[stages.features]\nmax_bacth = 4\n"))
    assert cli.main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"error {path}: stages.features.max_bacth: unknown key (did you mean 'max_batch'?)")


def test_topics_are_checked_against_the_broker(models, write_pipeline, kafka_bootstrap, tmp_path):
    from kafka.admin import NewPartitions

    from tensorline import config
    from tensorline.engine import clients

    path = tmp_path / "pipeline.toml"
    cfg = write_pipeline(path, body(models))
    admin = clients.admin(cfg)
    try:  # the detections grow a partition their changelog does not have; res goes
        admin.create_partitions({cfg.topic("det").name: NewPartitions(3)})
        admin.delete_topics([cfg.topic("res").name])
    finally:
        admin.close()
    found = errors(check.check(path))
    assert found["topics.det"] == f"topic {cfg.topic('det').name} has 3 partitions, the pipeline file says 2"
    assert found["topics.res"].startswith(f"topic {cfg.topic('res').name} does not exist on {kafka_bootstrap}")
    assert "(2 partitions) and" in found["topics.fusion-changelog"] and "are not co-partitioned" \
        in found["topics.fusion-changelog"]
    assert set(found) == {"topics.det", "topics.res", "topics.fusion-changelog"}
    assert config.load(path).name == cfg.name


def test_without_a_reachable_broker_the_topics_are_not_checked(models, offline, monkeypatch):
    from tensorline.ops import broker

    monkeypatch.delenv("TENSORLINE_BOOTSTRAP", raising=False)
    path = offline(body(models).replace('classes = ', f'bootstrap = "127.0.0.1:{broker.free_port()}"\nclasses = '))
    report = check.check(path)
    assert report.ok
    (topics,) = [r for r in report.results if r.key == "topics"]
    assert topics.status == check.SKIP and "no broker reachable at 127.0.0.1:" in topics.message


def test_preprocess_params_are_checked_and_a_plugin_stage_leaves_its_tensors_unknown(models, offline):
    found = errors(check.check(offline(body(models).replace('"full", "equalized"', '"full", "equalised"')),
                               topics=False))
    assert list(found) == ["stages.preprocess.params.views"]
    assert "expected a list of distinct views among window, full, equalized" in found["stages.preprocess.params.views"]

    plugin = body(models).replace('[stages.features]\n', '[stages.features]\nkind = "json:JSONDecoder"\n')
    report = check.check(offline(plugin), topics=False)
    assert report.ok
    status = {r.key: (r.status, r.message) for r in report.results}
    assert status["stages.features.kind"][0] == check.OK
    assert status["stages.detection.models.mlp.input"] == (
        check.SKIP, "tensor 'embedding' not checked: stage features (plugin json:JSONDecoder) writes topic 'feat', "
                    "what it carries is not knowable here")
