"""The producer on the real broker: every source kind, bad files, --limit, --watch across a restart,
records sent before (same record id) counted and named."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image
from pydicom.data import get_testdata_file

from tensorline import cli, config
from tensorline.engine import clients
from tensorline.ops import topics
from tensorline.producers import publish
from tensorline.producers.sources import read
from tensorline.schemas import FusedResult, decode_record, encode_result

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
            time.sleep(0.2)  # poll of the loop's condition
        done.set()
        t.join(10)
        return result["s"]

    first = watch_until(1)
    assert first.sent == 1
    np.save(folder / "b.npy", np.ones((4, 4), np.float32))  # arrives while nobody watches
    second = watch_until(2)
    assert second.sent == 1  # only b: a was remembered across the restart
    assert sorted(r.tensors["image"][0, 0] for r in raw(c)) == [0.0, 1.0]


def fusion_cfg(namespace, kafka_bootstrap, *, results=True):
    """A pipeline with a [fusion] (so a results topic and fusion.on_duplicate), its topics created
    (the results topic only if `results`)."""
    c = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap},
                      "topics": {"raw": {"partitions": 2}, "detections": {"partitions": 2},
                                 "results": {"partitions": 2}, "dlq": {"partitions": 1}},
                      "fusion": {"input": "detections", "output": "results", "expected_models": ["a"]}})
    clients.create_topics(c if results else replace(c, topics={k: t for k, t in c.topics.items() if k != "results"}))
    return c


def fused(c, record_id, timestamp_ms):
    """A result for `record_id` on the results topic, as fusion would have emitted at `timestamp_ms`."""
    r = FusedResult(record_id=record_id, source="earlier", ingest_ts_ms=0, strategy="soft_vote",
                    classes=("normal", "nodule"), scores=(0.5, 0.5), decision="normal", contributors=("a",),
                    missing=(), partial=False, label=None)
    producer = clients.producer(c)
    producer.send(c.topic("results").name, key=record_id.encode(), value=bytes(encode_result(r)),
                  timestamp_ms=timestamp_ms)
    producer.flush()
    producer.close()


def test_records_sent_before_are_counted_and_named(tmp_path, namespace, kafka_bootstrap):
    c = fusion_cfg(namespace, kafka_bootstrap)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, value in (("a", 0), ("b", 1), ("e", 2)):
        np.save(folder / f"{name}.npy", np.full((4, 4), value, np.float32))
    shutil.copy(folder / "a.npy", folder / "c.npy")  # the same image in another file: the same record id
    ids = {f.stem: next(read(f)).record_id for f in folder.iterdir()}
    now = int(time.time() * 1000)
    fused(c, ids["b"], now)  # fused a moment ago: within fusion.dedup_window_ms
    fused(c, ids["e"], now - 3_600_000)  # an hour ago: past the window, fused again
    state = tmp_path / "sent.state"

    first = publish.produce(c, [str(folder)], state=state, progress=False)
    assert (first.sent, first.sent_before) == (4, 3)
    head, *examples = first.notes
    assert head == ("3 of 4 records were sent before (same record id): fusion drops 2 of them "
                    "(fusion.on_duplicate = drop) and fuses 1 again, seen more than fusion.dedup_window_ms "
                    "(600000 ms) ago; e.g.")
    results = c.topic("results").name
    assert examples == [f"  {ids['b']} from {folder / 'b.npy'} (before: a result in {results})",
                        f"  {ids['c']} from {folder / 'c.npy'} (before: {folder / 'a.npy'}, this run)",
                        f"  {ids['e']} from {folder / 'e.npy'} (before: a result in {results})"]

    # A restart skips the files it sent; a new file holding b's image was sent before, the state says.
    shutil.copy(folder / "b.npy", folder / "d.npy")
    second = publish.produce(c, [str(folder)], state=state, progress=False)
    assert (second.sent, second.sent_before) == (1, 1)
    assert second.notes == ["1 of 1 records were sent before (same record id): fusion drops them "
                            "(fusion.on_duplicate = drop); e.g.",
                            f"  {ids['b']} from {folder / 'd.npy'} (before: {folder / 'b.npy'}, an earlier run)"]
    assert len(raw(c)) == 5  # counted, never held back


def test_no_results_topic_or_no_read_is_said_and_the_run_still_checks_itself(
        tmp_path, namespace, kafka_bootstrap, monkeypatch, capsys):
    c = fusion_cfg(namespace, kafka_bootstrap, results=False)
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 4), np.float32))
    summary = publish.produce(c, [str(folder)], progress=False)
    assert summary.notes == [f"record ids not checked against the results topic {c.topic('results').name}: "
                             "it does not exist"]

    # The command: the summary line, then what was sent before; --check-results 0 reads no results.
    shutil.copy(folder / "a.npy", folder / "b.npy")
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{kafka_bootstrap}"\n'
                    '[topics]\nraw = {partitions = 2}\ndetections = {partitions = 2}\nresults = {partitions = 2}\n'
                    'dlq = {partitions = 1}\n'
                    '[fusion]\ninput = "detections"\noutput = "results"\nexpected_models = ["a"]\n'
                    'on_duplicate = "reprocess"\n')
    monkeypatch.chdir(tmp_path)  # the command's state file goes under ./.tensorline
    capsys.readouterr()  # the first run's log lines (on stdout while structlog is not configured)
    assert cli.main(["produce", "-c", str(path), str(folder), "--check-results", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sent 2 records from 2 files")
    assert out[1:] == ["1 of 2 records were sent before (same record id): fusion fuses them again, one more "
                       "result each (fusion.on_duplicate = reprocess); e.g.",
                       f"  {next(read(folder / 'a.npy')).record_id} from {folder / 'b.npy'} "
                       f"(before: {folder / 'a.npy'}, this run)",
                       f"record ids not checked against the results topic {c.topic('results').name} "
                       "(--check-results 0)"]


def test_a_results_read_out_of_time_keeps_what_it_read_and_says_so(monkeypatch):
    c = config.parse({"pipeline": {"name": "p"}, "topics": {"raw": {}, "detections": {}, "results": {}, "dlq": {}},
                      "fusion": {"input": "detections", "output": "results", "expected_models": ["a"]}})

    def slow_read(cfg, topic, *, timeout_s):
        yield ConsumerRecord(topic=topic, partition=0, leader_epoch=0, offset=0, timestamp=int(time.time() * 1000),
                             timestamp_type=0, key=b"r1", value=b"", headers=[], checksum=None,
                             serialized_key_size=2, serialized_value_size=0, serialized_header_size=0)
        raise clients.ReadTimeout(f"reading {topic}: not at its end offsets after {timeout_s:.0f} s", {0: 1})

    monkeypatch.setattr(clients, "read_range", slow_read)
    seen = publish.SentBefore(c)
    seen.load_results(2.5)
    seen.check("r1", "x.dcm", int(time.time() * 1000))
    seen.check("r2", "y.dcm", int(time.time() * 1000))
    assert seen.lines(2) == [
        "1 of 2 records were sent before (same record id): fusion drops them (fusion.on_duplicate = drop); e.g.",
        "  r1 from x.dcm (before: a result in p.results)",
        "record ids checked against the first 1 results of p.results only: it was not read to its end in 2.5 s "
        "(--check-results)"]


def test_a_state_file_cut_by_a_crash_loses_only_the_cut_line(tmp_path):
    state = tmp_path / "p-0123456789ab.sent"
    state.write_text('{"id": "r1", "source": "a.npy", "ms": 1}\nfilekey1\n{"id": "r2", "sou')
    sent = publish.SentFiles(state)
    assert (sent.ids, sent.seen) == ({"r1": ("a.npy", 1)}, {"filekey1"})
    f = tmp_path / "b.npy"
    f.write_bytes(b"x")
    sent.add(f, [("r3", "b.npy", 2)])
    again = publish.SentFiles(state)
    assert again.ids == {"r1": ("a.npy", 1), "r3": ("b.npy", 2)} and f in again
