"""The main job end to end: `tensorline demo --json` on a small subset, against the real broker;
and its latency, ingest to when its read_committed consumer received each result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tensorline.engine.runtime import INGEST_MS
from tensorline.ops import demo, latency

ROOT = Path(__file__).resolve().parents[2]


def test_latency_ends_when_the_result_is_received_not_when_fusion_built_it():
    def result(ingest_ms: int, produced_ms: int, visible_s: float) -> latency.Seen:
        headers = [(INGEST_MS, str(ingest_ms).encode()), ("tl.fusion.produced_ms", str(produced_ms).encode())]
        return latency.Seen(SimpleNamespace(headers=headers), visible_s)

    # Built 100 ms after ingest, each seen by the demo's reader 400 ms after ingest.
    got, rps = demo.end_to_end([result(1000 + 10 * i, 1100 + 10 * i, 1.4 + i / 100) for i in range(5)])
    assert got == pytest.approx({"p50": 400.0, "p95": 400.0, "p99": 400.0})
    assert rps == pytest.approx(5 / (1.44 - 1.0))  # results over first ingest to last visible
    assert demo.end_to_end([]) == ({"p50": 0.0, "p95": 0.0, "p99": 0.0}, 0.0)


@pytest.mark.broker
# Training on a fresh folder (the final models and five cross-fitted runs) takes 4-5 minutes on an
# idle 2-core host with AVX-512, and TensorFlow's convolutions run ~7x slower on one without it.
@pytest.mark.timeout(3600)
def test_demo_on_a_subset_reports_every_model_and_the_fused_result(tmp_path, namespace, kafka_bootstrap):
    pipeline = (ROOT / "pipeline.toml").read_text()
    (tmp_path / "pipeline.toml").write_text(re.sub(r'name = "demo"', f'name = "{namespace}"', pipeline, count=1))
    env = {**os.environ, "TENSORLINE_BOOTSTRAP": kafka_bootstrap, "TENSORLINE_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "tensorline.cli", "demo", "--json", "--limit", "48"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["records"] == 48 and report["partial"] == 0
    assert set(report["models"]) == {"cnn", "logreg", "blob"}
    for rep in [*report["models"].values(), report["fused"]]:
        assert rep["records"] == 48 and 0.5 <= rep["accuracy"] <= 1.0
        assert set(rep["per_class"]) == {"normal", "nodule"}
    assert report["throughput_rps"] > 0 and 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["lag"] == {s: 0 for s in ("preprocess", "features", "detection.cnn", "detection.logreg",
                                             "detection.blob", "fusion")}
    assert len(list((tmp_path / ".tensorline" / "demo" / "dicom").glob("*.dcm"))) == 1200  # the DICOM path
    assert (tmp_path / ".tensorline" / "models" / "cnn.keras.card.json").exists()
    # One screen, ending with the table: the summary rows close stdout (before the JSON line); on
    # stderr, what the demo does, in its own words (no log records, no warnings, no CUDA lines,
    # no TensorFlow INFO line such as `I0000 ... port.cc:153] oneDNN custom operations are on`).
    table = done.stdout.strip().splitlines()[:-1]
    assert [line.split()[0] for line in table[-4:]] == ["blob", "cnn", "logreg", "FUSED"], done.stdout
    assert len(table) <= 14, done.stdout
    said = [line for line in done.stderr.splitlines() if not line.startswith("results ")]
    assert len(said) <= 10 and not any(w in done.stderr for w in ("WARNING", "ERROR", "cuda", '"event"')), \
        done.stderr
    assert not re.search(r"^[IWEF]\d{4} \d\d:\d\d:", done.stderr, re.M), done.stderr
