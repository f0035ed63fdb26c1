"""`tensorline check`: everything about a pipeline that can be known before a worker starts.

The pipeline file is loaded (strict: unknown keys, bad choices), every file it names is looked
for, every model is loaded (`stages.base.Model`, on whatever device the caller pinned) and its
shapes are checked against what the pipeline gives it: the tensor its `input` names, as the stage
writing that topic makes it (preprocess: params.size and params.views; features: the backbone's
embedding and the tensors it keeps), and for a detection model one score per pipeline class. The
stacker is checked against fusion.expected_models and the classes, and the expected models
against the detection models fusion actually reads. With a broker reachable, the topics are
checked too: there, partition counts, cleanup policy, message size, co-partitioned changelogs.

Each check is one `Result` (ok, error, warn, or skip: not knowable here); any error fails the
check. What a record's producer sends (the raw topic's image size) is not knowable, so a model
reading it is not shape-checked.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tensorline import config
from tensorline.config import PipelineConfig, StageConfig

OK, ERROR, WARN, SKIP = "ok", "error", "warn", "skip"
# A broker that does not accept a TCP connection within this is "not reachable": its topics are
# not checked (kafka-python itself would wait 30 s to give up on bootstrapping).
CONNECT_TIMEOUT_S = 3.0
# The topic producers write (producers/publish.py RAW) and the tensor every source gives a record.
RAW, RAW_TENSOR = "raw", "image"
MODEL_KINDS = ("features", "detection")


@dataclass(frozen=True)
class Result:
    """One check: its status, the pipeline key it concerns, and what was found."""

    status: str
    file: str
    key: str
    message: str

    def line(self) -> str:
        return f"{self.status:<5} {self.file}: {self.key}: {self.message}"


@dataclass(frozen=True)
class Report:
    path: str
    results: tuple[Result, ...]

    @property
    def ok(self) -> bool:
        return not any(r.status == ERROR for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in (OK, ERROR, WARN, SKIP)}

    def format(self) -> str:
        c = self.counts()
        verdict = "ok" if self.ok else "FAILED"
        return "\n".join([*(r.line() for r in self.results),
                          f"check {verdict}: {c[OK]} ok, {c[ERROR]} errors, {c[WARN]} warnings, "
                          f"{c[SKIP]} not checked"])

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path, "ok": self.ok, "counts": self.counts(),
                "checks": [asdict(r) for r in self.results]}


@dataclass(frozen=True)
class Tensor:
    """A tensor a topic's records carry: its shape per record (None: not knowable) and who makes it."""

    shape: tuple[int | None, ...] | None
    origin: str


@dataclass(frozen=True)
class Carried:
    """The tensors a topic's records carry as far as known: `complete` when they are all of them,
    else `note` says why the others are not knowable (a plugin stage writes the topic, or several
    stages do)."""

    tensors: Mapping[str, Tensor]
    complete: bool = True
    note: str = ""


def unknown(note: str) -> Carried:
    return Carried({}, complete=False, note=note)


class _Results:
    def __init__(self, path: str):
        self.path, self.items = path, []

    def add(self, status: str, key: str, message: str) -> None:
        self.items.append(Result(status, self.path, key, message))


def check(path: str | Path, *, topics: bool = True) -> Report:
    """Check the pipeline file at `path` (see the module docstring); `topics=False` leaves the
    broker alone."""
    out = _Results(str(path))
    try:
        cfg = config.load(path).as_principal(config.OPS_PRINCIPAL)  # it only looks
    except config.ConfigError as e:
        out.add(ERROR, e.key, _after_key(e))
        return Report(str(path), tuple(out.items))
    fusion = f"; fusion of {', '.join(cfg.fusion.expected_models)}" if cfg.fusion else ""
    out.add(OK, "(file)", f"valid: stages {', '.join(s for s in cfg.stages if s != 'fusion')}{fusion}; "
                          f"classes {', '.join(cfg.classes)}")
    missing = dict(config.missing_files(cfg))
    _flows(cfg, out, _Models(), missing)
    if cfg.fusion is not None:
        _fusion(cfg, out, missing)
    if topics:
        _topics(cfg, out)
    return Report(str(path), tuple(out.items))


