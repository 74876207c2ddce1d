"""Integrations shipped with the engine (the pytest plugin: :mod:`engine.contrib.pytest`)."""
