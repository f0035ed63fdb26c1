"""Training of the demo's models: the features backbone, each detection model, and the stacker.

The tensors come from the real preprocess stage run on the demo set's patches, so the models
see exactly what the pipeline will feed them. The models differ by input: each image model (the
backbone, the CNN, the blob detector) reads the preprocess view its config names ("image" the
DICOM window, "image_full" the whole range, "image_equalized" the equalised histogram,
"image_local" the local contrast), the MLP and the logistic model read the backbone's embedding.
They differ by kind too: the CNNs learn their filters, the blob detector's are fixed
(Laplacian-of-Gaussian at the lesions' scales) and only its small head learns, so it does not
learn the training images' anatomy and its errors are not the CNNs'. The window view alone also
gets an augmentation: a re-windowed copy of the training patches (preprocessed under random narrower windows, which
clip parts of a patch as the held-out CT windows do); the backbone and the CNN train on
complementary half-and-half mixes of plain and re-windowed patches, the MLP on the embeddings
of the plain ones, the logistic model on those of the backbone's mix. Every model gets a card
with its held-out scores, and each fusion strategy is scored offline through the fusion stage's
own `combine`.

The fusion is chosen on every record the models did not train on besides test: val's, scored by
the final models, and train's, cross-fitted (scored by models trained the same way on the other
folds of the training images, `_cross_fit`): 13 source images in the demo set, where val alone
has 3. The choice is by cross-validation grouped by source image (no image both fitted on and
scored), by record when those records hold a single image; the fusion card says which. Whatever
is fitted there must earn its place: of the candidates the stacker file can hold (the soft vote,
the best single model passed through, a weighting, that weighting shrunk toward the best single
model, a fitted stacker), the file holds the simplest that the folds cannot tell from the best by
more than one standard error (`choose_fusion`, `fusion.choice`). `train_seeds` repeats the whole
training under several model seeds, to show how much of a gain is the seed's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorline import config
from tensorline.config import ModelConfig, PipelineConfig
from tensorline.fusion import choice
from tensorline.fusion.stacking import Stacker, fit_stacker
from tensorline.fusion.stage import combine
from tensorline.ops import evaluation
from tensorline.ops.report import classification_report
from tensorline.producers import demo_data
from tensorline.schemas import Detection, ModelRef, Record
from tensorline.stages.preprocess import VIEWS, Preprocess

# The strategies scored offline; "threshold" is left out: it needs hand-picked parameters.
FUSION_STRATEGIES = ("soft_vote", "weighted_average", "majority_vote", "max_confidence", "stacking")
STRATEGIES_NEEDING_A_FILE = frozenset({"stacking"})
# The demo's own folder (pipeline.toml's default model paths): the only place `tensorline demo`
# trains into on its own; a model missing anywhere else is the user's, and an error.
DEMO_MODEL_DIR = Path(".tensorline/models")
LESIONS = "lesions are synthetic Gaussian blobs implanted in real DICOM images"
EMBEDDING_DIM = 64
# Validation accuracy is flat after a few epochs (seed 7); the training loss keeps falling, so
# more epochs only fit the training images better. The dense heads are cheap.
EPOCHS = {"backbone": 10, "cnn": 10, "mlp": 20, "logreg": 20, "blob": 20}
BATCH = 64
# Records per preprocess call: the stage's own micro-batch size would also do, this is faster.
PREPROCESS_CHUNK = 256
# Re-drawn windows: width 10-60 % of the patch's 5th-95th percentile range, centre inside it.
WINDOW_WIDTH = (0.1, 0.6)
WINDOW_PERCENTILES = (5, 95)
# Folds of the cross-validation that chooses the fusion on the held-out records: at most this many,
# never more than their source images (each image is in one fold).
STACKER_FOLDS = 5
# Folds of the training images for cross-fitting: each training record is also scored by models
# trained without its source image, so the fusion is chosen on train's 10 images as well as val's
# 3 (three images ranked the candidates by their own quirks). Five folds train each model on four
# fifths of the images, near what the final models see; the cost is five more trainings.
CROSSFIT_FOLDS = 5
# What the stacker file (fusion.strategy = "stacking", the demo's) can hold: a fitted stacker, or a
# weighting that is linear in the scores; else the best single model passed through.
HELD_BY_A_STACKER = ("stacking", "soft_vote", "weighted_average", choice.SHRUNK)
# The file's candidates by how much each fits on val, least first, for the one-standard-error rule
# (`choice.choose`): the soft vote fits nothing; the single model, the pick of one model; the
# weighting, a weight per model; the shrunk weighting, those and an amount; the stacker, a matrix.
SIMPLEST_FIRST = ("soft_vote", choice.SINGLE, "weighted_average", choice.SHRUNK, "stacking")


@dataclass(frozen=True)
class Tensors:
    """One split as the pipeline sees it: each preprocessed view (N, size, size, 1) by tensor name,
    and class indices."""

    images: Mapping[str, np.ndarray]
    labels: np.ndarray
    sources: np.ndarray


@dataclass(frozen=True)
class Arch:
    """How one configured model is built and trained: on an image tensor (`input` "image": any
    preprocess view) or on the embedding; `view` names its training images ("mix_a", "mix_b" or
    "plain"; only the window view has mixes, the others train on their plain patches)."""

    build: Callable[[PipelineConfig, np.ndarray], Any]
    input: str
    view: str
    description: str
    learning_rate: float  # Adam's: the dense heads (few weights on fixed features) take larger steps


def _dense_head(units: int | None) -> Callable[[PipelineConfig, np.ndarray], Any]:
    def build(cfg: PipelineConfig, x_train: np.ndarray) -> Any:
        import keras
        from keras import layers

        inputs = keras.Input((EMBEDDING_DIM,), name="embedding")
        # Standardised with the training embeddings' mean and variance, saved in the model.
        x = layers.Normalization(mean=x_train.mean(0), variance=x_train.var(0) + 1e-6, name="standardize")(inputs)
        if units:
            x = layers.Dense(units, activation="relu")(x)
            x = layers.Dropout(0.2)(x)
        outputs = layers.Dense(len(cfg.classes), activation="softmax",
                               kernel_regularizer=keras.regularizers.l2(1e-3), name="scores")(x)
        return keras.Model(inputs, outputs, name="mlp" if units else "logreg")
    return build


def _conv_stack(x: Any) -> Any:
    """Four small conv layers and a global max: a blob anywhere in the patch lights one position."""
    from keras import layers

    x = layers.Conv2D(16, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    return layers.GlobalMaxPooling2D()(x)


def _cnn(cfg: PipelineConfig, x_train: np.ndarray) -> Any:
    import keras
    from keras import layers

    inputs = keras.Input((_size(cfg), _size(cfg), 1), name="image")
    x = layers.Dropout(0.3)(_conv_stack(inputs))
    return keras.Model(inputs, layers.Dense(len(cfg.classes), activation="softmax", name="scores")(x), name="cnn")


# The blob detector's filters: Laplacian-of-Gaussian scales (pixels), about the lesions' sizes.
BLOB_SIGMAS = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0)
BLOB_KERNEL = 31  # taps per side: 2.5 sigma either side of the widest scale
# Of each side, the margin where no lesion is centred: the demo implants them in the middle half
# of a patch (centres a quarter of the side from each edge), so responses nearer the edge than
# 3/16 of the side are anatomy (edges, bright spots) cut by the patch, not a lesion.
BLOB_MARGIN = 3 / 16


def log_filters(sigmas: Sequence[float] = BLOB_SIGMAS, taps: int = BLOB_KERNEL) -> np.ndarray:
    """A bank of scale-normalised Laplacian-of-Gaussian filters (taps, taps, 1, len(sigmas)), sign
    flipped so a bright blob of that scale answers positive; each sums to 0 (a flat patch answers
    0) and has absolute sum 1."""
    r = np.arange(taps) - taps // 2
    q = (r[:, None] ** 2 + r[None, :] ** 2)[..., None] / (2 * np.asarray(sigmas, np.float64) ** 2)
    f = (1 - q) * np.exp(-q)
    f -= f.mean((0, 1))
    f /= np.abs(f).sum((0, 1))
    return f[:, :, None, :].astype(np.float32)


def separable_log_filters(sigmas: Sequence[float] = BLOB_SIGMAS,
                          taps: int = BLOB_KERNEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`log_filters` as 1-D passes: (1 - q) e^-q, q = (x² + y²) / 2σ², is g(x)g(y) - h(x)g(y) -
    g(x)h(y) with g(t) = e^(-t²/2σ²) and h(t) = t²/2σ² g(t), and its mean over the window is a
    box 1(x)1(y); so four terms a scale, each a column pass then a row pass, summed with weights
    (1, -1, -1, -mean) over the absolute sum. Returns the column kernels (taps, 1, 1, 4S), the row
    kernels for a depthwise pass (1, taps, 4S, 1) and the sums (1, 1, 4S, S): 2 * taps + 4 products
    a pixel and term instead of taps²."""
    r = (np.arange(taps) - taps // 2).astype(np.float64)
    columns, rows, sums = [], [], np.zeros((4 * len(sigmas), len(sigmas)))
    for k, sigma in enumerate(sigmas):
        t = r ** 2 / (2 * sigma ** 2)
        g, h, box = np.exp(-t), t * np.exp(-t), np.ones(taps)
        columns += [g, h, g, box]
        rows += [g, g, h, box]
        f = np.outer(g, g) - np.outer(h, g) - np.outer(g, h)
        mean = f.mean()
        sums[4 * k:4 * k + 4, k] = np.array([1.0, -1.0, -1.0, -mean]) / np.abs(f - mean).sum()
    return (np.stack(columns, -1)[:, None, None, :].astype(np.float32),
            np.stack(rows, -1)[None, :, :, None].astype(np.float32), sums[None, None].astype(np.float32))


def _blob(cfg: PipelineConfig, x_train: np.ndarray) -> Any:
    """A scale-space blob detector: fixed Laplacian-of-Gaussian filters, of each scale the largest
    and the mean response (bright and dark) inside the margin, standardised, then a small dense
    head. Nothing in it learns what anatomy looks like, so its errors are not the CNNs'."""
    import keras
    from keras import layers

    size = _size(cfg)
    inputs = keras.Input((size, size, 1), name="image")
    fixed = {"padding": "same", "use_bias": False, "trainable": False}
    passes = [layers.Conv2D(4 * len(BLOB_SIGMAS), (BLOB_KERNEL, 1), name="log_columns", **fixed),
              layers.DepthwiseConv2D((1, BLOB_KERNEL), name="log_rows", **fixed),
              layers.Conv2D(len(BLOB_SIGMAS), 1, name="log_filters", **fixed)]
    x = inputs
    for layer in passes:
        x = layer(x)
    for layer, kernel in zip(passes, separable_log_filters()):
        layer.set_weights([kernel])
    response = layers.Cropping2D(round(size * BLOB_MARGIN))(x)
    bright, dark = layers.ReLU()(response), layers.ReLU()(layers.Rescaling(-1.0)(response))
    features = layers.Concatenate(name="blob_features")(
        [pool()(r) for pool in (layers.GlobalMaxPooling2D, layers.GlobalAveragePooling2D) for r in (bright, dark)])
    measured = _predict(keras.Model(inputs, features), x_train)
    x = layers.Normalization(mean=measured.mean(0), variance=measured.var(0) + 1e-6, name="standardize")(features)
    x = layers.Dropout(0.2)(layers.Dense(32, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(len(cfg.classes), activation="softmax", name="scores")(x), name="blob")


def _backbone(cfg: PipelineConfig, x_train: np.ndarray) -> tuple[Any, Any]:
    """The backbone (image -> embedding) and the classifier it is trained inside (head dropped)."""
    import keras
    from keras import layers

    inputs = keras.Input((_size(cfg), _size(cfg), 1), name="image")
    embedding = layers.Dense(EMBEDDING_DIM, activation="relu", name="embedding")(_conv_stack(inputs))
    head = layers.Dense(len(cfg.classes), activation="softmax", name="scores")(layers.Dropout(0.3)(embedding))
    return keras.Model(inputs, embedding, name="backbone"), keras.Model(inputs, head, name="backbone_training")


BACKBONE = Arch(_backbone, "image", "mix_a", "conv stack (4 layers, global max) -> Dense 64 ReLU; trained "
                "under a softmax head, the head then dropped", 1e-3)
DETECTORS: Mapping[str, Arch] = {
    "cnn": Arch(_cnn, "image", "mix_b", "conv stack (4 layers, global max) -> dropout -> softmax", 1e-3),
    "mlp": Arch(_dense_head(32), "embedding", "plain", "standardize -> Dense 32 ReLU -> dropout -> softmax", 3e-3),
    "logreg": Arch(_dense_head(None), "embedding", "mix_a", "standardize -> softmax (L2 1e-3)", 3e-3),
    "blob": Arch(_blob, "image", "plain", "Laplacian-of-Gaussian filters (fixed, 6 scales) -> max and mean "
                 "response inside the margin -> standardize -> Dense 32 ReLU -> dropout -> softmax", 3e-3),
}
# The window view's tensor, the one view with a re-windowed augmentation.
WINDOW_TENSOR = VIEWS["window"]


def _size(cfg: PipelineConfig) -> int:
    return int(cfg.stages["preprocess"].params.get("size", 64))


# -- data ----------------------------------------------------------------------------------------
def preprocess(cfg: PipelineConfig, split: demo_data.Split, name: str,
               attrs: Sequence[Mapping[str, str]] | None = None) -> Tensors:
    """The split through the pipeline's own preprocess stage (with `attrs` replacing the patches' own)."""
    stage = Preprocess(cfg, cfg.stages["preprocess"], None)
    attrs = split.attrs if attrs is None else attrs
    records = [Record(record_id=f"{name}-{i}", source=str(src), ingest_ts_ms=0,
                      tensors={"image": image.astype(a.get("dtype", image.dtype))}, stage="raw",
                      attributes=dict(a), label=str(label))
               for i, (image, src, a, label) in enumerate(zip(split.images, split.source_ids, attrs, split.labels))]
    outputs = [r.tensors for i in range(0, len(records), PREPROCESS_CHUNK)
               for r in stage.process(records[i:i + PREPROCESS_CHUNK])]
    labels = np.array([cfg.classes.index(str(label)) for label in split.labels], np.int64)
    images = {name: np.stack([t[name] for t in outputs]).astype(np.float32) for name in outputs[0]}
    return Tensors(images, labels, split.source_ids)


def rewindowed_attrs(split: demo_data.Split, rng: np.random.Generator) -> list[dict[str, str]]:
    """Each patch's attributes with a random window, narrower than its range: the augmentation."""
    out = []
    for image, attrs in zip(split.images, split.attrs):
        slope = float(attrs.get("rescale_slope", 1.0))
        intercept = float(attrs.get("rescale_intercept", 0.0))
        lo, hi = np.percentile(image * slope + intercept, WINDOW_PERCENTILES)
        width = max(float(hi - lo) * rng.uniform(*WINDOW_WIDTH), 1e-3)
        out.append({**attrs, "window_center": repr(float(rng.uniform(lo, hi))), "window_width": repr(width)})
    return out


def _view(views: Mapping[str, Any], name: str) -> str:
    """`name` if the tensor has that training view, else "plain" (only the window view has mixes)."""
    return name if name in views else "plain"


def _subset(split: demo_data.Split, limit: int | None, rng: np.random.Generator) -> demo_data.Split:
    if limit is None or limit >= len(split.labels):
        return split
    keep = np.sort(rng.choice(len(split.labels), limit, replace=False))
    return demo_data.Split(split.images[keep], split.labels[keep], split.source_ids[keep],
                           [split.attrs[i] for i in keep], split.lesions[keep])


# -- training ------------------------------------------------------------------------------------
class _NoRetracingHint(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls ... triggered tf.function retracing": Keras
    traces a function per model it fits or predicts with, and a cross-fitted training builds
    dozens of models on purpose; the hint is about that loop, not something a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _without_retracing_hint() -> Iterator[None]:
    hint = _NoRetracingHint()
    logging.getLogger("tensorflow").addFilter(hint)
    try:
        yield
    finally:
        logging.getLogger("tensorflow").removeFilter(hint)


def _fit(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, learning_rate: float) -> None:
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy")
    with _without_retracing_hint():
        model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    with _without_retracing_hint():
        return np.asarray(model.predict(x, batch_size=256, verbose=0), np.float32)


def _report(cfg: PipelineConfig, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    truth = [cfg.classes[i] for i in labels]
    return classification_report(truth, [cfg.classes[i] for i in scores.argmax(1)], cfg.classes)


def _save_model(model: Any, path: Path) -> None:
    """Save atomically, so `ensure` never takes a half-written file for a trained model."""
    if path.suffix != ".keras":
        raise ValueError(f"model path {path}: training writes Keras files, expected a name ending in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    os.replace(partial, path)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(partial, path)


def card_path(model: ModelConfig) -> Path:
    return Path(f"{model.path}.card.json")


def stacker_path(cfg: PipelineConfig) -> Path:
    """fusion.params.path when the pipeline names one, else stacker.json beside the detection models."""
    if cfg.fusion is not None and "path" in cfg.fusion.params:
        return Path(cfg.fusion.params["path"])
    return Path(cfg.stages["detection"].models[0].path).parent / "stacker.json"


def _card(model: ModelConfig, arch: Arch, inputs: tuple[int, ...], outputs: dict[str, Any],
          training: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": model.name, "version": model.version, "file": model.path,
        "architecture": arch.description,
        "inputs": [{"name": model.input, "shape": list(inputs), "dtype": "float32"}],
        "outputs": outputs, "training": training, "scores": scores,
    }


def train(cfg: PipelineConfig, *, seed: int = 7, epochs: int | None = None, limit: int | None = None,
          show: bool = True, data_seed: int | None = None, crossfit_folds: int = CROSSFIT_FOLDS) -> dict[str, dict]:
    """Train and save the backbone and every detection model; choose the fusion (`choose_fusion`)
    and save it as the stacker file; score all on val and test (printed as a table when `show`).
    The fusion is chosen on val and on train cross-fitted over `crossfit_folds` folds of its
    source images (`_cross_fit`; 0 or 1: on val alone).

    `seed` seeds the models' training, `data_seed` (default: `seed`) the demo set and its subsets.
    `epochs` overrides every model's epochs and `limit` caps the patches per split (fast runs for
    tests). Returns {"models": {name: card}, "fusion": {candidate: {"val": report, "test":
    report}}, "summary": {...}}, a fusion's "val" being out of fold over the records it was chosen
    on; the fusion numbers are also written to `fusion.card.json` beside the stacker.
    """
    started = time.monotonic()
    backbone_cfg = cfg.model("features", None)
    detectors = cfg.stages["detection"].models
    if backbone_cfg is None or not detectors:
        raise ValueError(f"{cfg.path}: training needs a [stages.features] backbone and [stages.detection] models")
    unknown = [m.name for m in detectors if m.name not in DETECTORS]
    if unknown:
        raise ValueError(f"{cfg.path}: stages.detection.models: no training recipe for {', '.join(unknown)} "
                         f"(known: {', '.join(DETECTORS)})")
    emitted = {VIEWS[v] for v in Preprocess(cfg, cfg.stages["preprocess"], None).views}
    checked = [("features", backbone_cfg, BACKBONE), *(("detection", m, DETECTORS[m.name]) for m in detectors)]
    for where, m, arch in checked:
        expected = sorted(emitted) if arch.input == "image" else ["embedding"]
        if m.input not in expected:
            raise ValueError(f"{cfg.path}: stages.{where}.models.{m.name}.input: expected "
                             f"{' or '.join(map(repr, expected))}, got {m.input!r}")

    data_seed = seed if data_seed is None else data_seed
    rng = np.random.default_rng(seed)
    data_rng = rng if data_seed == seed else np.random.default_rng(data_seed)
    splits = {k: _subset(s, limit, data_rng) for k, s in demo_data.build(data_seed).items()}
    data = {k: preprocess(cfg, s, k) for k, s in splits.items()}
    y = data["train"].labels
    views = {name: {"plain": x} for name, x in data["train"].images.items()}
    if WINDOW_TENSOR in views:  # the window view's augmentation: half its patches re-windowed
        rewindowed = preprocess(cfg, splits["train"], "train",
                                rewindowed_attrs(splits["train"], rng)).images[WINDOW_TENSOR]
        plain = views[WINDOW_TENSOR]["plain"]
        half = (rng.random(len(y)) < 0.5)[:, None, None, None]
        views[WINDOW_TENSOR] = {"plain": plain, "mix_a": np.where(half, rewindowed, plain),
                                "mix_b": np.where(half, plain, rewindowed)}
    n_epochs = {k: epochs or v for k, v in EPOCHS.items()}
    image_shape = data["train"].images[backbone_cfg.input].shape[1:]
    base_training = {"seed": seed, "data_seed": data_seed, "splits": {k: len(t.labels) for k, t in data.items()},
                     "source_images": {k: sorted(set(map(str, t.sources))) for k, t in data.items()},
                     "data": LESIONS}

    models = _train_models(cfg, views, y, n_epochs, seed)
    _save_model(models.backbone, Path(backbone_cfg.path))
    head_scores = {k: _report(cfg, data[k].labels, _predict(models.classifier, data[k].images[backbone_cfg.input]))
                   for k in ("val", "test")}
    cards = {backbone_cfg.name: _card(
        backbone_cfg, BACKBONE, image_shape, {"name": "embedding", "shape": [EMBEDDING_DIM], "dtype": "float32"},
        {**base_training, "epochs": n_epochs["backbone"], "view": models.views[backbone_cfg.name]},
        {"note": "of the training head, dropped from the saved backbone", **head_scores})}
    held_out = {k: _scores(cfg, models, data[k].images) for k in ("val", "test")}
    scores = {m.name: {k: held_out[k][m.name] for k in ("val", "test")} for m in detectors}
    for m in detectors:
        arch = DETECTORS[m.name]
        _save_model(models.detectors[m.name], Path(m.path))
        shape = image_shape if arch.input == "image" else (EMBEDDING_DIM,)
        cards[m.name] = _card(
            m, arch, shape, {"name": "scores", "classes": list(cfg.classes), "dtype": "float32"},
            {**base_training, "epochs": n_epochs[m.name], "view": models.views[m.name]},
            {k: _report(cfg, data[k].labels, scores[m.name][k]) for k in ("val", "test")})
        _write_json(card_path(m), cards[m.name])
    _write_json(card_path(backbone_cfg), cards[backbone_cfg.name])

    # The fusion is chosen on every record held out from the models that scored it: val's (by
    # the models above) and, cross-fitted, train's (by models trained without its source image).
    names = tuple(m.name for m in detectors)
    versions = {m.name: m.version for m in detectors}
    val = np.stack([scores[n]["val"] for n in names], 1)
    cross_fitted = _cross_fit(cfg, views, data["train"], n_epochs, seed, crossfit_folds)
    held = {"val": (val, data["val"])} if cross_fitted is None else {
        "train, cross-fitted": (cross_fitted, data["train"]), "val": (val, data["val"])}
    stacked = {"val": np.concatenate([v for v, _ in held.values()]).astype(np.float64),
               "test": np.stack([scores[n]["test"] for n in names], 1).astype(np.float64)}
    labels = {"val": np.concatenate([t.labels for _, t in held.values()]), "test": data["test"].labels}
    fusion, summary = choose_fusion(cfg, names, versions, stacked, labels,
                                    np.concatenate([t.sources for _, t in held.values()]), seed)
    summary["cross_validation"]["records"] = {k: len(t.labels) for k, (_, t) in held.items()}
    path = stacker_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary.pop("stacker_object").save(path)
    summary = {"configured": cfg.fusion.strategy if cfg.fusion else None, **summary, "stacker": str(path),
               "seconds": round(time.monotonic() - started, 1)}
    _write_json(path.with_name("fusion.card.json"), {**summary, "data": LESIONS, "strategies": fusion})
    if show:
        print(format_table(cards, names, fusion, summary))
    return {"models": cards, "fusion": fusion, "summary": summary}


@dataclass(frozen=True)
class Models:
    """One training run's models: the backbone and the classifier it was trained inside, each
    detection model by name, and the training view each model (the backbone too) read."""

    backbone: Any
    classifier: Any
    detectors: dict[str, Any]
    views: dict[str, str]


def _train_models(cfg: PipelineConfig, views: Mapping[str, Mapping[str, np.ndarray]], y: np.ndarray,
                  epochs: Mapping[str, int], seed: int) -> Models:
    """Train the backbone, then each detection model on its view (or the backbone's embedding of it)."""
    import keras

    backbone_cfg = cfg.model("features", None)
    keras.utils.set_random_seed(seed)
    backbone_views = views[backbone_cfg.input]
    backbone_view = _view(backbone_views, BACKBONE.view)
    backbone, classifier = BACKBONE.build(cfg, backbone_views[backbone_view])
    _fit(classifier, backbone_views[backbone_view], y, epochs["backbone"], seed, BACKBONE.learning_rate)
    embeddings = {k: _predict(backbone, x) for k, x in backbone_views.items()}
    detectors, trained_on = {}, {backbone_cfg.name: backbone_view}
    for offset, m in enumerate(cfg.stages["detection"].models, start=1):
        arch = DETECTORS[m.name]
        keras.utils.set_random_seed(seed + offset)
        source = views[m.input] if arch.input == "image" else embeddings
        trained_on[m.name] = _view(source, arch.view)
        detectors[m.name] = arch.build(cfg, source[trained_on[m.name]])
        _fit(detectors[m.name], source[trained_on[m.name]], y, epochs[m.name], seed + offset, arch.learning_rate)
    return Models(backbone, classifier, detectors, trained_on)


def _scores(cfg: PipelineConfig, models: Models, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each detection model's scores on these preprocessed images, as the pipeline computes them."""
    embedding = _predict(models.backbone, images[cfg.model("features", None).input])
    return {m.name: _predict(models.detectors[m.name], embedding if m.input == "embedding" else images[m.input])
            for m in cfg.stages["detection"].models}


def _cross_fit(cfg: PipelineConfig, views: Mapping[str, Mapping[str, np.ndarray]], train_split: Tensors,
               epochs: Mapping[str, int], seed: int, n_folds: int) -> np.ndarray | None:
    """Every training record's scores (N, models, classes) from models trained, as the final ones
    are, on the other folds of the training images (grouped by source image): held-out scores for
    the fusion to be chosen on, besides val's. None when `n_folds` < 2 or train holds one image."""
    import keras

    if n_folds < 2 or len(set(map(str, train_split.sources))) < 2:
        return None
    folds = choice.grouped_folds(train_split.sources, n_folds)
    names = [m.name for m in cfg.stages["detection"].models]
    out = np.empty((len(folds), len(names), len(cfg.classes)), np.float32)
    for f in np.unique(folds):
        fit, held = folds != f, folds == f
        models = _train_models(cfg, {t: {v: x[fit] for v, x in by_view.items()} for t, by_view in views.items()},
                               train_split.labels[fit], epochs, seed)
        scores = _scores(cfg, models, {t: x[held] for t, x in train_split.images.items()})
        out[held] = np.stack([scores[n] for n in names], 1)
        keras.backend.clear_session()
    return out


# -- fusion, offline -----------------------------------------------------------------------------
def _weights(cfg: PipelineConfig, names: Sequence[str], scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """weighted_average's weights: each model's macro-F1 above chance on these records (at least 1e-3)."""
    return {n: round(max(_report(cfg, labels, scores[:, i])["f1_macro"] - 1 / len(cfg.classes), 1e-3), 4)
            for i, n in enumerate(names)}


def _best_single(cfg: PipelineConfig, names: Sequence[str], scores: np.ndarray, labels: np.ndarray) -> str:
    """The model with the best macro-F1 on these records (ties: the first named)."""
    return max(names, key=lambda n: _report(cfg, labels, scores[:, names.index(n)])["f1_macro"])


@dataclass(frozen=True)
class Fitted:
    """What the candidates fit on some validation records: weighted_average's weights, the stacker,
    the model best there (SINGLE), and the weights shrunk toward it (SHRUNK) by `amount`."""

    weights: dict[str, float]
    stacker: Stacker
    single: str
    amount: float
    shrunk: dict[str, float]


def _fit_candidates(cfg: PipelineConfig, names: tuple[str, ...], scores: np.ndarray, labels: np.ndarray) -> Fitted:
    """Fit every candidate on these records; the shrinkage is the amount best on them (`choice.best_amount`)."""
    weights = _weights(cfg, names, scores, labels)
    single = _best_single(cfg, names, scores, labels)

    def score(amount: float) -> float:
        w = choice.shrink(weights, single, amount)
        return _report(cfg, labels, np.einsum("m,nmk->nk", [w[n] for n in names], scores))["f1_macro"]

    amount = choice.best_amount(score)
    return Fitted(weights, fit_stacker(scores, labels, model_names=names, classes=cfg.classes), single, amount,
                  choice.shrink(weights, single, amount))


def _decisions(cfg: PipelineConfig, candidate: str, names: tuple[str, ...], versions: Mapping[str, str],
               scores: np.ndarray, fitted: Fitted) -> list[str]:
    """Each record's decision by a candidate: a strategy through `fusion.stage.combine`, as the fusion
    stage runs it (SHRUNK: weighted_average with the shrunk weights), or SINGLE (that model's own)."""
    if candidate == choice.SINGLE:
        return [cfg.classes[k] for k in scores[:, names.index(fitted.single)].argmax(1)]
    strategy, weights = ("weighted_average", fitted.shrunk) if candidate == choice.SHRUNK else (candidate,
                                                                                               fitted.weights)
    params = {"weights": dict(weights)} if strategy == "weighted_average" else {}
    return [combine(f"r{i}", _detections(cfg, f"r{i}", names, versions, row), names, cfg.classes, strategy, params,
                    fitted.stacker).decision for i, row in enumerate(scores)]


def choose_fusion(cfg: PipelineConfig, names: tuple[str, ...], versions: Mapping[str, str],
                  stacked: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], groups: np.ndarray,
                  seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Choose the fusion by cross-validation on "val" (the held-out records `train` passes: val's
    and train's cross-fitted) grouped by source image, and score every candidate there (out of
    fold) and on test (fitted on the whole of "val").

    Candidates: each strategy (the stacker and weighted_average's weights fitted on the other
    folds), SHRUNK (those weights shrunk toward the model best on the other folds, by the amount best
    there) and SINGLE, that model passed through. The stacker file holds, of SIMPLEST_FIRST, the
    simplest whose macro-F1 over the folds is within one standard error of the best's
    (`choice.choose`): SINGLE (the model best on val) only when it beats the soft vote by more than
    the folds' noise, a fitted one only when it beats both so. No image is in a fold and in the
    records fitted for it; with one source image in val, the folds are by record, and say so.
    Returns ({candidate or "chosen": {"val": report, "test": report}}, summary), the summary
    holding the file's Stacker as "stacker_object".
    """
    y_val, truth = labels["val"], {k: [cfg.classes[i] for i in v] for k, v in labels.items()}
    if len(set(map(str, groups))) >= 2:
        folds, by = choice.grouped_folds(groups, STACKER_FOLDS), "source image"
    else:
        folds, by = np.random.default_rng(seed).permutation(len(y_val)) % STACKER_FOLDS, "record"
    candidates = (*FUSION_STRATEGIES, choice.SHRUNK, choice.SINGLE)
    out_of_fold = {c: np.empty(len(y_val), object) for c in candidates}
    for f in np.unique(folds):
        fit, held = folds != f, folds == f
        fitted = _fit_candidates(cfg, names, stacked["val"][fit], y_val[fit])
        for c in candidates:
            out_of_fold[c][held] = _decisions(cfg, c, names, versions, stacked["val"][held], fitted)
    cv = {c: classification_report(truth["val"], list(out_of_fold[c]), cfg.classes) for c in candidates}
    by_fold = {c: [classification_report([truth["val"][i] for i in np.flatnonzero(folds == f)],
                                         list(out_of_fold[c][folds == f]), cfg.classes)["f1_macro"]
                   for f in np.unique(folds)] for c in SIMPLEST_FIRST}

    fitted = _fit_candidates(cfg, names, stacked["val"], y_val)
    chosen = choice.choose(by_fold, SIMPLEST_FIRST)
    n = len(y_val)
    weighting = {"soft_vote": dict.fromkeys(names, 1.0), "weighted_average": fitted.weights,
                 choice.SHRUNK: fitted.shrunk, choice.SINGLE: {fitted.single: 1.0}}
    held = fitted.stacker if chosen == "stacking" else choice.linear_stacker(weighting[chosen], names, cfg.classes,
                                                                             n_samples=n)
    out = {c: {"val": cv[c], "test": classification_report(
        truth["test"], _decisions(cfg, c, names, versions, stacked["test"], fitted), cfg.classes)}
           for c in candidates}
    decided = _decisions(cfg, "stacking", names, versions, stacked["test"], dataclasses.replace(fitted, stacker=held))
    out["chosen"] = {"val": cv[chosen], "test": classification_report(truth["test"], decided, cfg.classes)}
    # On test, the file's decisions against the model best there, record by record (the report's
    # paired comparison): is the gain real or the records'?
    best_on_test = _best_single(cfg, names, stacked["test"], labels["test"])
    versus = evaluation.paired(truth["test"], decided,
                               _decisions(cfg, choice.SINGLE, names, versions, stacked["test"],
                                          dataclasses.replace(fitted, single=best_on_test)), cfg.classes)
    summary = {"chosen": chosen if chosen != choice.SINGLE else f"{choice.SINGLE}: {fitted.single}",
               "test_vs_best_single": {"model": best_on_test, **(versus or {})},
               "best_on_val": max((*FUSION_STRATEGIES, choice.SHRUNK), key=lambda c: cv[c]["f1_macro"]),
               "best_single_on_val": fitted.single, "weights": fitted.weights,
               "shrunk": {"toward": fitted.single, "amount": fitted.amount, "weights": fitted.shrunk},
               "cross_validation": {"by": by, "folds": int(len(np.unique(folds))),
                                    "source_images": sorted(set(map(str, groups))),
                                    "rule": "one standard error, simplest first: " + ", ".join(SIMPLEST_FIRST),
                                    "f1_macro_by_fold": {c: [round(v, 4) for v in by_fold[c]] for c in SIMPLEST_FIRST}},
               "stacker_object": held}
    return out, summary


def _detections(cfg: PipelineConfig, record_id: str, names: Sequence[str], versions: Mapping[str, str],
          row: np.ndarray) -> dict[str, Detection]:
    """One record's detections from every model, as the detection stage sends them (float32)."""
    return {name: Detection(record_id=record_id, source="demo", ingest_ts_ms=0, model=ModelRef(name, versions[name]),
                            classes=cfg.classes, scores=tuple(float(v) for v in np.float32(s)))
            for name, s in zip(names, row)}


def applied(summary: Mapping[str, Any]) -> str:
    """What the fusion stage will run: the configured strategy, and what a stacker file holds."""
    configured = summary["configured"] or "stacking"
    return f"{configured} ({summary['chosen']})" if configured == "stacking" else configured


def format_table(cards: Mapping[str, dict], names: Sequence[str], fusion: Mapping[str, dict],
                 summary: Mapping[str, Any]) -> str:
    """Accuracy and macro-F1 on val (fusion: out of fold) and test, per detection model and per
    fusion candidate, then what the stacker file holds."""
    cv = summary["cross_validation"]
    lines = [f"{'':<25}{'val acc':>9}{'val F1':>9}{'test acc':>10}{'test F1':>9}"]
    rows = [(n, cards[n]["scores"]) for n in names] + [
        (f"fused: {c}" if c != "chosen" else "fused: the file", v) for c, v in fusion.items()]
    for label, s in rows:
        mark = "".join(f"  <- {what}" for what, s_ in (("best on val", summary["best_on_val"]),
                                                        ("configured", summary["configured"]))
                       if label == f"fused: {s_}")
        if label == "fused: the file":
            mark = f"  <- {summary['chosen']}"
        lines.append(f"{label:<25}{s['val']['accuracy']:>9.3f}{s['val']['f1_macro']:>9.3f}"
                     f"{s['test']['accuracy']:>10.3f}{s['test']['f1_macro']:>9.3f}{mark}")
    versus = summary.get("test_vs_best_single") or {}
    if versus.get("interval"):
        lines.append(f"on test, the file against the best model there ({versus['model']}): macro F1 "
                     f"{versus['f1_macro_diff']:+.3f} (95% CI {versus['interval'][0]:+.3f} to "
                     f"{versus['interval'][1]:+.3f}), McNemar p {versus['mcnemar_p']:.2g}: {versus['verdict']}")
    held = " and ".join(f"{k} ({n} records)" for k, n in cv["records"].items())
    lines.append(f"fusion val scores: {cv['folds']}-fold cross-validation by {cv['by']} on {held}; "
                 f"the stacker file "
                 f"({summary['stacker']}) holds {summary['chosen']}; weighted_average weights: {summary['weights']}, "
                 f"shrunk {summary['shrunk']['amount']:.1f} toward {summary['shrunk']['toward']}   "
                 f"{summary['seconds']:.0f} s")
    return "\n".join(lines)


def required_files(cfg: PipelineConfig) -> list[Path]:
    """What the pipeline needs trained: the backbone, each detection model, and the stacker if used."""
    files = [Path(m.path) for stage in ("features", "detection") if stage in cfg.stages
             for m in cfg.stages[stage].models]
    if cfg.fusion is not None and cfg.fusion.strategy in STRATEGIES_NEEDING_A_FILE:
        files.append(stacker_path(cfg))
    return files


def written_files(cfg: PipelineConfig) -> list[Path]:
    """Every file `train` writes: each model and its card, the stacker and the fusion card."""
    models = [Path(m.path) for stage in ("features", "detection") if stage in cfg.stages
              for m in cfg.stages[stage].models]
    stacker = stacker_path(cfg)
    return [*models, *(Path(f"{m}.card.json") for m in models), stacker, stacker.with_name("fusion.card.json")]


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def untrained(cfg: PipelineConfig, *, own: Path = DEMO_MODEL_DIR) -> list[tuple[str, str]]:
    """The missing files (key, path) the demo is to train: [] when every file the pipeline reads
    exists. Training writes every model and the stacker, so it is allowed only when each file it
    writes lies in the demo's own folder `own`: a missing file elsewhere raises MissingFile naming
    it, and a file elsewhere that training would overwrite raises ConfigError; nothing is trained."""
    missing = config.missing_files(cfg)
    if not missing:
        return []
    for key, path in missing:
        if not _inside(path, own):
            raise config.MissingFile(cfg.path, key, path)
    for path in written_files(cfg):
        if not _inside(path, own):
            key, file = missing[0]
            raise config.ConfigError(cfg.path, key, f"an existing file: {file!r} is missing, and training the demo "
                                     f"models into {own} would also overwrite {str(path)!r}, outside it; train them "
                                     f"with `tensorline train` or point the pipeline at existing files")
    return missing


def ensure(cfg: PipelineConfig, *, own: Path = DEMO_MODEL_DIR, seed: int = 7, epochs: int | None = None,
           limit: int | None = None) -> None:
    """Train (see `train`) only when a file the pipeline reads is missing, and only into the demo's
    own folder (see `untrained`)."""
    missing = untrained(cfg, own=own)
    if not missing:
        return
    print(f"training the demo models ({missing[0][1]} is missing) into {own} ...", file=sys.stderr)
    summary = train(cfg, seed=seed, epochs=epochs, limit=limit, show=False)["summary"]
    held = "val and train, cross-fitted" if len(summary["cross_validation"]["records"]) > 1 else "val"
    print(f"trained in {summary['seconds']:.0f} s; fusion: {applied(summary)}, chosen by cross-validation over "
          f"{len(summary['cross_validation']['source_images'])} held-out images ({held}); scores: "
          f"{own}/*.card.json, all strategies: tensorline train", file=sys.stderr)




# -- several seeds -------------------------------------------------------------------------------
def in_folder(cfg: PipelineConfig, folder: Path) -> PipelineConfig:
    """The pipeline with every model file and the stacker under `folder` (same file names)."""
    stages = {name: dataclasses.replace(s, models=tuple(dataclasses.replace(m, path=str(folder / Path(m.path).name))
                                                        for m in s.models))
              for name, s in cfg.stages.items()}
    fusion = cfg.fusion and dataclasses.replace(cfg.fusion, params={**cfg.fusion.params,
                                                                    "path": str(folder / stacker_path(cfg).name)})
    return dataclasses.replace(cfg, stages=stages, fusion=fusion)


def seed_row(result: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """One seed's test scores (macro-F1): each model, the best of them, the fused result as the
    stacker file holds it, its gain over the best model, and what was chosen."""
    models = {n: result["models"][n]["scores"]["test"]["f1_macro"] for n in names}
    fused = result["fusion"]["chosen"]["test"]["f1_macro"]
    best = max(models.values())
    versus = result["summary"].get("test_vs_best_single") or {}
    return {"seed": result["models"][names[0]]["training"]["seed"], "models": models, "best_single": best,
            "fused": fused, "gain": fused - best, "gain_interval": versus.get("interval"),
            "gain_verdict": versus.get("verdict"), "chosen": result["summary"]["chosen"],
            "best_single_on_val": result["summary"]["best_single_on_val"],
            "strategies": {c: v["test"]["f1_macro"] for c, v in result["fusion"].items() if c != "chosen"},
            "cross_validated": {c: v["val"]["f1_macro"] for c, v in result["fusion"].items() if c != "chosen"}}


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over the seeds of each model's, the best single's and the fused test
    macro-F1 and of the gain, and how often each fusion was chosen."""
    def stats(values: Sequence[float]) -> dict[str, float]:
        v = np.asarray(values, np.float64)
        return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    names = list(rows[0]["models"])
    return {"seeds": len(rows), **{n: stats([r["models"][n] for r in rows]) for n in names},
            "best_single": stats([r["best_single"] for r in rows]), "fused": stats([r["fused"] for r in rows]),
            "gain": stats([r["gain"] for r in rows]),
            "chosen": {c: sum(r["chosen"] == c for r in rows) for c in sorted({r["chosen"] for r in rows})}}


def train_seeds(cfg: PipelineConfig, seeds: int, *, seed: int = 7, epochs: int | None = None,
                limit: int | None = None, show: bool = True) -> dict[str, Any]:
    """Train the demo models under `seeds` model seeds (seed, seed + 1, ...) on the same demo set
    (data seed `seed`: the demo's test split), each into a scratch folder (the pipeline's own files
    are left alone); per seed and over all, each model's and the fused test macro-F1 and the
    fusion chosen (`seed_row`, `over_seeds`), printed as each seed ends when `show`."""
    import tempfile

    names = tuple(m.name for m in cfg.stages["detection"].models)
    rows = []
    if show:
        print(seeds_header(names), flush=True)
    for s in range(seed, seed + seeds):
        with tempfile.TemporaryDirectory(prefix=f"tensorline-seed{s}-") as folder:
            result = train(in_folder(cfg, Path(folder)), seed=s, data_seed=seed, epochs=epochs, limit=limit,
                           show=False)
        rows.append(seed_row(result, names))
        if show:
            print(format_seed(rows[-1]), flush=True)
    summary = over_seeds(rows)
    if show:
        print(format_over_seeds(summary, names))
    return {"per_seed": rows, "over_seeds": summary, "data_seed": seed, "limit": limit, "epochs": epochs}


def seeds_header(names: Sequence[str]) -> str:
    return (f"{'seed':<6}" + "".join(f"{n:>8}" for n in names) + f"{'best':>8}{'FUSED':>8}{'gain':>8}"
            + "  fusion chosen (gain's 95% CI on test: verdict)")


def format_seed(row: Mapping[str, Any]) -> str:
    interval = row.get("gain_interval")
    versus = f" ({interval[0]:+.3f} to {interval[1]:+.3f}: {row['gain_verdict']})" if interval else ""
    return (f"{row['seed']:<6}" + "".join(f"{v:>8.3f}" for v in row["models"].values())
            + f"{row['best_single']:>8.3f}{row['fused']:>8.3f}{row['gain']:>+8.3f}  {row['chosen']}{versus}")


def format_over_seeds(summary: Mapping[str, Any], names: Sequence[str]) -> str:
    lines = []
    for what in ("mean", "min", "max"):
        lines.append(f"{what:<6}" + "".join(f"{summary[n][what]:>8.3f}" for n in names)
                     + f"{summary['best_single'][what]:>8.3f}{summary['fused'][what]:>8.3f}"
                     f"{summary['gain'][what]:>+8.3f}")
    chosen = ", ".join(f"{c} x{k}" for c, k in summary["chosen"].items())
    lines.append(f"over {summary['seeds']} seeds: gain over the best single model {summary['gain']['mean']:+.3f} "
                 f"mean, {summary['gain']['min']:+.3f} min; chosen: {chosen}")
    return "\n".join(lines)