def _missing(cfg: PipelineConfig, key: str, file: str) -> str:
    return _after_key(config.MissingFile(cfg.path, key, file))


def _after_key(e: config.ConfigError) -> str:
    """A ConfigError's message without its 'file: key: ' prefix (a Result carries both apart)."""
    text, prefix = str(e), f"{e.path}: {e.key}: "
    return text[len(prefix):] if text.startswith(prefix) else text


# -- models and the tensors between stages ---------------------------------------------------
class _Models:
    """Models loaded once per file (two stages may serve the same one)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}

    def load(self, model: config.ModelConfig) -> Any:
        """The `Model`, or the exception loading it raised."""
        from tensorline.stages.base import Model

        if model.path not in self.loaded:
            try:
                self.loaded[model.path] = Model(model)
            except Exception as e:  # noqa: BLE001 - whatever Keras raises for a bad file is reported
                self.loaded[model.path] = e
        return self.loaded[model.path]


def _shape(shape: Iterable[int | None] | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def fits(expected: tuple[int | None, ...], actual: tuple[int | None, ...]) -> bool:
    """Whether a tensor of shape `actual` can be one row of a model input `expected` (None: any),
    as `Model.check` decides per record."""
    return len(expected) == len(actual) and all(e is None or a is None or e == a for e, a in zip(expected, actual))


def _order(cfg: PipelineConfig) -> list[str]:
    """The stages, each after the stages writing its input topic (file order otherwise; a cycle
    is broken in file order)."""
    writers = _writers(cfg)
    done: list[str] = []
    pending = [s for s in cfg.stages if s != "fusion"]
    while pending:
        ready = [s for s in pending if all(w in done or w == s for w in writers[cfg.stages[s].input])] or pending[:1]
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def _writers(cfg: PipelineConfig) -> dict[str, list[str]]:
    writers: dict[str, list[str]] = defaultdict(list)
    for name, st in cfg.stages.items():
        writers[st.output].append(name)
    return writers


def _flows(cfg: PipelineConfig, out: _Results, models: _Models, missing: Mapping[str, str]) -> None:
    """Each stage's models checked against what its input topic carries, stage by stage."""
    writers = _writers(cfg)
    made: dict[str, Carried] = {}

    def carried(topic: str) -> Carried:
        names = writers[topic]
        if not names:
            if topic == RAW:
                return Carried({RAW_TENSOR: Tensor(None, "the producers' image, of any size")})
            return unknown(f"topic {topic!r} is written by no stage of the pipeline")
        if len(names) > 1:
            return unknown(f"topic {topic!r} is written by several stages ({', '.join(names)})")
        return made.get(names[0]) or unknown(f"stage {names[0]} writes topic {topic!r} after its readers")

    for name in _order(cfg):
        st = cfg.stages[name]
        given = carried(st.input)
        if st.kind == "preprocess":
            made[name] = _preprocess(cfg, st, given, out)
        elif st.kind in MODEL_KINDS:
            made[name] = _model_stage(cfg, st, given, out, models, missing)
        elif ":" in st.kind:
            _plugin(st, out)
            made[name] = unknown(f"stage {name} (plugin {st.kind}) writes topic {st.output!r}")
        else:  # fusion: results, not tensors (checked with [fusion])
            made[name] = unknown(f"stage {name} writes results to topic {st.output!r}, not tensors")


def _config_error(e: Exception, default_key: str) -> tuple[str, str]:
    """(key, message) of a stage's 'file: key: message' ValueError; its own text under `default_key`
    otherwise."""
    parts = str(e).split(": ", 2)
    if len(parts) == 3 and parts[1].startswith("stages."):
        return parts[1], parts[2]
    return default_key, f"{type(e).__name__}: {e}"


