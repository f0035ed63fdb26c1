"""Fault injection on the real broker: a three-stage pipeline under `tensorline up` keeps every record
exactly once through worker SIGKILLs, a supervisor SIGKILL and restart, and a worker frozen
(SIGSTOP) past its session timeout then resumed; no group's committed offset moves backwards and
no worker outlives its supervisor. The scenario is bench/chaos.py's (`run`), shorter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def load_chaos():
    """bench/chaos.py as a module (bench/ is scripts, not a package)."""
    if "bench_chaos" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_chaos", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_chaos"] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules["bench_chaos"]


def test_schedule_is_seeded_freezes_early_and_kills_as_asked():
    chaos = load_chaos()
    plan = chaos.schedule(7, kills=3, supervisor_kills=1, records=400)
    assert plan == chaos.schedule(7, kills=3, supervisor_kills=1, records=400)
    assert sorted(e.kind for e in plan) == ["kill", "kill", "kill", "kill-supervisor", "stop"]
    [stop] = [e for e in plan if e.kind == "stop"]
    assert 60 <= stop.at <= 100 and [e.at for e in plan] == sorted(e.at for e in plan)


@pytest.mark.timeout(360)
def test_exactly_once_through_kills_a_supervisor_kill_and_a_frozen_worker(tmp_path, kafka_bootstrap, namespace):
    # 400 records at 8/s: the stream outlasts the freeze (session timeout + rebalance) by ~20 s.
    outcome = load_chaos().run(kafka_bootstrap, tmp_path, name=namespace, seed=7, kills=3, supervisor_kills=1,
                               records=400, rate=8.0)
    assert outcome.clean, outcome.report()
