"""`tensorline registry serve`: the Confluent Schema Registry REST API for the built-in schemas,
so kcat, Confluent's deserializers and any Confluent-compatible tool decode tensorline's topics.

The read side answers as a Confluent registry does (the same paths, JSON shapes, error codes and
content type): `GET /schemas/ids/{id}` (and `/schema`, the bare text), `/schemas/ids/{id}/versions`,
`/subjects`, `/subjects/{s}/versions`, `/subjects/{s}/versions/{version|latest}` (and `/schema`),
`/config`. It starts with the built-in schemas (ids 1, 2, 3: the embedded table every message
carries when no registry is configured) under each data topic's `<topic>-value` subject of the
pipeline file and under each record's full name (`schemas/subjects.py`).

It also takes registrations (`POST /subjects/{s}/versions`, `POST /subjects/{s}`,
`POST /compatibility/subjects/{s}/versions/latest`), in memory, under BACKWARD compatibility
(`schemas/compat.py`), so a pipeline may point `[schema_registry] url` at it for a trial; they are
gone when it stops, so production wants a real registry. Bound to localhost unless told otherwise;
beyond it, set `TENSORLINE_HTTP_TOKEN` so that only clients given the token (as the basic-auth
password: Confluent's `basic.auth.user.info`) reach it (`tensorline.engine.http`).

`check` is `tensorline schemas check`: this version's schemas against a registry's latest
versions, under BACKWARD, before anything is registered.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorline import logs
from tensorline.config import PipelineConfig
from tensorline.engine import http
from tensorline.schemas.compat import backward_problems
from tensorline.schemas.registry import SCHEMA_NAMES, canonical_form, schema_text
from tensorline.schemas.registry_client import DEFAULT_TIMEOUT_S, RegistryClient
from tensorline.schemas.subjects import topic_schemas, value_subject
from tensorline.ops import signals

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Schema Registry's own default port.
DEFAULT_PORT = 8081
_MAX_BODY_BYTES = 1024 * 1024  # a schema is a few KiB; refuse anything absurd before reading it


class ApiError(Exception):
    """An answer in Confluent's error shape: HTTP `status`, `{"error_code", "message"}`."""

    def __init__(self, status: int, error_code: int, message: str):
        super().__init__(message)
        self.status, self.error_code = status, error_code


def _log():
    return logs.get(component="registry")


class Store:
    """Schemas by id and subjects' versions, in memory; thread-safe. Ids are global: the same
    schema has one id whatever the subject, as in Confluent's. "The same" is the same JSON (docs
    and defaults included, whitespace not), as Confluent compares them; two schemas of one Parsing
    Canonical Form with different docs get two ids, both of which tensorline reads."""

    def __init__(self, subjects: Mapping[str, str], *, first_id: int = 1):
        self._lock = threading.Lock()
        self._schemas: dict[int, str] = {}
        self._by_text: dict[str, int] = {}
        self._subjects: dict[str, list[int]] = {}
        self._next_id = first_id
        self.requests: deque[str] = deque(maxlen=1000)  # "GET /subjects", newest last: what clients asked
        # The built-in ids keep their table's order (1, 2, 3 by default; first_id shifts them).
        for name in SCHEMA_NAMES.values():
            self._add(schema_text(name))
        for subject, name in subjects.items():
            self._subjects.setdefault(subject, []).append(self._by_text[_same(schema_text(name))])

    def _add(self, text: str) -> int:
        key = _same(text)
        if key not in self._by_text:
            self._by_text[key] = self._next_id
            self._schemas[self._next_id] = text
            self._next_id += 1
        return self._by_text[key]

    # -- reads ---------------------------------------------------------------------------------
    def schema(self, schema_id: int) -> str:
        with self._lock:
            if schema_id not in self._schemas:
                raise ApiError(404, 40403, "Schema not found")
            return self._schemas[schema_id]

    def subjects(self) -> list[str]:
        with self._lock:
            return sorted(self._subjects)

    def versions(self, subject: str) -> list[int]:
        with self._lock:
            return list(range(1, len(self._ids(subject)) + 1))

    def version(self, subject: str, version: str) -> dict[str, Any]:
        with self._lock:
            ids = self._ids(subject)
            if version == "latest" or version == "-1":
                number = len(ids)
            else:
                try:
                    number = int(version)
                    if not 1 <= number <= 2**31 - 1:
                        raise ValueError(version)
                except ValueError:
                    raise ApiError(422, 42202, "The specified version '{}' is not a valid version id. Allowed "
                                   "values are between [1, 2^31-1] and the string \"latest\"".format(version)) from None
            if number > len(ids):
                raise ApiError(404, 40402, f"Version {number} not found.")
            return {"subject": subject, "version": number, "id": ids[number - 1],
                    "schema": self._schemas[ids[number - 1]]}

    def subject_versions_of(self, schema_id: int) -> list[dict[str, Any]]:
        with self._lock:
            if schema_id not in self._schemas:
                raise ApiError(404, 40403, "Schema not found")
            return [{"subject": s, "version": ids.index(schema_id) + 1}
                    for s, ids in sorted(self._subjects.items()) if schema_id in ids]

    def _ids(self, subject: str) -> list[int]:
        if subject not in self._subjects:
            raise ApiError(404, 40401, f"Subject '{subject}' not found.")
        return self._subjects[subject]

    # -- writes --------------------------------------------------------------------------------
    def register(self, subject: str, text: str) -> int:
        """The schema's id under `subject`, added as its next version when new there; refused (409)
        when it cannot read data written with the subject's latest version (BACKWARD)."""
        _form(text)
        with self._lock:
            ids = self._subjects.get(subject, [])
            known = self._by_text.get(_same(text))
            if known is not None and known in ids:
                return known
            if ids:
                problems = backward_problems(text, self._schemas[ids[-1]])
                if problems:
                    raise ApiError(409, 409, "Schema being registered is incompatible with an earlier schema for "
                                   f"subject \"{subject}\", details: {problems}")
            schema_id = self._add(text)
            self._subjects.setdefault(subject, []).append(schema_id)
            return schema_id

    def lookup(self, subject: str, text: str) -> dict[str, Any]:
        _form(text)
        with self._lock:
            ids = self._ids(subject)
            schema_id = self._by_text.get(_same(text))
            if schema_id not in ids:
                raise ApiError(404, 40403, "Schema not found")
            return {"subject": subject, "version": ids.index(schema_id) + 1, "id": schema_id,
                    "schema": self._schemas[schema_id]}

    def compatibility(self, subject: str, version: str, text: str) -> dict[str, Any]:
        _form(text)
        with self._lock:
            if not self._subjects.get(subject):
                return {"is_compatible": True, "messages": []}
        old = self.version(subject, version)["schema"]
        problems = backward_problems(text, old)
        return {"is_compatible": not problems, "messages": problems}


