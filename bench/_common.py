"""What the worker-process benchmarks share: a broker in a temp dir, the Keras backbones (a small
CNN, and a MobileNet-style one for a realistic model's cost), the image stream, waiting on
groups, reading trace headers, and a pipeline under `tensorline up` fed at a steady rate (`UpRun`,
for the fault benches). Imported as `_common` by scripts in bench/.

A bench measures only what it sent: every run works on a pipeline of its own (`run_name`: fresh
topics and consumer groups, checked empty by `require_fresh`), on the broker `local_broker`
started (an inherited $TENSORLINE_BOOTSTRAP does not redirect it to a used one), and prints a
ratio only when the records it measured are the records it sent (`Measured`); otherwise the
ratio prints as n/a with the reason.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import broker, lag
from tensorline.schemas import Record, encode_record
from tensorline.engine.runtime import INGEST_MS, header

IMAGE = (64, 64, 1)
EMBEDDING = 64
CLASSES = ("normal", "nodule")
MAX_BATCH = 32  # the pipeline default: 32 images fill a CPU model call well
MAX_DELAY_MS = 50  # the pipeline default
# The realistic tier's images (preprocess's output at size 128: one channel per view) and backbone
# width: MobileNet v1 at its full width costs 10-11 ms of CPU per record at batch 32 on the 2-core
# machine under load (width 0.75: 5.7-9, width 0.5: 3.6-6; a quiet machine spends less than a
# loaded one, so the tier's 5 ms needs the margin).
REALISTIC_IMAGE = (128, 128, 1)
REALISTIC_WIDTH = 1.0
WORKER_START_S = 120.0  # TensorFlow import + model load + group join, generous on a cold machine
STREAM_TIMEOUT_S = 300.0


@contextmanager
def local_broker() -> Iterator[tuple[Path, broker.BrokerStatus]]:
    """A temp folder and the project's own broker running under it, stopped on the way out. Every
    pipeline of the bench and every worker it starts use that broker meanwhile (see `bootstrap_pinned`)."""
    with tempfile.TemporaryDirectory(prefix="tensorline-bench-") as tmp:
        folder = Path(tmp)
        data_dir = folder / "broker"
        status = broker.start(data_dir, broker.free_port(), with_parent=True)  # gone with the bench, even a killed one
        try:
            with bootstrap_pinned(status.bootstrap):
                yield folder, status
        finally:
            broker.stop(data_dir)


@contextmanager
def bootstrap_pinned(bootstrap: str) -> Iterator[None]:
    """$TENSORLINE_BOOTSTRAP set to `bootstrap` within (restored after): it overrides a pipeline
    file's bootstrap, so one inherited from the shell would send the bench, and the workers it
    starts, to another broker, whose topics may hold an earlier run's records."""
    before = os.environ.get(config.BOOTSTRAP_ENV)
    os.environ[config.BOOTSTRAP_ENV] = bootstrap
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(config.BOOTSTRAP_ENV, None)
        else:
            os.environ[config.BOOTSTRAP_ENV] = before


def run_name(prefix: str) -> str:
    """A pipeline name no earlier run used: its topics and consumer groups are new."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class UsedTopics(RuntimeError):
    """A bench's pipeline already has records or committed offsets: what it measured would count them."""


def require_fresh(cfg: config.PipelineConfig) -> None:
    """Raise UsedTopics unless every topic of `cfg` is empty and no consumer group of it exists
    (call after creating the topics, before sending anything)."""
    from kafka import TopicPartition

    consumer = clients.consumer(cfg, None)
    try:
        tps = [TopicPartition(t.name, p) for t in cfg.topics.values()
               for p in sorted(consumer.partitions_for_topic(t.name) or ())]
        used = [f"{tp.topic}[{tp.partition}] ends at offset {end}" for tp, end in consumer.end_offsets(tps).items()
                if end]
    finally:
        consumer.close()
    admin = clients.admin(cfg)
    try:
        used += [f"group {g['group_id']} exists" for g in clients.with_coordinator(admin.list_groups)
                 if g["group_id"].startswith(f"{cfg.name}.")]
    finally:
        admin.close()
    if used:
        raise UsedTopics(f"pipeline {cfg.name} is not fresh ({'; '.join(sorted(used))}): "
                         f"a bench run needs a name of its own (run_name)")


