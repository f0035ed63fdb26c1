"""docker/ cannot run here (no Docker engine): keep it in step with the launcher and the pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tensorline import config
from tensorline.ops import broker

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_compose_broker_matches_the_launcher(tmp_path):
    text = (DOCKER / "compose.yaml").read_text()
    assert f"image: apache/kafka:{broker.KAFKA_VERSION}" in text
    assert f"KAFKA_MESSAGE_MAX_BYTES: {config.DEFAULT_MAX_MESSAGE_BYTES}" in text
    single = broker.Node(1, 9092, 9093)  # compose runs the launcher's single node
    props = broker._write_config(tmp_path, single, [single], config.DEFAULT_MAX_MESSAGE_BYTES).read_text()
    for setting in ("transaction.state.log.min.isr=1", "offsets.topic.replication.factor=1",
                    "auto.create.topics.enable=false"):
        key, value = setting.split("=")
        assert f"{key}={value}" in props.splitlines()
        env = "KAFKA_" + key.upper().replace(".", "_")
        assert re.search(rf'{env}: "?{value}"?', text), env
    pom = (Path(broker.__file__).parent / "kafka" / "pom.xml").read_text()
    assert f"<kafka.version>{broker.KAFKA_VERSION}</kafka.version>" in pom


def test_every_stage_and_model_of_the_pipeline_has_a_service():
    text = (DOCKER / "compose.yaml").read_text()
    cfg = config.load(DOCKER.parent / "pipeline.toml")
    for name, stage in cfg.stages.items():
        if stage.kind == "detection":
            for m in stage.models:
                assert f'"run", "detection", "--model", "{m.name}"' in text
        else:
            assert f'"run", "{name}"' in text


def test_grafana_dashboard_is_valid_json_on_our_metrics():
    dash = json.loads((DOCKER / "grafana" / "tensorline.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("tensorline_records_in_total", "tensorline_dead_letters_total", "tensorline_end_to_end_seconds",
                   "tensorline_assigned_partitions", "tensorline_open_joins"):
        assert metric in exprs
