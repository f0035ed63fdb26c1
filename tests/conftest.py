"""Shared fixtures: one real Kafka broker per test session, and a topic namespace per test."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tensorline import config

# Property tests check results, not speed: on a busy 2-core machine one example may take 400 ms
# (the assignor's determinism test failed hypothesis' 200 ms deadline so), and generating data
# may be slow. No deadline, no too_slow health check, for every property test.
settings.register_profile("tensorline", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tensorline")

def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.2):
    """Poll `condition` until it is true (returned) or `timeout_s` passes (AssertionError naming
    `what`): how tests wait, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:.0f} s"
        time.sleep(every_s)  # poll of the condition
    return result


def joined(cfg, group: str, topic: str, timeout_s: float = 60.0, **overrides):
    """A consumer in `group` owning partitions of `topic`. It subscribes once its metadata shows
    the (just created) topic: a leader assigning without it gives an empty assignment."""
    from tensorline.engine import clients

    consumer = clients.consumer(cfg, group, **overrides)
    wait_for(lambda: consumer.partitions_for_topic(topic), timeout_s, f"topic {topic} in the metadata", every_s=0.1)
    consumer.subscribe([topic])
    wait_for(lambda: consumer.poll(timeout_ms=200) is not None and consumer.assignment(), timeout_s,
             f"partitions of {topic} for group {group}", every_s=0)
    return consumer


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_script(name: str):
    """bench/<name>.py as the module `bench_<name>`, loaded once. bench/ is scripts, not a package:
    they import `_common` from their folder, which is on sys.path while the script loads."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while it runs
        sys.path.insert(0, str(BENCH))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        finally:
            sys.path.remove(str(BENCH))
    return sys.modules[module_name]


def drained(cfg) -> bool:
    """Every stage group has committed to the end of its input: anything a stage would produce
    (twice, say) is committed and visible to read_committed readers by now."""
    from tensorline.ops import lag

    return all(g.total == 0 for g in lag.measure(cfg))


# Set to use an already running broker (e.g. `tensorline broker start`) instead of a fresh one.
TEST_BOOTSTRAP_ENV = "TENSORLINE_TEST_BOOTSTRAP"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Nothing is skipped silently: every skipped test, and why, in a red block at the end."""
    tr = terminalreporter
    skipped = tr.stats.get("skipped", [])
    if not skipped:
        return
    tr.write_sep("!", f"{len(skipped)} SKIPPED: these tests did not run", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        tr.write_line(f"SKIPPED {report.nodeid}: {reason.removeprefix('Skipped: ')}", red=True, bold=True)
    tr.write_line("Install what is named above and run them again (`./run test` installs Chromium when it is "
                  "root on Debian/Ubuntu).", red=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bootstrap address of a real broker: $TENSORLINE_TEST_BOOTSTRAP, else one started here."""
    if os.environ.get(TEST_BOOTSTRAP_ENV):
        yield os.environ[TEST_BOOTSTRAP_ENV]
        return
    from tensorline.ops import broker

    data_dir = tmp_path_factory.mktemp("broker")
    with_port = broker.free_port()
    st = broker.start(data_dir, with_port, with_parent=True)  # gone with the session, even a killed one
    try:
        yield st.bootstrap
    finally:
        broker.stop(data_dir)


@pytest.fixture
def namespace() -> str:
    """A unique pipeline name: every topic and group of the test lives under it."""
    return f"t{uuid.uuid4().hex[:10]}"


def pipeline_table(name: str, bootstrap: str, **extra: object) -> dict:
    """A minimal pipeline table for tests; `extra` adds or replaces top-level tables."""
    table: dict = {
        "pipeline": {"name": name, "bootstrap": bootstrap},
        "topics": {"raw": {"partitions": 2}, "out": {"partitions": 2}, "dlq": {"partitions": 1}},
    }
    table.update(extra)
    return table


@pytest.fixture
def write_pipeline(namespace: str, kafka_bootstrap: str):
    """Write a pipeline file under the test's namespace (the [pipeline] header, then `body`), load
    it and create its topics on the real broker: `write_pipeline(path, body) -> PipelineConfig`."""
    from tensorline.engine import clients

    def write(path: Path, body: str) -> config.PipelineConfig:
        path.write_text(f'[pipeline]\nname = "{namespace}"\nbootstrap = "{kafka_bootstrap}"\n{body}')
        cfg = config.load(path)
        clients.create_topics(cfg)
        return cfg
    return write


@pytest.fixture
def pipeline(namespace: str, kafka_bootstrap: str) -> config.PipelineConfig:
    """A pipeline under the test's own namespace, its topics created on the real broker."""
    from tensorline.engine import clients

    cfg = config.parse(pipeline_table(namespace, kafka_bootstrap), Path("test-pipeline.toml"))
    clients.create_topics(cfg)
    return cfg
