"""The ACL plan (a pure function of the pipeline file) and the passwords `acls apply` generates,
without a broker; tests/ops/test_broker_secure.py applies it on a --secure broker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tensorline import config
from tensorline.ops import acls
from tensorline.ops.acls import Binding

ROOT = Path(__file__).resolve().parents[2]


def by_principal(bindings: list[Binding], user: str) -> set[tuple[str, str, str, str]]:
    return {(b.operation, b.resource, b.name, b.pattern) for b in bindings if b.principal == f"User:{user}"}


def test_the_demo_pipelines_stages_may_touch_only_their_own_topics_groups_and_transactional_ids():
    cfg = config.load(ROOT / "pipeline.toml")
    plan = acls.plan(cfg)
    assert by_principal(plan, "demo.preprocess") == {
        ("READ", "TOPIC", "demo.raw", "LITERAL"), ("WRITE", "TOPIC", "demo.preprocessed", "LITERAL"),
        ("WRITE", "TOPIC", "demo.dlq", "LITERAL"), ("READ", "GROUP", "demo.preprocess", "LITERAL"),
        ("WRITE", "TRANSACTIONAL_ID", "demo.preprocess.", "PREFIXED"),
        ("DESCRIBE", "TRANSACTIONAL_ID", "demo.preprocess.", "PREFIXED")}
    detection = by_principal(plan, "demo.detection")
    assert {n for op, r, n, _ in detection if r == "GROUP"} == {f"demo.detection.{m}" for m in ("cnn", "logreg", "blob")}
    assert {(op, n) for op, r, n, _ in detection if r == "TOPIC"} == {
        ("READ", "demo.features"), ("WRITE", "demo.detections"), ("WRITE", "demo.dlq")}
    fusion = by_principal(plan, "demo.fusion")
    assert {(op, n) for op, r, n, _ in fusion if r == "TOPIC"} == {
        ("READ", "demo.detections"), ("WRITE", "demo.results"), ("WRITE", "demo.dlq"),
        ("READ", "demo.fusion-changelog"), ("WRITE", "demo.fusion-changelog")}
    assert by_principal(plan, "demo.producer") == {
        ("WRITE", "TOPIC", "demo.raw", "LITERAL"), ("WRITE", "TOPIC", "demo.dlq", "LITERAL"),
        ("READ", "TOPIC", "demo.results", "LITERAL")}


def test_ops_only_reads_and_describes():
    cfg = config.load(ROOT / "pipeline.toml")
    ops = by_principal(acls.plan(cfg), "demo.ops")
    assert {op for op, *_ in ops} == {"READ", "DESCRIBE_CONFIGS", "DESCRIBE"}
    assert {n for op, r, n, _ in ops if r == "TOPIC"} == {t.name for t in cfg.topics.values()}
    assert {n for op, r, n, _ in ops if r == "GROUP" and op == "DESCRIBE"} == {
        "demo.preprocess", "demo.features", "demo.fusion", *(f"demo.detection.{m}" for m in ("cnn", "logreg", "blob"))}


def test_no_binding_is_for_the_admin_and_every_one_allows_a_known_operation():
    plan = acls.plan(config.load(ROOT / "pipeline.toml"))
    assert plan == sorted(set(plan))  # sorted, no repeats: a stable plan to compare a cluster with
    assert not [b for b in plan if b.principal == "User:admin"]
    for b in plan:  # each converts to a kafka-python ACL (valid enums) and back
        assert Binding.of(b.acl()) == b


def chain(stages: int, fusion: bool) -> dict:
    topics = {f"t{i}": {"partitions": 1} for i in range(stages + 1)} | {"dlq": {}, "raw": {}}
    table = {"pipeline": {"name": "p"}, "topics": topics,
             "stages": {f"s{i}": {"input": f"t{i}" if i else "raw", "output": f"t{i + 1}",
                                  "kind": "tensorline.stages.testing:Scale"} for i in range(stages)}}
    if fusion:
        table["topics"]["results"] = {}
        table["fusion"] = {"input": f"t{stages}", "output": "results", "expected_models": ["m"]}
    return table


@settings(max_examples=25, deadline=None)
@given(stages=st.integers(1, 6), fusion=st.booleans())
def test_every_stage_reads_only_its_input_and_writes_only_its_output_and_the_dlq(stages, fusion):
    cfg = config.parse(chain(stages, fusion))
    plan = acls.plan(cfg)
    for name, stage in cfg.stages.items():
        mine = by_principal(plan, f"p.{name}")
        changelog = {cfg.topic(stage.changelog).name} if stage.changelog else set()
        assert {n for op, r, n, _ in mine if r == "TOPIC" and op == "READ"} == {cfg.topic(stage.input).name} | changelog
        assert {n for op, r, n, _ in mine if r == "TOPIC" and op == "WRITE"} == (
            {cfg.topic(stage.output).name, "p.dlq"} | changelog)
        assert {n for op, r, n, _ in mine if r == "GROUP"} == {cfg.group_id(name)}
        assert {(n, p) for op, r, n, p in mine if r == "TRANSACTIONAL_ID"} == {(f"p.{name}.", "PREFIXED")}
        assert {op for op, *_ in mine} <= {"READ", "WRITE", "DESCRIBE"}


def secured(tmp_path: Path, **security: str) -> config.PipelineConfig:
    table = chain(1, False)
    table["security"] = {"credentials_file": str(tmp_path / "credentials.toml"), **security}
    return config.parse(table)


def test_missing_passwords_are_generated_once_into_an_owner_only_file(tmp_path, monkeypatch):
    cfg = secured(tmp_path)
    monkeypatch.setenv("TENSORLINE_KAFKA_PASSWORD_OPS", "from-the-environment")
    assert acls.ensure_passwords(cfg, acls.principals(cfg)) == ["producer", "s0"]
    path = tmp_path / "credentials.toml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    written = config.read_credentials(path)
    assert set(written) == {"p.producer", "p.s0"} and all(len(v) >= 32 for v in written.values())
    assert acls.ensure_passwords(cfg, acls.principals(cfg)) == []  # the second apply: nothing new
    assert config.read_credentials(path) == written
    assert config.password(cfg, "s0") == written["p.s0"]
    assert config.password(cfg, "ops") == "from-the-environment"


def test_without_a_credentials_file_a_missing_password_names_its_variable():
    table = chain(1, False)
    table["security"] = {}
    cfg = config.parse(table)
    with pytest.raises(config.ConfigError, match=r"principal 'ops': \$TENSORLINE_KAFKA_PASSWORD_OPS"):
        acls.ensure_passwords(cfg, acls.principals(cfg))
