"""topics create/describe: the cluster's view of the pipeline's topics, and the operator warnings."""

from __future__ import annotations

import pytest

from tensorline import config
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
