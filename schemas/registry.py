"""The local schema registry: a fixed, append-only map of wire schema id <-> schema name.

Ids go in the Confluent header of every message, so an id is never reused or reassigned:
a new or changed schema gets the next id, and old ids stay here so replaying old topics still
decodes (see EVOLUTION.md). Each schema lives in `<full name>.avsc` beside this module;
named types it references (Tensor, ModelRef) are resolved from their own files by fastavro.
"""

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from fastavro.schema import load_schema

from tensorline.schemas.errors import UnknownSchemaId, UnknownSchemaName

RECORD = "tensorline.v1.Record"
DETECTION = "tensorline.v1.Detection"
FUSED_RESULT = "tensorline.v1.FusedResult"

SCHEMA_NAMES: Mapping[int, str] = MappingProxyType({1: RECORD, 2: DETECTION, 3: FUSED_RESULT})
_SCHEMA_IDS: Mapping[str, int] = MappingProxyType({n: i for i, n in SCHEMA_NAMES.items()})
_SCHEMA_DIR = Path(__file__).parent


def schema_id(name: str) -> int:
    """The wire id of a registered schema name."""
    try:
        return _SCHEMA_IDS[name]
    except KeyError:
        raise UnknownSchemaName(
            f"unknown schema name {name!r}; expected one of {', '.join(_SCHEMA_IDS)}"
        ) from None


def schema_name(wire_id: int) -> str:
    """The schema name registered under a wire id."""
    try:
        return SCHEMA_NAMES[wire_id]
    except KeyError:
        raise UnknownSchemaId(
            f"unknown schema id {wire_id}; expected one of {', '.join(map(str, SCHEMA_NAMES))}"
        ) from None


@cache
def parsed_schema(name: str) -> dict[str, Any]:
    """The fastavro-parsed schema for a registered name, loaded from disk once per process."""
    schema_id(name)  # unregistered names raise UnknownSchemaName, not FileNotFoundError
    return cast(dict[str, Any], load_schema(str(_SCHEMA_DIR / f"{name}.avsc")))
