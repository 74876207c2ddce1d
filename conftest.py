"""Root fixtures shared by tests/ and bench/: ``core`` runs a test on both core twins."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="session", params=["cython", "python"], ids=["cython", "python"])
def core(request):
    """The compiled core (``engine._core``) or its pure twin (``engine._core_py``)."""
    name = "engine._core" if request.param == "cython" else "engine._core_py"
    return importlib.import_module(name)
