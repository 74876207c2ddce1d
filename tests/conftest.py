"""Fixtures for the task API tests (the ``core`` fixture lives in the root conftest)."""

from __future__ import annotations

import pytest

from engine import Engine


@pytest.fixture
def app():
    """A fresh app whose sent messages are captured in ``app.sent`` instead of sent."""
    application = Engine("t", backend="memory://")
    application.sent = []
    application.send_message = application.sent.append
    yield application
    application.close()


@pytest.fixture
def eager_app():
    """A fresh app that runs every ``delay()`` in-process."""
    application = Engine("t", backend="memory://", task_always_eager=True)
    yield application
    application.close()
