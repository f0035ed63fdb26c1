"""Log lines: JSON off a TTY, bound context carried, secrets masked; no kafka-python error on a
normal close, no CUDA error from TensorFlow on a CPU device."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from tensorline import logs


def test_json_lines_carry_context_and_mask_secrets(capsys):
    logs.configure(json=True)
    log = logs.get(stage="features", topic="demo.raw", partition=3)
    log.info("record failed", offset=42, record_id="r1",
             kafka={"sasl_plain_password": "hunter2", "security_protocol": "SASL_SSL"})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "record failed" and line["level"] == "info"
    assert (line["stage"], line["topic"], line["partition"], line["offset"]) == ("features", "demo.raw", 3, 42)
    assert line["kafka"]["sasl_plain_password"] == "***"
    assert line["kafka"]["security_protocol"] == "SASL_SSL"
    assert "hunter2" not in json.dumps(line)


def test_level_filters(capsys):
    logs.configure(json=True, level="warning")
    logs.get().info("quiet")
    logs.get().warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err and "quiet" not in err


def test_a_request_cancelled_by_a_close_is_debug_and_a_real_failure_stays_an_error(caplog):
    from kafka.errors import Cancelled, KafkaConnectionError

    from tensorline.engine import clients  # noqa: F401  (puts the filter on kafka-python's loggers)

    log = logging.getLogger("kafka.cluster")
    with caplog.at_level(logging.INFO):
        log.error("Metadata refresh: failed %s", Cancelled())
        log.error("Metadata refresh: failed %s", KafkaConnectionError("socket disconnected"))
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "socket disconnected" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kafka.cluster"):
        log.error("Metadata refresh: failed %s", Cancelled())
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", "Metadata refresh: failed Cancelled")]


@pytest.mark.broker
def test_closing_a_consumer_with_a_request_in_flight_logs_no_error(pipeline, caplog):
    """The shutdown that printed `ERROR kafka.cluster: Metadata refresh: failed Cancelled`: a
    consumer closed while a metadata request is in flight (held there for the test)."""
    from kafka.errors import Cancelled

    from tensorline.engine import clients

    consumer = clients.consumer(pipeline, f"{pipeline.name}.g", pipeline.topic("raw").name)
    # kafka-python 3.0's internals (pinned below 3.1): no public way to hold a request in flight.
    # The broker's answers on one connection are dropped, so the metadata request sent on it stays
    # in flight until close() cancels it; the event loop stops once the cancelled refresh has logged.
    manager, loop = consumer._client._manager, consumer._client._net
    deadline = time.monotonic() + 30
    while not (nodes := [n for n, c in list(manager._conns.items()) if isinstance(n, int) and c.connected]):
        assert time.monotonic() < deadline, "the consumer did not connect to the broker"
        consumer.poll(timeout_ms=100)
    node = nodes[0]
    manager._conns[node].data_received = lambda data: None
    refresh = manager.call_soon(manager.cluster.refresh_metadata, node)
    stop_loop = loop.close

    def stop_after_the_refresh_failed() -> None:
        while not refresh.is_done and time.monotonic() < deadline:
            time.sleep(0.01)  # poll of the loop's condition
        stop_loop()
    loop.close = stop_after_the_refresh_failed
    with caplog.at_level(logging.DEBUG, logger="kafka"):
        consumer.close()
    assert refresh.is_done and isinstance(refresh.exception, Cancelled)
    loud = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith("kafka") and (r.levelno >= logging.ERROR or
                                              (r.levelno >= logging.WARNING and "Cancelled" in r.getMessage()))]
    assert not loud
    assert any(r.getMessage() == "Metadata refresh: failed Cancelled" and r.levelname == "DEBUG"
               for r in caplog.records)


@pytest.mark.parametrize("setup", ["pin_device('cpu')", "quiet_tensorflow()"])
def test_tensorflow_on_a_cpu_device_logs_no_cuda_error(setup):
    from tensorline.engine.plugins import has_gpu

    if setup == "quiet_tensorflow()" and has_gpu():
        pytest.skip("a GPU host: TensorFlow's own log level is kept for in-process use")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    code = (f"from tensorline.engine.plugins import pin_device, quiet_tensorflow; {setup}; "
            "import tensorflow as tf; print(tf.config.list_physical_devices('CPU'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPU" in done.stdout
    assert "cuInit" not in done.stderr and "CUDA error" not in done.stderr, done.stderr
    if not has_gpu():  # TensorFlow's import-time INFO lines, printed whatever its log level
        assert "Could not find cuda drivers" not in done.stderr and "absl::InitializeLog" not in done.stderr, \
            done.stderr
        # no absl line at all (I0000 00:00:..., as `port.cc] oneDNN custom operations are on` on a
        # CPU with AVX-512/AMX, where TensorFlow turns oneDNN on by default)
        assert not re.search(r"^[IWEF]\d{4} \d\d:\d\d:", done.stderr, re.M), done.stderr


def test_stderr_without_keeps_every_other_line_in_order(capfd):
    from tensorline.engine.plugins import stderr_without

    with stderr_without((b"cuda drivers",)):
        os.write(2, b"first\nCould not find cuda drivers on your machine\n")
        os.write(2, b"second\nthird, no newline")
    assert capfd.readouterr().err == "first\nsecond\nthird, no newline"


def test_an_authentication_failure_tensorline_reports_itself_is_debug_in_kafka_pythons_log(caplog):
    """A wrong password: kafka-python's four ERROR lines become DEBUG, so the one line left is
    tensorline's AuthenticationFailed (naming the principal and the bootstrap)."""
    from kafka.errors import KafkaConnectionError, SaslAuthenticationFailedError

    logs.quiet_close("kafka")
    transport = logging.getLogger("kafka.net.transport")
    with caplog.at_level(logging.DEBUG, logger="kafka.net.transport"):
        transport.error("%s: socket disconnected", "<KafkaSSLTransport>")
        transport.error("%s: Abort (%s)", "<KafkaSSLTransport>", SaslAuthenticationFailedError("invalid credentials"))
        transport.error("%s: Abort (%s)", "<KafkaSSLTransport>", KafkaConnectionError("reset by peer"))
    assert [r.levelname for r in caplog.records] == ["DEBUG", "DEBUG", "ERROR"]