def _preprocess(cfg: PipelineConfig, st: StageConfig, given: Carried, out: _Results) -> Carried:
    from tensorline.stages.preprocess import VIEWS, Preprocess

    key = f"stages.{st.name}"
    if RAW_TENSOR not in given.tensors and given.complete:
        out.add(ERROR, f"{key}.input", f"preprocess reads tensor {RAW_TENSOR!r}; topic {st.input!r} carries "
                                       f"{', '.join(map(repr, sorted(given.tensors))) or 'no tensor'}")
    size = st.params.get("size", 64)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        out.add(ERROR, f"{key}.params.size", f"expected a positive integer (pixels per side), got {size!r}")
        return unknown(f"stage {st.name}'s params are wrong")
    try:
        stage = Preprocess(cfg, st, None)
    except (ValueError, TypeError) as e:
        out.add(ERROR, *_config_error(e, f"{key}.params"))
        return unknown(f"stage {st.name}'s params are wrong")
    shape = (stage.size, stage.size, 1)
    made = {VIEWS[v]: Tensor(shape, f"stage {st.name}, view {v!r}, params.size = {stage.size}") for v in stage.views}
    out.add(OK, f"{key}.params", f"views {', '.join(stage.views)} -> tensors "
                                 f"{', '.join(repr(VIEWS[v]) for v in stage.views)} of {_shape(shape)}")
    return Carried(made)


def _model_stage(cfg: PipelineConfig, st: StageConfig, given: Carried, out: _Results, models: _Models,
                 missing: Mapping[str, str]) -> Carried:
    key = f"stages.{st.name}"
    if not st.models:
        out.add(ERROR, f"{key}.models", f"the {st.kind} stage needs a model")
    keep = st.params.get("keep") if st.kind == "features" else None
    if keep is not None and not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
        out.add(ERROR, f"{key}.params.keep", f"expected a list of tensor names, got {keep!r}")
        keep = None
    embeddings: set[tuple[int | None, ...] | None] = set()
    for m in st.models:
        mkey = f"{key}.models.{m.name}"
        if f"{mkey}.path" in missing:
            out.add(ERROR, f"{mkey}.path", _missing(cfg, f"{mkey}.path", m.path))
            embeddings.add(None)
            continue
        model = models.load(m)
        if isinstance(model, Exception):
            first = (str(model).strip().splitlines() or [""])[0]
            out.add(ERROR, f"{mkey}.path", f"{m.path} could not be loaded: {type(model).__name__}: {first[:300]}")
            embeddings.add(None)
            continue
        out.add(OK, f"{mkey}.path", f"{m.path} loaded: input {_shape(model.input_shape)}, "
                                    f"output {_shape(model.output_shape)}")
        _input(st, mkey, model, given, out)
        if st.kind == "detection":
            _scores(cfg, mkey, model, out)
        embeddings.add(model.output_shape)
    if st.kind != "features":
        return unknown(f"stage {st.name} writes detections to topic {st.output!r}, not tensors")
    kept = {k: v for k, v in given.tensors.items() if keep is None or k in keep}
    # With `keep` the tensors forwarded are known even when the input's are not.
    complete = given.complete or keep is not None
    embedding = embeddings.pop() if len(embeddings) == 1 else None
    origin = f"stage {st.name}'s embedding" + ("" if embedding else ", of a size not known here (no model loaded, "
                                                                   "or its models differ)")
    return Carried({**kept, "embedding": Tensor(embedding, origin)}, complete, given.note)


def _input(st: StageConfig, mkey: str, model: Any, given: Carried, out: _Results) -> None:
    """The tensor the model reads: carried by its input topic, and of the model's input shape."""
    name, key = model.config.input, f"{mkey}.input"
    if name not in given.tensors:
        if not given.complete:
            out.add(SKIP, key, f"tensor {name!r} not checked: {given.note}, what it carries is not knowable here")
        else:
            out.add(ERROR, key, f"model {model.config.name} reads tensor {name!r}, but topic {st.input!r} carries "
                                f"{', '.join(map(repr, sorted(given.tensors))) or 'no tensor'}: every record would "
                                f"be a dead letter (missing_tensor)")
        return
    tensor = given.tensors[name]
    if tensor.shape is None or model.input_shape is None:
        why = "the model (a SavedModel) does not show its input shape" if model.input_shape is None \
            else f"it is {tensor.origin}"
        out.add(SKIP, key, f"tensor {name!r} not shape-checked: {why}")
    elif not fits(model.input_shape, tensor.shape):
        out.add(ERROR, key, f"model {model.config.name} ({model.config.path}) expects input "
                            f"{_shape(model.input_shape)}, tensor {name!r} is {_shape(tensor.shape)} "
                            f"({tensor.origin}): every record would be a dead letter (bad_shape)")
    else:
        out.add(OK, key, f"tensor {name!r} {_shape(tensor.shape)} ({tensor.origin}) fits the model's input "
                         f"{_shape(model.input_shape)}")


