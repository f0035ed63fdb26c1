"""The pipeline file: validation errors name file, key and expectation; env overrides; secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorline import config

ROOT = Path(__file__).resolve().parents[2]


def table(**over: object) -> dict:
    base = {
        "pipeline": {"name": "p1"},
        "topics": {"raw": {}, "out": {"partitions": 8, "retention_ms": 1000}},
        "stages": {"pre": {"input": "raw", "output": "out", "max_batch": 16,
                           "models": {"m": {"path": "m.keras", "version": 2}}}},
    }
    base.update(over)
    return base


def test_demo_pipeline_file_loads():
    cfg = config.load(ROOT / "pipeline.toml")
    assert cfg.name == "demo"
    assert cfg.fusion is not None and cfg.fusion.expected_models == ("cnn", "logreg", "blob")
    assert [m.name for m in cfg.stages["detection"].models] == ["cnn", "logreg", "blob"]
    assert cfg.topic("raw").name == "demo.raw" and cfg.topic("dlq").partitions == 1


def test_defaults_and_derived_names():
    cfg = config.parse(table(), "p.toml")
    assert cfg.topic("raw").partitions == config.DEFAULT_PARTITIONS
    assert cfg.topic("out").partitions == 8 and cfg.topic("out").retention_ms == 1000
    assert cfg.topic("dlq").name == "p1.dlq"  # always present
    stage = cfg.stages["pre"]
    assert stage.max_batch == 16 and stage.max_delay_ms == config.DEFAULT_MAX_DELAY_MS
    assert stage.commit_interval_ms == config.DEFAULT_COMMIT_INTERVAL_MS
    assert stage.models[0].version == "2" and stage.devices == ("cpu",)
    assert cfg.group_id("pre") == "p1.pre" and cfg.group_id("det", "cnn") == "p1.det.cnn"
    assert cfg.delivery == "exactly_once" and cfg.max_message_bytes == 16 * 1024 * 1024
    assert cfg.producer.key == "record_id"  # records spread over every partition


def test_the_producer_key_is_a_checked_choice():
    assert config.parse(table(producer={"key": "study"})).producer.key == "study"
    with pytest.raises(config.ConfigError) as err:
        config.parse(table(producer={"key": "studies"}), "p.toml")
    assert str(err.value) == ("p.toml: producer.key: expected one of record_id, study, got 'studies' "
                              "(did you mean 'study'?)")


@pytest.mark.parametrize("mutate, key, expected", [
    (lambda t: t["stages"]["pre"].update(max_batch=0), "stages.pre.max_batch", "positive integer"),
    (lambda t: t["stages"]["pre"].update(input="nope"), "stages.pre.input", "topic key"),
    (lambda t: t["stages"]["pre"].update(commit_interval_ms=-1), "stages.pre.commit_interval_ms", "0: commit every"),
    (lambda t: t["stages"]["pre"].update(devices=["tpu"]), "stages.pre.devices", "gpu:0"),
    (lambda t: t["pipeline"].update(delivery="maybe"), "pipeline.delivery", "exactly_once"),
    (lambda t: t["pipeline"].pop("name"), "pipeline.name", "required"),
    (lambda t: t["topics"]["raw"].update(partitions="4"), "topics.raw.partitions", "positive integer"),
    (lambda t: t.update(kafka={"sasl_pasword": "x"}), "kafka.sasl_pasword", "kafka-python settings"),
    (lambda t: t["stages"]["pre"]["models"]["m"].pop("path"), "stages.pre.models.m.path", "required"),
    (lambda t: t.update(fusion={"input": "raw", "output": "out", "expected_models": ["a"], "quorum": 2}),
     "fusion.quorum", "from 1 to 1"),
])
def test_errors_name_file_key_and_expectation(mutate, key, expected):
    t = table()
    mutate(t)
    with pytest.raises(config.ConfigError) as err:
        config.parse(t, "bad.toml")
    assert err.value.key == key
    assert str(err.value).startswith(f"bad.toml: {key}: expected") and expected in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="missing.toml: \\(file\\)"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\nname=1")
    with pytest.raises(config.ConfigError, match="bad.toml: \\(syntax\\): expected valid TOML"):
        config.load(bad)


def test_environment_overrides_bootstrap_and_secrets(monkeypatch):
    t = table(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u"})
    t["pipeline"]["bootstrap"] = "file:9092"
    assert config.parse(t).bootstrap == "file:9092"
    monkeypatch.setenv("TENSORLINE_BOOTSTRAP", "env:9092")
    monkeypatch.setenv("TENSORLINE_SASL_PLAIN_PASSWORD", "from-env")
    cfg = config.parse(t)
    assert cfg.bootstrap == "env:9092"
    assert cfg.kafka["sasl_plain_password"] == "from-env"
    assert "from-env" not in repr(cfg) and "***" in repr(cfg)


def test_config_is_frozen():
    cfg = config.parse(table())
    with pytest.raises(AttributeError):
        cfg.name = "other"  # type: ignore[misc]


def test_with_name_moves_topics_and_groups():
    cfg = config.parse(table()).with_name("ns1")
    assert cfg.topic("raw").name == "ns1.raw" and cfg.group_id("pre") == "ns1.pre"


def test_a_stage_names_its_changelog_and_gets_it_compacted_and_co_partitioned():
    cfg = config.parse({"pipeline": {"name": "p"}, "topics": {"in": {"partitions": 6}, "out": {}, "state": {"partitions": 2}},
                 "stages": {"count": {"input": "in", "output": "out", "changelog": "state"}}})
    assert cfg.stages["count"].changelog == "state" and config.changelog_topics(cfg) == {"count": "state"}
    assert (cfg.topics["state"].cleanup_policy, cfg.topics["state"].partitions) == ("compact", 6)
    with pytest.raises(config.ConfigError, match="stages.count.changelog"):
        config.parse({"pipeline": {"name": "p"}, "topics": {"in": {}, "out": {}},
               "stages": {"count": {"input": "in", "output": "out", "changelog": "in"}}})


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["topics"]["raw"].update(partitons=4),
     "pipeline.toml: topics.raw.partitons: unknown key (did you mean 'partitions'?)"),
    (lambda t: t["pipeline"].update(delivey="at_least_once"),
     "pipeline.toml: pipeline.delivey: unknown key (did you mean 'delivery'?)"),
    (lambda t: t["stages"]["pre"].update(max_bacth=8),
     "pipeline.toml: stages.pre.max_bacth: unknown key (did you mean 'max_batch'?)"),
    (lambda t: t["topics"]["out"].update(retention=1000),
     "pipeline.toml: topics.out.retention: unknown key (did you mean 'retention_ms'?)"),
])
def test_a_typo_is_an_unknown_key_naming_file_key_and_the_closest_one(mutate, message):
    t = table()
    mutate(t)
    with pytest.raises(config.UnknownKey) as err:
        config.parse(t, "pipeline.toml")
    assert str(err.value) == message


def test_a_typo_in_a_pipeline_file_names_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("pipeline.toml").write_text('[pipeline]\nname = "p"\n[topics]\nraw = { partitons = 4 }\n')
    with pytest.raises(config.ConfigError) as err:
        config.load("pipeline.toml")
    assert str(err.value) == "pipeline.toml: topics.raw.partitons: unknown key (did you mean 'partitions'?)"


@pytest.mark.parametrize("mutate, key", [
    (lambda t: t.update(fusoin={}), "fusoin"),
    (lambda t: t["stages"]["pre"]["models"]["m"].update(pth="x"), "stages.pre.models.m.pth"),
    (lambda t: t.update(fusion={"input": "raw", "output": "out", "expected_models": ["a"], "quourm": 1}),
     "fusion.quourm"),
    (lambda t: t.update(kafka={"sasl_mechansim": "PLAIN"}), "kafka.sasl_mechansim"),
    (lambda t: t.update(producer={"kee": "study"}), "producer.kee"),
    (lambda t: t.update(prodcer={"key": "study"}), "prodcer"),
])
def test_every_table_rejects_unknown_keys(mutate, key):
    t = table()
    mutate(t)
    with pytest.raises(config.ConfigError) as err:
        config.parse(t, "bad.toml")
    assert err.value.key == key and "did you mean" in str(err.value)


def test_free_form_tables_take_any_name():
    t = table()
    t["stages"]["pre"]["params"] = {"anything": 1}
    t["stages"]["pre"]["capacity"] = {"gpu:3": 2.0}
    cfg = config.parse(t)
    assert cfg.stages["pre"].params == {"anything": 1} and cfg.stages["pre"].capacity == {"gpu:3": 2.0}


def fusion(**over: object) -> dict:
    return table(fusion={"input": "raw", "output": "out", "expected_models": ["a", "b"], **over})


def test_fusion_strategy_is_checked_at_load_with_a_suggestion():
    with pytest.raises(config.ConfigError) as err:
        config.parse(fusion(strategy="stackng"), "bad.toml")
    assert err.value.key == "fusion.strategy" and err.value.suggestion == "stacking"
    assert str(err.value).endswith("got 'stackng' (did you mean 'stacking'?)")


def test_stacking_needs_the_stacker_path():
    with pytest.raises(config.ConfigError) as err:
        config.parse(fusion(strategy="stacking"), "bad.toml")
    assert err.value.key == "fusion.params.path" and "required" in str(err.value)
    cfg = config.parse(fusion(strategy="stacking", params={"path": "s.json"}))
    assert cfg.fusion.strategy == "stacking" and cfg.fusion.params["path"] == "s.json"


def test_the_known_strategies_are_fusions_own():
    from tensorline.fusion.strategies import STRATEGIES

    assert sorted(config.FUSION_STRATEGIES) == sorted([*STRATEGIES, "stacking"])


def test_an_explicit_stage_kind_is_checked_at_load():
    from tensorline.engine.plugins import BUILTIN

    assert sorted(config.BUILTIN_KINDS) == sorted(BUILTIN)
    t = table()
    t["stages"]["pre"]["kind"] = "preprocces"
    with pytest.raises(config.ConfigError) as err:
        config.parse(t, "bad.toml")
    assert err.value.key == "stages.pre.kind" and err.value.suggestion == "preprocess"
    t["stages"]["pre"]["kind"] = "my.package:Stage"
    assert config.parse(t).stages["pre"].kind == "my.package:Stage"


def test_missing_model_and_stacker_files_are_named_when_a_command_starts(tmp_path):
    t = fusion(strategy="stacking", params={"path": str(tmp_path / "stacker.json")})
    t["stages"]["pre"]["models"] = {"m": {"path": str(tmp_path / "m.keras")},
                                    "n": {"path": str(tmp_path / "n.keras")}}
    cfg = config.parse(t, "p.toml")  # loading does not look for files
    (tmp_path / "n.keras").write_bytes(b"")
    assert config.missing_files(cfg) == [("stages.pre.models.m.path", str(tmp_path / "m.keras")),
                                         ("fusion.params.path", str(tmp_path / "stacker.json"))]
    assert config.missing_files(cfg, "pre", "n") == [] and config.missing_files(cfg, "fusion") == \
        [("fusion.params.path", str(tmp_path / "stacker.json"))]
    with pytest.raises(config.MissingFile) as err:
        config.require_files(cfg, "pre")
    assert err.value.key == "stages.pre.models.m.path"
    assert str(err.value).startswith(f"p.toml: stages.pre.models.m.path: no such file '{tmp_path / 'm.keras'}'")


def test_the_schema_registry_table_is_optional_and_checked():
    cfg = config.parse(table(), "p.toml")
    assert cfg.schema_registry.url is None  # no registry: the built-in schema ids
    assert cfg.schema_registry.timeout_ms == config.DEFAULT_SCHEMA_REGISTRY_TIMEOUT_MS
    cfg = config.parse(table(schema_registry={"url": "https://sr.example:8081/", "timeout_ms": 500}), "p.toml")
    assert cfg.schema_registry == config.SchemaRegistryConfig("https://sr.example:8081", 500)
    with pytest.raises(config.ConfigError) as err:
        config.parse(table(schema_registry={"url": "https://me:secret@sr.example"}), "p.toml")
    assert str(err.value).startswith("p.toml: schema_registry.url: expected an http(s)://host[:port] URL, "
                                     "without credentials (they come from $TENSORLINE_SCHEMA_REGISTRY_USER")
    with pytest.raises(config.ConfigError, match=r"schema_registry.url: expected an http"):
        config.parse(table(schema_registry={"url": "sr.example:8081"}), "p.toml")
    with pytest.raises(config.UnknownKey, match=r"schema_registry.ulr: unknown key \(did you mean 'url'\?\)"):
        config.parse(table(schema_registry={"ulr": "http://sr:8081"}), "p.toml")
    with pytest.raises(config.ConfigError, match="schema_registry.timeout_ms: expected a positive integer"):
        config.parse(table(schema_registry={"timeout_ms": 0}), "p.toml")


# -- [security] ----------------------------------------------------------------------------

def test_security_defaults_and_each_principals_user():
    cfg = config.parse(table(security={"credentials_file": "creds.toml"}))
    sec = cfg.security
    assert (sec.protocol, sec.mechanism, sec.ssl_cafile, sec.admin) == ("SASL_SSL", "SCRAM-SHA-512", None, "admin")
    assert [sec.user("p1", p) for p in ("admin", "ops", "producer", "pre")] == ["admin", "p1.ops", "p1.producer",
                                                                               "p1.pre"]
    assert cfg.principal == "admin" and cfg.as_principal("pre").principal == "pre"
    assert config.parse(table()).security is None


@pytest.mark.parametrize("mutate, key, expected", [
    (lambda t: t.update(security={"mechanism": "PLAIN"}), "security.mechanism", "SCRAM-SHA-512"),
    (lambda t: t.update(security={"password": "x"}), "security.password", "unknown key"),
    (lambda t: t.update(security={}, kafka={"sasl_plain_username": "u"}), "kafka.sasl_plain_username", "[security]"),
    (lambda t: t.update(kafka={"sasl_plain_password": "in-file"}), "kafka.sasl_plain_password",
     "$TENSORLINE_SASL_PLAIN_PASSWORD"),
    (lambda t: (t.update(security={}), t["stages"].update(ops=t["stages"]["pre"])), "stages.ops", "other than admin"),
])
def test_security_errors_name_the_key(mutate, key, expected):
    t = table()
    mutate(t)
    with pytest.raises(config.ConfigError) as err:
        config.parse(t, "bad.toml")
    assert err.value.key == key and expected in str(err.value)


def test_a_password_comes_from_the_environment_else_the_credentials_file(tmp_path, monkeypatch):
    creds = tmp_path / "creds.toml"
    creds.write_text('"p1.pre" = "from-the-file"\n')
    cfg = config.parse(table(security={"credentials_file": str(creds)}))
    assert config.password(cfg, "pre") == "from-the-file"
    monkeypatch.setenv("TENSORLINE_KAFKA_PASSWORD_PRE", "from-the-env")
    assert config.password(cfg, "pre") == "from-the-env"
    with pytest.raises(config.ConfigError, match=r"\$TENSORLINE_KAFKA_PASSWORD_OPS or a 'p1.ops' line in .*creds.toml"):
        config.password(cfg, "ops")
    assert "from-the" not in repr(cfg)
