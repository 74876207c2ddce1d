"""The session fixture body of ``redis_url``: a throw-away redis-server (:class:`bench.redis_server.RedisServer`)."""

from __future__ import annotations

import os
import shutil

import pytest

from bench.redis_server import RedisServer

__all__ = ("redis_url_fixture",)


def redis_url_fixture():
    """Yield the URL of a fresh redis-server for the session, stopping it afterwards.

    Skips when ``redis-server`` is not installed, except under ``CI=true``,
    where it fails: CI must run the redis tests, not silently skip them.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not on PATH but CI=true: the redis backend tests must run in CI "
                        "(.ci/run installs it with apt-get)", pytrace=False)
        pytest.skip("redis-server is not on PATH (install it, e.g. apt-get install redis-server); "
                    "set CI=true to make this a failure")
    server = RedisServer(executable).start()
    try:
        yield server.url
    finally:
        server.stop()
