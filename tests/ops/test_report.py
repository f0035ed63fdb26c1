"""The evaluation report: metrics by hand, the JSON read back from real topics, and the duplicates
fusion dropped, counted from the topics after a real fusion worker ran."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from prometheus_client import REGISTRY

from tensorline import cli
from tensorline.engine import clients, worker
from tensorline.ops import report
from tensorline.ops.report import classification_report, format_summary, format_table
from tensorline.schemas import Detection, FusedResult, ModelRef, encode_detection, encode_result

CLASSES = ("normal", "nodule")


def test_metrics_against_a_hand_computed_case():
    truth = ["nodule", "nodule", "nodule", "normal", "normal"]
    pred = ["nodule", "nodule", "normal", "nodule", "normal"]
    rep = classification_report(truth, pred, CLASSES)
    nod = rep["per_class"]["nodule"]
    assert (nod["precision"], nod["recall"], nod["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    nor = rep["per_class"]["normal"]
    assert (nor["precision"], nor["recall"], nor["f1"]) == (0.5, 0.5, 0.5)
    assert rep["accuracy"] == pytest.approx(0.6) and rep["f1_micro"] == pytest.approx(0.6)
    assert rep["f1_macro"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_empty_and_never_predicted_classes_are_zero_not_errors():
    rep = classification_report(["normal", "normal"], ["normal", "normal"], CLASSES)
    assert rep["per_class"]["nodule"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert classification_report([], [], CLASSES)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 labels but 1"):
        classification_report(["a", "b"], ["a"], CLASSES)


@pytest.mark.broker
def test_report_json_from_the_topics(tmp_path, write_pipeline):
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, """
[topics]
detections = { partitions = 2 }
results = { partitions = 2 }
[fusion]
input = "detections"
output = "results"
expected_models = ["a", "b"]
""")
    producer = clients.producer(cfg)
    truth = ["nodule", "normal", "nodule", "normal"]
    for i, label in enumerate(truth):
        for model, p in (("a", 0.9), ("b", 0.2 if i == 0 else 0.9)):
            d = Detection(record_id=f"r{i}", source="t", ingest_ts_ms=0, model=ModelRef(model, "1"),
                          classes=CLASSES, scores=(1 - p, p), label=label)
            producer.send(cfg.topic("detections").name, key=f"r{i}".encode(), value=bytes(encode_detection(d)))
        r = FusedResult(record_id=f"r{i}", source="t", ingest_ts_ms=0, strategy="soft_vote", classes=CLASSES,
                        scores=(0.5, 0.5), decision=label, contributors=("a", "b"), missing=(),
                        partial=i == 3, label=label)
        producer.send(cfg.topic("results").name, key=f"r{i}".encode(), value=bytes(encode_result(r)))
    producer.flush()
    producer.close()
    out = subprocess.run([sys.executable, "-m", "tensorline.cli", "report", "-c", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    rep = json.loads(out.stdout)
    assert set(rep) == {"models", "fused", "fused_complete", "fused_partial", "comparisons", "records", "partial",
                        "duplicates_dropped"}
    assert (rep["records"], rep["partial"], rep["duplicates_dropped"]) == (4, 1, 0)  # fusion never ran
    assert rep["fused"]["accuracy"] == 1.0
    assert rep["models"]["a"]["accuracy"] == 0.5  # a always says nodule
    assert rep["models"]["b"]["accuracy"] == 0.25  # b says nodule on all but r0
    assert set(rep["models"]["a"]) >= {"accuracy", "f1_macro", "f1_micro", "per_class", "intervals"}
    assert rep["fused"]["intervals"]["accuracy"] == [1.0, 1.0]
    assert (rep["fused_complete"]["records"], rep["fused_partial"]["records"]) == (3, 1)  # r3 is partial
    assert rep["comparisons"]["b"]["only_a_right"] == 3 and rep["comparisons"]["b"]["records"] == 4
    assert "FUSED" in format_table(rep) and "FUSED vs a" in format_table(rep)


def fused_count_of_duplicates() -> float:
    """tensorline_duplicates_total of the fusion stage in this process, every cause."""
    return sum(REGISTRY.get_sample_value("tensorline_duplicates_total", {"stage": "fusion", "model": "", "cause": c})
               or 0.0 for c in ("emitted", "joined"))


@pytest.mark.broker
@pytest.mark.parametrize("on_duplicate, dropped", [("drop", 4), ("reprocess", 1)])
def test_duplicates_dropped_by_fusion_are_counted_from_the_topics(tmp_path, write_pipeline, monkeypatch, capsys,
                                                                  on_duplicate, dropped):
    monkeypatch.setenv("TENSORLINE_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "p.toml"
    cfg = write_pipeline(path, f"""
