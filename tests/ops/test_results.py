"""`tensorline results`: rows built and formatted from hand-made records (no broker), then PNGs
produced through a real producer and a real fusion worker, their decisions and dead letters read
back with the command, and --follow picking up new results and dead letters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from tensorline import cli
from tensorline.engine import clients, worker
from tensorline.engine.runtime import dead_letter_headers
from tensorline.ops import results, topics
from tensorline.ops.results import (
    CREATE_TIME, DEAD_LETTER, FUSED, LOG_APPEND_TIME, PARTIAL, UNREADABLE, Refusal, Row, combine, format_row,
    letter_row, lines, result_row, source_matches, with_models)
from tensorline.producers import publish
from tensorline.schemas import Detection, FusedResult, ModelRef, decode_record, encode_detection, encode_result

CLASSES = ("normal", "nodule")


def record(topic: str, value: bytes | None, *, headers=(), timestamp=10_000, timestamp_type=0, key=b"k",
           partition=0, offset=0) -> ConsumerRecord:
    return ConsumerRecord(topic=topic, partition=partition, leader_epoch=0, offset=offset, timestamp=timestamp,
                          timestamp_type=timestamp_type, key=key, value=value, headers=list(headers),
                          checksum=None, serialized_key_size=len(key or b""),
                          serialized_value_size=len(value or b""), serialized_header_size=0)


def fused(rid: str = "r1", *, missing=(), contributors=("a", "b"), scores=(0.2, 0.8), source="in/img.png",
          ingest=9_000) -> bytes:
    return bytes(encode_result(FusedResult(
        record_id=rid, source=source, ingest_ts_ms=ingest, strategy="soft_vote", classes=CLASSES, scores=scores,
        decision=CLASSES[int(np.argmax(scores))], contributors=contributors, missing=missing, partial=bool(missing))))


def detection(rid: str, model: str, p: float, *, classes=CLASSES, source="in/img.png") -> bytes:
    return bytes(encode_detection(Detection(record_id=rid, source=source, ingest_ts_ms=9_000,
                                            model=ModelRef(model, "1"), classes=classes, scores=(1 - p, p))))


def letter(stage: str, error: Exception, value: bytes | None, headers=(), **kw) -> ConsumerRecord:
    return record("dlq", value, headers=[*headers, *dead_letter_headers(stage, error, topic="detections")], **kw)


# -- rows and lines, without a broker ----------------------------------------------------------------

def test_a_result_row_has_the_decision_its_score_and_latency_on_the_clock_it_names():
    ingest = [("tl.ingest_ms", b"9500")]
    row = result_row(record("results", fused(missing=("c",), contributors=("a", "b")), headers=ingest))
    assert (row.record_id, row.source, row.outcome, row.decision) == ("r1", "in/img.png", PARTIAL, "nodule")
    assert row.score == pytest.approx(0.8) and row.scores == pytest.approx({"normal": 0.2, "nodule": 0.8})
    assert (row.missing, row.latency_ms, row.latency_clock) == (("c",), 500, CREATE_TIME)  # header, not the field
    appended = result_row(record("results", fused(), timestamp=12_000, timestamp_type=1))
    assert (appended.outcome, appended.latency_ms, appended.latency_clock) == (FUSED, 3_000, LOG_APPEND_TIME)


def test_each_model_shows_its_detection_before_the_result():
    row = result_row(record("results", fused(), timestamp=10_000))
    found = {"a": [(8_000, {"normal": 0.4, "nodule": 0.6}), (11_000, {"normal": 0.9, "nodule": 0.1})],
             "b": [(12_000, {"normal": 0.3, "nodule": 0.7})]}  # only later ones: the last
    assert with_models(row, found).models == {"a": {"normal": 0.4, "nodule": 0.6}, "b": {"normal": 0.3, "nodule": 0.7}}
    assert with_models(row, {}).models == {"a": {}, "b": {}}


def test_a_dead_letter_row_names_its_record_from_its_bytes_else_from_headers():
    decodable = letter_row(letter("fusion", ValueError("2 classes"), detection("r2", "a", 0.5, source="x.png")))
    assert (decodable.record_id, decodable.source, decodable.outcome) == ("r2", "x.png", DEAD_LETTER)
    assert decodable.dead_letters == (Refusal("fusion", "ValueError", "2 classes"),)
    cut = letter_row(letter("detection", ValueError("big"), b"\0\0\0\0\x01xx",
                            headers=[("tl.source", b"scans/y.png"), ("tl.ingest_ms", b"9000")]))
    assert (cut.record_id, cut.source, cut.latency_ms) == (None, "scans/y.png", 1_000)
    bad_file = letter_row(letter("producer", ValueError("no"), b"\0" * 200, headers=[("tl.dlq.file", b"z.dcm")]))
    assert (bad_file.record_id, bad_file.source, bad_file.latency_ms) == (None, "z.dcm", None)


def test_a_result_that_does_not_decode_is_a_row_saying_why():
    row = result_row(record("results", b"junk", key=b"r9", headers=[("tl.source", b"q.png")]))
    assert (row.record_id, row.source, row.outcome) == ("r9", "q.png", UNREADABLE)
    assert row.error.startswith("UnknownMagicByte") and row.error in format_row(row)


def test_dead_letters_join_their_records_result_or_make_one_row_per_record():
    res = result_row(record("results", fused("r1", missing=("b",), contributors=("a",)), timestamp=30))
    late = letter_row(letter("fusion", ValueError("x"), detection("r1", "b", 0.5), timestamp=20))
    twice = [letter_row(letter("detection", ValueError(f"e{i}"), detection("r2", "a", 0.5), timestamp=t))
             for i, t in ((1, 10), (2, 40))]
    nameless = letter_row(letter("fusion", ValueError("?"), b"garbage", timestamp=5))
    rows = combine([res], [late, *twice, nameless])
    assert [(r.record_id, r.outcome) for r in rows] == [(None, DEAD_LETTER), ("r1", PARTIAL), ("r2", DEAD_LETTER)]
    assert [x.message for x in rows[1].dead_letters] == ["x"]
    assert [x.message for x in rows[2].dead_letters] == ["e1", "e2"] and rows[2].source == "in/img.png"


@pytest.mark.parametrize("source, wanted, hit", [
    ("in/img.png", "in/img.png", True),
    ("in/img.png", "img.png", True),            # the last components
    ("/data/in/img.png", "in/img.png", True),
    ("in/img.png", "/work/in/img.png", True),   # the same file, relative to the current folder
    ("in/img.png", "/work/in", True),           # a folder: the files under it
    ("in/img.png", "/work/in/", True),
    ("in/img.png", "/elsewhere/in/img.png", False),
    ("in/img.png", "mg.png", False),
    ("in/img.png", "in", True),                 # a folder relative to the current one
    ("in/img.png", "out", False),
    ("vol.nii#slice=2", "vol.nii", True),
    ("vol.nii#slice=2", "vol.nii#slice=2", True),
    ("vol.nii#slice=2", "vol.nii#slice=3", False),
    ("vol.nii", "vol.nii#slice=2", False),
    (None, "x", False),
])
def test_source_matching(source, wanted, hit):
    assert source_matches(source, wanted, cwd="/work") is hit


def test_table_json_and_csv_lines():
    row = Row(record_id="r1", source="in/img.png", outcome=PARTIAL, timestamp_ms=5, topic="results", partition=1,
              offset=7, decision="nodule", score=0.8, scores={"normal": 0.2, "nodule": 0.8}, strategy="soft_vote",
              models={"a": {"normal": 0.25, "nodule": 0.75}}, missing=("b",),
              dead_letters=(Refusal("detection", "non_finite", "NaN in x"),), latency_ms=42,
              latency_clock=CREATE_TIME)
    table = list(lines([row]))
    assert table[0].split() == ["RECORD", "ID", "OUTCOME", "DECISION", "SCORE", "LATENCY", "SOURCE", "DETAILS"]
    assert table[1].split(None, 6) == ["r1", "partial", "nodule", "0.800", "42", "ms",
                                       "in/img.png  models a=0.750; missing b; detection: non_finite (NaN in x)"]
    (obj,) = map(json.loads, lines([row], "json"))
    assert obj["models"] == {"a": {"normal": 0.25, "nodule": 0.75}} and obj["dead_letters"][0]["reason"] == "non_finite"
    head, values = lines([row], "csv", classes=CLASSES, models=("a", "b"))
    fields = dict(zip(head.split(","), values.split(",")))
    assert fields["a.nodule"] == "0.75" and fields["b.nodule"] == "" and fields["score.normal"] == "0.2"
    assert (fields["missing"], fields["dead_letter_reason"], fields["latency_ms"]) == ("b", "non_finite", "42")


# -- a real producer and a real fusion worker --------------------------------------------------------

PIPELINE = """
[topics]
raw = { partitions = 2 }
detections = { partitions = 2 }
results = { partitions = 2 }
dlq = { partitions = 1 }
[fusion]
input = "detections"
output = "results"
expected_models = ["a"]
"""


def png(path: Path, value: int) -> Path:
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


@pytest.fixture
def produced(tmp_path, write_pipeline, monkeypatch):
    """Three PNGs and a broken one produced with `produce`; detections made by hand from the raw
    records (model a: nodule for ok.png, the wrong classes for refused.png, bytes that are not
    Avro carrying ok.png's headers), then fusion run over them to the end."""
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, PIPELINE)
    folder = tmp_path / "in"
    folder.mkdir()
    png(folder / "ok.png", 10), png(folder / "refused.png", 20)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    summary = publish.produce(cfg, ["in"], progress=False, check_results_s=0)
    assert (summary.sent, dict(summary.dead)) == (2, {"unreadable_image": 1})
    raw = {Path(decode_record(r.value).source).name: r for r in topics.read_all(cfg, cfg.topic("raw").name)}
    ids = {name: decode_record(r.value).record_id for name, r in raw.items()}
    assert dict(raw["ok.png"].headers)["tl.source"] == b"in/ok.png"
    producer = clients.producer(cfg)
    for name, value in (("ok.png", detection(ids["ok.png"], "a", 0.9, source="in/ok.png")),
                        ("refused.png", detection(ids["refused.png"], "a", 0.5, classes=("cat", "dog"),
                                                  source="in/refused.png")),
                        ("ok.png", b"not avro")):
        producer.send(cfg.topic("detections").name, key=ids[name].encode(), value=value, headers=raw[name].headers)
    producer.close()
    drain = threading.Event()
    drain.set()  # stop once the detections are read and committed to their present end
    worker.run(cfg, "fusion", metrics_port=None, stop=threading.Event(), drain=drain)
    return path, cfg, ids


