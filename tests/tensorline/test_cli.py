"""The CLI's start: `run` and `up` name a missing model file before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorline import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The repository's pipeline with the cnn model at a path that does not exist, every other file
    it names in place."""
    missing = tmp_path / "models" / "cnn.keras"
    text = (ROOT / "pipeline.toml").read_text().replace(".tensorline/models/cnn.keras", str(missing))
    (tmp_path / "pipeline.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    Path(".tensorline/models").mkdir(parents=True)
    for name in ("backbone.keras", "logreg.keras", "blob.keras", "stacker.json"):
        Path(".tensorline/models", name).write_bytes(b"")
    return missing


@pytest.mark.parametrize("argv", [["up"], ["run", "detection", "--model", "cnn"],
                                  ["run", "detection", "--workers", "2"]])
def test_run_and_up_name_a_missing_model_file_before_starting(elsewhere, argv, capsys, monkeypatch):
    from tensorline.ops import supervisor

    monkeypatch.setattr(supervisor.Supervisor, "__init__", lambda *a, **kw: pytest.fail("a worker was started"))
    assert cli.main([*argv, "-c", "pipeline.toml"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.toml: stages.detection.models.cnn.path: no such file" in err and str(elsewhere) in err


def test_run_checks_only_the_files_of_its_own_stage_and_model(elsewhere):
    from tensorline import config

    cfg = config.load("pipeline.toml")
    assert config.missing_files(cfg) == [("stages.detection.models.cnn.path", str(elsewhere))]
    assert config.missing_files(cfg, "detection", "blob") == [] and config.missing_files(cfg, "fusion") == []
