"""What the package promises its users: a version (one source), ``--version``, the py.typed marker, exports."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine
import engine.exceptions
from engine.cli import main, worker_main
from tests.worker_helpers import ROOT


def test_engine_worker_version():
    result = CliRunner().invoke(worker_main, ["--version"])  # no -A needed
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"engine-worker {engine.__version__}"


def test_engine_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"engine {engine.__version__}"


@pytest.mark.slow
def test_version_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "engine.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"engine-worker {engine.__version__}"


def test_the_version_has_one_source():
    assert engine.__version__ == importlib.metadata.version("engine")  # what pip installed
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]


def test_the_typed_marker_ships():
    assert (Path(engine.__file__).parent / "py.typed").is_file()


def test_outbox_full_is_exported():
    assert engine.OutboxFull is engine.exceptions.OutboxFull
    assert "OutboxFull" in engine.__all__


def test_every_public_exception_is_in_all():
    defined = {name for name, value in vars(engine.exceptions).items()
               if inspect.isclass(value) and issubclass(value, BaseException)
               and value.__module__ == "engine.exceptions"}
    assert defined == set(engine.exceptions.__all__)
    for name in engine.__all__:
        assert hasattr(engine, name)
