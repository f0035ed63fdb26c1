"""Clients tensorline did not write read its topics through `tensorline registry serve`: Confluent's
consumer with its SchemaRegistryClient and AvroDeserializer decodes a record of every topic, and
kcat prints a result (as JSON with `-s value=avro -r URL` when built with Avro; the raw Confluent
frame, looked up in the registry by its id, otherwise). Real broker."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_reader

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import registry
from tensorline.schemas import (Detection, FusedResult, ModelRef, Record, encode_detection, encode_record,
                                encode_result)
from tensorline.schemas import subjects
from tensorline.schemas.registry_client import RegistryClient

pytestmark = pytest.mark.broker

IMAGE = np.arange(16, dtype=np.float32).reshape(4, 4)
TS = 1_796_000_000_123
RECORD = Record("r-1", "scan/1.dcm", TS, {"image": IMAGE}, stage="preprocess", attributes={"study": "s1"},
                label="nodule", model=ModelRef("backbone", "3"))
DETECTION = Detection("r-1", "scan/1.dcm", TS, ModelRef("cnn", "1"), ("normal", "nodule"), (0.25, 0.75),
                      label="nodule")
RESULT = FusedResult("r-1", "scan/1.dcm", TS, "soft_vote", ("normal", "nodule"), (0.25, 0.75), "nodule",
                     ("cnn",), ("mlp",), True, label="nodule")


def demo_like(namespace: str, bootstrap: str) -> config.PipelineConfig:
    """The demo's stages and topics under the test's namespace (no worker runs: nothing is loaded)."""
    return config.parse({
        "pipeline": {"name": namespace, "bootstrap": bootstrap},
        "topics": {k: {"partitions": 1} for k in ("raw", "preprocessed", "features", "detections", "results", "dlq")},
        "stages": {"preprocess": {"input": "raw", "output": "preprocessed"},
                   "features": {"input": "preprocessed", "output": "features",
                                "models": {"backbone": {"path": "backbone.keras"}}},
                   "detection": {"input": "features", "output": "detections",
                                 "models": {"cnn": {"path": "cnn.keras"}}}},
        "fusion": {"input": "detections", "output": "results", "expected_models": ["cnn"]},
    }, Path("interop.toml"))


@pytest.fixture
def topics_written(namespace: str, kafka_bootstrap: str):
    """A pipeline whose every data topic holds one message as its stage writes it, and the
    registry serving its subjects: (cfg, server, {topic: what was written})."""
    cfg = demo_like(namespace, kafka_bootstrap)
    clients.create_topics(cfg)
    written = {"raw": encode_record(RECORD), "preprocessed": encode_record(RECORD),
               "features": encode_record(RECORD), "detections": encode_detection(DETECTION),
               "results": encode_result(RESULT)}
    producer = clients.producer(cfg)
    try:
        for key, value in written.items():
            producer.send(cfg.topic(key).name, key=b"r-1", value=bytes(value))
        producer.flush(30)
    finally:
        producer.close()
    with registry.Server(subjects.served_subjects(cfg)) as server:
        yield cfg, server, written


def expected_datum(key: str) -> dict:
    common = {"record_id": "r-1", "source": "scan/1.dcm", "label": "nodule"}
    if key == "detections":
        return {**common, "model": {"name": "cnn", "version": "1"}, "classes": ["normal", "nodule"],
                "scores": [0.25, 0.75], "attributes": {}}
    if key == "results":
        return {**common, "strategy": "soft_vote", "classes": ["normal", "nodule"], "scores": [0.25, 0.75],
                "decision": "nodule", "contributors": ["cnn"], "missing": ["mlp"], "partial": True, "attributes": {}}
    return {**common, "tensors": {"image": {"dtype": "float32", "shape": [4, 4], "data": IMAGE.tobytes()}},
            "attributes": {"study": "s1"}, "stage": "preprocess", "model": {"name": "backbone", "version": "3"}}


def test_confluents_deserializer_decodes_every_topic(topics_written) -> None:
    from confluent_kafka import Consumer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    cfg, server, written = topics_written
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": server.url}))
    for key in written:
        topic = cfg.topic(key).name
        consumer = Consumer({"bootstrap.servers": cfg.bootstrap, "group.id": f"confluent-{uuid.uuid4().hex[:6]}",
                             "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                             "enable.auto.commit": False})
        try:
            consumer.subscribe([topic])
            message = None
            for _ in range(300):  # up to 60 s: the group's first assignment takes a few seconds
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    break
            assert message is not None and message.error() is None, f"nothing read from {topic}"
            datum = deserialize(message.value(), SerializationContext(topic, MessageField.VALUE))
        finally:
            consumer.close()
        ts = datum.pop("ingest_ts_ms")  # timestamp-millis: a datetime to Confluent's deserializer
        assert round(ts.timestamp() * 1000) == TS, key
        assert datum == expected_datum(key), key  # a Record's tensor bytes too: IMAGE, little-endian


def kcat(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["kcat", *args], capture_output=True, timeout=timeout_s)


@pytest.mark.skipif(shutil.which("kcat") is None,
                    reason="kcat is not installed (./run test installs it as root on Debian/Ubuntu: "
                           "apt-get install kcat)")
def test_kcat_reads_a_result_through_the_registry(topics_written) -> None:
    cfg, server, _ = topics_written
    topic = cfg.topic("results").name
    # The Confluent frame as kcat delivers it: magic 0, the id the registry serves for the subject.
    raw = kcat("-b", cfg.bootstrap, "-C", "-t", topic, "-o", "beginning", "-c", "1", "-e", "-q", "-f", "%s")
    assert raw.returncode == 0, raw.stderr.decode()
    latest = RegistryClient(server.url).latest(subjects.value_subject(topic))
    assert raw.stdout[0] == 0 and int.from_bytes(raw.stdout[1:5], "big") == latest.id
    schema = parse_schema(json.loads(RegistryClient(server.url).schema(latest.id)))
    datum = schemaless_reader(io.BytesIO(raw.stdout[5:]), schema)
    assert datum["decision"] == "nodule" and datum["missing"] == ["mlp"]


@pytest.mark.skipif(shutil.which("kcat") is None,
                    reason="kcat is not installed (./run test installs it as root on Debian/Ubuntu: "
                           "apt-get install kcat)")
def test_kcat_prints_a_result_as_json_with_value_avro(topics_written) -> None:
    cfg, server, _ = topics_written
    out = kcat("-b", cfg.bootstrap, "-C", "-t", cfg.topic("results").name, "-o", "beginning", "-c", "1", "-e", "-q",
               "-s", "value=avro", "-r", server.url)
    if b"lacks Avro" in out.stderr:
        pytest.skip(f"this kcat ({shutil.which('kcat')}) is built without Avro/Schema-Registry support "
                    f"({out.stderr.decode().strip()}): Debian's package has no libserdes; a kcat built with it "
                    "(e.g. from source with libserdes) runs this test")
    assert out.returncode == 0, out.stderr.decode()
    result = json.loads(out.stdout)
    assert result["decision"] == "nodule" and result["record_id"] == "r-1"
    assert result["label"] in ("nodule", {"string": "nodule"})  # Avro's JSON encoding of a union, or plain