def _scores(cfg: PipelineConfig, mkey: str, model: Any, out: _Results) -> None:
    """A detection model gives one score per pipeline class, of the kind fusion expects."""
    name, shape = model.config.name, model.output_shape
    classes = f"pipeline.classes names {len(cfg.classes)} ({', '.join(cfg.classes)})"
    if shape is None:
        out.add(SKIP, f"{mkey}.scores", f"not checked: model {name} (a SavedModel) does not show its output shape")
        return
    if shape[-1] != len(cfg.classes):
        out.add(ERROR, f"{mkey}.scores", f"model {name} ({model.config.path}) gives {shape[-1]} scores "
                                         f"(output {_shape(shape)}), {classes}")
        return
    fusion = cfg.fusion
    if (model.activation == "sigmoid" and fusion is not None and fusion.scores == "softmax"
            and name in fusion.expected_models):
        out.add(ERROR, "fusion.scores", f"model {name} ({model.config.path}) ends in a sigmoid, fusion.scores is "
                                        f"softmax: fusion would refuse every output (set fusion.scores = \"sigmoid\")")
        return
    out.add(OK, f"{mkey}.scores", f"{shape[-1]} scores ({model.activation or 'activation not shown'}), "
                                  f"one per class of pipeline.classes")


def _plugin(st: StageConfig, out: _Results) -> None:
    """A plugin stage ('package.module:Factory'): importable; what it makes is not knowable."""
    import importlib

    module, _, attr = st.kind.partition(":")
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        out.add(ERROR, f"stages.{st.name}.kind", f"{st.kind!r} cannot be imported: {type(e).__name__}: {e}")
        return
    out.add(OK, f"stages.{st.name}.kind", f"{st.kind} imports (its models and tensors are its own: not checked)")


# -- fusion ----------------------------------------------------------------------------------
def _fusion(cfg: PipelineConfig, out: _Results, missing: Mapping[str, str]) -> None:
    """fusion.expected_models against the detection models writing its input; the stacker against both."""
    assert cfg.fusion is not None
    f = cfg.fusion
    writers = [cfg.stages[w] for w in _writers(cfg)[f.input] if w != "fusion"]
    served = {m.name: st for st in writers if st.kind == "detection" for m in st.models}
    if any(":" in st.kind for st in writers):
        out.add(SKIP, "fusion.expected_models", f"not checked: a plugin stage writes topic {f.input!r}")
    elif not served:
        out.add(ERROR, "fusion.input", f"no detection stage writes topic {f.input!r}: fusion would receive nothing")
    else:
        unserved = [m for m in f.expected_models if m not in served]
        if unserved:
            them = "it" if len(unserved) == 1 else "them"
            out.add(ERROR, "fusion.expected_models",
                    f"{', '.join(map(repr, unserved))}: no detection stage writing topic {f.input!r} serves {them} "
                    f"(served there: {', '.join(served)}); every record would wait for {them} until "
                    f"join_timeout_ms and be fused partial")
        for m, st in served.items():
            if m not in f.expected_models:
                out.add(ERROR, f"stages.{st.name}.models.{m}",
                        f"fusion reads its detections but fusion.expected_models ({', '.join(f.expected_models)}) "
                        f"lacks {m!r}: each of them would be a dead letter (unknown_model)")
        if not unserved:
            out.add(OK, "fusion.expected_models", f"{', '.join(f.expected_models)}: each served by a detection "
                                                  f"model writing topic {f.input!r}")
    if f.strategy != "stacking":
        return
    if "fusion.params.path" in missing:
        out.add(ERROR, "fusion.params.path", _missing(cfg, "fusion.params.path", missing["fusion.params.path"]))
        return
    from tensorline.fusion.stacking import load_stacker

    path = str(f.params["path"])
    try:
        stacker = load_stacker(path, model_names=f.expected_models, classes=cfg.classes)
    except (ValueError, KeyError, TypeError, OSError) as e:
        out.add(ERROR, "fusion.params.path", str(e))
        return
    out.add(OK, "fusion.params.path", f"{path}: stacker fitted on {', '.join(stacker.model_names)} "
                                      f"({stacker.n_samples} samples) over classes {', '.join(stacker.classes)}, "
                                      f"as fusion.expected_models and pipeline.classes")


