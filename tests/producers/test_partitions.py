"""The producer's key spreads the demo's records over every partition: keyed by record id by
default, by study on request; and on the real broker the demo's records reach every partition of
every topic of the demo pipeline (its stages run in-process, with tiny models)."""

from __future__ import annotations

import threading
import tomllib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka.partitioner.default import murmur2

from tensorline import cli, config
from tensorline.engine import clients, worker
from tensorline.ops import topics
from tensorline.producers import demo_data, publish, sources
from tensorline.schemas import decode_result

ROOT = Path(__file__).resolve().parents[2]
# The demo's test split with 12 patches per source image: a study per source image, as the demo's
# 1,200 records are (300 per study).
PATCHES_PER_IMAGE = 12


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> list[Path]:
    split = demo_data.build(patches_per_image=PATCHES_PER_IMAGE)["test"]
    return demo_data.write_dicoms(split, tmp_path_factory.mktemp("demo"))


def partition(key: bytes, partitions: int) -> int:
    """The partition kafka-python's (and Java's) default partitioner picks for a key: murmur2."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class KeptProducer:
    """A producer that keeps the keys it is given, every send acknowledged at once."""

    def __init__(self):
        self.keys: list[bytes] = []

    def send(self, topic, *, key, value, headers):
        self.keys.append(key)
        return SimpleNamespace(is_done=True, get=lambda: None)

    def flush(self):
        pass

    def close(self):
        pass


def keys(cfg: config.PipelineConfig, files: list[Path], key: str | None = None) -> list[bytes]:
    producer = KeptProducer()
    publisher = publish.Publisher(cfg, producer=producer, progress=False, key=key)
    for f in files:
        publisher.publish_file(f)
    publisher.close()
    return producer.keys


def test_records_are_keyed_by_record_id_unless_the_pipeline_keys_them_by_study(demo_files):
    items = [item for f in demo_files for item in sources.read(f)]
    studies = {i.study for i in items}
    assert len(studies) == len(demo_files) // PATCHES_PER_IMAGE >= 2  # a study per source image
    table = {"pipeline": {"name": "p"}, "topics": {"raw": {"partitions": 4}}}

    by_id = keys(config.parse(table), demo_files)
    assert by_id == [i.record_id.encode() for i in items]
    assert {partition(k, 4) for k in by_id} == {0, 1, 2, 3}

    by_study = keys(config.parse({**table, "producer": {"key": "study"}}), demo_files)
    assert by_study == [i.study.encode() for i in items]
    assert len({partition(k, 4) for k in by_study}) <= len(studies)  # one partition per study at most
    # A run's own choice wins over the pipeline file's.
    assert keys(config.parse({**table, "producer": {"key": "study"}}), demo_files[:3], key="record_id") == by_id[:3]
    with pytest.raises(ValueError, match="one of record_id, study, not 'patient'"):
        publish.partition_key(items[0], "patient")


def test_produce_takes_the_key_for_one_run(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\nname = "p"\n[topics]\nraw = {}\n[producer]\nkey = "study"\n')
    given = []

    def produce(cfg, sources, **kw):
        given.append((cfg.producer.key, kw["key"]))
        return publish.Summary()

    monkeypatch.setattr(publish, "produce", produce)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["produce", "-c", str(path), str(tmp_path), "--check-results", "0"]) == 0
    assert cli.main(["produce", "-c", str(path), str(tmp_path), "--key", "record_id"]) == 0
    assert given == [("study", None), ("study", "record_id")]  # None: the pipeline file's


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """Untrained models with the demo models' names and shapes: a backbone on the 64x64 full view
    (8-d embedding), a CNN on the equalised view, a logistic model on the embedding, a blob
    detector on the local view."""
    import keras

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    saved = {
        "backbone": keras.Sequential([keras.Input((64, 64, 1)), layers.Conv2D(4, 3, strides=4, activation="relu"),
                                      layers.GlobalAveragePooling2D(), layers.Dense(8)]),
        "cnn": keras.Sequential([keras.Input((64, 64, 1)), layers.Conv2D(2, 3, strides=4),
                                 layers.GlobalAveragePooling2D(), layers.Dense(2, activation="softmax")]),
        "logreg": keras.Sequential([keras.Input((8,)), layers.Dense(2, activation="softmax")]),
        "blob": keras.Sequential([keras.Input((64, 64, 1)), layers.Conv2D(2, 5, strides=4),
                                  layers.GlobalMaxPooling2D(), layers.Dense(2, activation="softmax")]),
    }
    for name, model in saved.items():
        model.save(folder / f"{name}.keras")
    return folder


@pytest.mark.broker
def test_the_demo_records_reach_every_partition_of_every_topic(demo_files, tiny_models, tmp_path, namespace,
                                                               kafka_bootstrap, monkeypatch):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    # The demo pipeline as shipped (topics, partitions, stages, views, models by name), under this
    # test's name, with the tiny models and a strategy that needs no fitted stacker; joins never
    # time out here, so a partial result can only mean a record's detections were split.
    table = tomllib.loads((ROOT / "pipeline.toml").read_text())
    table["pipeline"].update(name=namespace, bootstrap=kafka_bootstrap)
    for stage in ("features", "detection"):
        for name, model in table["stages"][stage]["models"].items():
            model["path"] = str(tiny_models / f"{name}.keras")
    table["fusion"].update(strategy="soft_vote", params={}, join_timeout_ms=3_600_000)
    cfg = config.parse(table, tmp_path / "pipeline.toml")
    assert cfg.producer.key == "record_id"
    clients.create_topics(cfg)

    summary = publish.produce(cfg, [str(f) for f in demo_files], progress=False, check_results_s=0)
    assert summary.sent == len(demo_files)
    runs = [("preprocess", None), ("features", None),
            *(("detection", m.name) for m in cfg.stages["detection"].models), ("fusion", None)]
    for stage, model in runs:
        drain = threading.Event()
        drain.set()  # stop once the input is read and committed to its present end
        worker.run(cfg, stage, model=model, metrics_port=None, stop=threading.Event(), drain=drain)

    assert topics.read_all(cfg, cfg.topic(cfg.dlq).name) == []  # a clean run: no dead letters
    per_topic = {t.name: Counter(r.partition for r in topics.read_all(cfg, t.name))
                 for key, t in cfg.topics.items() if key != cfg.dlq}
    # Fusion joined each record's three detections on one partition: every result whole.
    results = [decode_result(r.value) for r in topics.read_all(cfg, cfg.topic("results").name)]
    assert len(results) == len(demo_files) and not any(r.partial for r in results)
    assert {name: sorted(counts) for name, counts in per_topic.items()} == {
        cfg.topic(key).name: list(range(t.partitions)) for key, t in cfg.topics.items() if key != cfg.dlq}
