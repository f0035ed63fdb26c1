"""The schema registry: fixed ids, versioned names, every .avsc parses, parsed once."""

import json
from pathlib import Path

import pytest

import tensorline.schemas
from tensorline.schemas.errors import UnknownSchemaId, UnknownSchemaName
from tensorline.schemas.registry import (
    DETECTION,
    FUSED_RESULT,
    RECORD,
    SCHEMA_NAMES,
    parsed_schema,
    schema_id,
    schema_name,
)

SCHEMA_DIR = Path(tensorline.schemas.__file__).parent


def test_ids_are_fixed() -> None:
    assert dict(SCHEMA_NAMES) == {1: RECORD, 2: DETECTION, 3: FUSED_RESULT}
    assert (RECORD, DETECTION, FUSED_RESULT) == (
        "tensorline.v1.Record", "tensorline.v1.Detection", "tensorline.v1.FusedResult"
    )
    assert [schema_id(schema_name(i)) for i in SCHEMA_NAMES] == list(SCHEMA_NAMES)


def test_registry_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        SCHEMA_NAMES[4] = "tensorline.v1.Other"  # type: ignore[index]


def test_unknown_id_and_name() -> None:
    with pytest.raises(UnknownSchemaId, match="unknown schema id 0"):
        schema_name(0)
    with pytest.raises(UnknownSchemaName, match="unknown schema name 'tensorline.v1.Tensor'"):
        parsed_schema("tensorline.v1.Tensor")


def test_schemas_are_parsed_once() -> None:
    assert parsed_schema(RECORD) is parsed_schema(RECORD)


def test_every_avsc_is_named_by_its_versioned_full_name() -> None:
    files = sorted(SCHEMA_DIR.glob("*.avsc"))
    assert [f.name for f in files] == [
        "tensorline.v1.Detection.avsc", "tensorline.v1.FusedResult.avsc",
        "tensorline.v1.ModelRef.avsc", "tensorline.v1.Record.avsc", "tensorline.v1.Tensor.avsc",
    ]
    for path in files:
        schema = json.loads(path.read_text())
        assert f"{schema['namespace']}.{schema['name']}.avsc" == path.name


def test_named_types_resolve_from_their_own_files() -> None:
    record = parsed_schema(RECORD)
    tensor = record["__named_schemas"]["tensorline.v1.Tensor"]
    assert [f["name"] for f in tensor["fields"]] == ["dtype", "shape", "data"]
    assert "tensorline.v1.ModelRef" in parsed_schema(DETECTION)["__named_schemas"]


def test_optional_fields_default_to_null() -> None:
    for name in SCHEMA_NAMES.values():
        fields = {f["name"]: f for f in parsed_schema(name)["fields"]}
        assert fields["label"]["type"] == ["null", "string"] and fields["label"]["default"] is None
    record_model = {f["name"]: f for f in parsed_schema(RECORD)["fields"]}["model"]
    assert record_model["default"] is None


def test_schema_text_is_self_contained_and_of_the_same_form() -> None:
    from fastavro import parse_schema

    from tensorline.schemas.registry import builtin_by_form, canonical_form, schema_text

    for name in SCHEMA_NAMES.values():
        text = schema_text(name)
        parse_schema(json.loads(text), named_schemas={})  # no file beside it needed
        assert canonical_form(text) == canonical_form(json.dumps(json.loads(text)))
        assert builtin_by_form()[canonical_form(text)] == name
    assert schema_text(RECORD).count('"name":"Tensor"') == 1  # each named type defined once


def test_installed_ids_replace_the_table_and_unknown_ids_are_resolved_once() -> None:
    from tensorline.schemas import registry

    asked: list[int] = []

    def resolve(wire_id: int) -> str:
        asked.append(wire_id)
        if wire_id == 12:
            return DETECTION
        raise UnknownSchemaId(f"schema id {wire_id} is not in the registry")

    try:
        registry.install({RECORD: 11}, resolve)
        assert schema_id(RECORD) == 11 and schema_name(11) == RECORD
        assert schema_name(12) == schema_name(12) == DETECTION and asked == [12]
        with pytest.raises(UnknownSchemaId, match="schema id 1 is not in the registry"):
            schema_name(1)  # the built-in ids mean nothing to a registry
        with pytest.raises(UnknownSchemaName, match="schema tensorline.v1.FusedResult has no id from the schema"):
            schema_id(FUSED_RESULT)
        registered: list[str] = []
        registry.install({}, resolve, lambda name: registered.append(name) or 13)
        assert schema_id(FUSED_RESULT) == schema_id(FUSED_RESULT) == 13 and registered == [FUSED_RESULT]
        assert schema_name(13) == FUSED_RESULT  # written once: read without asking the registry
        with pytest.raises(UnknownSchemaName):
            schema_id("tensorline.v1.Tensor")  # never registered: not a message schema
    finally:
        registry.install_builtin()
    assert schema_id(RECORD) == 1 and schema_name(2) == DETECTION


def test_installed_ids_frame_what_the_codec_writes_next() -> None:
    import numpy as np

    from tensorline.schemas import Record, decode_record, encode_record, read_header
    from tensorline.schemas import registry

    record = Record("r", "r.npy", 1, {"x": np.zeros(2, np.float32)}, stage="s")
    assert bytes(encode_record(record))[:5] == b"\x00\x00\x00\x00\x01"
    try:
        registry.install({RECORD: 11}, lambda wire_id: RECORD)
        message = encode_record(record)  # the frame built for id 1 is not reused
        assert bytes(message)[:5] == b"\x00\x00\x00\x00\x0b" and read_header(message) == RECORD
        assert decode_record(message).record_id == "r"
    finally:
        registry.install_builtin()
    assert bytes(encode_record(record))[:5] == b"\x00\x00\x00\x00\x01"
