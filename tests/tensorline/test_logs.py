"""Log lines: JSON off a TTY, bound context carried, secrets masked."""

from __future__ import annotations

import json

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
