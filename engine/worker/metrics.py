"""``engine-worker --metrics-port P``: Prometheus metrics and a health probe, served from the supervisor.

``GET /metrics`` is ``prometheus_client``'s exposition of a collector that
reads the supervisor's figures when scraped (nothing is counted twice on the
hot path: the counts are the ones ``engine inspect stats`` shows):

* ``engine_tasks_total{task, state}``: tasks that ended, by final state;
* ``engine_task_runtime_seconds{task}``: histogram of run times;
* ``engine_tasks_waiting``, ``engine_tasks_scheduled``, ``engine_tasks_in_children``;
* ``engine_client_credit{client}``: tasks a client may still send here;
* ``engine_children``, ``engine_children_busy``, ``engine_journal_frames``,
  ``engine_tasks_received_total``, ``engine_tasks_lost_total``.

``GET /healthz`` answers 200 while the supervisor's loop is turning and 503
once it has not turned for :data:`STALE_AFTER` seconds or the worker is
shutting down (a liveness and readiness probe; celery/celery#4079).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from engine.worker.task_stats import BUCKETS

if TYPE_CHECKING:
    from engine.worker.supervisor import Supervisor

__all__ = ("MetricsServer", "SupervisorCollector")

logger = logging.getLogger("engine.worker")

#: Seconds without a turn of the supervisor's loop after which /healthz says 503 (it turns at
#: least every housekeeping interval; a long store or journal write may hold it a moment).
STALE_AFTER = 10.0


class SupervisorCollector:
    """A ``prometheus_client`` collector of one supervisor's figures, read at each scrape."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        """The metrics, as of now (read from the scrape thread: every collection is copied first)."""
        sup = self.supervisor
        by_state = CounterMetricFamily("engine_tasks", "Tasks that ended, by final state.", labels=["task", "state"])
        runtime = HistogramMetricFamily("engine_task_runtime_seconds", "Run time of tasks.", labels=["task"])
        for name, kind in list(sup.task_stats.by_name.items()):
            for state, count in list(kind.by_state.items()):
                by_state.add_metric([name, state], count)
            cumulative, buckets = 0, []
            histogram = list(kind.histogram)
            for bound, count in zip([*BUCKETS, float("inf")], histogram):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            runtime.add_metric([name], buckets, sum_value=kind.runtime_sum)
        yield by_state
        yield runtime
        yield CounterMetricFamily("engine_tasks_received", "Task messages accepted.",
                                  value=sup.counters["received"])
        yield CounterMetricFamily("engine_tasks_lost", "Tasks whose child died while running them.",
                                  value=sup.counters["lost"])
        yield GaugeMetricFamily("engine_tasks_waiting", "Tasks waiting in the supervisor for a child.",
                                value=len(sup.scheduler))
        yield GaugeMetricFamily("engine_tasks_scheduled", "Tasks held for a later time (countdown, ETA, retry).",
                                value=len(sup.timers))
        yield GaugeMetricFamily("engine_tasks_in_children", "Tasks handed to children, running or queued there.",
                                value=sup.in_children)
        children = list(sup.pool.children.values())
        yield GaugeMetricFamily("engine_children", "Pool children alive.", value=len(children))
        yield GaugeMetricFamily("engine_children_busy", "Children running a task.",
                                value=sup.pool.busy())
        credit = GaugeMetricFamily("engine_client_credit", "Tasks each client may still send to this worker.",
                                   labels=["client"])
        consumer = sup.consumer
        for peer in list(consumer.peers) if consumer is not None else []:
            credit.add_metric([peer.name], sum(list(peer.credit.values())))
        yield credit
        journal = sup.journal
        yield GaugeMetricFamily("engine_journal_frames", "Received task frames the journal holds (not all final).",
                                value=journal.frames_held() if journal is not None else 0)

    def describe(self) -> list[Metric]:
        """Nothing up front: the metrics are only known when collected."""
        return []


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """The HTTP server of /metrics and /healthz, in a daemon thread of the supervisor process."""

    def __init__(self, supervisor: Supervisor, port: int, host: str = "0.0.0.0") -> None:
        self.supervisor = supervisor
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SupervisorCollector(supervisor))
        self._metrics = make_wsgi_app(registry)
        self._server = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="engine-metrics", daemon=True)

    def start(self) -> None:
        """Serve from now on."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def healthy(self) -> tuple[bool, str]:
        """(True, why) while the loop turns and the worker is not stopping."""
        sup = self.supervisor
        if sup.stopping:
            return False, f"shutting down ({sup.stopping})"
        idle = time.monotonic() - sup.last_turn
        if idle > STALE_AFTER:
            return False, f"the supervisor's loop has not turned for {idle:.1f}s"
        return True, "ok"

    def _app(self, environ: dict, start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            ok, why = self.healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        return self._metrics(environ, start_response)
