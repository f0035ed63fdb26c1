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


# kcat's own Avro decoding (`-s value=avro -r URL`) is not tested: Debian's kcat is built without
# libserdes ("This build of kcat lacks Avro/Schema-Registry support") and nothing else installs one
# here; the frame test above reads what it would decode.


# -- the pipeline on a registry that gives other ids than the built-in 1, 2, 3 ------------------
STAGES_SCRIPT = r'''
import sys, threading
from pathlib import Path
import keras
from tensorline import cli, config
from tensorline.engine import worker
from tensorline.producers import publish
from tensorline.schemas.subjects import producer_subjects, stage_subjects

path, models, files = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
keras.utils.set_random_seed(0)
L = keras.layers
for name, model in {
    "backbone": keras.Sequential([keras.Input((64, 64, 1)), L.Conv2D(4, 3, strides=4, activation="relu"),
                                  L.GlobalAveragePooling2D(), L.Dense(8)]),
    "cnn": keras.Sequential([keras.Input((64, 64, 1)), L.Conv2D(2, 3, strides=4), L.GlobalAveragePooling2D(),
                             L.Dense(2, activation="softmax")]),
    "logreg": keras.Sequential([keras.Input((8,)), L.Dense(2, activation="softmax")]),
    "blob": keras.Sequential([keras.Input((64, 64, 1)), L.Conv2D(2, 5, strides=4), L.GlobalMaxPooling2D(),
                              L.Dense(2, activation="softmax")]),
}.items():
    model.save(models / f"{name}.keras")
cfg = config.load(path)
cli._schema_registry(cfg, producer_subjects(cfg))  # what `tensorline produce` does at start
print("sent", publish.produce(cfg, files, progress=False, check_results_s=0).sent, flush=True)
runs = [("preprocess", None), ("features", None), *(("detection", m.name) for m in cfg.stages["detection"].models),
        ("fusion", None)]
for stage, model in runs:
    cli._schema_registry(cfg, stage_subjects(cfg, stage))  # what `tensorline run STAGE` does at start
    drain = threading.Event()
    drain.set()  # stop once the input is read and committed to its present end
    worker.run(cfg, stage, model=model, metrics_port=None, stop=threading.Event(), drain=drain)
'''


@pytest.mark.timeout(900)
def test_every_stage_round_trips_on_a_registry_with_other_ids(namespace, kafka_bootstrap, tmp_path) -> None:
    import os
    import struct
    import sys
    import tomllib

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from tensorline.ops import topics as topic_tools
    from tensorline.schemas.registry import schema_text

    root = Path(__file__).resolve().parents[2]
    models = tmp_path / "models"
    models.mkdir()
    with registry.Server({}, first_id=101) as server:
        text = (root / "pipeline.toml").read_text()
        table = tomllib.loads(text)
        text = text.replace('name = "demo"', f'name = "{namespace}"\nbootstrap = "{kafka_bootstrap}"', 1)
        text = text.replace('.tensorline/models/', f'{models}/')
        text = text.replace('strategy = "stacking"', 'strategy = "soft_vote"\njoin_timeout_ms = 3600000')
        text = text.replace('params = { path = ".tensorline/models/stacker.json" }', "")
        text = text.replace(f'params = {{ path = "{models}/stacker.json" }}', "")
        text += f'\n[schema_registry]\nurl = "{server.url}"\n'
        path = tmp_path / "pipeline.toml"
        path.write_text(text)
        cfg = config.load(path)
        assert cfg.fusion.strategy == "soft_vote" and table["pipeline"]["name"] == "demo"
        clients.create_topics(cfg)
        files = []
        rng = np.random.default_rng(0)
        for i in range(6):
            files.append(tmp_path / f"img{i}.npy")
            np.save(files[-1], rng.integers(0, 4096, (64, 64)).astype(np.uint16))

        # Two records no stage can read: one framed with the built-in id 1 (not this registry's),
        # one with the id of a record this version does not read (another name).
        foreign = {**json.loads(schema_text("tensorline.v1.Record")), "name": "Sample"}
        foreign_id = RegistryClient(server.url).register("elsewhere-value", json.dumps(foreign))
        good = bytes(encode_record(RECORD))
        producer = clients.producer(cfg)
        try:
            for wire_id in (1, foreign_id):
                producer.send(cfg.topic("raw").name, key=b"bad", value=struct.pack(">bI", 0, wire_id) + good[5:])
            producer.flush(30)
        finally:
            producer.close()

        done = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, str(path), str(models), *map(str, files)],
                              capture_output=True, text=True, timeout=800, cwd=tmp_path,
                              env={**os.environ, "TENSORLINE_STATE_DIR": str(tmp_path / "state")})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "sent 6" in done.stdout

        client = RegistryClient(server.url)
        expected = {"raw": 101, "preprocessed": 101, "features": 101, "detections": 102, "results": 103}
        for key, wire_id in expected.items():
            topic = cfg.topic(key).name
            assert client.latest(f"{topic}-value").id == wire_id, key  # registered under TopicNameStrategy
            values = [r.value for r in topic_tools.read_all(cfg, topic) if r.key != b"bad"]
            assert values and {struct.unpack_from(">bI", v)[1] for v in values} == {wire_id}, key
        dead = topic_tools.read_all(cfg, cfg.topic(cfg.dlq).name)
        reasons = sorted(dict(d.headers)["tl.dlq.reason"].decode() for d in dead)
        assert reasons == ["UnknownSchemaId", "WriterSchemaMismatch"], reasons
        messages = " | ".join(dict(d.headers)["tl.dlq.message"].decode() for d in dead)
        assert f"schema id 1 is not in the schema registry at {server.url}" in messages
        assert f"schema id {foreign_id} at {server.url} (tensorline.v1.Sample) is not a schema" in messages

        deserialize = AvroDeserializer(SchemaRegistryClient({"url": server.url}))
        results_topic = cfg.topic("results").name
        results = [deserialize(r.value, SerializationContext(results_topic, MessageField.VALUE))
                   for r in topic_tools.read_all(cfg, results_topic)]
        assert len(results) == 6 and all(r["contributors"] for r in results) and not any(r["partial"] for r in results)


