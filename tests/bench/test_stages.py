"""bench/stages.py's latency: a stage's from its trace headers, end to end from ingest to when the
bench's read_committed consumer received the output, not to the trace's produced time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tensorline.engine.runtime import INGEST_MS
from tensorline.ops import latency

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def stages():
    """bench/stages.py as a module (bench/ is scripts, importing `_common` from their folder)."""
    if "bench_stages" not in sys.modules:
        sys.path.insert(0, str(BENCH))
        try:
            spec = importlib.util.spec_from_file_location("bench_stages", BENCH / "stages.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules["bench_stages"] = module
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCH))
    return sys.modules["bench_stages"]


def output(key: bytes, visible_s: float, **ms: int) -> latency.Seen:
    names = {"ingest": INGEST_MS, **{f"{s}_{e}": f"tl.{s}.{e}_ms" for s in ("features", "detection")
                                      for e in ("received", "produced")}}
    return latency.Seen(SimpleNamespace(key=key, headers=[(names[k], str(v).encode()) for k, v in ms.items()]),
                        visible_s)


def test_e2e_is_ingest_to_the_receive_time_and_stages_their_processing(stages):
    # Detection built the output 60 ms after ingest; the bench received it at 1.250 s, 250 ms after.
    got = stages.latencies([output(b"p0", 1.25, ingest=1000, features_received=1005, features_produced=1030,
                                   detection_received=1045, detection_produced=1060)])
    assert list(got["e2e"]) == [250.0]
    assert list(got["features"]) == [25] and list(got["detection"]) == [15]
    with pytest.raises(KeyError, match=INGEST_MS):  # no ingest time: not a number to average
        stages.latencies([output(b"p1", 1.25, features_received=1, features_produced=2, detection_received=3,
                                 detection_produced=4)])
