"""`tensorline demo`: the whole pipeline end to end on the demo set, as real use runs it.

Starts the local broker if no bootstrap is configured, resets and creates the pipeline's topics,
trains the demo models on first run (only into its own folder, .tensorline/models: a model missing
elsewhere is an error before anything starts, and nothing is retrained), writes the demo test set
as DICOM files, starts one worker process per stage (and per detection model), sends the files
with the DICOM producer, waits for every record's fused result, prints the evaluation,
throughput, end-to-end latency and the final consumer lag per stage, then stops everything (also
on Ctrl-C).

End-to-end latency is ingest (`tl.ingest_ms`, when the producer read the file) to the moment the
demo's own read_committed consumer received the fused result, polling the results topic on a
thread of its own from before the first file is sent: when the result became visible, after
fusion sent it and committed its transaction (`latency.Collector`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from tensorline import config, logs
from tensorline.engine import clients
from tensorline.ops import broker, lag, latency, report, topics
from tensorline.ops.supervisor import Supervisor, pipeline_specs

DEMO_DIR = Path(".tensorline/demo")
# Enough for a cold start of six TensorFlow workers and the test set on 2 cores, with margin.
RESULT_TIMEOUT_S = 900.0
# Six TensorFlow workers importing and loading their models at once on 2 cores.
WORKER_START_S = 180.0
# Progress on a terminal rewrites one line every poll; into a file or pipe, a line this often.
PROGRESS_S = 10.0


def end_to_end(seen: list[latency.Seen]) -> tuple[dict[str, float], float]:
    """End-to-end latency percentiles in ms, ingest to visible (each result's time at the poll that
    received it), and records/s: results over first ingest to last visible."""
    pairs = [(latency.end_to_end_ms(s.headers, s.visible_s), s) for s in seen]
    pairs = [(ms, s) for ms, s in pairs if ms is not None]
    if not pairs:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}, 0.0
    e2e = np.array([ms for ms, _ in pairs])
    p50, p95, p99 = (float(np.percentile(e2e, q)) for q in (50, 95, 99))
    first_ingest_s = min(s.visible_s - ms / 1000 for ms, s in pairs)
    span_s = max(max(s.visible_s for _, s in pairs) - first_ingest_s, 1e-3)
    return {"p50": p50, "p95": p95, "p99": p99}, len(pairs) / span_s


def _test_dicoms(folder: Path) -> list[Path]:
    """The demo test split as DICOM files (written once; they keep the source's rescale/window)."""
    from tensorline.producers import demo_data

    files = sorted(folder.glob("*.dcm"))
    if not files:
        print(f"writing the demo test set as DICOM files to {folder} ...", file=sys.stderr)
        files = sorted(demo_data.write_dicoms(demo_data.build()["test"], folder))
    return files


def main(path: str, *, json_out: bool = False, limit: int | None = None) -> int:
    from tensorline.ops import train

    log = logs.get(stage="demo")
    # One of pydicom-data's images, a source of the demo set, says explicit VR and is implicit;
    # pydicom reads it right and warns on every build of the set.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    cfg = config.load(path)
    train.untrained(cfg)  # a missing model outside the demo's folder stops here, before any reset
    started_broker = None
    if not cfg.bootstrap and not broker.local_bootstrap():
        print("starting the local Kafka broker ...", file=sys.stderr)
        started_broker = broker.start()
    workers: Supervisor | None = None
    try:
        from tensorline.producers import publish

        bootstrap = clients.bootstrap(cfg)
        print(f"broker: {bootstrap}; resetting the demo topics", file=sys.stderr)
        topics.reset(cfg)
        clients.create_topics(cfg)
        train.ensure(cfg)
        files = _test_dicoms(DEMO_DIR / "dicom")[:limit]
        log_dir = DEMO_DIR / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, config.BOOTSTRAP_ENV: bootstrap}
        workers = Supervisor(path, pipeline_specs(cfg), log_dir=log_dir, env=env)
        workers.start()
        print(f"starting {len(workers.specs)} workers (logs in {log_dir}) ...", file=sys.stderr)
        _wait_for_workers(cfg, workers, log_dir)
        print(f"every stage's group has joined; sending {len(files)} DICOM files", file=sys.stderr)
        with latency.Collector(cfg, [cfg.topic(cfg.fusion.output).name], from_end=False) as results:
            summary = publish.produce(cfg, [str(f) for f in files])
            _wait_for_results(cfg, summary.sent, workers, log_dir, results)
            seen = results.seen()
        workers.stop()
        rep = report.build(cfg)
        e2e, rps = end_to_end(seen)
        lags = {g.stage: g.total for g in lag.measure(cfg)}
        print(f"\nthroughput: {rps:.1f} records/s   end-to-end latency ms (ingest to visible): p50 {e2e['p50']:.0f}  "
              f"p95 {e2e['p95']:.0f}  p99 {e2e['p99']:.0f}")
        print("final consumer lag: " + "  ".join(f"{k}={v}" for k, v in lags.items()))
        print(f"precision and recall per class: tensorline report -c {path}; per record: tensorline results -c {path}")
        print(report.format_summary(rep))
        if json_out:
            print(json.dumps({**rep, "throughput_rps": rps, "latency_ms": e2e, "lag": lags}))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers", file=sys.stderr)
        return 130
    finally:
        if workers is not None:
            workers.stop()
        if started_broker is not None:
            broker.stop()
        log.debug("demo finished")


def _until(done, workers: Supervisor, log_dir: Path, timeout_s: float, interval_s: float, late: str) -> None:
    """Poll `done()` until true, keeping the workers supervised; fail on a crash loop or after
    `timeout_s` (the message `late` says what was late)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        workers.check()
        if workers.given_up:
            raise RuntimeError(f"worker {workers.given_up[0].label} is in a crash loop; see {log_dir}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{late} after {timeout_s:.0f} s; see {log_dir}")
        time.sleep(interval_s)


def _wait_for_workers(cfg: config.PipelineConfig, workers: Supervisor, log_dir: Path) -> None:
    """Until every stage's consumer group is stable with a member (TensorFlow loaded, partitions
    assigned), so the demo measures the pipeline, not its start-up."""
    admin = clients.admin(cfg)
    groups = [g for _, g, _ in lag.groups(cfg)]

    def joined() -> bool:
        try:
            described = admin.describe_groups(groups)
        except Exception:  # the coordinator may not know a group yet
            return False
        return all((described.get(g) or {}).get("group_state") == "Stable" and (described.get(g) or {}).get("members")
                   for g in groups)
    try:
        _until(joined, workers, log_dir, WORKER_START_S, 1.0, "the workers had not joined")
    finally:
        admin.close()


def _wait_for_results(cfg: config.PipelineConfig, expected: int, workers: Supervisor, log_dir: Path,
                      results: latency.Collector) -> None:
    """Until every record sent has its fused result (counted by `results`, which stamps each as it
    arrives); shows progress; restarts crashed workers and fails when one is in a crash loop."""
    tty = sys.stderr.isatty()
    printed = [-PROGRESS_S]

    def all_in() -> bool:
        done = len(results.seen())
        if tty or done >= expected or time.monotonic() - printed[0] >= PROGRESS_S:
            printed[0] = time.monotonic()
            lags = "  ".join(f"{g.stage}={g.total}" for g in lag.measure(cfg))
            line = f"results {done}/{expected}   lag: {lags}"
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        return done >= expected
    try:
        _until(all_in, workers, log_dir, RESULT_TIMEOUT_S, 2.0, f"not every one of {expected} results was in")
    finally:
        if tty:
            print(file=sys.stderr)