def test_a_registry_down_at_start_stops_the_worker_with_one_fatal_line(namespace, kafka_bootstrap, tmp_path) -> None:
    import os
    import sys

    from tensorline.ops import broker

    port = broker.free_port()  # nothing listens there
    path = tmp_path / "pipeline.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{kafka_bootstrap}"\n'
                    '[topics]\nraw = {}\nout = {}\n[stages.scale]\ninput = "raw"\noutput = "out"\n'
                    'kind = "tensorline.stages.testing:Scale"\n'
                    f'[schema_registry]\nurl = "http://127.0.0.1:{port}"\ntimeout_ms = 2000\n')
    done = subprocess.run([sys.executable, "-m", "tensorline.cli", "run", "scale", "-c", str(path),
                           "--metrics-port", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TENSORLINE_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 3, done.stderr[-2000:]  # fatal: the supervisor gives it up at once
    assert done.stderr.strip().splitlines()[-1] == (
        f"tensorline run scale: stopped by a fatal error: schema registry POST "
        f"http://127.0.0.1:{port}/subjects/{namespace}.out-value/versions: unreachable: [Errno 111] Connection refused")


def test_a_registry_gone_after_start_is_retried_not_dead_lettered(namespace, kafka_bootstrap, write_pipeline,
                                                                   tmp_path, monkeypatch) -> None:
    import struct
    import threading

    from prometheus_client import REGISTRY

    from tensorline.engine import worker
    from tensorline.ops import broker
    from tensorline.ops import topics as topic_tools
    from tensorline.schemas import registry as ids
    from tensorline.schemas.registry import schema_text
    from tensorline.schemas.registry_client import connect
    from tensorline.stages.testing import scale_pipeline_body
    from tests.conftest import wait_for

    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    port = broker.free_port()
    # Another writer's Record: the same wire form with another doc, so a registry gives it its own id.
    variant = json.loads(schema_text("tensorline.v1.Record"))
    variant["doc"] = "a Record registered by another producer"

    def registry_with_variant() -> tuple[registry.Server, int]:
        server = registry.Server({}, port=port).start()  # ids 1, 2, 3 are its built-ins: the codec's too
        return server, RegistryClient(server.url).register("elsewhere-value", json.dumps(variant))

    server, variant_id = registry_with_variant()
    cfg = write_pipeline(tmp_path / "p.toml", scale_pipeline_body(partitions=1)
                         + f'factor = 2.0\n[schema_registry]\nurl = "{server.url}"\n')
    stop = threading.Event()
    record = bytes(encode_record(Record("a", "a.npy", TS, {"x": np.ones(3, np.float32)}, stage="produce")))
    producer = clients.producer(cfg)
    runner = None
    try:
        connect(server.url, subjects.stage_subjects(cfg, "scale"))  # what `tensorline run scale` does
        runner = threading.Thread(target=worker.run, args=(cfg, "scale"),
                                  kwargs={"metrics_port": None, "stop": stop}, daemon=True)
        runner.start()
        producer.send(cfg.topic("in").name, key=b"a", value=record)
        producer.flush(30)
        out = cfg.topic("out").name
        wait_for(lambda: len(topic_tools.read_all(cfg, out, timeout_s=5)) == 1, 120, "the first record through")

        server.stop()  # the registry goes away; a record framed with an id this worker never met arrives
        producer.send(cfg.topic("in").name, key=b"b", value=struct.pack(">bI", 0, variant_id) + record[5:])
        producer.flush(30)
        retries = lambda: REGISTRY.get_sample_value(  # noqa: E731
            "tensorline_retries_total", {"stage": "scale", "model": "", "error": "RegistryUnavailable"}) or 0
        wait_for(lambda: retries() >= 1, 120, "a retry on the unreachable registry")
        assert topic_tools.read_all(cfg, cfg.topic(cfg.dlq).name, timeout_s=5) == []

        server, again = registry_with_variant()  # back, with the same ids
        assert again == variant_id
        wait_for(lambda: len(topic_tools.read_all(cfg, out, timeout_s=5)) == 2, 180, "the second record through")
        assert topic_tools.read_all(cfg, cfg.topic(cfg.dlq).name, timeout_s=5) == []
    finally:
        stop.set()
        if runner is not None:
            runner.join(60)
        producer.close()
        server.stop()
        ids.install_builtin()


def test_a_stage_reads_an_evolved_writer_schema_and_dead_letters_an_incompatible_one_once(
        namespace, kafka_bootstrap, write_pipeline, tmp_path, monkeypatch) -> None:
    import struct
    import threading

    from fastavro import schemaless_writer

    from tensorline.engine import worker
    from tensorline.ops import topics as topic_tools
    from tensorline.schemas import decode_record
    from tensorline.schemas import registry as ids
    from tensorline.schemas.registry import schema_text
    from tensorline.schemas.registry_client import connect
    from tensorline.stages.testing import scale_pipeline_body
    from tests.conftest import drained, wait_for

    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))

    def newer_record(drop: str) -> dict:
        """Our Record as a newer producer's: tensorline.v2, `drop` removed, `site` added with a default."""
        schema = json.loads(schema_text("tensorline.v1.Record"))
        schema["namespace"] = "tensorline.v2"
        schema["fields"] = [f for f in schema["fields"] if f["name"] != drop]
        schema["fields"].append({"name": "site", "type": "string", "default": ""})
        return schema

    def framed(wire_id: int, schema: dict, record_id: str) -> bytes:
        """A record written with `schema`, framed with `wire_id`."""
        datum = {"record_id": record_id, "source": "a.npy", "ingest_ts_ms": TS, "site": "lyon", "attributes": {},
                 "tensors": {"x": {"dtype": "float32", "shape": [3], "data": np.ones(3, np.float32).tobytes()}},
                 "label": None, "stage": "produce", "model": None}
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, wire_id))
        schemaless_writer(buf, parse_schema(schema, named_schemas={}),
                          {f["name"]: datum[f["name"]] for f in schema["fields"]})
        return buf.getvalue()

    evolved, incompatible = newer_record(drop="label"), newer_record(drop="stage")  # ours has no default for stage
    with registry.Server({}) as server:
        client = RegistryClient(server.url)
        evolved_id = client.register("elsewhere-value", json.dumps(evolved))
        incompatible_id = client.register("other-value", json.dumps(incompatible))
        cfg = write_pipeline(tmp_path / "p.toml", scale_pipeline_body(partitions=1)
                             + f'factor = 2.0\n[schema_registry]\nurl = "{server.url}"\n')
        out, dlq = cfg.topic("out").name, cfg.topic(cfg.dlq).name
        stop = threading.Event()
        producer = clients.producer(cfg)
        runner = None
        try:
            connect(server.url, subjects.stage_subjects(cfg, "scale"))  # what `tensorline run scale` does
            runner = threading.Thread(target=worker.run, args=(cfg, "scale"),
                                      kwargs={"metrics_port": None, "stop": stop}, daemon=True)
            runner.start()
            sent = {key: producer.send(cfg.topic("in").name, key=key.encode(), value=value).get(30)
                    for key, value in (("evolved", framed(evolved_id, evolved, "evolved")),
                                       ("incompatible", framed(incompatible_id, incompatible, "incompatible")))}
            wait_for(lambda: topic_tools.read_all(cfg, out, timeout_s=5), 120, "the evolved record through")
            wait_for(lambda: topic_tools.read_all(cfg, dlq, timeout_s=5), 120, "the incompatible one dead-lettered")
            wait_for(lambda: drained(cfg), 60, "the stage committed past both")
        finally:
            stop.set()
            if runner is not None:
                runner.join(60)
            producer.close()
            ids.install_builtin()
        outputs, dead = topic_tools.read_all(cfg, out, timeout_s=5), topic_tools.read_all(cfg, dlq, timeout_s=5)
        assert [r.key for r in outputs] == [b"evolved"]
        record = decode_record(outputs[0].value)  # written with the stage's own schema, the defaults filled in
        assert (record.record_id, record.ingest_ts_ms, record.label, record.stage) == ("evolved", TS, None, "scale")
        np.testing.assert_array_equal(record.tensors["x"], np.full(3, 2.0, np.float32))
        assert [r.key for r in dead] == [b"incompatible"]  # once
        headers = {k: v.decode() for k, v in dead[0].headers if k.startswith("tl.dlq.")}
        assert headers["tl.dlq.reason"] == "IncompatibleWriterSchema"
        assert (headers["tl.dlq.topic"], headers["tl.dlq.partition"], headers["tl.dlq.offset"]) == (
            cfg.topic("in").name, str(sent["incompatible"].partition), str(sent["incompatible"].offset))
        assert headers["tl.dlq.message"] == (
            f"schema id {incompatible_id} at {server.url} (tensorline.v2.Record) cannot be read as "
            "tensorline.v1.Record: Record.stage: field added without a default (data written before it has no "
            "value for it)")
        assert dead[0].value == framed(incompatible_id, incompatible, "incompatible")  # the bytes untouched
        assert list(server.store.requests).count(f"GET /schemas/ids/{incompatible_id}") == 1  # decided once
