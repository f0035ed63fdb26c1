"""Prometheus metrics every worker exports (prometheus-client, default registry).

Labels: `stage` and `model` ("" for stages without one). Latency from trace headers is derived
from the records themselves, so it measures the pipeline, not a worker's view of it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from tensorline.engine import http

_LABELS = ("stage", "model")
# Batch and model time: 1 ms to a minute. End to end: 10 ms to 10 minutes (a backlog drains).
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

RECORDS_IN = Counter("tensorline_records_in_total", "Records consumed and committed", _LABELS)
RECORDS_OUT = Counter("tensorline_records_out_total", "Records produced and committed", _LABELS)
DEAD_LETTERS = Counter("tensorline_dead_letters_total", "Records sent to the DLQ", (*_LABELS, "reason"))
BATCH_SIZE = Histogram("tensorline_batch_size", "Records per micro-batch", _LABELS,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_SECONDS = Histogram("tensorline_batch_seconds", "Wall time of a batch, decode to the model's end (queueing included)", _LABELS, buckets=_FAST)
MODEL_SECONDS = Histogram("tensorline_model_seconds", "Wall time of the model call of a batch", _LABELS, buckets=_FAST)
END_TO_END_SECONDS = Histogram("tensorline_end_to_end_seconds", "Ingest to this stage's output, from trace headers",
                               _LABELS, buckets=_SLOW)
ASSIGNED_PARTITIONS = Gauge("tensorline_assigned_partitions", "Partitions assigned to this worker", _LABELS)
DEVICE = Gauge("tensorline_worker_device", "1 for the device this worker is pinned to", (*_LABELS, "device"))
RETRIES = Counter("tensorline_retries_total", "Transient failures retried (model calls, sends, commits), by error",
                  (*_LABELS, "error"))
DLQ_PAUSED = Gauge("tensorline_dlq_paused", "1 while the worker holds its input: too many recent records were dead letters",
                   _LABELS)
OPEN_JOINS = Gauge("tensorline_open_joins", "Fusion joins waiting for models", _LABELS)
OLDEST_JOIN_SECONDS = Gauge("tensorline_oldest_open_join_seconds", "Age of the oldest fusion join waiting for models",
                            _LABELS)
DUPLICATES = Counter("tensorline_duplicates_total", "Outputs dropped as repeats of a record already emitted or joined",
                     (*_LABELS, "cause"))
PARTIAL_RESULTS = Counter("tensorline_partial_results_total", "Fused results emitted without every model",
                          (*_LABELS, "cause"))


class _Handler(http.Handler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = generate_latest(REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(port: int, host: str = "127.0.0.1", log: Any = None) -> http.Server:
    """Expose the metrics (any path, as prometheus-client's own server) on host:port, 0 picking a
    free port; with a token in the environment, only to requests carrying it (`http`)."""
    return http.Server(_Handler, host=host, port=port, name="metrics", log=log).start()
