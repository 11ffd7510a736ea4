"""The type checker over dsrun/ (issue #29): the annotations the code carries are checked, not decoration.
Settings in pyproject.toml ([tool.mypy]); a new error fails the suite with mypy's own lines."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed: ./setup.sh --dev adds it")
def test_mypy_finds_no_error_in_dsrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