class Measured:
    """What a bench measured, checked before it prints a ratio. Each measurement names the records
    it saw against the records sent for it (`count`), or is refused with a reason (`refuse`); a
    value or ratio that rests on a refused measurement, or is not a finite number, prints as
    "n/a", and `reasons` says why."""

    def __init__(self) -> None:
        self.refused: dict[str, str] = {}

    def count(self, name: str, sent: int, seen: int, what: str = "records") -> bool:
        """Whether measurement `name` saw exactly the `sent` records; refused otherwise."""
        if seen != sent:
            self.refuse(name, f"{what}: {seen} measured, {sent} sent")
        return seen == sent

    def refuse(self, name: str, reason: str) -> None:
        self.refused.setdefault(name, reason)

    def ok(self, *names: str) -> bool:
        return not any(n in self.refused for n in names)

    def value(self, value: float | None, *names: str, fmt: str = ".2f") -> str:
        """`value` formatted, or "n/a" when a measurement it rests on (`names`) was refused."""
        if value is None or not self.ok(*names) or not math.isfinite(value):
            return "n/a"
        return format(value, fmt)

    def ratio(self, num: float | None, den: float | None, *names: str, fmt: str = ".2f") -> str:
        """num / den formatted, or "n/a" (a refused measurement, a missing or zero denominator)."""
        if num is None or den is None or den == 0:
            return "n/a"
        return self.value(num / den, *names, fmt=fmt)

    def reasons(self) -> list[str]:
        return [f"n/a: {name}: {reason}" for name, reason in self.refused.items()]


def machine_load() -> str:
    """Other sessions share the machine and skew phases unequally: say how busy it was."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min: {five:.1f}) on {os.cpu_count()} cores"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def build_backbone(image: tuple[int, ...] = IMAGE, embedding: int = EMBEDDING):
    """Four 3x3 convolutions then an embedding: the model call is a real part of a record's cost.
    Fixed seed; the caller saves it."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(image)])
    for i, width in enumerate((32, 32, 64, 64)):
        model.add(layers.Conv2D(width, 3, padding="same", activation="relu"))
        if i % 2:
            model.add(layers.MaxPooling2D())
    model.add(layers.GlobalAveragePooling2D())
    model.add(layers.Dense(embedding))
    return model


