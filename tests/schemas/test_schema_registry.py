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