def _same(text: str) -> str:
    """What two registrations must share to be one schema: the JSON, whitespace aside."""
    return json.dumps(json.loads(text), separators=(",", ":"))


def _form(text: Any) -> str:
    if not isinstance(text, str):
        raise ApiError(422, 42201, "Invalid schema: expected a JSON object with a \"schema\" string")
    try:
        return canonical_form(text)
    except Exception as e:  # noqa: BLE001 - whatever fastavro says is wrong with it
        raise ApiError(422, 42201, f"Invalid schema: {type(e).__name__}: {e}") from None


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/schemas/ids/(\d+)"), "schema_by_id"),
    ("GET", re.compile(r"/schemas/ids/(\d+)/schema"), "schema_text"),
    ("GET", re.compile(r"/schemas/ids/(\d+)/versions"), "schema_versions"),
    ("GET", re.compile(r"/subjects"), "subjects"),
    ("GET", re.compile(r"/subjects/([^/]+)/versions"), "versions"),
    ("GET", re.compile(r"/subjects/([^/]+)/versions/([^/]+)"), "version"),
    ("GET", re.compile(r"/subjects/([^/]+)/versions/([^/]+)/schema"), "version_schema"),
    ("GET", re.compile(r"/config"), "config"),
    ("GET", re.compile(r"/config/([^/]+)"), "config"),
    ("GET", re.compile(r"/schemas/types"), "types"),
    ("GET", re.compile(r"/"), "root"),
    ("POST", re.compile(r"/subjects/([^/]+)/versions"), "register"),
    ("POST", re.compile(r"/subjects/([^/]+)"), "lookup"),
    ("POST", re.compile(r"/compatibility/subjects/([^/]+)/versions/([^/]+)"), "compatibility"),
]


