"""The suite says loudly what it skipped (tests/conftest.py `pytest_terminal_summary`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def run_suite(folder: Path, tests: str) -> subprocess.CompletedProcess:
    """pytest on a suite of its own whose conftest is this one's."""
    (folder / "conftest.py").write_text(f"exec(compile(open({str(CONFTEST)!r}).read(), {str(CONFTEST)!r}, 'exec'))\n")
    (folder / "test_some.py").write_text(tests)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                           "-c", str(folder / "pytest.ini"), str(folder)],
                          capture_output=True, text=True, timeout=120, cwd=folder)


def test_every_skipped_test_is_listed_with_its_reason_at_the_end(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = run_suite(tmp_path, "import pytest\n"
                               "def test_runs(): pass\n"
                               "def test_needs_chromium(): pytest.skip('/usr/bin/chromium not installed')\n"
                               "@pytest.mark.skipif(True, reason='no GPU here')\n"
                               "def test_needs_a_gpu(): pass\n")
    assert done.returncode == 0, done.stdout + done.stderr
    tail = done.stdout[done.stdout.index("2 SKIPPED: these tests did not run"):]
    assert "SKIPPED test_some.py::test_needs_chromium: /usr/bin/chromium not installed" in tail
    assert "SKIPPED test_some.py::test_needs_a_gpu: no GPU here" in tail


def test_a_run_without_skips_says_nothing_of_them(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = run_suite(tmp_path, "def test_runs(): pass\n")
    assert done.returncode == 0 and "SKIPPED" not in done.stdout
