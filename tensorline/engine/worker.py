"""One worker process of one stage: pin the device, load the stage, join the group, run, leave."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
from dataclasses import asdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from tensorline import logs
from tensorline.config import PipelineConfig
from tensorline.engine import clients, metrics
from tensorline.engine.assignor import CapacityAssignor
from tensorline.engine.plugins import PER_MODEL_KINDS, load_stage, pin_device
from tensorline.engine.kafka import KafkaSink, KafkaSource
from tensorline.engine.runtime import Stats, Worker
from tensorline.engine.state import ChangelogRecord

STATE_DIR_ENV = "TENSORLINE_STATE_DIR"
# Set by the supervisor to its pid: a worker whose parent is no longer that pid stops (see
# `_stop_without_supervisor`); checked every second, well inside a batch's time to stop.
SUPERVISOR_PID_ENV = "TENSORLINE_SUPERVISOR_PID"
SUPERVISOR_CHECK_S = 1.0


def group_id(pipeline: PipelineConfig, stage: str, model: str | None) -> str:
    """The stage's consumer group; per-model stages (detection) get one group per model."""
    per_model = pipeline.stages[stage].kind in PER_MODEL_KINDS
    return pipeline.group_id(stage, model or pipeline.model(stage, None).name if per_model else None)


def claim_slot(group: str) -> tuple[int, IO]:
    """The lowest worker index of `group` free on this host, held by a file lock while we run.

    The index makes the transactional id stable across restarts (a restarted worker aborts its
    killed predecessor's open transaction at once) yet unique among live workers on the host.
    """
    folder = Path(os.environ.get(STATE_DIR_ENV, ".tensorline")) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        handle = open(folder / f"{group}.{index}.lock", "a")  # "a": never truncate a live worker's file
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.truncate(0)
            return index, handle
        except BlockingIOError:
            handle.close()
            index += 1


def _stop_without_supervisor(supervisor_pid: int, worker: Worker, log) -> None:
    """Stop the worker once its parent is not the supervisor that started it: the supervisor died
    where Linux's PR_SET_PDEATHSIG is missing, or before the child could set it."""
    while os.getppid() == supervisor_pid:
        if worker.stop_event.wait(SUPERVISOR_CHECK_S):
            return
    log.warning("supervisor gone: stopping", supervisor_pid=supervisor_pid, parent_pid=os.getppid())
    worker.stop()


def read_changelog(pipeline: PipelineConfig, topic: str, partitions: set[int]) -> Iterator[ChangelogRecord]:
    """A stateful stage's changelog partitions read to their end (read_committed), to restore."""
    for r in clients.read_range(pipeline, topic, partitions=partitions):
        yield ChangelogRecord(r.partition, r.key, r.value, list(r.headers or []))


def run(pipeline: PipelineConfig, stage: str, *, model: str | None = None, device: str = "cpu",
        until_idle_s: float | None = None, stop: threading.Event | None = None,
        metrics_port: int | None = 0, metrics_host: str = "127.0.0.1",
        end_offsets: Mapping[tuple[str, int], int] | None = None, drain: threading.Event | None = None) -> Stats:
    """Run one worker until SIGTERM/SIGINT (or `stop`, or idle for `until_idle_s`, or, bounded by
    `end_offsets` or a set `drain` event, once its input is read and committed to the end: see
    `KafkaSource`; replays run this way).

    Prometheus metrics are served on `metrics_host`:`metrics_port` (0: a free port, None: not served);
    the address is written into the worker's slot file under the state dir, where the dashboard
    and a Prometheus file-based discovery can find it.
    """
    pinned = pin_device(device)
    group = group_id(pipeline, stage, model)
    index, slot = claim_slot(group)
    member = f"{socket.gethostname()}-{index}"
    log = logs.get(stage=stage, model=model, group=group, member=member, device=device)
    endpoint = server = None
    if metrics_port is not None:
        server = metrics.serve(metrics_port, metrics_host, log=log)
        endpoint = f"{metrics_host}:{server.port}"
        slot.write(json.dumps({"group": group, "member": member, "device": device, "metrics": endpoint,
                               "pid": os.getpid()}))
        slot.flush()
    if not pinned:
        log.warning("TensorFlow was imported before the device could be pinned; using its default devices")
    cfg = pipeline.stages[stage]
    stage_obj = load_stage(pipeline, stage, model)
    # Partitions in proportion to capacity: declared per device in the pipeline file, else measured.
    assignor = CapacityAssignor(cfg.capacity.get(device), log=log)
    consumer = clients.consumer(pipeline, group, client_id=f"{group}.{member}.{device}",
                                partition_assignment_strategy=[assignor])
    source = KafkaSource(consumer, [pipeline.topic(cfg.input).name], end_offsets=end_offsets, drain=drain)
    exactly_once = pipeline.delivery == "exactly_once"
    transactional_id = f"{group}.{member}" if exactly_once else None
    sink = KafkaSink(lambda: clients.producer(pipeline, transactional_id=transactional_id), source,
                     transactional=exactly_once)
    if not exactly_once:
        log.warning("at-least-once delivery: after a crash, records of the last batch are produced again")
    worker = Worker(stage_obj, source, sink, output_topic=pipeline.topic(cfg.output).name,
                    dlq_topic=pipeline.topic(pipeline.dlq).name, max_batch=cfg.max_batch,
                    max_delay_ms=cfg.max_delay_ms, commit_interval_ms=cfg.commit_interval_ms,
                    max_message_bytes=pipeline.max_message_bytes, dlq_max_ratio=cfg.dlq_max_ratio,
                    dlq_window=cfg.dlq_window, restore=lambda topic, parts: read_changelog(pipeline, topic, parts),
                    log=log)
    assignor.measure = lambda: (worker.stats.records_in, worker.stats.batch_seconds)
    if stop is not None:
        worker.stop_event = stop
    elif threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.stop())
        if os.environ.get(SUPERVISOR_PID_ENV):
            threading.Thread(target=_stop_without_supervisor, args=(int(os.environ[SUPERVISOR_PID_ENV]), worker, log),
                             name="supervisor-watch", daemon=True).start()
    if source.bounded:
        def at_end() -> None:
            log.info("input read and committed to its end offsets: stopping")
            worker.stop()
        source.on_end = at_end
    metrics.DEVICE.labels(*worker.labels, device).set(1)
    log.info("worker started", metrics=endpoint, input=pipeline.topic(cfg.input).name, output=pipeline.topic(cfg.output).name,
             delivery=pipeline.delivery, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
             commit_interval_ms=cfg.commit_interval_ms)
    # A measured capacity reaches the group only at a join: the watch makes one when it moves.
    watching = threading.Event()  # set when the worker ends, and the watch ends with it
    assignor.watch(consumer, watching)
    try:
        stats = worker.run(until_idle_s=until_idle_s)
    finally:
        watching.set()
        sink.close()
        source.close()
        slot.close()
        if server is not None:
            server.stop()
    log.info("worker stopped", **asdict(stats))
    return stats
