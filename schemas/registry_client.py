"""A client of the Confluent Schema Registry REST API (stdlib only), and the resolver that lets
the codec read ids a registry gave.

`RegistryClient(url)` registers a schema under a subject (its id), fetches a schema by id (cached:
an id never changes meaning), reads a subject's latest version and asks for a compatibility check.
Basic auth comes from $TENSORLINE_SCHEMA_REGISTRY_USER / _PASSWORD (never logged, never in an
error). Errors name the URL: `RegistryUnavailable` (a ConnectionError, so the runtime retries it:
an infrastructure failure is never a dead letter) when the registry cannot be reached or answers
5xx, `RegistryError` for an answer it refused, with Confluent's error code.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from tensorline.schemas.compat import backward_problems
from tensorline.schemas.errors import UnknownSchemaId
from tensorline.schemas.registry import (SCHEMA_NAMES, WriterSchema, builtin_by_form, canonical_form, install,
                                         schema_text)

USER_ENV = "TENSORLINE_SCHEMA_REGISTRY_USER"
PASSWORD_ENV = "TENSORLINE_SCHEMA_REGISTRY_PASSWORD"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Ten seconds: a registry answers in milliseconds; one that takes longer is down for our purposes.
DEFAULT_TIMEOUT_S = 10.0
# An id the registry does not have (or that is not a schema this version reads) is asked again only
# after a minute: a stream of such records costs one request a minute, not one per record.
UNKNOWN_ID_RETRY_S = 60.0

# Confluent's error codes this client names
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403


class RegistryError(RuntimeError):
    """The registry refused a request; `error_code` is Confluent's (40401, 40403, 409, ...)."""

    def __init__(self, message: str, *, url: str, status: int | None = None, error_code: int | None = None):
        super().__init__(message)
        self.url, self.status, self.error_code = url, status, error_code


class RegistryUnavailable(RegistryError, ConnectionError):
    """The registry could not be reached, timed out, or failed (HTTP 5xx): may pass."""


class WriterSchemaMismatch(UnknownSchemaId):
    """A registry id whose schema is none of the schemas this version of tensorline reads."""


class IncompatibleWriterSchema(WriterSchemaMismatch):
    """A registry id whose schema is a version of one this version reads (the same record name)
    that Avro schema resolution cannot read as ours: a field we need without a default is missing,
    or a type changed beyond a promotion. The message names the fields."""


@dataclass(frozen=True)
class Version:
    """One version of a subject, as `GET /subjects/{s}/versions/{v}` returns it."""

    subject: str
    version: int
    id: int
    schema: str


