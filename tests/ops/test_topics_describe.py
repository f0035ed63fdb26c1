"""topics create/describe: the cluster's view of the pipeline's topics, and the operator warnings."""

from __future__ import annotations

import pytest

from tensorline import cli, config
from tensorline.engine import clients
from tensorline.ops import topics

TABLE = {"topics": {"in": {"partitions": 2}, "out": {"partitions": 3}, "detections": {"partitions": 3},
                    "results": {}},
         "stages": {"scale": {"input": "in", "output": "out", "kind": "tensorline.stages.testing:Scale", "workers": 3}},
         "fusion": {"input": "detections", "output": "results", "expected_models": ["a"]}}


def test_warnings_for_idle_workers_missing_topics_and_co_partitioning():
    cfg = config.parse({"pipeline": {"name": "w"}, **TABLE})
    actual = {k: t.partitions for k, t in cfg.topics.items()}
    assert topics.warnings(cfg, actual) == ["stage scale: 3 workers per group but w.in has 2 partitions: "
                                           "1 worker(s) will sit idle"]
    actual.update({"fusion-changelog": 5, "results": None})
    found = topics.warnings(cfg, actual)
    assert any("w.results does not exist" in w for w in found)
    assert any("w.fusion-changelog has 5 partitions, the pipeline file says 3" in w for w in found)
    assert any("must be co-partitioned" in w for w in found)


@pytest.mark.broker
def test_create_is_idempotent_and_describe_reads_the_cluster(namespace, kafka_bootstrap):
    cfg = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap}, **TABLE})
    assert len(clients.create_topics(cfg)) == len(cfg.topics)
    assert clients.create_topics(cfg) == []
    states, warnings = topics.describe(cfg)
    by_key = {s.key: s for s in states}
    assert by_key["out"].actual_partitions == 3
    assert by_key["fusion-changelog"].cleanup_policy == "compact" and by_key["out"].cleanup_policy == "delete"
    assert by_key["in"].max_message_bytes == str(16 * 1024 * 1024)
    assert warnings == ["stage scale: 3 workers per group but " f"{namespace}.in has 2 partitions: 1 worker(s) will sit idle"]


def test_skew_names_the_topic_and_its_empty_or_busiest_partition():
    # The demo's 1,200 images keyed by study: two studies, two partitions of four.
    found = topics.skew("demo.raw", (600, 0, 600, 0))
    assert found.startswith("topic demo.raw: traffic skewed, partitions 1, 3 hold no records "
                            "(records per partition 0: 600, 1: 0, 2: 600, 3: 0)")
    assert 'producer.key = "record_id"' in found
    assert topics.skew("t", (40, 0, 40, 40)).startswith("topic t: traffic skewed, partition 1 holds no records")
    assert topics.skew("t", (100, 100, 300, 100)).startswith("topic t: traffic skewed, partition 2 holds 2.0x the mean")
    # Even enough, too few records to tell, or one partition: nothing to say.
    assert topics.skew("t", (310, 290, 305, 295)) is None
    assert topics.skew("t", (60, 40, 55, 45)) is None and topics.skew("t", (20, 10, 80, 10)) is None
    assert topics.skew("t", (9, 0, 9, 9)) is None and topics.skew("t", (1000,)) is None


def test_skewed_traffic_is_a_warning_beside_the_others_but_not_for_the_dlq():
    cfg = config.parse({"pipeline": {"name": "w"}, **TABLE, "topics": {**TABLE["topics"], "dlq": {"partitions": 2}}})
    actual = {k: t.partitions for k, t in cfg.topics.items()}
    found = topics.warnings(cfg, actual, {"in": (0, 200), "out": (70, 70, 70), "dlq": (500, 0)})
    assert found[0].startswith("stage scale: 3 workers per group")
    assert [w.split(",")[0] for w in found[1:]] == ["topic w.in: traffic skewed"]


@pytest.mark.broker
def test_describe_counts_each_partitions_records_and_warns_of_skew_on_the_broker(namespace, kafka_bootstrap, tmp_path,
                                                                                 capsys):
    cfg = config.parse({"pipeline": {"name": namespace, "bootstrap": kafka_bootstrap},
                        "topics": {"raw": {"partitions": 4}, "out": {"partitions": 3}, "even": {"partitions": 2},
                                   "dlq": {"partitions": 1}}})
    clients.create_topics(cfg)
    producer = clients.producer(cfg)
    # As keyed by two studies: partitions 0 and 2 of raw; out's partition 2 three times the others.
    for topic, counts in (("raw", (100, 0, 100, 0)), ("out", (60, 60, 180)), ("even", (75, 75))):
        for partition, n in enumerate(counts):
            for i in range(n):
                producer.send(cfg.topic(topic).name, key=f"{partition}-{i}".encode(), value=b"x", partition=partition)
    producer.flush()
    producer.close()
    states, found = topics.describe(cfg)
    assert {s.key: s.records for s in states} == {"raw": (100, 0, 100, 0), "out": (60, 60, 180), "even": (75, 75),
                                                  "dlq": (0,)}
    assert [w.split(" (")[0] for w in found] == [
        f"topic {namespace}.raw: traffic skewed, partitions 1, 3 hold no records",
        f"topic {namespace}.out: traffic skewed, partition 2 holds 1.8x the mean"]
    # The command prints each topic's records per partition, and the warnings on stderr.
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{kafka_bootstrap}"\n[topics]\n'
                    'raw = { partitions = 4 }\nout = { partitions = 3 }\neven = { partitions = 2 }\n'
                    'dlq = { partitions = 1 }\n')
    capsys.readouterr()
    assert cli.main(["topics", "describe", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "records=100,0,100,0 exists" in out and "records=75,75 exists" in out
    assert f"warning: topic {namespace}.raw: traffic skewed, partitions 1, 3 hold no records" in err


def test_reset_waits_for_a_group_coordinator_still_loading(monkeypatch):
    """The demo resets its topics right after starting its broker, whose group coordinator may still
    be loading (CoordinatorLoadInProgressError from ListGroups): reset retries, not a traceback."""
    from kafka.errors import CoordinatorLoadInProgressError

    class LoadingAdmin:
        """An admin client whose coordinator answers from the third ListGroups on."""
        def __init__(self):
            self.asked, self.deleted_groups, self.closed = 0, [], False

        def list_topics(self):
            return []

        def list_groups(self):
            self.asked += 1
            if self.asked < 3:
                raise CoordinatorLoadInProgressError("loading")
            return [{"group_id": "w.scale"}, {"group_id": "someone.else"}]

        def delete_groups(self, groups):
            self.deleted_groups.append(groups)

        def close(self):
            self.closed = True

    admin = LoadingAdmin()
    monkeypatch.setattr(clients, "admin", lambda cfg: admin)
    topics.reset(config.parse({"pipeline": {"name": "w"}, **TABLE}))
    assert admin.asked == 3 and admin.deleted_groups == [["w.scale"]] and admin.closed