[topics]
detections = {{ partitions = 2 }}
results = {{ partitions = 2 }}
dlq = {{ partitions = 1 }}
[fusion]
input = "detections"
output = "results"
expected_models = ["a", "b"]
on_duplicate = "{on_duplicate}"
""")

    def send(pairs, classes=CLASSES):
        producer = clients.producer(cfg)
        for rid, model in pairs:
            d = Detection(record_id=rid, source="t", ingest_ts_ms=0, model=ModelRef(model, "1"), classes=classes,
                          scores=(0.4, 0.6), label="nodule")
            producer.send(cfg.topic("detections").name, key=rid.encode(), value=bytes(encode_detection(d)))
        producer.flush()
        producer.close()

    def fusion_to_the_end():
        drain = threading.Event()
        drain.set()  # stop once the detections are read and committed to their present end
        worker.run(cfg, "fusion", metrics_port=None, stop=threading.Event(), drain=drain)

    before = fused_count_of_duplicates()
    send([(f"r{i}", m) for i in range(4) for m in ("a", "b")])
    fusion_to_the_end()
    send([("r1", "a"), ("r1", "b"),  # r1 sent again: dropped, or fused again into a second result
          ("r0", "a"),               # r0 again, from a alone: dropped, or a new join left open
          ("r5", "a"), ("r5", "a"),  # twice into one open join: the second dropped either way
          ("r4", "a")])              # a join left open: not a duplicate
    send([("r3", "b")], classes=("cat", "dog"))  # a dead letter (wrong_classes): not a duplicate
    fusion_to_the_end()
    assert fused_count_of_duplicates() - before == dropped  # what fusion itself counted

    rep = report.build(cfg)
    assert rep["duplicates_dropped"] == dropped
    assert rep["records"] == 4 and f"duplicates dropped: {dropped}" in format_table(rep).splitlines()
    capsys.readouterr()  # the worker's log lines so far
    assert cli.main(["report", "-c", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates_dropped"] == dropped


def canned(n_models: int = 2) -> dict:
    """A report from canned records: 40 records, model "good" right on 36, "poor" on 24, fused right on
    38; the last 10 results partial, 2 of them wrong."""
    truth = [CLASSES[i % 2] for i in range(40)]
    wrong = lambda x: CLASSES[1 - CLASSES.index(x)]  # noqa: E731
    by_model = {"good": {f"r{i}": (t, wrong(t) if i < 4 else t) for i, t in enumerate(truth)},
                "poor": {f"r{i}": (t, wrong(t) if i % 10 < 4 else t) for i, t in enumerate(truth)}}
    fused = {f"r{i}": report.Decided(t, wrong(t) if i in (30, 31) else t, partial=i >= 30) for i, t in enumerate(truth)}
    return {**report.evaluate(dict(list(by_model.items())[:n_models]), fused, CLASSES),
            "records": 40, "partial": 10, "duplicates_dropped": 0}


def test_evaluate_scores_partial_results_apart_and_compares_fused_with_each_model_by_record_id():
    rep = canned()
    assert rep["fused"]["accuracy"] == pytest.approx(38 / 40)
    assert (rep["fused_complete"]["accuracy"], rep["fused_complete"]["records"]) == (1.0, 30)
    assert (rep["fused_partial"]["accuracy"], rep["fused_partial"]["records"]) == (0.8, 10)
    assert rep["fused_complete"]["intervals"]["f1_macro"] == [1.0, 1.0]
    for scores in (rep["models"]["good"], rep["models"]["poor"], rep["fused"]):
        low, high = scores["intervals"]["f1_macro"]
        assert low <= scores["f1_macro"] <= high and set(scores["intervals"]["per_class"]) == set(CLASSES)
    poor = rep["comparisons"]["poor"]  # 14 records only fused got right, none only poor did
    assert (poor["records"], poor["only_a_right"], poor["only_b_right"]) == (40, 14, 0)
    assert poor["mcnemar_p"] < 0.01 and poor["verdict"] == "better" and poor["f1_macro_diff"] > 0.3
    good = rep["comparisons"]["good"]  # 4 against 2 records: not enough to tell
    assert (good["only_a_right"], good["only_b_right"], good["verdict"]) == (4, 2, "not distinguishable")
    assert json.loads(json.dumps(rep)) == rep  # --json carries all of it
    text = format_table(rep)
    assert "FUSED vs poor: macro F1 +" in text and ": better" in text and "FUSED, partial results  (n=10)" in text


def test_the_summary_is_one_row_per_model_and_the_fused_result_with_intervals():
    rep = canned()
    rep["partial"], rep["fused_partial"] = 0, report.scored([], [], CLASSES)  # no partial results: no sub-rows
    lines = format_summary(rep).splitlines()
    assert lines[0] == "records with a result: 40   partial results: 0"
    assert lines[2].startswith("FUSED vs the best model (good): macro F1 +0.050 (") and "not distinguishable" in lines[2]
    assert lines[-4].split() == ["model", "accuracy", "(95%", "CI)", "macro", "F1", "(95%", "CI)", "F1", "normal",
                                 "F1", "nodule", "n"]
    good = rep["models"]["good"]["intervals"]
    assert lines[-3].split()[:3] == ["good", "0.900", f"({good['accuracy'][0]:.3f}-{good['accuracy'][1]:.3f})"]
    assert lines[-3].split()[-1] == "40" and lines[-2].startswith("poor") and lines[-1].startswith("FUSED")
    assert max(map(len, lines[3:])) <= 80


def test_the_summary_shows_partial_results_beside_the_complete_ones():
    lines = format_summary(canned()).splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["FUSED", "complete", "partial"]
    assert lines[-1].split()[1] == "0.800" and lines[-1].split()[-1] == "10"
