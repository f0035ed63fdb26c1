"""The pipeline file (TOML) loaded into one validated, frozen configuration object.

Every error names the file, the key and what was expected; a key a table does not have is an error
with the closest allowed key as a suggestion (a typo must not silently become a default). The files
the pipeline names are checked apart, when a command starts (`require_files`), so the demo can
still train into its own default paths. Environment variables override the bootstrap address
(``TENSORLINE_BOOTSTRAP``). Secrets never live in the pipeline file: the [kafka] ones come from
``TENSORLINE_SASL_PLAIN_PASSWORD`` and ``TENSORLINE_SSL_PASSWORD``, the [security] principals'
from ``TENSORLINE_KAFKA_PASSWORD_<PRINCIPAL>`` or the credentials file the table names (`password`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

# One limit for every Kafka size setting (broker message.max.bytes, topic max.message.bytes,
# producer max_request_size, consumer max_partition_fetch_bytes): a 2048x2048 float32 slice
# (16 MiB) is the largest tensor the demo's users send; raising one without the others fails.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A week: long enough to replay after a model change found on Monday of last week's data.
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
# Four partitions let up to four workers share a stage on one host; more hosts want more.
DEFAULT_PARTITIONS = 4
# Micro-batch bounds: 32 images fill a CPU/GPU model call well; 50 ms caps the wait a lone
# record pays for batching.
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_DELAY_MS = 50
# Under load, one transaction spans the batches finished within 100 ms (Kafka Streams' default
# commit.interval.ms under exactly-once): a commit costs three round trips and a wait for the
# previous transaction's markers, ~20 ms on one node, too much to pay for every 25 ms batch.
# A worker with no batch in flight and no full batch of input waiting commits at once, so a quiet
# stream pays no extra latency.
DEFAULT_COMMIT_INTERVAL_MS = 100
# A stage holds its input when more than half of its last 100 records were dead letters: a few
# bad records flow through to the DLQ, a broken model or producer does not drain the topic into it.
DEFAULT_DLQ_MAX_RATIO = 0.5
DEFAULT_DLQ_WINDOW = 100
# Exactly-once unless the pipeline asks otherwise (at-least-once exists for comparison).
DEFAULT_DELIVERY = "exactly_once"
# The demo's task: a patch is normal or holds a nodule. Detection and fusion share this order.
DEFAULT_CLASSES = ("normal", "nodule")
DELIVERY_MODES = ("exactly_once", "at_least_once")
FUSION_EMIT_MODES = ("all", "quorum", "deadline")
DUPLICATE_ACTIONS = ("drop", "reprocess")
# What detection scores are: one distribution over the classes, or each class on its own.
SCORE_KINDS = ("softmax", "sigmoid")
BAD_FILE_ACTIONS = ("dlq", "skip")
# What a producer keys the raw topic's records by; the key picks the partition, and the stages keep
# it on their outputs. "record_id" by default: records spread evenly over every partition, so each
# worker of a stage has work whatever the number of studies (the demo's 1,200 images come from two
# studies, which kept two of four partitions, and workers, busy). "study" keeps one study (a NIfTI
# volume, an .npz archive) in order on one partition, for a pipeline that needs a study's images
# in order; at most as many partitions as studies then carry records.
PRODUCER_KEY_CHOICES = ("record_id", "study")
DEFAULT_PRODUCER_KEY = "record_id"
# fusion.strategy: fusion's STRATEGIES (fusion/strategies.py) and "stacking" (fusion/stacking.py),
# named here so a typo fails at load; the engine imports no plugin (a test keeps the two equal).
FUSION_STRATEGIES = ("weighted_average", "soft_vote", "majority_vote", "threshold", "max_confidence", "stacking")
# The builtin stage kinds (engine/plugins.py BUILTIN); any other kind is "package.module:Factory".
BUILTIN_KINDS = ("preprocess", "features", "detection", "fusion")

# Kafka client settings the pipeline file may pass through to kafka-python ([kafka] table).
KAFKA_PASSTHROUGH = frozenset({
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "ssl_cafile", "ssl_certfile",
    "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_check_hostname", "client_id",
    "request_timeout_ms",
})
SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})
# What [security] sets for every client; the [kafka] table may not set them beside it.
SECURITY_PASSTHROUGH = frozenset({"security_protocol", "sasl_mechanism", "sasl_plain_username", "ssl_cafile"})
SECRET_ENV = {"sasl_plain_password": "TENSORLINE_SASL_PLAIN_PASSWORD",
              "ssl_password": "TENSORLINE_SSL_PASSWORD"}
BOOTSTRAP_ENV = "TENSORLINE_BOOTSTRAP"
CHANGELOG = "fusion-changelog"
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# The keys each table may have; anything else is an UnknownKey. Tables of names (topics, stages,
# models, capacity) and the plugins' own `params` tables are free-form and checked otherwise.
ROOT_KEYS = ("pipeline", "topics", "producer", "stages", "fusion", "kafka", "schema_registry", "security")
PIPELINE_KEYS = ("name", "bootstrap", "dlq", "delivery", "max_message_bytes", "on_bad_file", "classes")
PRODUCER_KEYS = ("key",)
SCHEMA_REGISTRY_KEYS = ("url", "timeout_ms")
# A registry answers in milliseconds; ten seconds without an answer is a registry that is down.
DEFAULT_SCHEMA_REGISTRY_TIMEOUT_MS = 10_000
TOPIC_KEYS = ("name", "partitions", "retention_ms")
# [security]: one SCRAM principal per stage, a read-only one for ops commands, one for `produce`
# and the cluster's admin (see SecurityConfig).
SECURITY_KEYS = ("protocol", "mechanism", "ssl_cafile", "credentials_file", "admin")
SECURITY_PROTOCOLS = ("SASL_SSL", "SASL_PLAINTEXT")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
# SCRAM-SHA-512: the strongest SASL mechanism Kafka has that needs no outside service (Kerberos,
# OAuth), and the one `tensorline broker start --secure` enables.
DEFAULT_SASL_MECHANISM = "SCRAM-SHA-512"
# The principals other than the stages: the cluster's super user, the read-only one of the
# commands that only look (lag, dashboard, results, ...), and the one `produce` writes raw with.
ADMIN_PRINCIPAL = "admin"
OPS_PRINCIPAL = "ops"
PRODUCER_PRINCIPAL = "producer"
PASSWORD_ENV_PREFIX = "TENSORLINE_KAFKA_PASSWORD_"
MODEL_KEYS = ("path", "version", "input")
# The runtime settings a stage table and the [fusion] table share.
RUNTIME_KEYS = ("max_batch", "max_delay_ms", "commit_interval_ms", "dlq_max_ratio", "dlq_window", "workers")
STAGE_KEYS = ("input", "output", "kind", "models", "changelog", "devices", "params", "capacity", *RUNTIME_KEYS)
FUSION_KEYS = ("input", "output", "expected_models", "emit", "quorum", "deadline_ms", "strategy", "params",
               "join_timeout_ms", "dedup_window_ms", "on_duplicate", "scores", *RUNTIME_KEYS)


def did_you_mean(word: str, allowed: Any) -> str | None:
    """The allowed word closest to `word` (difflib's ratio, at least 0.6), or None."""
    found = difflib.get_close_matches(word, sorted(allowed), n=1)
    return found[0] if found else None


class ConfigError(ValueError):
    """The pipeline file is wrong; the message names the file, the key and what was expected."""

    def __init__(self, path: str | Path, key: str, expected: str, got: Any = None, suggestion: str | None = None):
        self.path, self.key, self.suggestion = str(path), key, suggestion
        shown = "" if got is None else f", got {got!r}"
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        super().__init__(f"{path}: {key}: expected {expected}{shown}{hint}")


class UnknownKey(ConfigError):
    """A key its table does not have, most often a typo: named with the closest allowed key."""

    def __init__(self, path: str | Path, key: str, allowed: tuple[str, ...]):
        self.path, self.key = str(path), key
        self.suggestion = did_you_mean(key.rpartition(".")[2], allowed)
        hint = (f"did you mean {self.suggestion!r}?" if self.suggestion
                else f"this table has {', '.join(allowed)}")
        ValueError.__init__(self, f"{path}: {key}: unknown key ({hint})")


class MissingFile(ConfigError):
    """A file the pipeline names (a model, the stacker) is not there."""

    def __init__(self, path: str | Path, key: str, file: str):
        self.path, self.key, self.suggestion, self.file = str(path), key, None, file
        ValueError.__init__(self, f"{path}: {key}: no such file {file!r} (relative to {Path.cwd()}; "
                                  f"`tensorline train` writes the demo models where the pipeline file says)")


# A state changelog (compacted) must not keep history, or restore time grows with it. The cleaner
# never touches the active segment, so roll segments every minute (Kafka 5's minimum, KIP-1030) or
# 64 MiB instead of 7 days / 1 GiB; keep tombstones 5 minutes after their first cleaning instead of
# a day (at 100 records/s a day of expired ids is 8.6 M records read at every restore), which is
# still far above the longest restore read (60 s), so a restore never misses a key's deletion.
COMPACTED_TOPIC_CONFIGS = {"segment.ms": "60000", "segment.bytes": str(64 * 1024 * 1024),
                           "delete.retention.ms": "300000"}


@dataclass(frozen=True)
class TopicConfig:
    """One Kafka topic of the pipeline."""

    key: str
    name: str
    partitions: int = DEFAULT_PARTITIONS
    retention_ms: int = DEFAULT_RETENTION_MS
    cleanup_policy: str = "delete"  # "compact" for the fusion changelog: latest state per key


@dataclass(frozen=True)
class ModelConfig:
    """A model serving one stage: a Keras file or SavedModel, with its version."""

    name: str
    path: str
    version: str = "1"
    input: str = "image"  # the record's tensor the model reads


@dataclass(frozen=True)
class ProducerConfig:
    """How `tensorline produce` writes the raw topic ([producer] table)."""

    key: str = DEFAULT_PRODUCER_KEY  # "record_id" or "study": see PRODUCER_KEY_CHOICES


@dataclass(frozen=True)
class SchemaRegistryConfig:
    """The Confluent-compatible schema registry the pipeline's schema ids come from
    ([schema_registry] table; basic auth from $TENSORLINE_SCHEMA_REGISTRY_USER / _PASSWORD)."""

    # None: no registry, messages carry the built-in ids (schemas/registry.py), which
    # `tensorline registry serve` serves to other tools.
    url: str | None = None
    timeout_ms: int = DEFAULT_SCHEMA_REGISTRY_TIMEOUT_MS


@dataclass(frozen=True)
class SecurityConfig:
    """A SASL cluster's principals ([security] table): the admin, `ops` (read-only), `producer`
    and one per stage, each "<pipeline>.<principal>" but the admin. Passwords come from
    $TENSORLINE_KAFKA_PASSWORD_<PRINCIPAL> or `credentials_file`, never from the pipeline file."""

    # TLS on every connection; SASL_PLAINTEXT only where the network itself is trusted.
    protocol: str = "SASL_SSL"
    mechanism: str = DEFAULT_SASL_MECHANISM
    # None: the system's CAs, or, when the bootstrap is the local broker (none configured), the CA
    # `tensorline broker start --secure` made for it.
    ssl_cafile: str | None = None
    # A TOML file of `"<user>" = "password"` lines, by SCRAM user name, so one file can serve
    # several pipelines and the admin (`broker start --secure` writes the admin's into its own);
    # owner-only, outside the repository. None: the environment only. `tensorline acls apply`
    # adds the passwords it generates to it.
    credentials_file: str | None = None
    # The super user's name: the one `tensorline broker start --secure` creates.
    admin: str = ADMIN_PRINCIPAL

    def user(self, pipeline: str, principal: str) -> str:
        """The SCRAM user name of a principal: the admin's own name, else "<pipeline>.<principal>"."""
        return self.admin if principal == ADMIN_PRINCIPAL else f"{pipeline}.{principal}"


@dataclass(frozen=True)
class StageConfig:
    """One stage: an independent consumer group from `input` to `output`."""

    name: str
    input: str
    output: str
    kind: str = ""  # builtin stage name or "package.module:Factory"; defaults to the stage's name
    models: tuple[ModelConfig, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS
    commit_interval_ms: int = DEFAULT_COMMIT_INTERVAL_MS
    dlq_max_ratio: float = DEFAULT_DLQ_MAX_RATIO  # 1.0: never hold the input
    # The topic key of the changelog of a stage that keeps state (None: stateless). The topic is
    # made compacted and co-partitioned with the stage's input ([fusion] sets "fusion-changelog").
    changelog: str | None = None
    dlq_window: int = DEFAULT_DLQ_WINDOW
    workers: int = 1
    devices: tuple[str, ...] = ("cpu",)
    params: Mapping[str, Any] = field(default_factory=dict)
    # Declared capacity per device (e.g. {"gpu:0": 4.0, "cpu": 1.0}); empty: measured records/s.
    capacity: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FusionConfig:
    """How the detection models' outputs for one record are joined and fused."""

    input: str
    output: str
    expected_models: tuple[str, ...]
    emit: str = "all"
    quorum: int = 0
    # Five seconds: far above a healthy stage's latency, short enough for a dashboard to notice.
    deadline_ms: int = 5000
    strategy: str = "soft_vote"
    params: Mapping[str, Any] = field(default_factory=dict)
    # A join still missing a model this long after its first output is emitted partial, naming
    # the missing models (emit "all" and "quorum"; "deadline" uses deadline_ms). Fifteen seconds:
    # several times the demo's end-to-end p99 with a whole set sent at once, and never infinite,
    # so a model that never answers costs a partial result, not a record lost in an open join.
    join_timeout_ms: int = 15_000
    # Emitted record ids are kept this long to recognise late and repeated outputs, then
    # tombstoned: the changelog holds the open joins plus ten minutes of ids (about 100 bytes
    # each), not every record ever fused. A record sent again within it is a duplicate.
    dedup_window_ms: int = 600_000
    # A duplicate (a record id already emitted, within the window): "drop" it (counted, in the
    # metrics and `tensorline report`), or "reprocess" it into a new result.
    on_duplicate: str = "drop"
    # What every incoming detection's scores must be: "softmax" (one distribution over the
    # classes, summing to 1), as the demo models and the voting strategies assume; "sigmoid" for
    # models scoring each class on its own (each in [0, 1]). Others are dead letters.
    scores: str = "softmax"


@dataclass(frozen=True)
class PipelineConfig:
    """The whole validated pipeline file."""

    path: str
    name: str
    bootstrap: str | None
    topics: Mapping[str, TopicConfig]
    stages: Mapping[str, StageConfig]
    fusion: FusionConfig | None = None
    dlq: str = "dlq"
    delivery: str = DEFAULT_DELIVERY
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    on_bad_file: str = "dlq"
    kafka: Mapping[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    producer: ProducerConfig = ProducerConfig()
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()
    security: SecurityConfig | None = None
    # Who this process's clients act as on a [security] cluster: the admin unless narrowed (the
    # CLI narrows each command to the least it needs; a worker acts as its stage).
    principal: str = ADMIN_PRINCIPAL

    def as_principal(self, principal: str) -> "PipelineConfig":
        """The same pipeline, its clients acting as `principal` (admin, ops, producer or a stage)."""
        return replace(self, principal=principal)

    def model(self, stage: str, name: str | None) -> ModelConfig | None:
        """The stage's model called `name`; with no name, its only model (or None if it has none)."""
        models = self.stages[stage].models
        if name is None:
            if len(models) > 1:
                raise ConfigError(self.path, f"stages.{stage}.models",
                                  f"--model to pick one of {', '.join(m.name for m in models)}")
            return models[0] if models else None
        for m in models:
            if m.name == name:
                return m
        raise ConfigError(self.path, f"stages.{stage}.models.{name}", f"one of {', '.join(m.name for m in models)}")

    def topic(self, key: str) -> TopicConfig:
        """The topic behind a logical key such as "raw" or "dlq"."""
        return self.topics[key]

    def group_id(self, stage: str, model: str | None = None) -> str:
        """Consumer group of a stage (and of one model, for stages that run one group per model)."""
        return f"{self.name}.{stage}" + (f".{model}" if model else "")

    def with_name(self, name: str) -> "PipelineConfig":
        """The same pipeline under another name: its own topics and groups (tests, replays)."""
        topics = {k: replace(t, name=t.name.replace(self.name, name, 1)) for k, t in self.topics.items()}
        return replace(self, name=name, topics=topics)

    def __repr__(self) -> str:
        kafka = {k: ("***" if k in SECRET_KEYS else v) for k, v in self.kafka.items()}
        return (f"PipelineConfig(path={self.path!r}, name={self.name!r}, bootstrap={self.bootstrap!r}, "
                f"kafka={kafka}, principal={self.principal!r})")


class _Reader:
    """Typed access to one TOML table, raising ConfigError with the full dotted key."""

    def __init__(self, path: str, prefix: str, table: Any):
        if not isinstance(table, dict):
            raise ConfigError(path, prefix, "a table", table)
        self.path, self.prefix, self.table = path, prefix, table

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def only(self, allowed: tuple[str, ...]) -> "_Reader":
        """Fail on the first key (in file order) that is not one of `allowed`."""
        for name in self.table:
            if name not in allowed:
                raise UnknownKey(self.path, self.key(name), allowed)
        return self

    def sub(self, name: str, required: bool = False) -> "_Reader":
        if name not in self.table and not required:
            return _Reader(self.path, self.key(name), {})
        return _Reader(self.path, self.key(name), self.table.get(name))

    def get(self, name: str, kind: type, default: Any = ..., check=None, expected: str = "") -> Any:
        if name not in self.table:
            if default is ...:
                raise ConfigError(self.path, self.key(name), f"a {kind.__name__} (required)")
            return default
        value = self.table[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok or (check and not check(value)):
            raise ConfigError(self.path, self.key(name), expected or f"a {kind.__name__}", value)
        return value

    def positive(self, name: str, default: Any = ...) -> int:
        return self.get(name, int, default, lambda v: v > 0, "a positive integer")

    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(self.path, self.key(name), f"one of {', '.join(choices)}", value,
                              did_you_mean(value, choices))
        return value

    def strings(self, name: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(name, list, default, lambda v: all(isinstance(s, str) for s in v),
                         "a list of strings")
        return tuple(value)


def _topics(r: _Reader, pipeline: str) -> dict[str, TopicConfig]:
    topics = {}
    for key in r.table:
        t = r.sub(key, required=True).only(TOPIC_KEYS)
        name = t.get("name", str, f"{pipeline}.{key}", _NAME.match, "a topic name ([A-Za-z0-9._-])")
        topics[key] = TopicConfig(key, name, t.positive("partitions", DEFAULT_PARTITIONS),
                                  t.positive("retention_ms", DEFAULT_RETENTION_MS))
    for key in ("dlq",):
        topics.setdefault(key, TopicConfig(key, f"{pipeline}.{key}"))
    return topics


def _models(r: _Reader) -> tuple[ModelConfig, ...]:
    models = []
    for name in r.table:
        m = r.sub(name, required=True).only(MODEL_KEYS)
        version = m.table.get("version", "1")
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise ConfigError(r.path, m.key("version"), "a version string or integer", version)
        models.append(ModelConfig(name, m.get("path", str), str(version), m.get("input", str, "image")))
    return tuple(models)


def _kind(r: _Reader, name: str) -> str:
    """A builtin stage kind or 'package.module:Factory'; defaults to the stage's name, which the
    worker resolves (a stage named after no builtin needs an explicit kind to run)."""
    expected = f"a builtin stage ({', '.join(BUILTIN_KINDS)}) or 'package.module:Factory'"
    if "kind" not in r.table:
        return name
    kind = r.get("kind", str, check=lambda v: bool(re.fullmatch(r"[a-z_]+|[\w.]+:\w+", v)), expected=expected)
    if ":" not in kind and kind not in BUILTIN_KINDS:
        raise ConfigError(r.path, r.key("kind"), expected, kind, did_you_mean(kind, BUILTIN_KINDS))
    return kind


def _stage(r: _Reader, name: str, topics: Mapping[str, TopicConfig]) -> StageConfig:
    r.only(STAGE_KEYS)

    def topic_key(field_name: str) -> str:
        return r.get(field_name, str, check=lambda v: v in topics,
                     expected=f"a topic key declared under [topics] ({', '.join(topics)})")

    devices = r.strings("devices", ["cpu"])
    for d in devices:
        if not re.fullmatch(r"cpu|gpu:\d+", d):
            raise ConfigError(r.path, r.key("devices"), "devices like 'cpu' or 'gpu:0'", d)
    return StageConfig(
        name=name, input=topic_key("input"), output=topic_key("output"),
        kind=_kind(r, name),
        models=_models(r.sub("models")),
        max_batch=r.positive("max_batch", DEFAULT_MAX_BATCH),
        max_delay_ms=r.get("max_delay_ms", int, DEFAULT_MAX_DELAY_MS, lambda v: v >= 0,
                           "a non-negative integer"),
        commit_interval_ms=r.get("commit_interval_ms", int, DEFAULT_COMMIT_INTERVAL_MS, lambda v: v >= 0,
                                 "a non-negative integer (0: commit every batch)"),
        **_dlq_limits(r),
        changelog=r.get("changelog", str, None, lambda v: v in topics and v != r.get("input", str),
                        "a topic key declared under [topics], other than the stage's input"),
        workers=r.positive("workers", 1), devices=devices,
        params=dict(r.sub("params").table),
        capacity=_capacity(r.sub("capacity")),
    )


def _dlq_limits(r: _Reader) -> dict[str, Any]:
    """The dead-letter pause settings of a stage table (see DEFAULT_DLQ_MAX_RATIO)."""
    return {"dlq_max_ratio": r.get("dlq_max_ratio", float, DEFAULT_DLQ_MAX_RATIO, lambda v: 0 < v <= 1,
                                   "a ratio in (0, 1] (1: never hold the input)"),
            "dlq_window": r.positive("dlq_window", DEFAULT_DLQ_WINDOW)}


def _capacity(r: _Reader) -> dict[str, float]:
    out = {}
    for device in r.table:
        if not re.fullmatch(r"cpu|gpu:\d+", device):
            raise ConfigError(r.path, r.key(device), "a device like 'cpu' or 'gpu:0'", device)
        out[device] = r.get(device, float, check=lambda v: v > 0, expected="a positive number")
    return out


def _fusion(r: _Reader, topics: Mapping[str, TopicConfig]) -> FusionConfig:
    r.only(FUSION_KEYS)
    expected = r.strings("expected_models")
    if not expected:
        raise ConfigError(r.path, r.key("expected_models"), "at least one model name")
    emit = r.choice("emit", FUSION_EMIT_MODES, "all")
    quorum = r.get("quorum", int, len(expected), lambda v: 1 <= v <= len(expected),
                   f"an integer from 1 to {len(expected)}")
    in_topics = lambda v: v in topics  # noqa: E731
    strategy = r.choice("strategy", FUSION_STRATEGIES, "soft_vote")
    params = r.sub("params")
    if strategy == "stacking":
        params.get("path", str, expected="the stacker's file (required with strategy \"stacking\"; "
                                         "`tensorline train` fits it)")
    return FusionConfig(
        input=r.get("input", str, check=in_topics, expected="a topic key declared under [topics]"),
        output=r.get("output", str, check=in_topics, expected="a topic key declared under [topics]"),
        expected_models=expected, emit=emit, quorum=quorum,
        deadline_ms=r.positive("deadline_ms", 5000),
        strategy=strategy,
        params=dict(params.table),
        join_timeout_ms=r.positive("join_timeout_ms", 15_000),
        dedup_window_ms=r.positive("dedup_window_ms", 600_000),
        on_duplicate=r.choice("on_duplicate", DUPLICATE_ACTIONS, "drop"),
        scores=r.choice("scores", SCORE_KINDS, "softmax"),
    )


def _producer(r: _Reader) -> ProducerConfig:
    r.only(PRODUCER_KEYS)
    return ProducerConfig(key=r.choice("key", PRODUCER_KEY_CHOICES, DEFAULT_PRODUCER_KEY))


def _schema_registry(r: _Reader) -> SchemaRegistryConfig:
    r.only(SCHEMA_REGISTRY_KEYS)
    url = r.get("url", str, None, lambda v: bool(re.fullmatch(r"https?://[^/@\s]+(/\S*)?", v)),
                "an http(s)://host[:port] URL, without credentials (they come from "
                "$TENSORLINE_SCHEMA_REGISTRY_USER and $TENSORLINE_SCHEMA_REGISTRY_PASSWORD)")
    return SchemaRegistryConfig(url=url.rstrip("/") if url else None,
                                timeout_ms=r.positive("timeout_ms", DEFAULT_SCHEMA_REGISTRY_TIMEOUT_MS))


def _kafka(r: _Reader, secured: bool) -> dict[str, Any]:
    unknown = [k for k in r.table if k not in KAFKA_PASSTHROUGH]
    if unknown:
        raise ConfigError(r.path, r.key(unknown[0]),
                          f"one of the kafka-python settings {', '.join(sorted(KAFKA_PASSTHROUGH))}",
                          suggestion=did_you_mean(unknown[0], KAFKA_PASSTHROUGH))
    for key in r.table:
        if key in SECRET_KEYS:
            raise ConfigError(r.path, r.key(key), f"no secret in the pipeline file: set ${SECRET_ENV[key]}")
        if secured and key in SECURITY_PASSTHROUGH:
            raise ConfigError(r.path, r.key(key), "nothing [security] sets: it sets the protocol, mechanism, "
                                                  "user and CA of every client")
    settings = dict(r.table)
    for key, env in SECRET_ENV.items():
        if os.environ.get(env):
            settings[key] = os.environ[env]
    return settings


def _security(r: _Reader, stages: Mapping[str, StageConfig]) -> SecurityConfig:
    r.only(SECURITY_KEYS)
    taken = [s for s in stages if s in (ADMIN_PRINCIPAL, OPS_PRINCIPAL, PRODUCER_PRINCIPAL)]
    if taken:
        raise ConfigError(r.path, f"stages.{taken[0]}", f"a stage name other than {ADMIN_PRINCIPAL}, "
                                                        f"{OPS_PRINCIPAL} and {PRODUCER_PRINCIPAL} with [security] "
                                                        f"(each stage is a principal of that name)")
    return SecurityConfig(
        protocol=r.choice("protocol", SECURITY_PROTOCOLS, "SASL_SSL"),
        mechanism=r.choice("mechanism", SASL_MECHANISMS, DEFAULT_SASL_MECHANISM),
        ssl_cafile=r.get("ssl_cafile", str, None),
        credentials_file=r.get("credentials_file", str, None),
        admin=r.get("admin", str, ADMIN_PRINCIPAL, _NAME.match, "a user name ([A-Za-z0-9._-])"))


def password_env(principal: str) -> str:
    """The environment variable holding a principal's password: TENSORLINE_KAFKA_PASSWORD_<PRINCIPAL>,
    upper case, anything but letters and digits as "_"."""
    return PASSWORD_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", principal.upper())


def read_credentials(path: str | Path) -> dict[str, str]:
    """A credentials file's `"<user>" = "password"` lines ({} when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:  # its message quotes no value, only where it stopped
        raise ConfigError(path, "(syntax)", f"valid TOML ({e})") from None
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise ConfigError(path, bad[0], "a password string")
    return data


def password(cfg: PipelineConfig, principal: str) -> str:
    """A principal's password: $TENSORLINE_KAFKA_PASSWORD_<PRINCIPAL>, else the credentials file's;
    ConfigError naming both when neither has it."""
    env = password_env(principal)
    if os.environ.get(env):
        return os.environ[env]
    sec = cfg.security
    user = (sec or SecurityConfig()).user(cfg.name, principal)
    found = read_credentials(sec.credentials_file).get(user) if sec and sec.credentials_file else None
    if found:
        return found
    where = f" or a {user!r} line in {sec.credentials_file}" if sec and sec.credentials_file else ""
    raise ConfigError(cfg.path, "security", f"a password for principal {principal!r}: ${env}{where} "
                                            f"(`tensorline acls apply` writes them to security.credentials_file)")


def parse(data: Mapping[str, Any], path: str | Path = "<pipeline>") -> PipelineConfig:
    """Validate an already-parsed pipeline table."""
    path = str(path)
    root = _Reader(path, "", dict(data)).only(ROOT_KEYS)
    p = root.sub("pipeline", required=True).only(PIPELINE_KEYS)
    name = p.get("name", str, check=_NAME.match, expected="a pipeline name ([A-Za-z0-9._-])")
    topics = _topics(root.sub("topics"), name)
    stages_r = root.sub("stages")
    stages = {s: _stage(stages_r.sub(s, required=True), s, topics) for s in stages_r.table}
    fusion = None
    if "fusion" in data:
        fusion = _fusion(root.sub("fusion"), topics)
        f = root.sub("fusion")
        # The join's changelog: co-partitioned with its input, compacted to the latest state per key.
        topics[CHANGELOG] = TopicConfig(CHANGELOG, f"{name}.{CHANGELOG}", topics[fusion.input].partitions,
                                        cleanup_policy="compact")
        stages["fusion"] = StageConfig(name="fusion", input=fusion.input, output=fusion.output, kind="fusion",
                                       max_batch=f.positive("max_batch", DEFAULT_MAX_BATCH),
                                       max_delay_ms=f.get("max_delay_ms", int, DEFAULT_MAX_DELAY_MS),
                                       commit_interval_ms=f.get("commit_interval_ms", int,
                                                                DEFAULT_COMMIT_INTERVAL_MS),
                                       workers=f.positive("workers", 1), params=fusion.params,
                                       changelog=CHANGELOG, **_dlq_limits(f))
    for st in stages.values():  # a state changelog is compacted and co-partitioned with its input
        if st.changelog:
            topics[st.changelog] = replace(topics[st.changelog], cleanup_policy="compact",
                                           partitions=topics[st.input].partitions)
    bootstrap = os.environ.get(BOOTSTRAP_ENV) or p.get("bootstrap", str, None)
    return PipelineConfig(
        path=path, name=name, bootstrap=bootstrap, topics=topics, stages=stages, fusion=fusion,
        dlq=p.get("dlq", str, "dlq", lambda v: v in topics, "a topic key declared under [topics]"),
        delivery=p.choice("delivery", DELIVERY_MODES, DEFAULT_DELIVERY),
        max_message_bytes=p.positive("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        on_bad_file=p.choice("on_bad_file", BAD_FILE_ACTIONS, "dlq"),
        kafka=_kafka(root.sub("kafka"), "security" in data),
        classes=p.strings("classes", list(DEFAULT_CLASSES)),
        producer=_producer(root.sub("producer")),
        schema_registry=_schema_registry(root.sub("schema_registry")),
        security=_security(root.sub("security"), stages) if "security" in data else None,
    )


def load(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "an existing pipeline file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", f"valid TOML ({e})") from None
    return parse(data, path)


def changelog_topics(cfg: PipelineConfig) -> dict[str, str]:
    """Stage -> the key of its changelog topic, for every stage keeping state in one (its
    `changelog` key; [fusion] sets it). Its state is per input partition, so the changelog is
    co-partitioned with the stage's input."""
    return {name: s.changelog for name, s in cfg.stages.items() if s.changelog}


def referenced_files(cfg: PipelineConfig, stage: str | None = None, model: str | None = None) -> list[tuple[str, str]]:
    """(key, path) of every file the pipeline (or one stage, one model of it) reads: each model's
    path and, with strategy "stacking", the stacker's (fusion.params.path)."""
    files = []
    for name, st in cfg.stages.items():
        if stage not in (None, name):
            continue
        files += [(f"stages.{name}.models.{m.name}.path", m.path) for m in st.models if model in (None, m.name)]
    if cfg.fusion is not None and stage in (None, "fusion") and cfg.fusion.strategy == "stacking":
        files.append(("fusion.params.path", str(cfg.fusion.params["path"])))
    return files


def missing_files(cfg: PipelineConfig, stage: str | None = None, model: str | None = None) -> list[tuple[str, str]]:
    """The referenced files (see `referenced_files`) that do not exist. Not part of loading: the
    demo trains into its own default paths after loading the pipeline that names them."""
    return [(key, path) for key, path in referenced_files(cfg, stage, model) if not Path(path).exists()]


def require_files(cfg: PipelineConfig, stage: str | None = None, model: str | None = None) -> None:
    """Raise MissingFile naming the first missing referenced file: `run` and `up` call it when they
    start, before any worker does (`demo` decides what it may train: ops/train.py `untrained`)."""
    for key, path in missing_files(cfg, stage, model):
        raise MissingFile(cfg.path, key, path)
