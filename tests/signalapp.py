"""An app whose receivers log every worker-side signal: ``engine-worker -A tests.signalapp``.

Each receiver appends one JSON line ``{"signal", "pid", ...}`` to the file named by
``ENGINE_TEST_SIGNAL_LOG``; a receiver of ``task_prerun`` raises for the task
``broken_receiver`` (it must not break the task).
"""

from __future__ import annotations

import json
import os

from engine import Engine, signals

app = Engine(
    "signalapp",
    transport=os.environ.get("ENGINE_TEST_ENDPOINT", "tcp://127.0.0.1:5599").split(","),
    backend=os.environ.get("ENGINE_TEST_BACKEND") or None,
)


def _log(signal_name: str, **fields: object) -> None:
    path = os.environ.get("ENGINE_TEST_SIGNAL_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"signal": signal_name, "pid": os.getpid(), **fields}, default=repr) + "\n")


@app.task
def add(x, y):
    return x + y


@app.task
def fails(message):
    raise ValueError(message)


@app.task(bind=True)
def headers(self):
    """The headers a before_task_publish receiver added on the sending side."""
    return self.request.headers


@app.task
def broken_receiver():
    return "ran anyway"


@app.task
def crash():
    os._exit(13)


@signals.worker_init.connect
def _worker_init(sender=None, **kwargs):
    _log("worker_init", hostname=sender.hostname)


@signals.worker_ready.connect
def _worker_ready(sender=None, **kwargs):
    _log("worker_ready", hostname=sender.hostname)


@signals.worker_shutdown.connect
def _worker_shutdown(sender=None, **kwargs):
    _log("worker_shutdown")


@signals.worker_process_init.connect
def _process_init(sender=None, **kwargs):
    _log("worker_process_init")


@signals.worker_process_shutdown.connect
def _process_shutdown(sender=None, pid=None, exitcode=None, **kwargs):
    _log("worker_process_shutdown", exitcode=exitcode, same_pid=pid == os.getpid())


@signals.task_received.connect
def _received(sender=None, request=None, **kwargs):
    _log("task_received", id=request.id, name=request.name)


@signals.task_prerun.connect
def _prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **rest):
    _log("task_prerun", id=task_id, name=task.name, args=list(args))
    if task.name == broken_receiver.name:
        raise RuntimeError("a broken receiver")


@signals.task_postrun.connect
def _postrun(sender=None, task_id=None, retval=None, state=None, **kwargs):
    _log("task_postrun", id=task_id, state=state, retval=retval)


@signals.task_success.connect(sender=add)
def _success_of_add(sender=None, result=None, **kwargs):
    _log("task_success", name=sender.name, result=result)


@signals.task_failure.connect
def _failure(sender=None, task_id=None, exception=None, **kwargs):
    _log("task_failure", id=task_id, exception=repr(exception))


@signals.task_unknown.connect
def _unknown(sender=None, name=None, id=None, **kwargs):
    _log("task_unknown", name=name, id=id)


@signals.task_revoked.connect
def _revoked(sender=None, request=None, terminated=None, expired=None, **kwargs):
    _log("task_revoked", id=request.id if request is not None else None, terminated=terminated, expired=expired)
