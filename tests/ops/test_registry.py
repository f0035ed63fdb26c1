"""`tensorline registry serve` answers as a Confluent Schema Registry; tensorline's own client
registers, fetches and caches against it; `schemas check` says what would break (no broker)."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tensorline import config
from tensorline.ops import registry
from tensorline.schemas import subjects
from tensorline.schemas.errors import UnknownSchemaId
from tensorline.schemas.registry import (DETECTION, FUSED_RESULT, RECORD, SCHEMA_NAMES, WriterSchema, canonical_form,
                                         schema_text)
from tensorline.schemas.registry_client import (RegistryClient, RegistryError, RegistryUnavailable, Resolver,
                                                WriterSchemaMismatch)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> config.PipelineConfig:
    return config.load(ROOT / "pipeline.toml")


@pytest.fixture
def served(demo: config.PipelineConfig):
    with registry.Server(subjects.served_subjects(demo)) as server:
        yield server


def get(url: str) -> tuple[int, str, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], json.loads(e.read())


def test_the_subjects_follow_the_stages_of_the_pipeline_file(demo: config.PipelineConfig) -> None:
    assert subjects.served_subjects(demo) == {
        "demo.raw-value": RECORD, "demo.preprocessed-value": RECORD, "demo.features-value": RECORD,
        "demo.detections-value": DETECTION, "demo.results-value": FUSED_RESULT,
        RECORD: RECORD, DETECTION: DETECTION, FUSED_RESULT: FUSED_RESULT,
    }
    # derived from the stage kinds, not the topic names: rename every topic and the subjects follow
    renamed = config.parse({**_table(demo), "topics": {k: {"name": f"x.{k}"} for k in
                                                      ("raw", "preprocessed", "features", "detections", "results")}})
    assert subjects.topic_schemas(renamed) == {"x.preprocessed": RECORD, "x.features": RECORD,
                                               "x.detections": DETECTION, "x.results": FUSED_RESULT, "x.raw": RECORD}
    assert subjects.served_subjects(None) == {n: n for n in SCHEMA_NAMES.values()}


def _table(cfg: config.PipelineConfig) -> dict:
    import tomllib
    return tomllib.loads(Path(cfg.path).read_text())


def test_reads_answer_with_confluents_shapes(served: registry.Server) -> None:
    status, ctype, body = get(f"{served.url}/schemas/ids/3")
    assert (status, ctype) == (200, registry.CONTENT_TYPE) and body == {"schema": schema_text(FUSED_RESULT)}
    assert get(f"{served.url}/schemas/ids/1/schema")[2] == json.loads(schema_text(RECORD))
    assert get(f"{served.url}/subjects")[2] == sorted(subjects.served_subjects(config.load(ROOT / "pipeline.toml")))
    assert get(f"{served.url}/subjects/demo.detections-value/versions")[2] == [1]
    for version in ("1", "latest"):
        assert get(f"{served.url}/subjects/demo.detections-value/versions/{version}")[2] == {
            "subject": "demo.detections-value", "version": 1, "id": 2, "schema": schema_text(DETECTION)}
    assert get(f"{served.url}/subjects/tensorline.v1.Record/versions/latest/schema")[2] == json.loads(
        schema_text(RECORD))
    assert {"subject": "demo.raw-value", "version": 1} in get(f"{served.url}/schemas/ids/1/versions")[2]
    assert get(f"{served.url}/config")[2] == {"compatibilityLevel": "BACKWARD"}


@pytest.mark.parametrize("path, status, body", [
    ("/schemas/ids/9", 404, {"error_code": 40403, "message": "Schema not found"}),
    ("/subjects/nope-value/versions", 404, {"error_code": 40401, "message": "Subject 'nope-value' not found."}),
    ("/subjects/demo.raw-value/versions/2", 404, {"error_code": 40402, "message": "Version 2 not found."}),
    ("/subjects/demo.raw-value/versions/x", 422, {"error_code": 42202, "message": "The specified version 'x' is not "
     "a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""}),
    ("/nothing/here", 404, {"error_code": 404, "message": "HTTP 404 Not Found"}),
])
def test_errors_answer_with_confluents_codes(served: registry.Server, path: str, status: int, body: dict) -> None:
    assert get(served.url + path) == (status, registry.CONTENT_TYPE, body)


def test_a_confluent_client_reads_the_served_schemas(served: registry.Server) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    client = SchemaRegistryClient({"url": served.url})
    assert client.get_schema(2).schema_str == schema_text(DETECTION)
    latest = client.get_latest_version("demo.results-value")
    assert (latest.schema_id, latest.version) == (3, 1)
    assert sorted(client.get_subjects()) == get(f"{served.url}/subjects")[2]


def test_with_a_token_confluents_client_reads_with_it_as_the_basic_auth_password(
        demo: config.PipelineConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from tensorline.engine import http

    monkeypatch.setenv(http.TOKEN_ENV, "registry-token")
    with registry.Server(subjects.served_subjects(demo)) as server:
        client = SchemaRegistryClient({"url": server.url, "basic.auth.user.info": "reader:registry-token"})
        assert client.get_schema(2).schema_str == schema_text(DETECTION)
        with pytest.raises(SchemaRegistryError) as refused:
            SchemaRegistryClient({"url": server.url}).get_schema(1)
        assert refused.value.http_status_code == 401


def test_tensorline_client_registers_fetches_and_caches(served: registry.Server) -> None:
    client = RegistryClient(served.url)
    assert client.register("demo.raw-value", schema_text(RECORD)) == 1  # already there: its id
    assert client.register("demo.raw-value", schema_text(RECORD)) == 1
    assert list(served.store.requests).count("POST /subjects/demo.raw-value/versions") == 1  # cached
    assert client.register("other-value", schema_text(DETECTION)) == 2  # ids are global per schema
    assert client.schema(3) == client.schema(3) == schema_text(FUSED_RESULT)
    assert list(served.store.requests).count("GET /schemas/ids/3") == 1  # an id never changes meaning
    new = json.loads(schema_text(RECORD))
    new["fields"].append({"name": "site", "type": "string", "default": ""})
    assert client.compatibility("demo.raw-value", json.dumps(new)) == (True, [])
    assert client.register("demo.raw-value", json.dumps(new)) == 4
    latest = client.latest("demo.raw-value")
    assert (latest.version, latest.id, canonical_form(latest.schema)) == (2, 4, canonical_form(json.dumps(new)))
    assert client.latest("never-value") is None
    new["fields"].append({"name": "ward", "type": "string"})
    compatible, messages = client.compatibility("demo.raw-value", json.dumps(new))
    assert not compatible and messages == [
        "Record.ward: field added without a default (data written before it has no value for it)"]
    with pytest.raises(RegistryError) as err:
        client.register("demo.raw-value", json.dumps(new))
    assert err.value.status == 409 and f"{served.url}/subjects/demo.raw-value/versions" in str(err.value)


def test_client_errors_name_the_url_and_never_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    class Auth(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"reader:s3cret").decode()
            body = json.dumps({"schema": schema_text(RECORD)} if ok else
                              {"error_code": 401, "message": "Unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Auth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("TENSORLINE_SCHEMA_REGISTRY_USER", "reader")
        monkeypatch.setenv("TENSORLINE_SCHEMA_REGISTRY_PASSWORD", "wrong")
        with pytest.raises(RegistryError) as err:
            RegistryClient(url).schema(1)
        assert str(err.value) == (f"schema registry GET {url}/schemas/ids/1: HTTP 401: Unauthorized "
                                  "(check $TENSORLINE_SCHEMA_REGISTRY_USER and _PASSWORD)")
        monkeypatch.setenv("TENSORLINE_SCHEMA_REGISTRY_PASSWORD", "s3cret")
        client = RegistryClient(url)
        assert client.schema(1) == schema_text(RECORD) and "s3cret" not in repr(client)
        assert seen[-1] == "Basic " + base64.b64encode(b"reader:s3cret").decode()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RegistryUnavailable, match=rf"schema registry GET {url}/schemas/ids/1: unreachable") as down:
        RegistryClient(url, timeout_s=2).schema(1)
    assert isinstance(down.value, ConnectionError)  # the runtime retries it: never a dead letter
    assert "s3cret" not in str(down.value)


def test_the_resolver_names_registry_ids_and_refuses_others(served: registry.Server) -> None:
    client = RegistryClient(served.url)
    evolved = json.loads(schema_text(RECORD))
    evolved["fields"].append({"name": "site", "type": "string", "default": ""})
    evolved_id = client.register("demo.raw-value", json.dumps(evolved))
    foreign = client.register("elsewhere-value", json.dumps({**evolved, "name": "Sample"}))
    now = [0.0]
    resolve = Resolver(client, clock=lambda: now[0])
    assert [resolve(i) for i in (1, 2, 3)] == [RECORD, DETECTION, FUSED_RESULT]
    assert resolve(evolved_id) == WriterSchema(RECORD, json.dumps(evolved))  # read by schema resolution
    with pytest.raises(WriterSchemaMismatch, match=rf"schema id {foreign} at {served.url} \(tensorline.v1.Sample\) "
                                                   "is not a schema this version of tensorline reads"):
        resolve(foreign)
    with pytest.raises(UnknownSchemaId, match=f"schema id 77 is not in the schema registry at {served.url}"):
        resolve(77)
    asked = list(served.store.requests).count("GET /schemas/ids/77")
    with pytest.raises(UnknownSchemaId):
        resolve(77)
    assert list(served.store.requests).count("GET /schemas/ids/77") == asked  # not asked again for a minute
    now[0] += 61
    with pytest.raises(UnknownSchemaId):
        resolve(77)
    assert list(served.store.requests).count("GET /schemas/ids/77") == asked + 1
    served.stop()  # a registry gone later: retried (a ConnectionError), never a dead letter, never cached
    from tensorline.engine.errors import Kind, classify
    for _ in range(2):
        with pytest.raises(RegistryUnavailable) as down:
            resolve(foreign + 1)
        assert classify(down.value) is Kind.TRANSIENT
    assert resolve(1) == RECORD  # what was read before is cached


def test_served_ids_can_start_elsewhere(demo: config.PipelineConfig) -> None:
    with registry.Server(subjects.served_subjects(demo), first_id=101) as server:
        client = RegistryClient(server.url)
        assert client.latest("demo.results-value").id == 103
        assert Resolver(client)(101) == RECORD


def test_schemas_check_says_what_would_break_before_anything_is_registered(served: registry.Server,
                                                                           demo: config.PipelineConfig) -> None:
    client = RegistryClient(served.url)
    # an older Record without `stage` (as if ours had added it without a default)
    older = json.loads(schema_text(RECORD))
    older["fields"] = [f for f in older["fields"] if f["name"] != "stage"]
    client.register("demo.features-value", json.dumps(older))
    before = len(served.store.requests)
    verdicts = {v.subject: v for v in registry.check(demo, served.url)}
    assert not [r for r in list(served.store.requests)[before:] if r.startswith("POST /subjects")]  # nothing registered
    assert verdicts["demo.raw-value"].status == "ok"
    assert verdicts["demo.raw-value"].line() == (
        "ok    demo.raw-value: tensorline.v1.Record is version 1 (id 1); the registry agrees")
    bad = verdicts["demo.features-value"]
    assert (bad.status, bad.problems) == ("error", (
        "Record.stage: field added without a default (data written before it has no value for it)",))
    assert bad.line().startswith("error demo.features-value: tensorline.v1.Record cannot read data written with "
                                 "version 2 (id 4); the registry agrees:")
    with registry.Server({}) as empty:
        assert {v.status for v in registry.check(demo, empty.url)} == {"new"}


def test_the_cli_check_exits_1_on_a_break(served: registry.Server, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorline import cli

    assert cli.main(["schemas", "-c", str(ROOT / "pipeline.toml"), "check", "--url", served.url]) == 0
    assert capsys.readouterr().out.count("ok    demo.") == 5
    older = json.loads(schema_text(DETECTION))
    older["fields"] = [f for f in older["fields"] if f["name"] != "classes"]
    RegistryClient(served.url).register("demo.detections-value", json.dumps(older))
    assert cli.main(["schemas", "-c", str(ROOT / "pipeline.toml"), "check", "--url", served.url]) == 1
    assert "Detection.classes: field added without a default" in capsys.readouterr().out


def test_serve_logs_its_url_warns_beyond_localhost_and_stops_on_ctrl_c() -> None:
    import os
    import queue
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tensorline.cli", "registry", "-c", str(ROOT / "pipeline.toml"),
                             "serve", "--port", "0", "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as a script's & job
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        seen: list[dict] = []
        def said(prefix: str) -> bool:
            return any(e.get("event", "").startswith(prefix) for e in seen)

        while not (said("schema registry serving") and said("schema registry reachable beyond this host")):
            line = lines.get(timeout=60)
            if line.startswith("{"):
                seen.append(json.loads(line))
        url = next(e["url"] for e in seen if e["event"] == "schema registry serving")
        port = url.rsplit(":", 1)[1]
        assert get(f"http://127.0.0.1:{port}/subjects/demo.results-value/versions/latest")[2]["id"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
