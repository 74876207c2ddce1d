"""The demo's tasks: a small pipeline, as in the Tasks guide's fetch -> parse -> store."""

from __future__ import annotations

import hashlib
import os

from engine import Engine
from engine.log import get_task_logger

app = Engine(
    "demo",
    transport=os.environ.get("DEMO_ENDPOINT", "tcp://127.0.0.1:5555"),
    backend=os.environ.get("DEMO_BACKEND", "sqlite:///demo-results.db"),
)
logger = get_task_logger(__name__)


@app.task
def add(x, y):
    return x + y


@app.task(ignore_result=True)
def noop(x, y):
    return None


@app.task
def fetch(n):
    return f"document-{n}"


@app.task
def parse(document):
    return hashlib.sha256(document.encode()).hexdigest()[:12]


@app.task
def store(digest, n):
    return {"n": n, "digest": digest}


@app.task(bind=True, autoretry_for=(ConnectionError,), retry_backoff=0.05, retry_jitter=False, max_retries=3)
def flaky(self, n):
    if self.request.retries < 2:
        raise ConnectionError("temporary failure")
    return n
