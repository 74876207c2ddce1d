"""Workers on several hosts (issue 17): network namespaces on this machine, a name in a hosts file.

Each test builds its own lab (:mod:`tests.netns`): worker hosts, a client host
whose ``/etc/hosts`` maps ``workers.test`` to the worker hosts, and a Redis
result store on the bridge. The client runs :mod:`tests.netns_client` inside
its host with the transport ``dns+tcp://workers.test:5555``. Every execution
is recorded in a file named by the host that ran it, so the tests count what
ran where, what was lost (must be nothing) and what ran twice (reported).

Needs root and iproute2, as CI has (``.ci/run`` installs iproute2); skipped,
with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time

import pytest

from bench.redis_server import RedisServer
from tests import netns
from tests.test_drain import journal_rows
from tests.worker_helpers import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PORT = 5555
NAME = "workers.test"


class Cluster:
    """The lab's worker hosts, its client host and the Redis store, for one test."""

    def __init__(self, lab: netns.Lab, tmp_path) -> None:
        self.lab = lab
        self.tmp_path = tmp_path
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        self.redis = RedisServer(host=lab.gateway).start()
        self.client = lab.add_host("c")
        self.workers: dict[str, WorkerProcess] = {}
        self._client_proc: subprocess.Popen | None = None

    def start_worker(self, name: str, *args: str) -> WorkerProcess:
        """A new host ``name`` running a worker on port 5555 (concurrency 2 unless ``args`` say)."""
        host = self.lab.add_host(name)
        env = {"ENGINE_TEST_HOST": name, "ENGINE_TEST_BACKEND": self.redis.url,
               "ENGINE_TEST_ENDPOINT": f"tcp://{host.address}:{PORT}",
               "ENGINE_STATE_DIR": str(self.tmp_path / f"state-{name}")}
        worker = WorkerProcess("--bind", f"tcp://0.0.0.0:{PORT}", "--concurrency", "2", *args,
                               env=env, prefix=host.prefix())
        self.lab.started(worker.pid)
        self.workers[name] = worker.wait_ready()
        return worker

    def name_resolves_to(self, *names: str) -> None:
        """Make ``workers.test`` resolve, in the client host, to the addresses of these worker hosts."""
        self.client.write_hosts({NAME: [self.lab.hosts[name].address for name in names]})

    def send_batch(self, tasks: int, seconds: float, timeout: float = 150) -> None:
        """Start the client: ``tasks`` tasks of ``seconds`` each, sent to ``dns+tcp://workers.test:5555``."""
        self._report = self.tmp_path / "report.json"
        self._client_proc = subprocess.Popen(
            [*self.client.prefix(), sys.executable, "-m", "tests.netns_client", "--transport",
             f"dns+tcp://{NAME}:{PORT}", "--backend", self.redis.url, "--runs", str(self.runs),
             "--tasks", str(tasks), "--seconds", str(seconds), "--timeout", str(timeout), "--out", str(self._report)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lab.started(self._client_proc.pid)

    def report(self, timeout: float = 200) -> dict:
        """Wait for the client to finish its batch; its report."""
        proc = self._client_proc
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the client did not finish its batch in time") from None
        assert proc.returncode == 0, output
        return json.loads(self._report.read_text())

    def executions(self) -> dict[str, collections.Counter]:
        """Per host, how many times each task number ran."""
        ran: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for path in self.runs.glob("*.runs"):
            host = path.name.split("-", 1)[0]
            ran[host].update(int(line) for line in path.read_text().split())
        return ran

    def ran(self, host: str | None = None) -> int:
        """Executions so far, on ``host`` or everywhere."""
        ran = self.executions()
        return sum(sum(counter.values()) for name, counter in ran.items() if host in (None, name))

    def lost_and_duplicated(self, tasks: int) -> tuple[list[int], int]:
        """The task numbers that never ran, and how many executions were repeats."""
        total: collections.Counter = collections.Counter()
        for counter in self.executions().values():
            total.update(counter)
        lost = [number for number in range(tasks) if total[number] == 0]
        return lost, sum(count - 1 for count in total.values() if count > 1)

    def close(self) -> None:
        """Stop the workers, the client and Redis, by pid (the lab removes the rest)."""
        if self._client_proc is not None and self._client_proc.poll() is None:
            self._client_proc.kill()
            self._client_proc.wait(10)
        for worker in self.workers.values():
            worker.kill()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path):
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    with netns.Lab() as lab:
        cluster = Cluster(lab, tmp_path)
        try:
            yield cluster
        finally:
            cluster.close()


def _done_cleanly(report: dict, cluster: Cluster, tasks: int) -> int:
    """Assert every task finished and none was lost; the number of duplicate executions (reported)."""
    assert report["missing"] == [] and report["states"] == {"SUCCESS": tasks}, report
    lost, duplicates = cluster.lost_and_duplicated(tasks)
    assert lost == []
    print(f"\n{tasks} tasks: lost 0, duplicates {duplicates}, ran per host "
          f"{ {host: sum(c.values()) for host, c in sorted(cluster.executions().items())} }, {report['elapsed']} s")
    return duplicates


def test_tasks_spread_over_the_worker_hosts_a_name_resolves_to(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    cluster.send_batch(400, 0.005)
    report = cluster.report()
    duplicates = _done_cleanly(report, cluster, 400)
    assert duplicates == 0  # nothing failed: nothing ran twice
    assert cluster.ran("w1") >= 50 and cluster.ran("w2") >= 50


def test_a_worker_host_cut_off_mid_batch_loses_nothing(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1000
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 150, timeout=60, message="a quarter of the batch under way")
    cluster.lab.hosts["w1"].cut()
    on_w2 = cluster.ran("w2")
    # The client stops sending to the silent host and sends what it did not acknowledge elsewhere.
    wait_until(lambda: cluster.ran("w2") >= on_w2 + 300, timeout=90, message="the other host taking the work")
    # What the cut-off host had accepted (journaled) finishes there once it is back: nothing is lost.
    cluster.lab.hosts["w1"].reconnect()
    _done_cleanly(cluster.report(), cluster, tasks)


def test_a_worker_host_added_during_a_batch_takes_work_soon_after_the_name_resolves_to_it(cluster):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1500
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 100, timeout=60, message="the batch under way")
    cluster.start_worker("w3")
    cluster.name_resolves_to("w1", "w2", "w3")
    named = time.monotonic()
    wait_until(lambda: cluster.ran("w3") > 0, timeout=15, message="the new host taking work")
    delay = time.monotonic() - named
    print(f"\nthe new host ran its first task {delay:.2f} s after the name resolved to it")
    assert delay < 5.0  # refresh every 0.5 s: within a second or two, bounded generously
    _done_cleanly(cluster.report(), cluster, tasks)
    assert cluster.ran("w3") >= 50


def test_a_drained_worker_host_hands_its_tasks_back_and_leaves_an_empty_journal(cluster):
    journal = str(cluster.tmp_path / "w1-journal.db")
    first = cluster.start_worker("w1", "--shutdown-timeout", "10", "--journal", journal)
    cluster.start_worker("w2")
    cluster.name_resolves_to("w1", "w2")
    tasks = 1000
    cluster.send_batch(tasks, 0.02)
    wait_until(lambda: cluster.ran() >= 150, timeout=60, message="a quarter of the batch under way")
    cluster.name_resolves_to("w2")  # scaled down: the name no longer lists it ...
    assert first.stop(signal.SIGTERM, timeout=30) == 0  # ... and it is told to stop
    assert journal_rows(journal) == 0
    _done_cleanly(cluster.report(), cluster, tasks)
