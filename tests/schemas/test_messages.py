"""The message types' own helpers."""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorline.schemas import ModelRef, Record


def test_passed_on_equals_replace_of_tensors_stage_and_model_whatever_fields_record_gains() -> None:
    # Every field set to a value of its own, so a field passed_on forgot (or swapped) shows.
    r = Record(record_id="id", source="src", ingest_ts_ms=7, tensors={"x": np.zeros(2)}, stage="preprocess",
               attributes={"a": "b"}, label="nodule", model=ModelRef("old", "0"))
    tensors, model = {"y": np.ones(3)}, ModelRef("cnn", "1")
    out = r.passed_on(tensors, "features", model)
    want = dataclasses.replace(r, tensors=tensors, stage="features", model=model)
    assert [getattr(out, f.name) for f in dataclasses.fields(Record)] == \
           [getattr(want, f.name) for f in dataclasses.fields(Record)]
    assert r.stage == "preprocess" and r.model == ModelRef("old", "0")  # the input is left as it was