def redact(url: str) -> str:
    """`url` without user and password, to name in errors and logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, "")).rstrip("/")


class RegistryClient:
    """Talks to one registry; safe to share between threads."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, user: str | None = None,
                 password: str | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"schema registry url {redact(url)!r}: expected http(s)://host[:port][/path]")
        self.url = redact(url)
        user = user if user is not None else os.environ.get(USER_ENV) or parts.username
        password = password if password is not None else os.environ.get(PASSWORD_ENV) or parts.password or ""
        self._auth = ("Basic " + base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
                                                  .encode()).decode()) if user else None
        self.timeout_s = timeout_s
        self._schemas: dict[int, str] = {}
        self._registered: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no credentials
        return f"RegistryClient({self.url!r})"

    # -- the API -------------------------------------------------------------------------------
    def register(self, subject: str, schema: str) -> int:
        """The id of `schema` under `subject`, registering it as the subject's next version if it is
        new there (409 when the subject's compatibility rule refuses it)."""
        key = (subject, json.dumps(json.loads(schema), separators=(",", ":")))
        with self._lock:
            if key in self._registered:
                return self._registered[key]
        body = self._request("POST", f"/subjects/{_q(subject)}/versions", {"schema": schema})
        schema_id = int(body["id"])
        with self._lock:
            self._registered[key] = schema_id
            self._schemas.setdefault(schema_id, schema)
        return schema_id

    def schema(self, schema_id: int) -> str:
        """The schema text behind an id (cached: ids are immutable). RegistryError 40403 if none."""
        with self._lock:
            if schema_id in self._schemas:
                return self._schemas[schema_id]
        body = self._request("GET", f"/schemas/ids/{int(schema_id)}")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise RegistryError(f"{self.url}: schema id {schema_id} is a {body['schemaType']} schema, not Avro",
                                url=self.url, error_code=SCHEMA_NOT_FOUND)
        with self._lock:
            self._schemas[schema_id] = body["schema"]
        return body["schema"]

    def latest(self, subject: str) -> Version | None:
        """The subject's latest version, or None when the subject has none."""
        try:
            body = self._request("GET", f"/subjects/{_q(subject)}/versions/latest")
        except RegistryError as e:
            if e.error_code in (SUBJECT_NOT_FOUND, VERSION_NOT_FOUND):
                return None
            raise
        return Version(body["subject"], int(body["version"]), int(body["id"]), body["schema"])

    def subjects(self) -> list[str]:
        return list(self._request("GET", "/subjects"))

    def compatibility(self, subject: str, schema: str) -> tuple[bool, list[str]]:
        """The registry's verdict on `schema` against the subject's latest version under the
        subject's rule: (compatible, the registry's messages when it gives them)."""
        try:
            body = self._request("POST", f"/compatibility/subjects/{_q(subject)}/versions/latest?verbose=true",
                                 {"schema": schema})
        except RegistryError as e:
            if e.error_code in (SUBJECT_NOT_FOUND, VERSION_NOT_FOUND):
                return True, []  # nothing registered yet: anything is compatible
            raise
        return bool(body["is_compatible"]), [str(m) for m in body.get("messages", ())]

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        url = self.url + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Accept": CONTENT_TYPE + ", application/json",
                                              **({"Content-Type": CONTENT_TYPE} if data else {})})
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
                code, message = err.get("error_code"), err.get("message") or str(err)
            except (ValueError, AttributeError):
                code, message = None, raw[:200].decode(errors="replace") or e.reason
            cls = RegistryUnavailable if e.code >= 500 else RegistryError
            hint = " (check $TENSORLINE_SCHEMA_REGISTRY_USER and _PASSWORD)" if e.code in (401, 403) else ""
            raise cls(f"schema registry {method} {url}: HTTP {e.code}: {message}{hint}", url=url, status=e.code,
                      error_code=code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryUnavailable(f"schema registry {method} {url}: unreachable: {reason}", url=url) from None
        except ValueError as e:
            raise RegistryError(f"schema registry {method} {url}: not a JSON answer: {e}", url=url) from None


def _q(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


# The built-in schema a writer's record resolves to, by the record's unqualified name (Avro matches
# records so: a tensorline.v2.Record is read as our tensorline.v1.Record).
_BUILTIN_BY_RECORD = {name.rpartition(".")[2]: name for name in SCHEMA_NAMES.values()}


class Resolver:
    """Names the registry ids a process reads: the writer schema is fetched once per id and matched
    to a built-in schema by its Parsing Canonical Form (same form: the same bytes on the wire), or
    else to the built-in record of its name if BACKWARD compatibility (`compat.py`) says ours reads
    it (a `WriterSchema`: the codec reads it by Avro schema resolution).
    An id the registry lacks raises UnknownSchemaId (a dead letter) and is asked again only after
    UNKNOWN_ID_RETRY_S; one whose schema is none of ours (WriterSchemaMismatch) or one ours cannot
    read (IncompatibleWriterSchema) is a dead letter decided once (an id's schema never changes); an
    unreachable registry raises RegistryUnavailable (retried, never a dead letter)."""

    def __init__(self, client: RegistryClient, clock=time.monotonic):
        self.client, self._clock = client, clock
        self._failed: dict[int, tuple[float, UnknownSchemaId]] = {}  # id -> (asked again after, error)

    def __call__(self, schema_id: int) -> str | WriterSchema:
        failed = self._failed.get(schema_id)
        if failed and self._clock() < failed[0]:
            raise failed[1].with_traceback(None)  # raised afresh: its traceback does not grow
        try:
            text = self.client.schema(schema_id)
        except RegistryUnavailable:
            raise
        except RegistryError as e:
            return self._fail(schema_id, UnknownSchemaId(
                f"schema id {schema_id} is not in the schema registry at {self.client.url}: {e}"),
                self._clock() + UNKNOWN_ID_RETRY_S)
        where = f"schema id {schema_id} at {self.client.url}"
        try:
            name = builtin_by_form().get(canonical_form(text))
        except Exception as e:  # noqa: BLE001 - anything the registry holds that fastavro cannot parse
            return self._fail(schema_id, WriterSchemaMismatch(
                f"{where} does not parse as Avro: {type(e).__name__}: {e}"))
        if name is not None:
            return name
        full = _full_name(text)
        name = _BUILTIN_BY_RECORD.get(full.rpartition(".")[2])
        if name is None:
            return self._fail(schema_id, WriterSchemaMismatch(
                f"{where} ({full}) is not a schema this version of tensorline reads (its record name "
                f"is none of {', '.join(_BUILTIN_BY_RECORD)})"))
        problems = backward_problems(schema_text(name), text)
        if problems:
            return self._fail(schema_id, IncompatibleWriterSchema(
                f"{where} ({full}) cannot be read as {name}: {'; '.join(problems)}"))
        return WriterSchema(name, text)

    def _fail(self, schema_id: int, error: UnknownSchemaId, retry_at: float = float("inf")) -> NoReturn:
        self._failed[schema_id] = (retry_at, error)
        raise error


def _full_name(text: str) -> str:
    try:
        s = json.loads(text)
        return s["name"] if "." in s["name"] else f"{s.get('namespace', '')}.{s['name']}".lstrip(".")
    except (ValueError, KeyError, TypeError):
        return "unnamed"


def connect(url: str, subjects: Mapping[str, str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, int]:
    """Register each schema this process writes under its subject (subject -> built-in name) and
    install the ids the registry returned, with a resolver for every other id read: what a stage
    or producer does at start (a tool that only reads passes no subjects: nothing is asked until
    an id is met). A built-in schema written later without an id is registered then under its
    full name (RecordNameStrategy; the registry gives the same id as under any topic's subject).
    RegistryUnavailable or RegistryError (the caller makes it fatal) when the registry is down
    or refuses a schema."""
    client = RegistryClient(url, timeout_s=timeout_s)
    ids: dict[str, int] = {}
    for subject, name in subjects.items():
        got = client.register(subject, schema_text(name))
        if ids.setdefault(name, got) != got:
            raise RegistryError(f"{client.url}: {name} has id {ids[name]} under one subject and {got} under "
                                f"{subject}; a message carries one id per schema", url=client.url)
    install(ids, Resolver(client), lambda name: client.register(name, schema_text(name)))
    return ids
