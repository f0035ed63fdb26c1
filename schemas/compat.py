"""BACKWARD compatibility of two Avro schemas, by the Avro specification's schema resolution.

`backward_problems(new, old)` lists what keeps a reader on `new` from reading data written with
`old` (empty: compatible), each naming where (`Record.tensors.<values>.dtype`) and why. It is what
a Confluent registry checks under BACKWARD before it registers a new version; `tensorline schemas
check` runs it on the project's .avsc files against the latest registered versions first.

The rules (Avro 1.11 "Schema Resolution"): records match by unqualified name (or a reader alias)
and fields by name (or a reader field's alias); a reader field the writer lacks needs a default;
a writer field the reader lacks is skipped. Numbers widen int -> long -> float -> double; string
and bytes read each other. An enum reader needs every writer symbol unless it has a default
symbol; fixed types match name and size. A writer union needs each of its branches readable; a
reader union needs one branch to read the writer. Logical types resolve as their underlying type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# writer type -> the reader types that can read it besides itself (the spec's promotions)
PROMOTIONS: Mapping[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
NAMED = ("record", "error", "enum", "fixed")


def backward_problems(new: Any, old: Any) -> list[str]:
    """What breaks when data written with `old` is read with `new` (JSON text or parsed JSON)."""
    reader, writer = _Schema(new), _Schema(old)
    problems: list[str] = []
    _match(reader, reader.root, writer, writer.root, _path(reader.root, ""), problems, set())
    return problems


def is_backward_compatible(new: Any, old: Any) -> bool:
    return not backward_problems(new, old)


class _Schema:
    """A schema with its named types collected, so references resolve by full name."""

    def __init__(self, schema: Any):
        self.root = json.loads(schema) if isinstance(schema, str) else schema
        self.named: dict[str, dict[str, Any]] = {}
        self._collect(self.root, "")

    def _collect(self, node: Any, namespace: str) -> None:
        if isinstance(node, list):
            for n in node:
                self._collect(n, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in NAMED:
                full = _full_name(node, namespace)
                self.named.setdefault(full, node)
                namespace = full.rpartition(".")[0]
                for f in node.get("fields", ()):
                    self._collect(f["type"], namespace)
            elif kind in ("array", "map"):
                self._collect(node.get("items", node.get("values")), namespace)
            elif isinstance(kind, (dict, list)):
                self._collect(kind, namespace)

    def resolve(self, node: Any, namespace: str) -> tuple[Any, str]:
        """The definition behind a reference, and the namespace names inside it resolve in."""
        if isinstance(node, str) and node not in PRIMITIVES:
            for full in (node, f"{namespace}.{node}" if namespace else node):
                if full in self.named:
                    return self.named[full], full.rpartition(".")[0]
            raise ValueError(f"unknown type {node!r}")
        if isinstance(node, dict):
            kind = node.get("type")
            if kind in NAMED:
                return node, _full_name(node, namespace).rpartition(".")[0]
            if kind in PRIMITIVES:
                return kind, namespace  # {"type": "long", "logicalType": ...}: its underlying type
            if isinstance(kind, (str, dict, list)) and kind not in ("array", "map"):
                return self.resolve(kind, namespace)
        return node, namespace


def _full_name(node: Mapping[str, Any], namespace: str) -> str:
    name = node["name"]
    if "." in name:
        return name
    ns = node.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _kind(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "union"
    return "error" if node["type"] == "error" else node["type"]


def _path(node: Any, where: str) -> str:
    if where:
        return where
    return node["name"].rpartition(".")[2] if isinstance(node, dict) and "name" in node else "(root)"


def _describe(node: Any) -> str:
    if isinstance(node, list):
        return "union [" + ", ".join(_describe(n) for n in node) + "]"
    if isinstance(node, dict):
        return f"{node['type']} {node['name']}" if "name" in node else node["type"]
    return node


def _match(rs: _Schema, r: Any, ws: _Schema, w: Any, where: str, problems: list[str],
           seen: set[tuple[int, int]], r_ns: str = "", w_ns: str = "") -> None:
    r, r_ns = rs.resolve(r, r_ns)
    w, w_ns = ws.resolve(w, w_ns)
    rk, wk = _kind(r), _kind(w)
    if wk == "union":
        for branch in w:
            _match(rs, r, ws, branch, f"{where}<{_describe(ws.resolve(branch, w_ns)[0])}>", problems, seen, r_ns, w_ns)
        return
    if rk == "union":
        for branch in r:
            found: list[str] = []
            _match(rs, branch, ws, w, where, found, set(seen), r_ns, w_ns)
            if not found and _kind(rs.resolve(branch, r_ns)[0]) in (wk, *PROMOTIONS.get(wk, ())):
                return
        for branch in r:  # no branch of the same kind: any branch that reads it will do
            found = []
            _match(rs, branch, ws, w, where, found, set(seen), r_ns, w_ns)
            if not found:
                return
        problems.append(f"{where}: the reader's {_describe(r)} has no branch that reads the writer's {_describe(w)}")
        return
    if wk in PRIMITIVES or rk in PRIMITIVES:
        if rk != wk and rk not in PROMOTIONS.get(wk, ()):
            problems.append(f"{where}: the writer's {_describe(w)} cannot be read as {_describe(r)}")
        return
    if rk != wk:
        problems.append(f"{where}: the writer's {_describe(w)} cannot be read as {_describe(r)}")
        return
    if rk == "array":
        _match(rs, r["items"], ws, w["items"], f"{where}.<items>", problems, seen, r_ns, w_ns)
        return
    if rk == "map":
        _match(rs, r["values"], ws, w["values"], f"{where}.<values>", problems, seen, r_ns, w_ns)
        return
    r_name, w_name = r["name"].rpartition(".")[2], w["name"].rpartition(".")[2]
    aliases = {a.rpartition(".")[2] for a in r.get("aliases", ())}
    if r_name != w_name and w_name not in aliases:
        problems.append(f"{where}: the writer's {wk} {w_name} cannot be read as {rk} {r_name} (names differ)")
        return
    if rk == "fixed":
        if r["size"] != w["size"]:
            problems.append(f"{where}: fixed {r_name} has size {r['size']}, the writer's {w['size']}")
        return
    if rk == "enum":
        missing = [s for s in w["symbols"] if s not in r["symbols"]]
        if missing and "default" not in r:
            problems.append(f"{where}: enum {r_name} lacks the writer's symbols {missing} and has no default")
        return
    key = (id(r), id(w))
    if key in seen:  # a recursive type already being matched
        return
    seen.add(key)
    w_fields = {f["name"]: f for f in w["fields"]}
    for field in r["fields"]:
        names = [field["name"], *field.get("aliases", ())]
        wf = next((w_fields[n] for n in names if n in w_fields), None)
        at = f"{where}.{field['name']}"
        if wf is None:
            if "default" not in field:
                problems.append(f"{at}: field added without a default (data written before it has no value for it)")
            continue
        _match(rs, field["type"], ws, wf["type"], at, problems, seen, r_ns, w_ns)