# -- the broker ------------------------------------------------------------------------------
def reachable(bootstrap: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when one of the bootstrap servers accepts a TCP connection, else why not."""
    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s).close()
            return None
        except (OSError, ValueError) as e:
            errors.append(f"{server.strip()}: {e}")
    return "; ".join(errors)


def _topics(cfg: PipelineConfig, out: _Results) -> None:
    from kafka.errors import KafkaError

    from tensorline.engine import clients
    from tensorline.engine.errors import AuthenticationFailed
    from tensorline.ops import topics

    try:
        bootstrap = clients.bootstrap(cfg)
    except clients.NoBroker as e:
        out.add(SKIP, "topics", f"not checked, no broker: {str(e).split(': ', 1)[-1]}")
        return
    why = reachable(bootstrap)
    if why:
        out.add(SKIP, "topics", f"not checked: no broker reachable at {bootstrap} ({why})")
        return
    try:
        states, _ = topics.describe(cfg)
    except (KafkaError, AuthenticationFailed, config.ConfigError) as e:  # the last two: the ops principal's password
        out.add(ERROR, "topics", f"the broker at {bootstrap} did not describe the topics: {type(e).__name__}: {e}")
        return
    actual = {s.key: s.actual_partitions for s in states}
    for s in states:
        _topic(cfg, s, bootstrap, out)
    for name, changelog in config.changelog_topics(cfg).items():
        source, a, b = cfg.stages[name].input, actual.get(cfg.stages[name].input), actual.get(changelog)
        if a is None or b is None:
            continue  # a missing topic is an error above
        where = f"{cfg.topics[changelog].name} ({b} partitions) and {cfg.topics[source].name} ({a})"
        if a != b:
            out.add(ERROR, f"topics.{changelog}", f"{where} are not co-partitioned: stage {name} keeps the state of "
                                                  f"each input partition in the changelog's partition of that number")
        else:
            out.add(OK, f"topics.{changelog}", f"{where} are co-partitioned (stage {name}'s state changelog)")
    for name, st in cfg.stages.items():
        n = actual.get(st.input)
        if n is not None and st.workers > n:
            out.add(WARN, f"stages.{name}.workers", f"{st.workers} workers per group, {cfg.topics[st.input].name} "
                                                    f"has {n} partitions: {st.workers - n} would sit idle")


def _topic(cfg: PipelineConfig, s: Any, bootstrap: str, out: _Results) -> None:
    """One topic as the cluster has it against the pipeline file."""
    key, want = f"topics.{s.key}", cfg.topics[s.key]
    if s.actual_partitions is None:
        out.add(ERROR, key, f"topic {s.name} does not exist on {bootstrap} (tensorline topics create)")
        return
    problems = []
    if s.actual_partitions != s.partitions:
        problems.append(f"has {s.actual_partitions} partitions, the pipeline file says {s.partitions}")
    if s.cleanup_policy is not None and s.cleanup_policy != want.cleanup_policy:
        problems.append(f"cleanup.policy is {s.cleanup_policy}, the pipeline needs {want.cleanup_policy}"
                        + (" (a state changelog: only the latest state per key)" if want.cleanup_policy == "compact"
                           else ""))
    if s.max_message_bytes is not None and int(s.max_message_bytes) < cfg.max_message_bytes:
        problems.append(f"max.message.bytes is {s.max_message_bytes}, below pipeline.max_message_bytes "
                        f"{cfg.max_message_bytes}: the broker would refuse the larger records")
    if problems:
        out.add(ERROR, key, f"topic {s.name} " + "; ".join(problems))
        return
    if s.retention_ms is not None and s.retention_ms != str(want.retention_ms):
        out.add(WARN, f"{key}.retention_ms", f"topic {s.name} keeps records {s.retention_ms} ms, the pipeline file "
                                             f"says {want.retention_ms} (topics create leaves an existing topic as is)")
    out.add(OK, key, f"topic {s.name}: {s.actual_partitions} partitions, cleanup.policy {s.cleanup_policy}, "
                     f"max.message.bytes {s.max_message_bytes}")
