"""bench/stages.py's latency: a stage's from its trace headers, end to end from ingest to when the
bench's read_committed consumer received the output, not to the trace's produced time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tensorline.engine.runtime import INGEST_MS
from tensorline.ops import latency

from tests.conftest import bench_script

@pytest.fixture(scope="module")
def stages():
    return bench_script("stages")


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
