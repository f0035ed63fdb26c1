"""BACKWARD compatibility by Avro's resolution rules: the rules one by one, the project's own
schemas, and (property) every pair the check calls compatible is one fastavro resolves."""

from __future__ import annotations

import copy
import io
import json

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_one
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorline.schemas.compat import backward_problems, is_backward_compatible
from tensorline.schemas.registry import DETECTION, FUSED_RESULT, RECORD, schema_text


def record(*fields: dict, name: str = "R", **extra: object) -> dict:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields), **extra}


def field(name: str, type_: object, **extra: object) -> dict:
    return {"name": name, "type": type_, **extra}


def test_the_project_schemas_read_themselves_and_not_each_other() -> None:
    for name in (RECORD, DETECTION, FUSED_RESULT):
        assert backward_problems(schema_text(name), schema_text(name)) == []
    assert backward_problems(schema_text(DETECTION), schema_text(RECORD)) == [
        "Detection: the writer's record Record cannot be read as record Detection (names differ)"]


def test_a_field_added_needs_a_default_and_a_removed_one_is_skipped() -> None:
    old = record(field("a", "int"))
    assert backward_problems(record(field("a", "int"), field("b", "string")), old) == [
        "R.b: field added without a default (data written before it has no value for it)"]
    assert backward_problems(record(field("a", "int"), field("b", "string", default="")), old) == []
    assert backward_problems(record(), old) == []  # a field removed: the reader skips it
    # a renamed field is a new field, unless the new one lists the old name as an alias
    assert backward_problems(record(field("b", "int")), old) == [
        "R.b: field added without a default (data written before it has no value for it)"]
    assert backward_problems(record(field("b", "int", aliases=["a"])), old) == []


@pytest.mark.parametrize("writer, reader, ok", [
    ("int", "long", True), ("int", "float", True), ("int", "double", True), ("long", "float", True),
    ("long", "double", True), ("float", "double", True), ("string", "bytes", True), ("bytes", "string", True),
    ("long", "int", False), ("double", "float", False), ("float", "long", False), ("int", "string", False),
    ("boolean", "int", False), ("null", "string", False),
])
def test_type_promotions(writer: str, reader: str, ok: bool) -> None:
    problems = backward_problems(record(field("x", reader)), record(field("x", writer)))
    assert problems == ([] if ok else [f"R.x: the writer's {writer} cannot be read as {reader}"])


def test_logical_types_resolve_as_their_underlying_type() -> None:
    ts = {"type": "long", "logicalType": "timestamp-millis"}
    assert backward_problems(record(field("t", ts)), record(field("t", "long"))) == []
    assert backward_problems(record(field("t", "long")), record(field("t", ts))) == []


def test_unions() -> None:
    optional = ["null", "string"]
    assert backward_problems(record(field("x", optional)), record(field("x", "string"))) == []  # made optional
    assert backward_problems(record(field("x", "string")), record(field("x", optional))) == [
        "R.x<null>: the writer's null cannot be read as string"]
    assert backward_problems(record(field("x", ["null", "long"])), record(field("x", ["null", "int"]))) == []
    assert backward_problems(record(field("x", ["null", "int", "string"])), record(field("x", ["null", "int"]))) == []
    assert backward_problems(record(field("x", ["null", "int"])), record(field("x", ["null", "int", "string"]))) == [
        "R.x<string>: the reader's union [null, int] has no branch that reads the writer's string"]


def test_enums() -> None:
    def enum(*symbols: str, **extra: object) -> dict:
        return {"type": "enum", "name": "E", "symbols": list(symbols), **extra}
    assert backward_problems(record(field("e", enum("A", "B", "C"))), record(field("e", enum("A", "B")))) == []
    assert backward_problems(record(field("e", enum("A"))), record(field("e", enum("A", "B")))) == [
        "R.e: enum E lacks the writer's symbols ['B'] and has no default"]
    assert backward_problems(record(field("e", enum("A", default="A"))), record(field("e", enum("A", "B")))) == []


def test_nested_records_arrays_maps_and_fixed() -> None:
    inner_old = record(field("v", "float"), name="Inner")
    inner_new = record(field("v", "double"), field("w", "int"), name="Inner")
    old = record(field("xs", {"type": "array", "items": inner_old}), field("m", {"type": "map", "values": "Inner"}))
    new = record(field("xs", {"type": "array", "items": inner_new}), field("m", {"type": "map", "values": "Inner"}))
    # a named type is matched once, where it first appears: its problem is reported there
    assert backward_problems(new, old) == [
        "R.xs.<items>.w: field added without a default (data written before it has no value for it)"]
    fixed = lambda n: {"type": "fixed", "name": "F", "size": n}  # noqa: E731
    assert backward_problems(record(field("f", fixed(4))), record(field("f", fixed(8)))) == [
        "R.f: fixed F has size 4, the writer's 8"]
    assert backward_problems(record(field("f", "bytes")), record(field("f", fixed(4)))) == [
        "R.f: the writer's fixed F cannot be read as bytes"]