def command(capsys, *args: str) -> list[str]:
    capsys.readouterr()  # the worker's log lines so far
    assert cli.main(["results", *args]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.broker
def test_results_show_a_pngs_decision_and_a_dead_letters_reason(produced, capsys):
    path, cfg, ids = produced
    head, line = command(capsys, "-c", str(path), "--id", ids["ok.png"])
    assert head.startswith("RECORD ID")
    assert line.split()[:4] == [ids["ok.png"], "fused", "nodule", "0.900"] and "models a=0.900" in line
    (ok,) = map(json.loads, command(capsys, "-c", str(path), "--id", ids["ok.png"], "--json"))
    assert ok["source"] == "in/ok.png" and ok["models"] == {"a": pytest.approx({"normal": 0.1, "nodule": 0.9})}
    assert ok["latency_clock"] == CREATE_TIME and 0 <= ok["latency_ms"] < 120_000

    (refused,) = map(json.loads, command(capsys, "-c", str(path), "--id", ids["refused.png"], "--json"))
    assert (refused["outcome"], refused["decision"], refused["source"]) == (DEAD_LETTER, None, "in/refused.png")
    assert [(d["stage"], d["reason"]) for d in refused["dead_letters"]] == [("fusion", "wrong_classes")]

    # By file: a bad file the producer refused; ok.png's result, and its bytes that never were Avro,
    # named by the tl.source header alone.
    (broken,) = map(json.loads, command(capsys, "-c", str(path), "--source", "broken.png", "--json"))
    assert (broken["record_id"], broken["source"]) == (None, str(Path("in") / "broken.png"))
    assert [(d["stage"], d["reason"]) for d in broken["dead_letters"]] == [("producer", "unreadable_image")]
    of_ok = [json.loads(x) for x in command(capsys, "-c", str(path), "--source", "in/ok.png", "--json")]
    assert {(r["record_id"], r["outcome"]) for r in of_ok} == {(ids["ok.png"], FUSED), (None, DEAD_LETTER)}
    assert [d["reason"] for r in of_ok for d in r["dead_letters"]] == ["UnknownMagicByte"]

    # --follow prints what exists, then waits for more until Ctrl-C (exit 130, nothing on stderr).
    follow = subprocess.Popen([sys.executable, "-m", "tensorline.cli", "results", "-c", str(path), "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        shown = [follow.stdout.readline() for _ in range(1 + 4)]
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert shown[0].startswith("RECORD ID") and ids["ok.png"] in "".join(shown)
    assert (out, err, follow.returncode) == ("", "", 130)

    everything = command(capsys, "-c", str(path), "--csv")
    assert everything[0].startswith("record_id,source,outcome,decision,score,score.normal,score.nodule,a.normal")
    assert len(everything) == 1 + 4  # ok, its undecodable detection, refused, broken
    assert len(command(capsys, "-c", str(path), "--limit", "1")) == 2


@pytest.mark.broker
def test_follow_prints_what_exists_then_new_results_and_dead_letters(produced):
    _, cfg, ids = produced
    admin = clients.admin(cfg)  # the broker's clock ends the latency now (LogAppendTime)
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, cfg.topic("results").name,
                                        configs={"message.timestamp.type": "LogAppendTime"})])
    admin.close()
    producer = clients.producer(cfg)
    new = [("tl.ingest_ms", b"1000"), ("tl.source", b"in/new.png")]

    def detect(rid: str, p: float) -> None:
        producer.send(cfg.topic("detections").name, key=rid.encode(), value=detection(rid, "a", p, source="in/new.png"))
        producer.flush()  # committed before its result, as fusion reads them

    detect("n0", 0.6)  # before reading starts, its result after: a join open, or fusion behind
    follow = results.rows(cfg, source="in", follow=True)
    try:
        assert sorted(r.outcome for r in (next(follow) for _ in range(4))) == [DEAD_LETTER] * 3 + [FUSED]
        detect("n1", 0.3)
        for rid, scores in (("n0", (0.4, 0.6)), ("n1", (0.7, 0.3))):
            producer.send(cfg.topic("results").name, key=rid.encode(), headers=new, timestamp_ms=2_000,
                          value=fused(rid, contributors=("a",), scores=scores, source="in/new.png"))
        producer.send(cfg.topic("results").name, key=b"x", value=fused("x", source="other/x.png"))  # not in/
        producer.send(cfg.topic("dlq").name, key=b"n2", value=b"\x01cut",
                      headers=[*new, *dead_letter_headers("detection", ValueError("too big"), topic="features")])
        producer.close()
        got = {r.record_id: r for r in (next(follow), next(follow), next(follow))}
    finally:
        follow.close()
    assert set(got) == {"n0", "n1", None}
    for rid, decision, p in (("n0", "nodule", 0.6), ("n1", "normal", 0.3)):
        row = got[rid]
        assert (row.decision, row.latency_clock) == (decision, LOG_APPEND_TIME)
        assert row.models == {"a": pytest.approx({"normal": 1 - p, "nodule": p})}
        assert row.latency_ms > 1_000_000  # from the ingest header (1 s after the epoch) to the broker's clock
    assert (got[None].source, got[None].dead_letters[0].reason) == ("in/new.png", "ValueError")
