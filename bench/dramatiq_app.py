"""The same benchmark tasks on Dramatiq (``dramatiq bench.dramatiq_app``), for the peer comparison.

Broker and result backend are the Redis in ``BENCH_DRAMATIQ_REDIS`` (a URL);
the worker's prefetch comes from Dramatiq's own ``dramatiq_queue_prefetch``
environment variable, which the harness sets.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench import apps as engine_apps


def _broker(url: str) -> RedisBroker:
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    return broker


dramatiq.set_broker(_broker(os.environ.get("BENCH_DRAMATIQ_REDIS", "redis://127.0.0.1:6379/1")))


@dramatiq.actor(max_retries=0)
def noop(x, y):
    engine_apps._bump()


@dramatiq.actor(max_retries=0, store_results=True)
def add(x, y):
    return x + y


def use(url: str) -> None:
    """Send to (and read results from) the Redis at ``url`` from now on, in this process."""
    broker = _broker(url)
    dramatiq.set_broker(broker)
    for actor in (noop, add):
        actor.broker = broker
        broker.declare_actor(actor)
