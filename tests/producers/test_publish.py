"""The producer on the real broker: every source kind, bad files, --limit, --watch across a restart."""

from __future__ import annotations

import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.producers import publish
from tensorline.schemas import decode_record

pytestmark = pytest.mark.broker


@pytest.fixture
def cfg(namespace, kafka_bootstrap):
    def make(on_bad_file: str = "dlq") -> config.PipelineConfig:
        c = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap, "on_bad_file": on_bad_file},
                          "topics": {"raw": {"partitions": 2}, "dlq": {"partitions": 1}}})
        clients.create_topics(c)
        return c
    return make


def raw(c):
    return [decode_record(r.value) for r in topics.read_all(c, c.topic("raw").name)]


def sources(folder):
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), folder / "ct.dcm")
    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.eye(4)), folder / "vol.nii.gz")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(folder / "img.png")
    np.save(folder / "arr.npy", np.ones((6, 7), np.float32))
    return folder


def test_every_source_kind_reaches_the_raw_topic(tmp_path, cfg):
    c = cfg()
    summary = publish.produce(c, [str(sources(tmp_path / "in"))], progress=False)
    records = raw(c)
    assert summary.sent == len(records) == 1 + 3 + 1 + 1  # CT, 3 NIfTI slices, PNG, npy
    by_source = {r.source.split("/")[-1]: r for r in records}
    ct = by_source["ct.dcm"]
    assert ct.tensors["image"].shape == (128, 128) and ct.attributes["modality"] == "CT"
    assert {"rescale_slope", "rescale_intercept"} <= set(ct.attributes)
    slices = [r for r in records if "vol.nii.gz" in r.source]
    assert sorted(int(r.attributes["slice_index"]) for r in slices) == [0, 1, 2]
    assert by_source["img.png"].tensors["image"].tobytes() == np.arange(64, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("mode", ["dlq", "skip"])
def test_bad_files_are_reported_and_the_run_goes_on(tmp_path, cfg, mode):
    c = cfg(mode)
    folder = sources(tmp_path / "in")
    (folder / "junk.dcm").write_bytes(b"not a dicom at all" * 10)
    ct = (folder / "ct.dcm").read_bytes()
    (folder / "half.dcm").write_bytes(ct[: len(ct) // 2])
    summary = publish.produce(c, [str(folder)], progress=False)
    assert summary.sent == 6
    bad = summary.dead if mode == "dlq" else summary.skipped
    assert bad == {"not_dicom": 1, "truncated": 1}
    dead = topics.read_all(c, c.topic("dlq").name)
    if mode == "skip":
        assert dead == []
        return
    reasons = {dict(d.headers)["tl.dlq.reason"]: d for d in dead}
    assert set(reasons) == {b"not_dicom", b"truncated"}
    assert reasons[b"not_dicom"].value == (folder / "junk.dcm").read_bytes()  # the original bytes
    assert dict(reasons[b"truncated"].headers)["tl.dlq.file"].endswith(b"half.dcm")


def test_limit_stops_after_n_records(tmp_path, cfg):
    c = cfg()
    assert publish.produce(c, [str(sources(tmp_path / "in"))], limit=2, progress=False).sent == 2
    assert len(raw(c)) == 2


def test_watch_publishes_new_files_and_a_restart_does_not_resend(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(publish, "SETTLE_S", 0.1)
    monkeypatch.setattr(publish, "WATCH_INTERVAL_S", 0.1)
    c = cfg()
    folder = tmp_path / "watched"
    folder.mkdir()
    state = tmp_path / "sent.state"
    np.save(folder / "a.npy", np.zeros((4, 4), np.float32))

    def watch_until(n_records: int) -> publish.Summary:
        done = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("s", publish.produce(
            c, [str(folder)], watch=True, state=state, progress=False, stop=done.is_set)))
        t.start()
        deadline = time.monotonic() + 30
        while len(raw(c)) < n_records and time.monotonic() < deadline:
            time.sleep(0.2)
        done.set()
        t.join(10)
        return result["s"]

    first = watch_until(1)
    assert first.sent == 1
    np.save(folder / "b.npy", np.ones((4, 4), np.float32))  # arrives while nobody watches
    second = watch_until(2)
    assert second.sent == 1  # only b: a was remembered across the restart
    assert sorted(r.tensors["image"][0, 0] for r in raw(c)) == [0.0, 1.0]
