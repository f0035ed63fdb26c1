"""Registry ids whose writer schema is an evolution of a built-in one: a compatible evolution is read
by Avro schema resolution into the built-in schema's view (defaults filled in); an incompatible one is
an IncompatibleWriterSchema naming the id and the field, decided once per id. No broker: the
registry is an in-memory stand-in behind the real Resolver."""

from __future__ import annotations

import copy
import io
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorline.schemas import Record, decode_record, registry
from tensorline.schemas.codec import decode_plain
from tensorline.schemas.errors import UnknownSchemaId
from tensorline.schemas.registry import DETECTION, FUSED_RESULT, RECORD, SCHEMA_NAMES, schema_text
from tensorline.schemas.registry_client import (SCHEMA_NOT_FOUND, IncompatibleWriterSchema, RegistryError,
                                                RegistryUnavailable, Resolver, WriterSchemaMismatch)

URL = "http://registry.test"
Convert = Callable[[Any], Any]


class Registry:
    """What the Resolver asks of a registry client: schema texts by id (and how often it asked)."""

    url = URL

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.asked: Counter[int] = Counter()
        self.down = False

    def add(self, schema: dict) -> int:
        wire_id = 100 + len(self.texts)
        self.texts[wire_id] = json.dumps(schema)
        return wire_id

    def schema(self, wire_id: int) -> str:
        self.asked[wire_id] += 1
        if self.down:
            raise RegistryUnavailable(f"{URL}: unreachable", url=URL)
        if wire_id not in self.texts:
            raise RegistryError("HTTP 404: Schema not found", url=URL, status=404, error_code=SCHEMA_NOT_FOUND)
        return self.texts[wire_id]


@pytest.fixture(scope="module")
def stand_in() -> Iterator[Registry]:
    stand_in = Registry()
    registry.install({name: wire_id for wire_id, name in SCHEMA_NAMES.items()}, Resolver(stand_in))
    yield stand_in
    registry.install_builtin()


def message(wire_id: int, writer: dict, datum: dict) -> bytes:
    """A Confluent message of `datum` written with `writer`, framed with `wire_id`."""
    buf = io.BytesIO(struct.pack(">bI", 0, wire_id))
    buf.seek(5)
    schemaless_writer(buf, parse_schema(writer, named_schemas={}), datum)
    return buf.getvalue()


# -- values of a schema, and compatible writer schemas for them ------------------------------------
PRIMITIVE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**63 - 1)),
    "float": st.one_of(st.integers(-(2**24), 2**24).map(float), st.floats(width=32, allow_nan=False)),
    "double": st.floats(allow_nan=False),
    "string": st.text(max_size=6),
    "bytes": st.one_of(st.text(max_size=6).map(str.encode), st.binary(max_size=6)),
}


def kind(t: Any) -> str:
    if isinstance(t, list):
        return "union"
    return t if isinstance(t, str) else t["type"]


def values(t: Any) -> st.SearchStrategy[Any]:
    """Values of the (inline, self-contained) schema `t`, as fastavro writes and reads them with
    logical types dropped."""
    k = kind(t)
    if k == "union":
        return st.one_of([values(b) for b in t])
    if k == "array":
        return st.lists(values(t["items"]), max_size=3)
    if k == "map":
        return st.dictionaries(st.text(max_size=4), values(t["values"]), max_size=3)
    if k == "record":
        return st.fixed_dictionaries({f["name"]: values(f["type"]) for f in t["fields"]})
    return PRIMITIVE_VALUES[k]


# writer types each reader type reads besides itself (the Avro spec's promotions), and whether a
# value the reader holds can be written with one: how the writer writes it, or None
PROMOTED_FROM = {"long": ("int",), "float": ("int", "long"), "double": ("int", "long", "float"),
                 "string": ("bytes",), "bytes": ("string",)}


def written_as(writer: str, reader: str, v: Any) -> Any:
    if writer == reader:
        return v
    if reader == "string":
        return v.encode()
    if reader == "bytes":
        return v.decode()  # UnicodeDecodeError: not UTF-8, so not writable as a string
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("not integral")
    limit = 2**31 if writer == "int" else 2**63
    if not -limit <= int(v) < limit:
        raise ValueError("out of range")
    return int(v)


def writable(writer: str, reader: str, held: list[Any]) -> bool:
    try:
        for v in held:
            written_as(writer, reader, v)
    except (ValueError, OverflowError):
        return False
    return True


def same(v: Any) -> Any:
    return v


