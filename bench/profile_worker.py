"""Profile one stage worker on a real broker: its CPU per record that is not the model's.

A fixed backlog of 64x64x1 float32 records (keyed by study, `tl.ingest_ms` headers, as the demo's
preprocess writes them) is produced to a fresh input topic; then one worker process runs the
stage (`features`: the bench backbone, forwarding only the embedding, as bench/stages runs it; or
`scale`: the model-free `stages.testing.Scale`, whose output is the whole tensor) exactly-once,
until it has committed the backlog. `bare` is the client's floor, the baseline for `scale`:
kafka-python alone, forwarding each record as it came in the same exactly-once shape (poll up to
max_batch, produce, commit the transaction with the offsets every commit interval), no runtime,
codec or stage: what `scale` costs beyond it is ours. Over the records committed after the
first `--warmup` ones, it measures per record:
- the worker process's CPU (every thread: main loop, model thread, kafka-python's IO threads,
  TensorFlow's pools), from `time.process_time()` in the worker, and per thread from /proc,
  less the upkeep of its helper threads (kafka-python's IO, sender and heartbeat threads: their
  CPU per second once the worker idles after the window) over the window;
- the broker's CPU over the same window (/proc/PID/stat; the broker must serve nothing else),
  less its idle CPU per second (read before the worker starts) over the window: upkeep paid
  per second, not per record, which would make a slower run (a busier machine) look costlier;
- the model's CPU: that of the worker's native threads (TensorFlow's pools, where a model call
  computes; Scale has none). What TensorFlow computes on the calling thread, and the model
  thread's Python, count as ours: the figure errs high.
overhead = worker + broker - model: what the Kafka path costs on top of the model, the figure
issue 14 asks to halve. (Subtracting the model measured alone instead proved useless on a loaded
machine: TensorFlow's pools spin, and its CPU per record moved by 0.5 ms between runs.) CPU time, not wall time: the machine is shared, so compare runs in the
same conditions (`--tree` runs code versions interleaved).

`--cprofile` prints cProfile's top lists on CPU time (`time.thread_time`: a thread waiting for a
core costs nothing, which matters on a loaded machine) of every thread of the worker (its loop,
the model thread, kafka-python's threads), for the whole run; `--py-spy` records the window
(`py-spy record --gil --nonblocking`) and prints the top functions by own and total GIL time
(wall time holding the GIL: on a loaded machine it counts time the holder waited for a core).
Profiled runs are slower: their CPU figures are not comparable with unprofiled ones.

    .venv/bin/tensorline broker start --data-dir /tmp/broker-perf --port 19192
    .venv/bin/python bench/profile_worker.py --broker-dir /tmp/broker-perf --stage features --repeat 3
    .venv/bin/python bench/profile_worker.py --tree HEAD --tree HEAD+schemas/codec.py --repeat 3
    .venv/bin/python bench/profile_worker.py --stage bare --stage scale --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TREES = Path(tempfile.gettempdir()) / "profile-worker-trees"
MODELS = Path(tempfile.gettempdir()) / "profile-worker-models"
# pyproject's package-dir: where each subpackage of `tensorline` lives in the repository.
PACKAGE_DIRS = {"tensorline": "tensorline", "tensorline/producers": "producers", "tensorline/schemas": "schemas",
                "tensorline/stages": "stages", "tensorline/fusion": "fusion", "tensorline/ops": "ops"}
SAMPLE_S = 0.02
BROKER_IDLE_S = 4.0  # the broker's idle CPU, per second, is read over this long before each run
SETTLE_S, IDLE_S = 1.0, 4.0  # after the window: the worker's last commit, then its idle CPU per second
RUN_TIMEOUT_S = 900.0  # the window's edges are found within this (a commit adds ~30-100 records at once)

PIPELINE = """\
[pipeline]
name = "{name}"
bootstrap = "{bootstrap}"
delivery = "exactly_once"
[topics]
in = {{ partitions = 4 }}
out = {{ partitions = 4 }}
dlq = {{ partitions = 1 }}
[stages.work]
kind = "{kind}"
input = "in"
output = "out"
max_batch = 32
max_delay_ms = 50
commit_interval_ms = {commit_interval_ms}
{extra}
"""
STAGES = {
    "features": ("features", '[stages.work.params]\nkeep = []\n[stages.work.models.backbone]\npath = "{models}/backbone.keras"\n'),
    "scale": ("tensorline.stages.testing:Scale", ""),
    "bare": ("tensorline.stages.testing:Scale", ""),  # the pipeline file only names its topics and group
}


# -- parent: topics, backlog, worker processes, report ---------------------------------------
def tree_path(spec: str) -> Path | None:
    """A tree of the repository laid out as the installed package, for PYTHONPATH: `REF` (a git
    ref), `REF+PATH,PATH` (REF with these files as they are in the working tree: a change
    measured against the commit it starts from, while others commit around it), or "." (the
    working tree itself, which the venv's editable install imports: None)."""
    if spec == ".":
        return None
    ref, _, overlay = spec.partition("+")
    files = [f for f in overlay.split(",") if f]
    sha = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", ref], text=True).strip()
    digest = hashlib.sha256(b"".join(f.encode() + (REPO / f).read_bytes() for f in files)).hexdigest()[:8]
    root = TREES / (sha[:12] + (f"+{digest}" if files else ""))
    if not (root / "tensorline").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(f"git -C {REPO} archive {sha} | tar -x -C {tmp}", shell=True, check=True)
            for f in files:
                shutil.copy(REPO / f, Path(tmp) / f)
            staged = Path(tmp) / "out"
            for package, folder in sorted(PACKAGE_DIRS.items()):
                shutil.copytree(Path(tmp) / folder, staged / package, dirs_exist_ok=True)
            shutil.copytree(staged, root)
    return root


def build_models() -> None:
    if (MODELS / "backbone.keras").exists():
        return
    sys.path.insert(0, str(BENCH))
    from _common import build_backbone

    MODELS.mkdir(parents=True, exist_ok=True)
    build_backbone().save(MODELS / "backbone.keras")


def backlog(cfg, n: int, tensor: str) -> None:
    """n records on the input topic, produced before the worker starts: records as the demo's
    preprocess writes them (one 64x64x1 float32 tensor named `tensor`, keyed by study, with a
    `tl.ingest_ms` header)."""
    sys.path.insert(0, str(BENCH))
    from _common import CLASSES, IMAGE, images

    from tensorline.engine import clients
    from tensorline.engine.runtime import INGEST_MS
    from tensorline.schemas import Record, encode_record

    producer = clients.producer(cfg)
    for i, image in enumerate(images(n, IMAGE, seed=1)):
        ingest = int(time.time() * 1000)
        r = Record(record_id=f"r{i}", source="bench", ingest_ts_ms=ingest, tensors={tensor: image},
                   stage="preprocess", label=CLASSES[i % 2])
        producer.send(cfg.topic("in").name, key=f"study-{i % 64}".encode(), value=bytes(encode_record(r)),
                      headers=[(INGEST_MS, str(ingest).encode())])
    producer.flush()
    producer.close()


def run_once(args, stage: str, ref: str, bootstrap: str, broker_pid: int, folder: Path) -> dict:
    from tensorline import config
    from tensorline.engine import clients

    name = f"prof{os.urandom(4).hex()}"
    kind, extra = STAGES[stage]
    path = folder / f"{name}.toml"
    path.write_text(PIPELINE.format(name=name, bootstrap=bootstrap, kind=kind, extra=extra.format(models=MODELS),
                                    commit_interval_ms=args.commit_interval_ms))
    cfg = config.load(path)
    clients.create_topics(cfg)
    backlog(cfg, args.warmup + args.records, "image" if stage == "features" else "x")
    env = {**os.environ, "TENSORLINE_STATE_DIR": str(folder / "state"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "-1"}
    tree = tree_path(ref)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, __file__, "--child", str(path), "--broker-pid", str(broker_pid),
           "--warmup", str(args.warmup), "--records", str(args.records), "--stage", stage,
           "--out", str(folder / f"{name}.json")]
    cmd += ["--py-spy"] if args.py_spy else []
    cmd += ["--cprofile"] if args.cprofile else []
    idle = broker_idle(broker_pid)
    log = folder / f"{name}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"worker run failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    result = json.loads((folder / f"{name}.json").read_text())
    result["ref"] = ref if stage == "features" else f"{stage} {ref}"
    # The broker's own upkeep (timers, the group's heartbeats) costs CPU per second, not per
    # record: left in, a slower run (a busier machine) would read as a costlier path.
    result["broker_idle_ms"] = 1000 * idle / result["rps"]
    result["broker_ms"] -= result["broker_idle_ms"]
    result["overhead_ms"] = result["worker_ms"] + result["broker_ms"] - result["model_ms"]
    if args.py_spy or args.cprofile:
        print(result.pop("profile"))
    return result


def broker_idle(pid: int) -> float:
    """The broker's CPU seconds per second with no client at work (before the worker starts)."""
    started, cpu = time.monotonic(), proc_cpu_s(pid)
    time.sleep(BROKER_IDLE_S)  # the measurement window
    return (proc_cpu_s(pid) - cpu) / (time.monotonic() - started)


def show(r: dict) -> str:
    threads = " ".join(f"{k}={v:.3f}" for k, v in sorted(r["threads_ms"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
    return (f"[{r['ref']}] overhead={r['overhead_ms']:.3f} ms/rec: worker={r['worker_ms']:.3f} broker={r['broker_ms']:.3f} "
            f"model={r['model_ms']:.3f} (upkeep left out: worker {r['upkeep_ms']:.3f}, broker {r['broker_idle_ms']:.3f}; records={r['records']} batch={r['batch']:.1f} rps={r['rps']:.0f}; "
            f"records per {', per '.join(f'{k} {v:.0f}' for k, v in r['requests'].items())})\n"
            f"    per thread ms/rec: {threads}")


def parent(args) -> None:
    from tensorline.engine import local

    status = local.status(Path(args.broker_dir))
    if not status.running:
        sys.exit(f"no broker running under {args.broker_dir}: tensorline broker start --data-dir {args.broker_dir}")
    stages = args.stage or ["features"]
    if "features" in stages:
        build_models()
    refs = args.tree or ["."]
    results: dict[tuple[str, str], list[dict]] = {(stage, ref): [] for stage in stages for ref in refs}
    with tempfile.TemporaryDirectory(prefix="profile-worker-") as tmp:
        for i in range(args.repeat):
            for stage, ref in results:  # interleaved: a busy spell of the machine hits every run alike
                r = run_once(args, stage, ref, status.bootstrap, status.pid, Path(tmp))
                results[stage, ref].append(r)
                print(show(r), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for (stage, ref), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("overhead_ms", "worker_ms", "broker_ms", "model_ms")}
        print(f"profile_worker: stage={stage} tree={ref} runs={len(rs)} overhead_ms_per_record={med['overhead_ms']:.3f} "
              f"worker_ms={med['worker_ms']:.3f} broker_ms={med['broker_ms']:.3f} model_ms={med['model_ms']:.3f} "
              f"(overheads {', '.join(format(r['overhead_ms'], '.3f') for r in rs)})")


# -- child: one worker, measured ---------------------------------------------------------------
def proc_cpu_s(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds per thread of this process: Python threads by name (the model thread as
    "model", kafka-python's by its own names), native ones (TensorFlow's pools) as "native"."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "native")
        name = "model" if "-model" in name else name.split("-")[0] if name.startswith("kafka") else name
        out[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return dict(out)


def top(counts: Counter, total: int, n: int = 25) -> str:
    return "\n".join(f"  {100 * c / total:5.1f}%  {name}" for name, c in counts.most_common(n))


def py_spy_report(raw: Path) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  for f in stack.split(";")[1:]]  # first frame: the thread
        c = int(count)
        total += c
        if frames:
            own[frames[-1]] += c
        for f in set(frames):
            inclusive[f] += c
    return (f"py-spy (GIL held) samples={total}\nby own time:\n{top(own, total)}\n"
            f"by total time:\n{top(inclusive, total, 40)}")


class Bare:
    """The client's floor: kafka-python alone in the worker's exactly-once shape, no runtime, no
    codec, no model. One consumer group member and one transactional producer; each poll's
    records (up to max_batch) are produced to the output as they came (key, value, headers),
    and every commit interval the transaction commits with the consumed offsets (KIP-447).
    What a worker's overhead costs beyond this is the runtime's, the codec's and the stage's."""

    def __init__(self):
        self.stats = SimpleNamespace(records_in=0, batches=0)

    def run(self, cfg, stop: threading.Event, interval_s: float):
        from kafka.structs import OffsetAndMetadata

        from tensorline.engine import clients

        consumer = clients.consumer(cfg, f"{cfg.name}.bare", cfg.topic("in").name)
        producer = clients.producer(cfg, transactional_id=f"{cfg.name}.bare")
        producer.init_transactions()
        out, max_batch = cfg.topic("out").name, cfg.stages["work"].max_batch
        offsets: dict = {}
        pending, since = 0, None
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=100, max_records=max_batch)
            for tp, records in polled.items():
                if since is None:
                    producer.begin_transaction()
                    since = time.monotonic()
                for r in records:
                    producer.send(out, key=r.key, value=r.value, headers=r.headers)
                offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                pending += len(records)
            self.stats.batches += bool(polled)
            if since is not None and (not polled or time.monotonic() - since >= interval_s):
                producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
                producer.commit_transaction()
                self.stats.records_in += pending
                pending, since, offsets = 0, None, {}
        producer.close()
        consumer.close()
        return self.stats


def count_requests() -> Counter:
    """Counts, for the whole run, of the client calls that cost the broker most per record when
    they are frequent: transactions committed and fetch requests sent."""
    from kafka import KafkaProducer
    from kafka.consumer.fetcher import Fetcher

    counts: Counter[str] = Counter()

    def counted(name, call, many=False):
        def wrapper(*a, **k):
            result = call(*a, **k)
            counts[name] += len(result) if many else 1
            return result
        return wrapper
    KafkaProducer.commit_transaction = counted("commit", KafkaProducer.commit_transaction)
    Fetcher.send_fetches = counted("fetch", Fetcher.send_fetches, many=True)
    return counts


def profiled_run(run, profiles: list):
    import cProfile

    def wrapper(*a, **k):
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        try:
            return run(*a, **k)
        finally:
            profiler.disable()
            profiles.append(profiler)
    return wrapper


def profile_threads(profiles: list) -> None:
    """cProfile on CPU time (time.thread_time) in every thread: the worker's loop (from
    Worker.run, after the model loaded), the model thread and kafka-python's threads. Each
    thread's profile is added to `profiles` when it ends."""
    from tensorline.engine.runtime import Worker

    threading.Thread._bootstrap_inner = profiled_run(threading.Thread._bootstrap_inner, profiles)  # subclasses' too
    Worker.run = profiled_run(Worker.run, profiles)


def cprofile_report(profiles: list) -> str:
    import io
    import pstats

    text = io.StringIO()
    merged = pstats.Stats(profiles[0], stream=text)
    for p in profiles[1:]:
        merged.add(p)
    merged.sort_stats("tottime").print_stats(40)
    merged.sort_stats("cumulative").print_stats(60)
    return "cProfile, CPU time of every thread, whole run:\n" + text.getvalue()


def child(args) -> None:
    from tensorline import config
    from tensorline.engine import clients, worker as worker_module
    from tensorline.engine.runtime import Worker

    cfg = config.load(Path(args.child))
    consumer = clients.consumer(cfg, None)
    from kafka import TopicPartition

    topic = cfg.topic("in").name
    ends = {(tp.topic, tp.partition): o for tp, o in consumer.end_offsets(
        [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]).items()}
    consumer.close()
    total = sum(ends.values())
    made: list = []
    init = Worker.__init__

    def spy_init(self, stage, *a, **k):  # the worker object run() builds, to read its stats
        init(self, stage, *a, **k)
        made.append(self)
    Worker.__init__ = spy_init
    window: dict = {}
    done, stop = threading.Event(), threading.Event()
    deadline = time.monotonic() + RUN_TIMEOUT_S

    def sample() -> tuple[int, float, float, float, dict]:
        w = made[0]
        return (w.stats.records_in, time.process_time(), proc_cpu_s(args.broker_pid), time.monotonic(),
                thread_cpu_s())

    def monitor() -> None:
        spy = None
        while not done.is_set():
            if made and "start" not in window and made[0].stats.records_in >= args.warmup:
                window["start"] = sample()
                if args.py_spy:
                    window["raw"] = Path(args.out).with_suffix(".raw")
                    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                                            "--gil", "--nonblocking", "--rate", "250", "--format", "raw",
                                            "-o", str(window["raw"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if "start" in window and made[0].stats.records_in >= total:
                window["end"] = sample()
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                time.sleep(SETTLE_S)  # the last commit and the idle settle, before the idle window
                before = thread_cpu_s()
                time.sleep(IDLE_S)  # the worker's idle window
                window["idle"] = {k: (v - before.get(k, 0.0)) / IDLE_S for k, v in thread_cpu_s().items()}
                stop.set()
                return
            if time.monotonic() > deadline:
                stop.set()
                return
            time.sleep(SAMPLE_S)  # sampling period of the window's edges

    threading.Thread(target=monitor, name="profile-monitor", daemon=True).start()
    profiles: list = []
    if args.cprofile:
        profile_threads(profiles)
    requests = count_requests()
    if args.stage[-1] == "bare":
        bare = Bare()
        made.append(bare)
        Bare.run = profiled_run(Bare.run, profiles) if args.cprofile else Bare.run
        stats = bare.run(cfg, stop, args.commit_interval_ms / 1000)
    else:
        stats = worker_module.run(cfg, "work", metrics_port=None, stop=stop)
    done.set()
    if "idle" not in window:
        sys.exit(f"the window never closed: {stats}")
    (n0, c0, b0, t0, th0), (n1, c1, b1, t1, th1) = window["start"], window["end"]
    n = n1 - n0
    batch = stats.records_in / max(1, stats.batches)
    model = th1.get("native", 0.0) - th0.get("native", 0.0)
    # Upkeep: what the worker's other threads (kafka-python's IO, sender and heartbeat threads)
    # spend per second with nothing to do, paid per second, not per record (as the broker's).
    upkeep = sum(v for k, v in window["idle"].items() if k not in ("MainThread", "native", "profile-monitor"))
    rps = n / (t1 - t0)
    upkeep_ms = 1000 * upkeep / rps
    worker_ms, broker_ms, model_ms = 1000 * (c1 - c0) / n - upkeep_ms, 1000 * (b1 - b0) / n, 1000 * model / n
    result = {"records": n, "rps": rps, "batch": batch, "requests": {k: total / v for k, v in requests.items() if v},
              "worker_ms": worker_ms, "broker_ms": broker_ms,
              "model_ms": model_ms, "overhead_ms": worker_ms + broker_ms - model_ms, "upkeep_ms": upkeep_ms,
              "threads_ms": {k: 1000 * (v - th0.get(k, 0.0)) / n for k, v in th1.items() if k != "profile-monitor"}}
    profile = []
    if "raw" in window:
        profile.append(py_spy_report(window["raw"]))
    if profiles:
        profile.append(cprofile_report(profiles))
    result["profile"] = "\n".join(profile)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-dir", default="/tmp/broker-perf", help="data dir of a running `tensorline broker`")
    parser.add_argument("--stage", choices=sorted(STAGES), action="append",
                        help="what to run (default features); repeat to compare, runs interleaved")
    parser.add_argument("--records", type=int, default=4000, help="records in the measured window")
    parser.add_argument("--warmup", type=int, default=1000, help="records before the window opens")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--commit-interval-ms", type=int, default=100, help="the stage's commit_interval_ms")
    parser.add_argument("--tree", action="append", help="code to run the worker from: a git ref, REF+FILE,FILE (REF with those files "
                        "from the working tree) or '.' (the working tree); repeat to compare, runs interleaved")
    parser.add_argument("--py-spy", action="store_true", help="py-spy top list of the window (GIL time)")
    parser.add_argument("--cprofile", action="store_true", help="cProfile top lists (CPU time, every thread)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