class _Handler(http.Handler):
    store: Store  # set on the subclass each Server makes
    protocol_version = "HTTP/1.1"  # keep-alive: Confluent's clients reuse connections

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        self.store.requests.append(f"{method} {parts.path}")
        try:
            body = self._body() if method in ("POST", "PUT") else None
            matched = [(m, name, match) for m, pattern, name in _ROUTES if (match := pattern.fullmatch(path))]
            for m, name, match in matched:
                if m == method:
                    args = [urllib.parse.unquote(g) for g in match.groups()]
                    status, answer = getattr(self, "_" + name)(*args, body=body)
                    self._json(status, answer)
                    return
            if matched:
                raise ApiError(405, 405, "HTTP 405 Method Not Allowed")
            raise ApiError(404, 404, "HTTP 404 Not Found")
        except ApiError as e:
            self._json(e.status, {"error_code": e.error_code, "message": str(e)})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            raise ApiError(413, 413, f"request body of {length} bytes; at most {_MAX_BODY_BYTES}")
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise ApiError(400, 50005, "Unrecognized JSON body") from None

    def _schema_field(self, body: Any) -> str:
        if not isinstance(body, dict) or body.get("schemaType", "AVRO") != "AVRO" or body.get("references"):
            raise ApiError(422, 42201, "Invalid schema: only Avro schemas without references are taken here")
        return body.get("schema")

    # -- routes: each returns (status, JSON answer) ----------------------------------------------
    def _schema_by_id(self, schema_id: str, body: Any) -> tuple[int, Any]:
        return 200, {"schema": self.store.schema(int(schema_id))}

    def _schema_text(self, schema_id: str, body: Any) -> tuple[int, Any]:
        return 200, json.loads(self.store.schema(int(schema_id)))

    def _schema_versions(self, schema_id: str, body: Any) -> tuple[int, Any]:
        return 200, self.store.subject_versions_of(int(schema_id))

    def _subjects(self, body: Any) -> tuple[int, Any]:
        return 200, self.store.subjects()

    def _versions(self, subject: str, body: Any) -> tuple[int, Any]:
        return 200, self.store.versions(subject)

    def _version(self, subject: str, version: str, body: Any) -> tuple[int, Any]:
        return 200, self.store.version(subject, version)

    def _version_schema(self, subject: str, version: str, body: Any) -> tuple[int, Any]:
        return 200, json.loads(self.store.version(subject, version)["schema"])

    def _config(self, subject: str | None = None, body: Any = None) -> tuple[int, Any]:
        return 200, {"compatibilityLevel": "BACKWARD"}

    def _types(self, body: Any) -> tuple[int, Any]:
        return 200, ["AVRO"]

    def _root(self, body: Any) -> tuple[int, Any]:
        return 200, {}

    def _register(self, subject: str, body: Any) -> tuple[int, Any]:
        return 200, {"id": self.store.register(subject, self._schema_field(body))}

    def _lookup(self, subject: str, body: Any) -> tuple[int, Any]:
        return 200, self.store.lookup(subject, self._schema_field(body))

    def _compatibility(self, subject: str, version: str, body: Any) -> tuple[int, Any]:
        answer = self.store.compatibility(subject, version, self._schema_field(body))
        if "verbose=true" not in (urllib.parse.urlsplit(self.path).query or ""):
            answer = {"is_compatible": answer["is_compatible"]}
        return 200, answer

    def _json(self, status: int, answer: Any) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(http.Server):
    """The registry on a thread of its own: `start()`, `url`, `stop()`; a context manager."""

    def __init__(self, subjects: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 0, first_id: int = 1):
        self.store = Store(subjects, first_id=first_id)
        super().__init__(_Handler, host=host, port=port, name="schema registry", log=_log(), store=self.store)


def serve(subjects: Mapping[str, str], host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM (port 0: a free port; the URL is logged)."""
    server = Server(subjects, host=host, port=port).start()
    log = _log()
    log.info("schema registry serving", url=server.url, subjects=len(subjects),
             ids=", ".join(f"{i}={n}" for i, n in SCHEMA_NAMES.items()))
    try:
        signals.wait_for_stop()
    finally:
        server.stop()


@dataclass(frozen=True)
class Verdict:
    """One subject of `tensorline schemas check`: `status` is ok, new or error."""

    subject: str
    schema: str
    status: str
    detail: str
    problems: tuple[str, ...] = ()

    def line(self) -> str:
        text = f"{self.status:5s} {self.subject}: {self.schema} {self.detail}"
        return "\n".join([text, *(f"        {p}" for p in self.problems)])


def check(cfg: PipelineConfig, url: str, *, ask_registry: bool = True,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Verdict]:
    """Each data topic's schema (this version's .avsc) against the latest version registered under
    its subject, under BACKWARD: can the new schema read what was written with the registered one.
    Nothing is registered. With `ask_registry`, the registry's compatibility endpoint is asked too,
    and a disagreement is named."""
    client = RegistryClient(url, timeout_s=timeout_s)
    verdicts = []
    for topic, name in topic_schemas(cfg).items():
        subject, text = value_subject(topic), schema_text(name)
        latest = client.latest(subject)
        if latest is None:
            verdicts.append(Verdict(subject, name, "new", "(nothing registered: the first worker registers it)"))
            continue
        problems = tuple(backward_problems(text, latest.schema))
        where = f"version {latest.version} (id {latest.id})"
        registry_says = ""
        if ask_registry:
            compatible, messages = client.compatibility(subject, text)
            if compatible == (not problems):
                registry_says = "; the registry agrees"
            else:
                registry_says = (f"; but the registry says {'compatible' if compatible else 'incompatible'}"
                                 + (f": {'; '.join(messages)}" if messages else ""))
        if problems:
            verdicts.append(Verdict(subject, name, "error", f"cannot read data written with {where}{registry_says}:",
                                    problems))
        elif canonical_form(text) == canonical_form(latest.schema):
            verdicts.append(Verdict(subject, name, "ok", f"is {where}{registry_says}"))
        else:
            verdicts.append(Verdict(subject, name, "ok", f"reads data written with {where} (BACKWARD)"
                                    f"{registry_says}"))
    return verdicts