def evolve(draw: st.DrawFn, t: Any, held: list[Any]) -> tuple[Any, Convert, Convert]:
    """A writer type that reader type `t` reads, drawn from the changes producers make (a field
    added, an optional one removed, a number narrowed, string <-> bytes, a union narrowed to a
    branch, fields reordered); then how a value the reader holds is written, and what the reader
    reads back. `held`: the values it must write (a narrower type must hold all of them)."""
    k = kind(t)
    if k in PRIMITIVE_VALUES:
        options = [w for w in PROMOTED_FROM.get(k, ()) if writable(w, k, held)]
        writer = draw(st.sampled_from([t, *options]))
        if writer is t:
            return t, same, same
        return writer, lambda v: written_as(writer, k, v), same
    if k in ("array", "map"):
        part = "items" if k == "array" else "values"
        inner = [x for v in held for x in (v if k == "array" else v.values())]
        w, to_w, seen = evolve(draw, t[part], inner)
        if k == "array":
            return {"type": k, part: w}, lambda v: [to_w(x) for x in v], lambda v: [seen(x) for x in v]
        return ({"type": k, part: w}, lambda v: {a: to_w(x) for a, x in v.items()},
                lambda v: {a: seen(x) for a, x in v.items()})
    if k == "union":  # ["null", T]: ours are all so
        null, branch = t
        present = [v for v in held if v is not None]
        w, to_w, seen = evolve(draw, branch, present)
        options = [[null, w], *([w] if len(present) == len(held) else []), *([] if present else [null])]
        writer = draw(st.sampled_from(options))
        if writer == null:
            return writer, same, same
        return writer, lambda v: None if v is None else to_w(v), lambda v: None if v is None else seen(v)
    return evolve_record(draw, t, held)


def evolve_record(draw: st.DrawFn, t: dict, held: list[dict]) -> tuple[dict, Convert, Convert]:
    fields, kept = [], []
    for f in t["fields"]:
        if "default" in f and draw(st.booleans()):
            continue  # removed: the reader fills in its default
        w, to_w, seen = evolve(draw, f["type"], [v[f["name"]] for v in held])
        fields.append({k: v for k, v in f.items() if k != "default" or w == f["type"]} | {"type": w})
        kept.append((f["name"], to_w, seen))
    added = draw(st.lists(st.sampled_from(["string", "long", "double", "boolean", ["null", "string"],
                                           {"type": "array", "items": "int"}]), max_size=2))
    extra = [{"name": f"added_{i}", "type": a} for i, a in enumerate(added)]
    fields = draw(st.permutations(fields + extra))
    writer = {**t, "fields": fields, "doc": "evolved"}
    if t.get("namespace") == "tensorline.v1" and t["name"] in ("Record", "Detection", "FusedResult"):
        writer["namespace"] = draw(st.sampled_from(["tensorline.v1", "tensorline.v2", "com.example"]))
    defaults = {f["name"]: f["default"] for f in t["fields"] if "default" in f}

    def to_writer(v: dict) -> dict:
        out = {name: to_w(v[name]) for name, to_w, _ in kept}
        return out | {f["name"]: draw(values(f["type"])) for f in extra}

    def seen(v: dict) -> dict:
        return defaults | {name: read(v[name]) for name, _, read in kept}

    return writer, to_writer, seen


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_compatible_evolution_reads_as_the_built_in_schema_with_defaults(stand_in: Registry,
                                                                            data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([RECORD, DETECTION, FUSED_RESULT]))
    reader = json.loads(schema_text(name))
    datum = data.draw(values(reader))
    writer, to_writer, seen = evolve(data.draw, reader, [datum])
    wire_id = stand_in.add(writer)
    framed = message(wire_id, writer, to_writer(datum))
    assert decode_plain(framed, name) == seen(datum)


# -- writer schemas ours cannot read ---------------------------------------------------------------
# For each kind of a required field of ours: writer types it cannot be read from.
UNREADABLE = {"string": ["long", "boolean", "double", {"type": "array", "items": "string"}],
              "long": ["double", "float", "string", "boolean"],
              "boolean": ["string", "int"],
              "bytes": ["long", "boolean"],
              "map": ["string", {"type": "array", "items": "string"}],
              "array": ["string", {"type": "map", "values": "string"}, {"type": "array", "items": "boolean"}],
              "record": ["string", ["null", "string"]]}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_an_incompatible_writer_schema_is_a_typed_error_naming_the_id_and_the_field(stand_in: Registry,
                                                                                    data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([RECORD, DETECTION, FUSED_RESULT]))
    reader = json.loads(schema_text(name))
    writer, _, _ = evolve(data.draw, reader, [data.draw(values(reader))])  # compatible so far
    writer = copy.deepcopy(writer)
    record, ours, where = writer, reader, reader["name"]
    if name == RECORD and data.draw(st.booleans()):  # break the Tensor inside instead
        record, ours, where = _tensor(writer), _tensor(reader), "Record.tensors.<values>"
    field_name = data.draw(st.sampled_from([f["name"] for f in ours["fields"] if "default" not in f]))
    i = next(i for i, f in enumerate(record["fields"]) if f["name"] == field_name)
    if data.draw(st.booleans()):
        del record["fields"][i]  # removed (or renamed) though ours has no default for it
    else:
        ours_type = next(f["type"] for f in ours["fields"] if f["name"] == field_name)
        record["fields"][i] = {**record["fields"][i], "type": data.draw(st.sampled_from(UNREADABLE[kind(ours_type)]))}
    wire_id = stand_in.add(writer)
    framed = struct.pack(">bI", 0, wire_id)  # refused from its id: the payload is never read
    with pytest.raises(IncompatibleWriterSchema) as refused:
        decode_plain(framed, name)
    assert f"schema id {wire_id} at {URL} ({writer['namespace']}.{writer['name']}) cannot be read as {name}: " in str(
        refused.value)
    assert f"{where}.{field_name}" in str(refused.value)


