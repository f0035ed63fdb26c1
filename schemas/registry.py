"""The schema ids in use: the built-in, append-only table, or the ids a schema registry gave.

Ids go in the Confluent header of every message, so a built-in id is never reused or reassigned:
a new or changed schema gets the next id, and old ids stay here so replaying old topics still
decodes (see EVOLUTION.md). Each schema lives in `<full name>.avsc` beside this module;
named types it references (Tensor, ModelRef) are resolved from their own files by fastavro.

With a schema registry configured (`[schema_registry] url`), a process `install`s the ids the
registry returned for the schemas it writes, and a resolver for any other id it reads (the
registry's writer schema, fetched once, matched to a built-in schema by its Parsing Canonical
Form, or a compatible evolution of one: a `WriterSchema`, read by Avro schema resolution); the
codec's per-message cost stays one dict lookup.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from fastavro import parse_schema
from fastavro.schema import load_schema, to_parsing_canonical_form

from tensorline.schemas.errors import UnknownSchemaId, UnknownSchemaName

RECORD = "tensorline.v1.Record"
DETECTION = "tensorline.v1.Detection"
FUSED_RESULT = "tensorline.v1.FusedResult"

# The embedded default: what every message is framed with when no registry is configured.
SCHEMA_NAMES: Mapping[int, str] = MappingProxyType({1: RECORD, 2: DETECTION, 3: FUSED_RESULT})
_SCHEMA_IDS: Mapping[str, int] = MappingProxyType({n: i for i, n in SCHEMA_NAMES.items()})
_SCHEMA_DIR = Path(__file__).parent


@dataclass(frozen=True)
class WriterSchema:
    """An id's writer schema that is not a built-in one but a compatible evolution of `name` (an
    added or removed field with a default, a widened number, ...): its data is read with `text` as
    the writer schema and the built-in `name` as the reader schema."""

    name: str
    text: str


# The ids in use (the built-in table until `install`), the writer schemas of the ids read that are
# evolutions of a built-in one, and the resolver of ids not among them.
_ids: dict[str, int] = dict(_SCHEMA_IDS)
_names: dict[int, str] = dict(SCHEMA_NAMES)
_writers: dict[int, str] = {}
_resolve: Callable[[int], str | WriterSchema] | None = None
_register: Callable[[str], int] | None = None
_listeners: list[Callable[[], None]] = []
_lock = threading.Lock()


def schema_id(name: str) -> int:
    """The wire id a schema name is written with."""
    try:
        return _ids[name]
    except KeyError:
        pass
    if name in _SCHEMA_IDS and _register is not None:
        wire_id = _register(name)
        _ids[name] = wire_id
        _names.setdefault(wire_id, name)
        return wire_id
    if name in _SCHEMA_IDS and _resolve is not None:
        raise UnknownSchemaName(f"schema {name} has no id from the schema registry: this process did not "
                                f"register it (it registers the schemas its stage writes when it starts)")
    raise UnknownSchemaName(
        f"unknown schema name {name!r}; expected one of {', '.join(_SCHEMA_IDS)}"
    ) from None


def schema_name(wire_id: int) -> str:
    """The schema name a wire id stands for (a reader reads it as that built-in schema); with a
    registry, an id met for the first time is looked up there once (UnknownSchemaId when it is not
    a schema this version reads)."""
    try:
        return _names[wire_id]
    except KeyError:
        pass
    if _resolve is None:
        raise UnknownSchemaId(f"unknown schema id {wire_id}; expected one of {', '.join(map(str, _names))}")
    resolved = _resolve(wire_id)
    if isinstance(resolved, WriterSchema):
        _writers[wire_id] = resolved.text
        resolved = resolved.name
    _names[wire_id] = resolved
    return resolved


def writer_schema(wire_id: int) -> str | None:
    """The writer schema of an id `schema_name` resolved to an evolution of its built-in schema;
    None when the id's writer schema is the built-in one."""
    return _writers.get(wire_id)


def install(ids: Mapping[str, int], resolve: Callable[[int], str | WriterSchema],
            register: Callable[[str], int] | None = None) -> None:
    """Use a registry's ids in place of the built-in table: `ids` are the ids this process writes
    with (name -> id, as the registry returned them), `resolve` names any other id it reads (or
    gives its `WriterSchema`), and `register` gives the id of a built-in schema first written
    without one (a worker registers what it writes at start; a replay or a tool writing another
    schema registers it then)."""
    global _resolve, _register
    with _lock:
        _ids.clear()
        _ids.update(ids)
        _names.clear()
        _names.update({i: n for n, i in ids.items()})
        _writers.clear()
        _resolve, _register = resolve, register
        _changed()


def install_builtin() -> None:
    """Back to the embedded default table (no registry)."""
    global _resolve, _register
    with _lock:
        _ids.clear()
        _ids.update(_SCHEMA_IDS)
        _names.clear()
        _names.update(SCHEMA_NAMES)
        _writers.clear()
        _resolve = _register = None
        _changed()


def ids_in_use() -> dict[str, int]:
    """Name -> id of the schemas this process writes with."""
    return dict(_ids)


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever the ids change (the codec drops the message frames it built)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


@cache
def parsed_schema(name: str) -> dict[str, Any]:
    """The fastavro-parsed schema for a built-in name, loaded from disk once per process."""
    if name not in _SCHEMA_IDS:  # unknown names raise UnknownSchemaName, not FileNotFoundError
        schema_id(name)
    return cast(dict[str, Any], load_schema(str(_SCHEMA_DIR / f"{name}.avsc")))


@cache
def schema_text(name: str) -> str:
    """The built-in schema `name` as one self-contained JSON document, each named type it uses
    (Tensor, ModelRef) defined inline where it first appears: what a schema registry stores and
    any Avro library parses without this folder."""
    if name not in _SCHEMA_IDS:
        schema_id(name)
    return json.dumps(_inline(_avsc(name), set()), separators=(",", ":"))


def _avsc(name: str) -> Any:
    return json.loads((_SCHEMA_DIR / f"{name}.avsc").read_text())


def _inline(node: Any, defined: set[str]) -> Any:
    """`node` with references to the .avsc files beside this module replaced by their definition
    the first time each appears (Avro names must be defined before they are referenced)."""
    if isinstance(node, str):
        if node not in defined and (_SCHEMA_DIR / f"{node}.avsc").is_file() and "." in node:
            return _inline(_avsc(node), defined)
        return node
    if isinstance(node, list):
        return [_inline(n, defined) for n in node]
    if isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            full = node["name"] if "." in node["name"] else f"{node.get('namespace', '')}.{node['name']}"
            defined.add(full.lstrip("."))
        return {k: (_inline(v, defined) if k in ("type", "fields", "items", "values") else v)
                for k, v in node.items()}
    return node


def canonical_form(schema: str | Mapping[str, Any] | list[Any]) -> str:
    """The Parsing Canonical Form of a schema (JSON text or parsed): two schemas with the same
    form write and read the same bytes, whatever their docs, defaults or logical types."""
    parsed = json.loads(schema) if isinstance(schema, str) else schema
    return cast(str, to_parsing_canonical_form(parse_schema(parsed, _write_hint=False)))


@cache
def builtin_by_form() -> Mapping[str, str]:
    """Parsing Canonical Form -> built-in schema name: which built-in schema a writer schema is."""
    return MappingProxyType({canonical_form(schema_text(n)): n for n in _SCHEMA_IDS})
