"""The model-free Scale stage: params.work costs CPU per record, by the device a worker is pinned to."""

from __future__ import annotations

import numpy as np

from tensorline import config
from tensorline.schemas import Record
from tensorline.stages.testing import Scale, pinned_device, scale_pipeline_body


def stage(tmp_path, **params):
    path = tmp_path / "pipeline.toml"
    path.write_text('[pipeline]\nname = "t"\n' + scale_pipeline_body(**params))
    cfg = config.load(path)
    return Scale(cfg, cfg.stages["scale"], None)


def test_pinned_device_is_what_pin_device_made_visible(monkeypatch):
    for visible, device in (("-1", "cpu"), ("", "cpu"), ("0", "gpu:0"), ("3", "gpu:3")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert pinned_device() == device
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pinned_device() == "cpu"


def test_work_is_per_record_and_by_device(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    by_device = stage(tmp_path, work='{ cpu = 2, "gpu:0" = 6 }')
    assert by_device.work == 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert stage(tmp_path, work='{ cpu = 2, "gpu:0" = 6 }').work == 2
    assert stage(tmp_path, work=4).work == 4 and stage(tmp_path).work == 0

    products = []
    s = stage(tmp_path, work=3, factor=2.0)
    s._matrix = Counting(s._matrix, products)
    items = [Record(record_id=str(i), source="t", ingest_ts_ms=0, stage="in",
                    tensors={"x": np.ones(2, np.float32)})
             for i in range(5)]
    out = s.process(items)
    assert len(products) == 15  # 3 per record
    assert [r.tensors["x"].tolist() for r in out] == [[2.0, 2.0]] * 5


class Counting:
    """A matrix that counts the products taken with it."""

    def __init__(self, matrix, products):
        self.matrix, self.products = matrix, products

    def __matmul__(self, other):
        self.products.append(other)
        return self.matrix
