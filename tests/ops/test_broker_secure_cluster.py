"""`broker start --secure --nodes 3` against real Kafka: three SASL_SSL nodes replicating as the
admin (SCRAM between brokers, PLAIN to the controllers), a node stopped and started again
rejoining with its credentials, and a stage principal's transaction replicated on all three."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorline import config
from tensorline.engine import clients
from tensorline.ops import acls, broker

from tests.conftest import wait_for

pytestmark = pytest.mark.broker

# Three JVMs booting together, with TLS and SCRAM between them: 80 s at a load of 5 on 2 cores,
# more than the launcher's default 90 s at a load of 11 (the nodes' acceptors came up after 50-70 s).
START_S = 300.0


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("secure-cluster")
    try:
        st = broker.start(data_dir, broker.free_port_range(3), nodes=3, secure=True, timeout=START_S,
                          with_parent=True)
        yield data_dir, st
    finally:
        broker.stop(data_dir)


@pytest.mark.timeout(900)
def test_three_secure_nodes_replicate_and_a_restarted_node_rejoins(secure_cluster, namespace):
    data_dir, st = secure_cluster
    assert [n.running for n in st.nodes] == [True, True, True] and st.security["protocol"] == "SASL_SSL"
    for node in st.nodes:
        assert "inter.broker.listener.name=SASL_SSL" in (Path(node.data_dir) / "server.properties").read_text()
    cfg = config.parse({"pipeline": {"name": namespace, "bootstrap": st.bootstrap},
                        "topics": {"raw": {"partitions": 3}, "out": {"partitions": 3}, "dlq": {"partitions": 1}},
                        "stages": {"scale": {"input": "raw", "output": "out",
                                             "kind": "tensorline.stages.testing:Scale"}},
                        "security": {"ssl_cafile": st.security["ssl_cafile"],
                                     "credentials_file": st.security["credentials_file"]}})
    clients.create_topics(cfg)
    acls.apply(cfg)
    broker.stop(data_dir, node=2)
    again = broker.start(data_dir, timeout=START_S, with_parent=True)  # node 2 again: it must authenticate to the others to catch up
    assert [n.running for n in again.nodes] == [True, True, True]
    stage = cfg.as_principal("scale")
    producer = clients.producer(stage, transactional_id=f"{namespace}.scale.test-0")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        for i in range(3):
            producer.send(cfg.topic("out").name, key=str(i).encode(), value=b"x", partition=i)
        producer.commit_transaction()
    finally:
        producer.close(timeout=5)
    admin = clients.admin(cfg)
    try:
        def replicated() -> bool:
            [topic] = admin.describe_topics([cfg.topic("out").name])
            return all(sorted(p["isr_nodes"]) == [1, 2, 3] for p in topic["partitions"])
        wait_for(replicated, 120, "every partition of the output in sync on the three nodes")
    finally:
        admin.close()
    ops = cfg.as_principal("ops")
    wait_for(lambda: len(list(clients.read_range(ops, cfg.topic("out").name))) == 3, 60,
             "the transaction's three records visible to ops")
