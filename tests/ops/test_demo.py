"""The main job end to end: `tensorline demo --json` on a small subset, against the real broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.broker


def test_demo_on_a_subset_reports_every_model_and_the_fused_result(tmp_path, namespace, kafka_bootstrap):
    pipeline = (ROOT / "pipeline.toml").read_text()
    (tmp_path / "pipeline.toml").write_text(re.sub(r'name = "demo"', f'name = "{namespace}"', pipeline, count=1))
    env = {**os.environ, "TENSORLINE_BOOTSTRAP": kafka_bootstrap, "TENSORLINE_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "tensorline.cli", "demo", "--json", "--limit", "48"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["records"] == 48 and report["partial"] == 0
    assert set(report["models"]) == {"cnn", "mlp", "logreg"}
    for rep in [*report["models"].values(), report["fused"]]:
        assert rep["records"] == 48 and 0.5 <= rep["accuracy"] <= 1.0
        assert set(rep["per_class"]) == {"normal", "nodule"}
    assert report["throughput_rps"] > 0 and 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["lag"] == {s: 0 for s in ("preprocess", "features", "detection.cnn", "detection.mlp",
                                             "detection.logreg", "fusion")}
    assert len(list((tmp_path / ".tensorline" / "demo" / "dicom").glob("*.dcm"))) == 1200  # the DICOM path
    assert (tmp_path / ".tensorline" / "models" / "cnn.keras.card.json").exists()
    assert "FUSED" in done.stdout