def test_recursive_types_terminate() -> None:
    node = record(field("value", "int"), field("next", ["null", "t.R"], default=None))
    assert backward_problems(node, node) == []
    wider = record(field("value", "long"), field("next", ["null", "t.R"], default=None))
    assert is_backward_compatible(wider, node) and not is_backward_compatible(node, wider)


def test_json_text_and_parsed_json_give_the_same_answer() -> None:
    old, new = record(field("a", "int")), record(field("a", "int"), field("b", "int"))
    assert backward_problems(json.dumps(new), json.dumps(old)) == backward_problems(new, old) != []


# -- property: what the check calls compatible, fastavro's schema resolution reads --------------
PRIMITIVE = st.sampled_from(["null", "boolean", "int", "long", "float", "double", "bytes", "string"])
NAMES = st.uuids().map(lambda u: f"N{u.hex[:12]}")
FIELD_NAMES = st.sampled_from([f"f{i}" for i in range(8)])


def _types(depth: int = 2) -> st.SearchStrategy[object]:
    if depth == 0:
        return PRIMITIVE
    inner = _types(depth - 1)
    return st.one_of(
        PRIMITIVE,
        inner.map(lambda t: {"type": "array", "items": t}),
        inner.map(lambda t: {"type": "map", "values": t}),
        st.lists(st.sampled_from(["int", "long", "string", "boolean"]), min_size=1, max_size=3, unique=True)
        .map(lambda bs: ["null", *bs]),
        st.builds(lambda name, fields: record(*fields, name=name), NAMES,
                  st.lists(st.tuples(FIELD_NAMES, inner).map(lambda p: field(*p)), max_size=3,
                           unique_by=lambda f: f["name"])),
    )


WRITERS = st.builds(lambda fields: record(*fields), st.lists(
    st.tuples(FIELD_NAMES, _types()).map(lambda p: field(*p)), min_size=1, max_size=5, unique_by=lambda f: f["name"]))
# bytes -> string is allowed by the spec (test_type_promotions) but reads only bytes that are UTF-8,
# which random data is not: left out of the evolutions whose old data is random.
PROMOTE = {"int": "long", "long": "double", "float": "double", "string": "bytes"}


@st.composite
def evolutions(draw: st.DrawFn) -> tuple[dict, dict]:
    """A writer record and a reader made from it by a few of the changes people make."""
    writer = draw(WRITERS)
    reader = copy.deepcopy(writer)
    for _ in range(draw(st.integers(0, 3))):
        fields = reader["fields"]
        op = draw(st.sampled_from(["add_default", "add_bare", "remove", "promote", "demote", "optional"]))
        i = draw(st.integers(0, max(0, len(fields) - 1)))
        free = [n for n in (f"g{k}" for k in range(6)) if n not in {f["name"] for f in fields}]
        if op == "add_default" and free:
            fields.append(field(free[0], ["null", "int"], default=None))
        elif op == "add_bare" and free:
            fields.append(field(free[0], "int"))
        elif op == "remove" and fields:
            fields.pop(i)
        elif op in ("promote", "demote") and fields and isinstance(fields[i]["type"], str):
            table = PROMOTE if op == "promote" else {v: k for k, v in PROMOTE.items() if v != "bytes"}
            fields[i]["type"] = table.get(fields[i]["type"], fields[i]["type"])
        elif op == "optional" and fields and isinstance(fields[i]["type"], str) and fields[i]["type"] != "null":
            fields[i]["type"] = ["null", fields[i]["type"]]
    return writer, reader


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evolutions())
def test_compatible_means_fastavro_reads_old_data_with_the_new_schema(pair: tuple[dict, dict]) -> None:
    writer, reader = pair
    assert backward_problems(writer, writer) == []
    if backward_problems(reader, writer):
        return
    w, r = parse_schema(writer), parse_schema(reader)
    datum = generate_one(w)
    buf = io.BytesIO()
    schemaless_writer(buf, w, datum)
    buf.seek(0)
    schemaless_reader(buf, w, r)  # raises SchemaResolutionError if the check was wrong


@settings(max_examples=100, deadline=None)
@given(WRITERS, st.sampled_from(["int", "string", "boolean"]))
def test_a_field_added_without_a_default_always_breaks(writer: dict, type_: str) -> None:
    reader = copy.deepcopy(writer)
    reader["fields"].append(field("added", type_))
    assert backward_problems(reader, writer) == [
        "R.added: field added without a default (data written before it has no value for it)"]
    reader["fields"][-1]["default"] = {"int": 0, "string": "", "boolean": False}[type_]
    assert backward_problems(reader, writer) == []
