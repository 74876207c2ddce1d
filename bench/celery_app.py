"""The same benchmark tasks on Celery (``celery -A bench.celery_app worker``), for the peer comparison.

Settings are what a knowledgeable user picks for each scenario: results off
for the no-op run, the Redis result backend for round trips, ``-O fair`` with
a prefetch multiplier of 1 for the fairness run.
"""

from __future__ import annotations

import os

from celery import Celery

from bench import apps as engine_apps

broker = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("bench_celery", broker=broker, backend=broker)
app.conf.update(
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    task_serializer="msgpack",
    result_serializer="msgpack",
    accept_content=["msgpack", "json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(ignore_result=True)
def noop(x, y):
    engine_apps._bump()


@app.task
def add(x, y):
    return x + y


@app.task(ignore_result=True, name="bench.long")
def long_task(seconds, sent):
    engine_apps._timed("long", seconds, sent)


@app.task(ignore_result=True, name="bench.short")
def short_task(seconds, sent):
    engine_apps._timed("short", seconds, sent)


@app.task(name="bench.chord_part")
def chord_part(value, sent):
    return engine_apps.chord_part.run(value, sent)


@app.task(ignore_result=True, name="bench.chord_body")
def chord_body(values, sent):
    engine_apps.chord_body.run(values, sent)
