"""Fault injection on the real broker: a three-stage pipeline under `tensorline up` keeps every record
exactly once through worker SIGKILLs, a supervisor SIGKILL and restart, and a worker frozen
(SIGSTOP) past its session timeout then resumed; no group's committed offset moves backwards and
no worker outlives its supervisor. The scenario is bench/chaos.py's (`run`), shorter."""

from __future__ import annotations

import pytest

from tests.conftest import bench_script

pytestmark = pytest.mark.broker

def test_schedule_is_seeded_freezes_early_and_kills_as_asked():
    chaos = bench_script("chaos")
    plan = chaos.schedule(7, kills=3, supervisor_kills=1, records=400)
    assert plan == chaos.schedule(7, kills=3, supervisor_kills=1, records=400)
    assert sorted(e.kind for e in plan) == ["kill", "kill", "kill", "kill-supervisor", "stop"]
    [stop] = [e for e in plan if e.kind == "stop"]
    assert 60 <= stop.at <= 100 and [e.at for e in plan] == sorted(e.at for e in plan)


@pytest.mark.timeout(360)
def test_exactly_once_through_kills_a_supervisor_kill_and_a_frozen_worker(tmp_path, kafka_bootstrap, namespace):
    # 400 records at 8/s: the stream outlasts the freeze (session timeout + rebalance) by ~20 s.
    outcome = bench_script("chaos").run(kafka_bootstrap, tmp_path, name=namespace, seed=7, kills=3, supervisor_kills=1,
                               records=400, rate=8.0)
    assert outcome.clean, outcome.report()