def _tensor(reader: dict) -> dict:
    return next(f for f in reader["fields"] if f["name"] == "tensors")["type"]["values"]


# -- once per id -----------------------------------------------------------------------------------
def v2_record(*, drop: str = "label") -> dict:
    """Our Record as a newer producer's: in tensorline.v2, `drop` removed, a `site` added (with a
    default, as a registry under BACKWARD asks), the timestamp an int."""
    schema = json.loads(schema_text(RECORD))
    schema["namespace"] = "tensorline.v2"
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop]
    schema["fields"].append({"name": "site", "type": "string", "default": ""})
    next(f for f in schema["fields"] if f["name"] == "ingest_ts_ms")["type"] = "int"
    return schema


def test_an_evolved_record_decodes_to_a_record_its_tensors_viewing_the_message(stand_in: Registry) -> None:
    image = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)  # 64 KiB: read as a view
    writer = v2_record()
    wire_id = stand_in.add(writer)
    framed = message(wire_id, writer, {
        "record_id": "r-1", "source": "scan/1.dcm", "ingest_ts_ms": 17, "stage": "produce", "site": "lyon",
        "tensors": {"image": {"dtype": "float32", "shape": [128, 128], "data": image.tobytes()}},
        "attributes": {"study": "s1"}, "model": {"name": "backbone", "version": "3"}})
    record = decode_record(framed)
    assert isinstance(record, Record) and (record.record_id, record.ingest_ts_ms, record.label) == ("r-1", 17, None)
    assert record.model is not None and record.model.name == "backbone" and record.attributes == {"study": "s1"}
    np.testing.assert_array_equal(record.tensors["image"], image)
    assert not record.tensors["image"].flags.owndata  # a view of the message, as for our own id
    assert stand_in.asked[wire_id] == 1
    decode_record(framed)
    assert stand_in.asked[wire_id] == 1  # resolved once, then read from the codec's own table


def test_an_incompatible_id_is_decided_once(stand_in: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorline.schemas import registry_client

    checks: list[str] = []
    check = registry_client.backward_problems
    monkeypatch.setattr(registry_client, "backward_problems", lambda new, old: checks.append(old) or check(new, old))
    wire_id = stand_in.add(v2_record(drop="stage"))
    for _ in range(3):
        with pytest.raises(IncompatibleWriterSchema, match=rf"schema id {wire_id} at {URL} \(tensorline.v2.Record\) "
                                                           r"cannot be read as tensorline.v1.Record: Record.stage: "
                                                           "field added without a default"):
            decode_record(struct.pack(">bI", 0, wire_id))
    assert len(checks) == 1 and stand_in.asked[wire_id] == 1


def test_a_writer_record_of_another_name_is_no_schema_of_ours(stand_in: Registry) -> None:
    other = {**json.loads(schema_text(RECORD)), "name": "Sample"}
    wire_id = stand_in.add(other)
    with pytest.raises(WriterSchemaMismatch, match=rf"schema id {wire_id} at {URL} \(tensorline.v1.Sample\) is "
                                                   "not a schema this version of tensorline reads") as refused:
        decode_record(struct.pack(">bI", 0, wire_id))
    assert not isinstance(refused.value, IncompatibleWriterSchema)


def test_unknown_ids_and_a_registry_down_behave_as_before(stand_in: Registry) -> None:
    with pytest.raises(UnknownSchemaId, match=f"schema id 99 is not in the schema registry at {URL}"):
        decode_record(struct.pack(">bI", 0, 99))
    writer = v2_record()
    wire_id = stand_in.add(writer)
    framed = message(wire_id, writer, {"record_id": "r", "source": "s", "ingest_ts_ms": 1, "tensors": {},
                                       "attributes": {}, "stage": "p", "model": None, "site": ""})
    stand_in.down = True
    for _ in range(2):  # a ConnectionError (retried by the runtime, never a dead letter), not cached
        with pytest.raises(RegistryUnavailable):
            decode_record(framed)
    stand_in.down = False
    assert decode_record(framed).record_id == "r"
