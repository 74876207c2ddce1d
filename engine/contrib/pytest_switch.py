"""The ``pytest11`` entry point of the engine: off unless enabled, as Celery's plugin is.

Enable the fixtures of :mod:`engine.contrib.pytest` with any of: ``engine_plugin =
true`` in the pytest ini file, ``pytest --engine-plugin``, the environment variable
``ENGINE_PYTEST_PLUGIN=1``, or ``pytest_plugins = ("engine.contrib.pytest",)`` in a
``conftest.py`` (which does not need this switch).
"""

from __future__ import annotations

import os

import pytest

PLUGIN = "engine.contrib.pytest"


def pytest_addoption(parser: pytest.Parser) -> None:
    """The switch and the app the fixtures use."""
    group = parser.getgroup("engine", "engine task workers in tests")
    group.addoption("--engine-plugin", action="store_true", default=False,
                    help="enable the engine fixtures (engine_app, engine_worker, engine_eager)")
    parser.addini("engine_plugin", "enable the engine fixtures", type="bool", default=False)
    parser.addini("engine_app", "the app the engine fixtures use, as engine-worker -A takes it ('module[:attr]')",
                  default="")


def pytest_configure(config: pytest.Config) -> None:
    """Load the fixtures when enabled."""
    enabled = (config.getoption("--engine-plugin") or config.getini("engine_plugin")
               or os.environ.get("ENGINE_PYTEST_PLUGIN", "").strip().lower() in {"1", "true", "yes"})
    if enabled and not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