def build_mobilenet(image: tuple[int, ...] = REALISTIC_IMAGE, width: float = REALISTIC_WIDTH,
                    embedding: int = EMBEDDING):
    """MobileNet v1's layout at `width` (a strided 3x3 convolution, then 13 depthwise-separable
    blocks, each convolution followed by batch norm and ReLU6), pooled into an embedding: a model
    whose call costs what a real vision backbone's does. Random He-normal weights (no download),
    fixed seed; the caller saves it."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)
    # He-normal over a depthwise kernel's own 3x3 fan-in: Keras' default counts every channel in
    # it, and activations would shrink ~sqrt(channels) per block, to ~1e-16 at the end.
    depthwise = keras.initializers.RandomNormal(stddev=(2 / 9) ** 0.5)

    def normalised(x):
        return layers.ReLU(6.0)(layers.BatchNormalization()(x))

    inputs = keras.Input(image)
    x = normalised(layers.Conv2D(int(32 * width), 3, strides=2, padding="same", use_bias=False,
                                 kernel_initializer="he_normal")(inputs))
    for filters, stride in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
                            (1024, 2), (1024, 1)):
        x = normalised(layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                              depthwise_initializer=depthwise)(x))
        x = normalised(layers.Conv2D(int(filters * width), 1, use_bias=False, kernel_initializer="he_normal")(x))
    x = layers.Dense(embedding)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, x, name="mobilenet")


def images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def record(i: int, image: np.ndarray, prefix: str = "r", key: bytes | None = None) -> tuple[bytes, bytes, int]:
    """(key, value, ingest ms) of one preprocessed record; keyed by study (64 of them) unless `key`."""
    ingest = int(time.time() * 1000)
    r = Record(record_id=f"{prefix}{i}", source="bench", ingest_ts_ms=ingest, tensors={"image": image},
               stage="preprocess", label=CLASSES[i % 2])
    return key or f"study-{i % 64}".encode(), bytes(encode_record(r)), ingest


def produce(cfg: config.PipelineConfig, topic: str, batch: np.ndarray, *, prefix: str = "r",
            first: int = 0, rate: float | None = None, unique_keys: bool = False) -> None:
    """Send one record per image; paced at `rate` records/s when given, else as fast as possible.
    With `unique_keys` each record is keyed by its record id (outputs then tell records apart)."""
    producer = clients.producer(cfg)
    started = time.monotonic()
    for i, image in enumerate(batch):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        rid = f"{prefix}{first + i}"
        key, value, ingest = record(first + i, image, prefix, rid.encode() if unique_keys else None)
        producer.send(cfg.topic(topic).name, key=key, value=value, headers=[(INGEST_MS, str(ingest).encode())])
    producer.flush()
    producer.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, check: Callable[[], None]) -> None:
    """Poll `predicate` every 0.2 s; `check` raises when a worker died meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def group_joined(admin, group: str) -> bool:
    info = admin.describe_groups([group]).get(group, {})
    return info.get("group_state") == "Stable" and bool(info.get("members"))


def committed(admin, group: str) -> int:
    """Records a group has committed on its (non-transactional) input topic."""
    return sum(o.offset for o in admin.list_group_offsets(group).get(group, {}).values() if o.offset > 0)


def ms(r, name: str) -> int:
    """A trace header of an output record, as an int (milliseconds)."""
    value = header(list(r.headers), name)
    if value is None:
        raise KeyError(f"output {r.key!r} has no header {name}")
    return int(value)


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="inverted_cdf"))


