"""features and detection stages with small real Keras models, run by the runtime in memory."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.config import parse
from tensorline.schemas import Record, decode_detection, decode_record, encode_record
from tensorline.engine.plugins import load_stage
from tensorline.engine.runtime import Message, Worker, header
from tensorline.engine.testing import MemorySink, MemorySource


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8)])
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    backbone.save(folder / "backbone.keras")
    head.save(folder / "head.keras")
    # Heads whose scores are the same for every input (a zero kernel, the bias alone): scores that
    # are not probabilities, as issue 11 saw them fused (5/-2, 100/0), and sigmoid scores 0.9/0.9.
    for name, bias, activation in (("minus", [5, -2], None), ("hundred", [100, 0], None),
                                   ("sigmoid", [2.1972246, 2.1972246], "sigmoid")):
        constant = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation=activation)])
        constant.layers[-1].set_weights([np.zeros((8, 2), np.float32), np.array(bias, np.float32)])
        constant.save(folder / f"{name}.keras")
    return folder


def pipeline(folder, classes=("normal", "nodule"), fusion=None, **features_params):
    heads = {name: {"path": str(folder / f"{name}.keras"), "input": "embedding"}
             for name in ("minus", "hundred", "sigmoid")}
    return parse({
        "pipeline": {"name": "m", "classes": list(classes)},
        "topics": {"pre": {}, "feat": {}, "det": {}, "res": {}},
        "stages": {
            "features": {"input": "pre", "output": "feat", "params": features_params,
                         "models": {"backbone": {"path": str(folder / "backbone.keras")}}},
            "detection": {"input": "feat", "output": "det",
                          "models": {"head": {"path": str(folder / "head.keras"), "input": "embedding", "version": "3"},
                                     **heads}},
        },
        **({"fusion": {"input": "det", "output": "res", **fusion}} if fusion else {}),
    })


def msg(i: int, image: np.ndarray) -> Message:
    r = Record(record_id=f"r{i}", source="s", ingest_ts_ms=7, tensors={"image": image}, stage="preprocess",
               label="nodule")
    return Message("m.pre", 0, i, b"study-1", bytes(encode_record(r)), [], 0)


def run(stage, messages):
    sink = MemorySink()
    Worker(stage, MemorySource(messages), sink, output_topic="out", dlq_topic="dlq",
           max_batch=8, max_delay_ms=0).run(until_idle_s=0)
    return sink


def test_features_then_detection_keyed_by_record_id(models):
    cfg = pipeline(models)
    rng = np.random.default_rng(0)
    feats = run(load_stage(cfg, "features"), [msg(i, rng.standard_normal((16, 16, 1)).astype(np.float32)) for i in range(5)])
    records = [decode_record(o.value) for o in feats.topic("out")]
    assert [r.tensors["embedding"].shape for r in records] == [(8,)] * 5
    assert records[0].model.name == "backbone" and records[0].tensors["image"].shape == (16, 16, 1)

    det_messages = [Message("m.feat", 0, i, o.key, o.value, o.headers, 0) for i, o in enumerate(feats.topic("out"))]
    dets = run(load_stage(cfg, "detection", "head"), det_messages)
    outs = dets.topic("out")
    assert [o.key for o in outs] == [f"r{i}".encode() for i in range(5)]
    decoded = [decode_detection(o.value) for o in outs]
    assert all(d.model.name == "head" and d.model.version == "3" and d.label == "nodule" for d in decoded)
    assert all(abs(sum(d.scores) - 1) < 1e-5 and d.classes == ("normal", "nodule") for d in decoded)
    assert header(outs[0].headers, "tl.features.produced_ms") is not None  # the trace goes on


def test_wrong_input_shape_is_a_dead_letter_naming_model_and_shapes(models):
    cfg = pipeline(models)
    good, bad = np.zeros((16, 16, 1), np.float32), np.zeros((20, 16, 1), np.float32)
    sink = run(load_stage(cfg, "features"), [msg(0, good), msg(1, bad), msg(2, good)])
    assert len(sink.topic("out")) == 2
    [dead] = sink.topic("dlq")
    reason = header(dead.headers, "tl.dlq.message").decode()
    assert "[20, 16, 1]" in reason and "backbone" in reason and "[16, 16, 1]" in reason


def test_class_count_mismatch_fails_at_start(models):
    with pytest.raises(ValueError, match="gives 2 scores.*names 3"):
        load_stage(pipeline(models, classes=("a", "b", "c")), "detection", "head")


def test_missing_model_file_names_the_path(models, tmp_path):
    cfg = pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="backbone.keras"):
        load_stage(cfg, "features")


def test_a_saved_model_folder_serves_like_a_keras_file(models, tmp_path):
    import keras

    from tensorline.config import ModelConfig
    from tensorline.stages.base import Model

    keras.saving.load_model(models / "head.keras").export(tmp_path / "head_savedmodel")
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    from_file = Model(ModelConfig("head", str(models / "head.keras"), input="embedding"))
    from_folder = Model(ModelConfig("head", str(tmp_path / "head_savedmodel"), input="embedding"))
    np.testing.assert_allclose(from_folder(x), from_file(x), rtol=1e-5, atol=1e-6)


def test_features_keep_forwards_only_the_named_input_tensors(models):
    image = np.ones((16, 16, 1), np.float32)
    r = Record(record_id="r0", source="s", ingest_ts_ms=7, tensors={"image": image, "mask": image}, stage="preprocess")
    message = Message("m.pre", 0, 0, b"k", bytes(encode_record(r)), [], 0)
    [kept] = run(load_stage(pipeline(models, keep=["mask"]), "features"), [message]).topic("out")
    assert sorted(decode_record(kept.value).tensors) == ["embedding", "mask"]
    [alone] = run(load_stage(pipeline(models, keep=[]), "features"), [message]).topic("out")
    assert sorted(decode_record(alone.value).tensors) == ["embedding"]
    with pytest.raises(ValueError, match="params.keep: expected a list of tensor names"):
        load_stage(pipeline(models, keep="image"), "features")


def test_the_traced_model_call_equals_keras_eager_call(models):
    import keras

    from tensorline.config import ModelConfig
    from tensorline.stages.base import Model

    x = np.random.default_rng(4).standard_normal((5, 16, 16, 1)).astype(np.float32)
    eager = keras.saving.load_model(models / "backbone.keras")(x, training=False)
    traced = Model(ModelConfig("backbone", str(models / "backbone.keras")))
    np.testing.assert_allclose(traced(x), np.asarray(eager), rtol=1e-5, atol=1e-6)
    assert traced(x[:1]).shape == (1, 8)  # one graph for every batch size


# --- issue 11, finding 6: garbage in, no confident answer out -------------------------------------


def feat_msg(i: int, embedding: np.ndarray) -> Message:
    r = Record(record_id=f"r{i}", source="s", ingest_ts_ms=7, tensors={"embedding": embedding}, stage="features")
    return Message("m.feat", 0, i, b"study-1", bytes(encode_record(r)), [], 0)


def reasons(sink) -> dict[int, tuple[str, str]]:
    """DLQ offset -> (reason, message) of every dead letter."""
    return {int(header(d.headers, "tl.dlq.offset")): (header(d.headers, "tl.dlq.reason").decode(),
                                                       header(d.headers, "tl.dlq.message").decode())
            for d in sink.topic("dlq")}


def test_a_nan_embedding_never_reaches_the_detection_model(models):
    stage = load_stage(pipeline(models), "detection", "head")
    rows = []
    call = stage.model._call
    stage.model._call = lambda x: rows.append(len(x)) or call(x)
    good = np.ones(8, np.float32)
    sink = run(stage, [feat_msg(0, good), feat_msg(1, np.full(8, np.nan, np.float32)), feat_msg(2, good)])
    assert [o.key for o in sink.topic("out")] == [b"r0", b"r2"] and sum(rows) == 2
    [(reason, message)] = reasons(sink).values()
    assert reason == "non_finite" and "record r1" in message and "'embedding'" in message


def test_features_giving_a_non_finite_embedding_is_a_dead_letter_naming_it(models):
    # 3e38 is a finite float32; the backbone's sums overflow it to Inf and NaN.
    huge = np.full((16, 16, 1), 3e38, np.float32)
    sink = run(load_stage(pipeline(models), "features"), [msg(0, np.zeros((16, 16, 1), np.float32)), msg(1, huge)])
    assert len(sink.topic("out")) == 1
    [(reason, message)] = reasons(sink).values()
    assert reason == "non_finite" and "record r1" in message and "'embedding'" in message


@pytest.mark.parametrize("model, shown", [("minus", "[ 5. -2.]"), ("hundred", "[100.   0.]")])
def test_detection_scores_outside_zero_one_are_not_probabilities(models, model, shown):
    sink = run(load_stage(pipeline(models), "detection", model), [feat_msg(i, np.ones(8, np.float32)) for i in range(3)])
    assert sink.topic("out") == []
    found = reasons(sink)
    assert sorted(found) == [0, 1, 2] and all(r == "not_probabilities" for r, _ in found.values())
    assert f"model {model}" in found[1][1] and "record r1" in found[1][1] and shown in found[1][1]


def test_a_softmax_model_whose_rows_do_not_sum_to_one_is_refused_but_sigmoid_rows_need_not(models):
    softmax = load_stage(pipeline(models), "detection", "head")
    assert softmax.kind == "softmax"
    softmax.model._call = lambda x: np.full((len(x), 2), 0.9, np.float32)  # what a real softmax cannot give
    sink = run(softmax, [feat_msg(0, np.ones(8, np.float32))])
    [(reason, message)] = reasons(sink).values()
    assert reason == "not_probabilities" and "summing to 1.8" in message
    sigmoid = load_stage(pipeline(models), "detection", "sigmoid")
    assert sigmoid.kind == "sigmoid"
    [out] = run(sigmoid, [feat_msg(0, np.ones(8, np.float32))]).topic("out")
    assert decode_detection(out.value).scores == pytest.approx((0.9, 0.9), abs=1e-6)


def test_a_sigmoid_model_feeding_a_softmax_fusion_fails_at_start(models):
    fusion = {"expected_models": ["sigmoid"]}
    with pytest.raises(ValueError, match="ends in a sigmoid, fusion.scores is softmax"):
        load_stage(pipeline(models, fusion=fusion), "detection", "sigmoid")
    load_stage(pipeline(models, fusion={**fusion, "scores": "sigmoid"}), "detection", "sigmoid")


def test_a_saved_model_giving_the_wrong_number_of_scores_is_not_probabilities(models, tmp_path):
    import keras

    keras.saving.load_model(models / "head.keras").export(tmp_path / "head_savedmodel")
    cfg = parse({"pipeline": {"name": "m", "classes": ["a", "b", "c"]}, "topics": {"feat": {}, "det": {}},
                 "stages": {"detection": {"input": "feat", "output": "det", "models": {
                     "head": {"path": str(tmp_path / "head_savedmodel"), "input": "embedding"}}}}})
    stage = load_stage(cfg, "detection")  # a SavedModel does not show its output shape until called
    sink = run(stage, [feat_msg(i, np.ones(8, np.float32)) for i in range(2)])
    assert sink.topic("out") == []
    found = reasons(sink)
    assert sorted(found) == [0, 1] and all(r == "not_probabilities" for r, _ in found.values())
    assert "gives 2 scores, pipeline.classes names 3" in found[0][1]
