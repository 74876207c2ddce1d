"""Workers found by DNS (issue 17, part): dns+tcp://NAME:PORT resolved again and again, a bounded mesh."""

from __future__ import annotations

import collections
import time

import pytest

from engine.exceptions import ImproperlyConfigured
from engine.transport import discovery
from engine.transport.discovery import EndpointSet, rendezvous, resolve
from tests.worker_helpers import free_port


def test_a_dns_entry_resolves_to_every_address_of_its_name():
    assert "tcp://127.0.0.1:5000" in resolve("dns+tcp://localhost:5000")
    for bad in ("dns+ipc:///tmp/x", "dns+tcp://no-port-here", "dns+tcp://:5000"):
        with pytest.raises(ImproperlyConfigured, match="dns\\+tcp://NAME:PORT"):
            resolve(bad)
    with pytest.raises(OSError):
        resolve("dns+tcp://name-that-does-not-exist.invalid:5000")


def test_rendezvous_spreads_clients_and_moves_few_links_when_a_worker_goes():
    workers = [f"tcp://10.0.0.{i}:5555" for i in range(10)]
    picks = {f"client-{c}": rendezvous(workers, f"client-{c}", 3) for c in range(300)}
    assert all(len(chosen) == 3 for chosen in picks.values())
    load = collections.Counter(w for chosen in picks.values() for w in chosen)
    assert min(load.values()) > 50 and max(load.values()) < 130  # about 90 each
    gone = workers[4]
    after = {client: rendezvous([w for w in workers if w != gone], client, 3) for client in picks}
    moved = sum(1 for client in picks if set(picks[client]) != set(after[client]))
    assert moved == load[gone]  # only the clients linked to the worker that went change a link
    assert rendezvous(workers[:2], "x", 3) == sorted(workers[:2])


def test_a_name_that_stops_resolving_keeps_its_last_addresses(monkeypatch):
    answers = [["tcp://127.0.0.2:7000", "tcp://127.0.0.3:7000"], OSError("DNS is down")]

    def fake(entry):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(discovery, "resolve", fake)
    endpoints = EndpointSet(["dns+tcp://workers.test:7000", "ipc:///tmp/static"], "client-1", most=None)
    assert endpoints.dynamic
    first = endpoints.current()
    assert first == ["ipc:///tmp/static", "tcp://127.0.0.2:7000", "tcp://127.0.0.3:7000"]
    assert endpoints.current() == first


@pytest.mark.slow
def test_a_client_follows_the_workers_a_name_resolves_to(monkeypatch, tmp_path):
    from tests import workerapp
    from tests.worker_helpers import WorkerProcess

    port = free_port("127.0.0.2", "127.0.0.3")
    first, second = f"tcp://127.0.0.2:{port}", f"tcp://127.0.0.3:{port}"
    answer = [first]
    monkeypatch.setattr(discovery, "resolve", lambda entry: list(answer))
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    workers = []
    app = workerapp.app
    app.close()
    app.conf.update(transport=f"dns+tcp://workers.test:{port}", result_backend=backend, transport_bind=False,
                    transport_dns_refresh=0.3, producer_flush_timeout=30)
    try:
        for index, endpoint in enumerate((first, second)):
            env = {"ENGINE_TEST_ENDPOINT": endpoint, "ENGINE_TEST_BACKEND": backend,
                   "ENGINE_STATE_DIR": str(tmp_path / f"state{index}")}
            workers.append(WorkerProcess("--bind", endpoint, "--concurrency", "1", env=env).wait_ready())
        pids = [{p.pid for p in worker.children()} for worker in workers]

        def where(results):
            ran = collections.Counter()
            for result in results:
                pid = result.get(timeout=30)
                ran[next(i for i, children in enumerate(pids) if pid in children)] += 1
            return ran

        # 10 ms tasks: the first worker's credit window (about 50 ms of work per child) then holds a
        # few, not all 200 of the burst below, which would all go to whichever worker granted first.
        assert where([workerapp.whoami.delay(0.01) for _ in range(40)]) == {0: 40}  # only the first is named
        answer.append(second)  # a second worker host joins the name
        time.sleep(1.0)  # a refresh or two
        ran = where([workerapp.whoami.delay(0.01) for _ in range(200)])
        assert ran[1] > 0 and ran[0] > 0  # it takes work within seconds
        answer.remove(first)  # the first leaves the name
        time.sleep(1.0)
        assert where([workerapp.whoami.delay(0.01) for _ in range(40)]) == {1: 40}
    finally:
        app.close()
        for worker in workers:
            worker.kill()


def test_a_connecting_worker_follows_the_producers_a_name_resolves_to(monkeypatch):
    import zmq

    from engine.transport.consumer import Consumer

    answer = ["tcp://127.0.0.2:7001"]
    monkeypatch.setattr(discovery, "resolve", lambda entry: list(answer))
    context = zmq.Context()
    consumer = Consumer(context, "worker-1", [], ["dns+tcp://producers.test:7001", "tcp://127.0.0.9:7002"], ["q"],
                        1 << 20, dns_refresh=0.5)
    try:
        linked = lambda: sorted(peer.key for peer in consumer.peers)  # noqa: E731
        assert linked() == ["tcp://127.0.0.2:7001", "tcp://127.0.0.9:7002"] and len(consumer.sockets) == 2
        before = consumer.generation
        answer[:] = ["tcp://127.0.0.3:7001"]  # the producer moved
        now = time.monotonic()
        consumer.refresh_links(now)  # not due yet: nothing changes
        assert linked() == ["tcp://127.0.0.2:7001", "tcp://127.0.0.9:7002"]
        consumer.refresh_links(now + 1.0)
        assert linked() == ["tcp://127.0.0.3:7001", "tcp://127.0.0.9:7002"]  # the static entry stays
        assert len(consumer.sockets) == 2 and consumer.generation > before
        assert all(not sock.closed for sock in consumer.sockets)
    finally:
        consumer.close()
        context.term()