class UpRun:
    """A pipeline under `tensorline up` in `folder` (its pipeline file, state dir and the log of
    `up` and its workers), fed by a paced producer: what the fault benches (chaos, failover)
    share. Subclasses run their scenario; `notes` are the run's events as they came, each also
    logged by `say`."""

    source = "bench"  # the records' source field
    stop_timeout_s = 60.0  # `up` stops its workers (their own stop bound is 30 s)

    def __init__(self, folder: Path, pipeline_text: str, *, records: int, rate: float,
                 log: Callable[[str], None] = print, env: dict[str, str] | None = None):
        self.folder, self.records, self.rate, self.say = folder, records, rate, log
        self.path = (folder / "pipeline.toml").resolve()
        self.path.write_text(pipeline_text)
        self.cfg = config.load(self.path)
        clients.create_topics(self.cfg)
        self.state_dir = folder / "state"
        self.env = {**os.environ, "TENSORLINE_STATE_DIR": str(self.state_dir), **(env or {})}
        self.log_path = folder / "up.log"
        self.up: subprocess.Popen | None = None
        self.sent = 0
        self.send_errors: list[str] = []
        self.notes: list[str] = []
        self.started = time.time()

    def note(self, what: str) -> None:
        line = f"{time.time() - self.started:6.1f}s sent={self.sent:<5} {what}"
        self.notes.append(line)
        self.say(line)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll every 0.2 s; raise on timeout, or when `up` exited meanwhile."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.up is not None and self.up.poll() is not None:
                raise RuntimeError(f"`tensorline up` exited with {self.up.returncode} while waiting for {what}; "
                                   f"see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.log_path}")
            time.sleep(0.2)

    def start_up(self) -> None:
        with open(self.log_path, "ab") as err:
            # cwd: the run's folder, so `-m tensorline.cli` never picks up a source tree from the caller's cwd.
            self.up = subprocess.Popen([sys.executable, "-m", "tensorline.cli", "up", "-c", str(self.path)],
                                       cwd=self.folder, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err)
        self.note(f"tensorline up started (pid {self.up.pid})")

    def stop_up(self) -> None:
        """SIGTERM `up` (it stops its workers); SIGKILL if it has not ended in `stop_timeout_s`."""
        if self.up is None or self.up.poll() is not None:
            return
        self.up.send_signal(signal.SIGTERM)
        try:
            self.up.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.note(f"`up` still running {self.stop_timeout_s:.0f} s after SIGTERM: killed")
            self.up.kill()
            self.up.wait()
        self.note(f"`up` stopped (SIGTERM), exit code {self.up.returncode}")

    def kill_up(self) -> None:
        """SIGKILL `up` if it still runs (cleanup: its workers are the subclass's to end)."""
        if self.up is not None and self.up.poll() is None:
            self.up.kill()
            self.up.wait()

    def gate(self, i: int) -> bool:
        """Called before record `i` is sent; True when it waited (the pacing starts again from
        there). The default never waits."""
        return False

    def produce(self) -> None:
        """Send `records` records (ids r0, r1, ...) to the `in` topic at `rate` per second, keyed
        by id; failed sends are kept in `send_errors` (the producer retries through broker
        failures as any idempotent producer does)."""
        producer = clients.producer(self.cfg)
        try:
            started = time.monotonic()
            for i in range(self.records):
                if self.gate(i):
                    started = time.monotonic() - i / self.rate
                time.sleep(max(0.0, started + i / self.rate - time.monotonic()))
                rec = Record(record_id=f"r{i}", source=self.source, ingest_ts_ms=int(time.time() * 1000),
                             tensors={"x": np.arange(4, dtype=np.float32) + i}, stage="producer")
                future = producer.send(self.cfg.topic("in").name, key=f"r{i}".encode(),
                                       value=bytes(encode_record(rec)))
                future.add_errback(lambda e, i=i: self.send_errors.append(f"r{i}: {e!r}"))
                self.sent = i + 1
            producer.flush()
        finally:
            producer.close()

    def drained(self) -> bool:
        """Every stage group committed to its input's end (measured in pipeline order)."""
        try:
            return all(g.total == 0 for g in lag.measure(self.cfg))
        except Exception:  # a group's coordinator moving: measure again
            return False


def scale_chain(name: str, bootstrap: str, stages: tuple[str, ...], *, workers: int, partitions: int,
                sleep_s: float) -> str:
    """A pipeline file: the chain in -> stages[0] -> ... of model-free Scale stages (each batch
    sleeps `sleep_s`), `workers` each, `partitions` per topic, exactly once."""
    lines = [f'[pipeline]\nname = "{name}"\nbootstrap = "{bootstrap}"\ndelivery = "exactly_once"\n[topics]',
             f"in = {{ partitions = {partitions} }}"]
    lines += [f"{s} = {{ partitions = {partitions} }}" for s in stages]
    lines.append("dlq = { partitions = 1 }")
    source = "in"
    for s in stages:
        lines += [f'[stages.{s}]\nkind = "tensorline.stages.testing:Scale"\ninput = "{source}"\noutput = "{s}"',
                  f"workers = {workers}\nmax_batch = 8\nmax_delay_ms = 20",
                  f"[stages.{s}.params]\nsleep_s = {sleep_s}"]
        source = s
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WorkerProc:
    """A live `tensorline run STAGE` process, its parent (the supervisor, or not) and its stage."""

    pid: int
    ppid: int
    stage: str


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state first), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def worker_procs(path: Path) -> list[WorkerProc]:
    """Live `tensorline run STAGE -c PATH` processes of this pipeline file, whoever their parent."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "tensorline.cli" in args and "run" in args and str(path) in args:
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                out.append(WorkerProc(int(entry.name), int(stat[1]), args[args.index("run") + 1]))
    return out
