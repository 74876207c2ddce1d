"""``python -m bench mesh``: what the client-worker mesh costs per host, measured, then computed for big meshes.

Every link between a client and a worker is one TCP connection. While idle it
carries the client's demand/heartbeat frame every producer ``HEARTBEAT``
(0.25 s, engine/transport/producer.py) and the worker's "alive" credit frame
every supervisor ``HEARTBEAT`` (1 s, engine/worker/supervisor.py). A full mesh
of W workers and C clients is W x C links; with ``transport_max_peers`` a
client links to at most that many of the workers a name resolves to, picked by
rendezvous hashing on its id (engine/transport/discovery.py).

This starts real ``engine-worker`` processes (concurrency 1, ``--no-journal``)
on loopback and, for a few mesh sizes, small client processes that start their
producer (which links to the workers) and then idle. Over an idle window it
measures, per process:

- links: ESTABLISHED TCP connections (psutil), and open file descriptors;
- frames: data segments sent per connection (``ss -ti``'s ``data_segs_out``;
  an idle frame is one small write, so one segment), split by direction; all
  segments (ACKs too) and bytes as well; the loopback interface's packets
  (psutil) are printed beside them, but they count the whole machine;
- memory: USS (``memory_full_info``) of each client and worker supervisor;
- CPU: user + system seconds over the window.

It fits a straight line (base + slope x links) to memory, CPU and descriptors
over all processes of all sizes, and computes, for 10 / 100 / 1,000 workers and
as many clients, the cost per host with and without ``transport_max_peers=64``.
A short probe also links one client to 1,000 and 1,100 addresses nobody listens
on: a ZeroMQ context holds at most ``MAX_SOCKETS`` (1023) sockets, one per link.

Clients are given ``dns+tcp://mesh.bench:1`` and resolve it, in their own
process, to the loopback workers' endpoints (``discovery.resolve`` replaced):
``transport_max_peers`` applies to DNS entries only, and workers on one box
listen on one address with distinct ports, which a real name cannot express.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil

from bench.harness import ROOT, Worker, cpu_seconds, stop_process

__all__ = ("Client", "extrapolate", "fit", "main", "measure", "tcp_counters")

#: The name clients are given; each client resolves it to the endpoints in MESH_ENDPOINTS.
NAME = "dns+tcp://mesh.bench:1"
#: Mesh sizes computed beyond what one box holds: workers = clients = each of these.
SCALES = (10, 100, 1000)
#: The bound computed beside "no bound" (the default of ``transport_max_peers``).
BOUND = 64
MIB = 1024 * 1024


def _heartbeats() -> tuple[float, float]:
    """Seconds between idle frames on a link: client to worker, worker to client (the code's constants)."""
    from engine.transport.producer import HEARTBEAT as CLIENT_EVERY
    from engine.worker.supervisor import HEARTBEAT as WORKER_EVERY

    return CLIENT_EVERY, WORKER_EVERY


# --- the client process ---------------------------------------------------------------


def _client_main() -> int:
    """Run inside a client process: link (start the producer), print ``linked N``, idle until SIGTERM."""
    endpoints = [e for e in os.environ.get("MESH_ENDPOINTS", "").split(",") if e]
    # The limit probe: addresses nobody listens on (port 9 of 127.1.x.y), distinct strings each.
    fake = int(os.environ.get("MESH_FAKE") or 0)
    endpoints += [f"tcp://127.1.{i // 250}.{i % 250 + 1}:9" for i in range(fake)]
    raw = os.environ.get("MESH_MAX_PEERS", "")
    from engine.transport import discovery

    # The name stands for these endpoints (see the module docstring); looked up again
    # every transport_dns_refresh seconds, as a real name would be, at no network cost here.
    discovery.resolve = lambda entry: list(endpoints)
    from engine import Engine

    app = Engine("mesh-client", transport=NAME)
    app.conf.update(transport_max_peers=int(raw) if raw else None)
    try:
        producer = app.producer  # created on first use: links to every chosen worker at once
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
        os._exit(1)
    # stats()["credit"] has one entry per linked worker, whatever it granted.
    print(f"linked {len(producer.stats()['credit'])}", flush=True)
    if os.environ.get("MESH_PROBE"):
        os._exit(0)  # nothing was sent: no flush at exit to wait for
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)


class Client:
    """One client process of the mesh (``python -m bench.mesh _client``), stopped by pid."""

    def __init__(self, endpoints: list[str], max_peers: int | None, fake: int = 0, probe: bool = False) -> None:
        env = {**os.environ, "MESH_ENDPOINTS": ",".join(endpoints),
               "MESH_MAX_PEERS": "" if max_peers is None else str(max_peers),
               "MESH_FAKE": str(fake), "MESH_PROBE": "1" if probe else ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.mesh", "_client"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.linked: int | None = None
        self.error: str | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self._ready = threading.Event()
        # Its output is read until it exits, so a full pipe can never block it.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("linked "):
                self.linked = int(line.split()[1])
                self._ready.set()
            elif line.startswith("error "):
                self.error = line[6:].strip()
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        """Wait until it linked; raise with its output if it failed or took longer than ``timeout``."""
        if not self._ready.wait(timeout) or self.linked is None:
            raise RuntimeError(f"client {self.pid} did not link within {timeout}s:\n" + "".join(self.lines))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of its session after 10 s."""
        stop_process(self.proc, grace=10)


def _stop_all(workers: list[Worker], clients: list[Client]) -> None:
    """Stop every process started, by pid: clients first, then workers (SIGTERM to all, then wait, then kill)."""
    for client in clients:
        try:
            client.stop()
        except Exception as exc:  # keep going: the others must stop too
            print(f"could not stop client {client.pid}: {exc}", file=sys.stderr)
    # Signal every worker before waiting for any: their warm shutdowns overlap.
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for worker in workers:
        try:
            worker.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired) as exc:  # keep going: the others must stop too
                print(f"could not stop worker {worker.proc.pid}: {exc}", file=sys.stderr)
        shutil.rmtree(worker.tmp, ignore_errors=True)


# --- measuring --------------------------------------------------------------------------

_FIELD = re.compile(r"\b(segs_out|data_segs_out|bytes_sent):(\d+)")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def tcp_counters(ports: set[int]) -> dict[tuple[str, str], tuple[str, dict[str, int]]]:
    """Per established connection touching ``ports`` (the workers'): ``(side, counters)``.

    ``side`` is ``"worker"`` for the worker's end (local port in ``ports``) and
    ``"client"`` for the client's; counters are what that end sent so far
    (``segs_out``, ``data_segs_out``, ``bytes_sent``; 0 when ``ss`` omits them).
    """
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    found: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}
    key: tuple[str, str] | None = None
    side = ""
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # "Recv-Q Send-Q Local:Port Peer:Port"
            fields = line.split()
            local, peer = fields[-2], fields[-1]
            key = None
            if _port(local) in ports:
                key, side = (local, peer), "worker"
            elif _port(peer) in ports:
                key, side = (local, peer), "client"
        elif key is not None:  # its details line
            counters = {"segs_out": 0, "data_segs_out": 0, "bytes_sent": 0}
            counters.update({name: int(value) for name, value in _FIELD.findall(line)})
            found[key] = (side, counters)
            key = None
    return found


def _established(proc: psutil.Process, ports: set[int], side: str) -> int:
    """Links of ``proc``: its established TCP connections to (client) or on (worker) the workers' ports."""
    count = 0
    for conn in proc.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr:
            continue
        port = conn.laddr.port if side == "worker" else conn.raddr.port
        count += port in ports
    return count


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds ``proc``'s threads ran so far, in nanoseconds' precision where the kernel has it.

    An idle client uses some milliseconds a second, and cpu_times() counts in 10 ms ticks:
    the threads' ``schedstat`` (their run time in ns) resolves a 10 s window far better.
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(proc)


def _lo() -> tuple[int, int]:
    counters = psutil.net_io_counters(pernic=True).get("lo")
    return (counters.packets_sent, counters.bytes_sent) if counters else (0, 0)


def measure(label: str, workers: list[Worker], clients: list[Client], cap: int | None, idle: float,
            ports: set[int]) -> dict:
    """Links, frames, memory and CPU of ``workers`` and ``clients`` over ``idle`` seconds of idling."""
    client_ps = [psutil.Process(c.pid) for c in clients]
    children = {w.proc.pid: w.ps.children() for w in workers}
    before_cpu = {p.pid: _cpu(p) for p in [*client_ps, *(w.ps for w in workers)]}
    before_children = {pid: sum(_cpu(c) for c in kids) for pid, kids in children.items()}
    before_tcp, before_lo, start = tcp_counters(ports), _lo(), time.monotonic()
    time.sleep(idle)
    after_tcp, after_lo, window = tcp_counters(ports), _lo(), time.monotonic() - start
    after_cpu = {p.pid: _cpu(p) for p in [*client_ps, *(w.ps for w in workers)]}
    after_children = {pid: sum(_cpu(c) for c in kids) for pid, kids in children.items()}

    def pct(pid: int) -> float:
        return round(100 * (after_cpu[pid] - before_cpu[pid]) / window, 3)

    client_rows = [{"links": _established(p, ports, "client"), "fds": p.num_fds(),
                    "uss_mib": round(p.memory_full_info().uss / MIB, 2), "rss_mib": round(p.memory_info().rss / MIB, 2),
                    "cpu_pct": pct(p.pid)} for p in client_ps]
    worker_rows = []
    for w in workers:
        kids = children[w.proc.pid]
        worker_rows.append({
            "links": _established(w.ps, ports, "worker"), "fds": w.ps.num_fds(),
            "uss_mib": round(w.ps.memory_full_info().uss / MIB, 2), "rss_mib": round(w.ps.memory_info().rss / MIB, 2),
            "cpu_pct": pct(w.proc.pid),
            "child_uss_mib": round(sum(c.memory_full_info().uss for c in kids) / MIB, 2),
            "child_cpu_pct": round(100 * (after_children[w.proc.pid] - before_children[w.proc.pid]) / window, 3)})
    # Only connections alive over the whole window count (a link that came or went would skew the rate).
    sums = {side: collections.Counter() for side in ("client", "worker")}
    links = collections.Counter()
    for key, (side, after) in after_tcp.items():
        if key in before_tcp:
            before = before_tcp[key][1]
            sums[side].update({name: after[name] - before[name] for name in after})
            links[side] += 1

    def per_link(side: str, name: str) -> float:
        return round(sums[side][name] / window / links[side], 3) if links[side] else 0.0

    return {
        "label": label, "workers": sum(1 for r in worker_rows if r["links"]), "clients": len(clients),
        "max_peers": cap, "window_s": round(window, 2), "client": client_rows, "worker": worker_rows,
        "links_seen": links["worker"],
        "frames": {  # per link per second, as measured by ss over the window
            "client_to_worker": per_link("client", "data_segs_out"),
            "worker_to_client": per_link("worker", "data_segs_out"),
            "segments_both_ways": round(per_link("client", "segs_out") + per_link("worker", "segs_out"), 3),
            "bytes_both_ways": round(per_link("client", "bytes_sent") + per_link("worker", "bytes_sent"), 1),
        },
        "lo_packets_per_s": round((after_lo[0] - before_lo[0]) / window, 1),
        "lo_bytes_per_s": round((after_lo[1] - before_lo[1]) / window, 1),
    }


def _wait_linked(clients: list[Client], ports: set[int], timeout: float) -> None:
    """Wait until every client's links are established TCP connections (ZeroMQ connects in the background)."""
    deadline = time.monotonic() + timeout
    for client in clients:
        proc = psutil.Process(client.pid)
        while _established(proc, ports, "client") < (client.linked or 0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"client {client.pid}: links not established within {timeout}s")
            time.sleep(0.1)


def _probe(count: int, cap: int | None) -> str:
    """Link one client to ``count`` addresses nobody listens on: ``linked N`` or the error it got."""
    client = Client([], cap, fake=count, probe=True)
    try:
        client._ready.wait(60)
        return f"linked {client.linked}" if client.linked is not None else f"failed: {client.error or 'no answer'}"
    finally:
        client.stop()


# --- fitting and computing ----------------------------------------------------------------


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(base, slope)`` of ``y = base + slope * x`` (slope 0 when every x is the same)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def _fits(results: list[dict]) -> dict:
    """Base and per-link slope of memory, CPU and descriptors, for clients and for worker supervisors."""
    out = {}
    for side in ("client", "worker"):
        # A client without links is left out: its ZeroMQ context starts its I/O thread with
        # its first socket, a fixed cost that would show as per-link cost. A worker without
        # clients has its ROUTER socket already, so it is the base of the line.
        rows = [row for result in results for row in result[side] if row["links"] or side == "worker"]
        out[side] = {name: fit([(row["links"], row[name]) for row in rows]) for name in ("uss_mib", "cpu_pct", "fds")}
    workers = [row for result in results for row in result["worker"]]
    out["worker_child"] = {"uss_mib": sum(r["child_uss_mib"] for r in workers) / len(workers),
                           "cpu_pct": sum(r["child_cpu_pct"] for r in workers) / len(workers)}
    return out


def extrapolate(fits: dict, scales=SCALES, bound: int = BOUND) -> list[dict]:
    """Cost per host at ``scales`` workers and as many clients, unbounded and with ``bound`` (computed).

    A client links to min(W, bound) workers; a worker then has C x min(W, bound) / W
    clients on average. Frames per link per second come from the heartbeat constants
    (the measurement checks them); memory, CPU and descriptors are base + slope x links.
    """
    client_every, worker_every = _heartbeats()
    rows = []
    for n in scales:
        for cap in (None, bound):
            per_client = min(n, cap) if cap else n
            workers = clients = n
            per_worker = clients * per_client / workers  # every client's links, spread over the workers

            def cost(side: str, links: float) -> dict:
                f = fits[side]
                return {name: f[name][0] + f[name][1] * links for name in f}

            rows.append({
                "workers": workers, "clients": clients, "max_peers": cap,
                "client_links": per_client, "worker_links": per_worker,
                "client_frames_out": per_client / client_every, "client_frames_in": per_client / worker_every,
                "worker_frames_out": per_worker / worker_every, "worker_frames_in": per_worker / client_every,
                "client": cost("client", per_client), "worker": cost("worker", per_worker),
                "mesh_links": clients * per_client,
                "mesh_frames": clients * per_client * (1 / client_every + 1 / worker_every),
            })
    return rows


# --- printing -----------------------------------------------------------------------------


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _print(report: dict) -> None:
    client_every, worker_every = _heartbeats()
    print(f"\n{report['machine']}, {report['date']}; idle window {report['idle_s']} s per size.\n")
    print("MEASURED (real processes on loopback; frames = TCP data segments per connection from `ss -ti`):\n")
    header = ["size", "max_peers", "links per client", "links per worker (min / mean / max)",
              "frames/s per link c->w / w->c", "segments, bytes /s per link (both ways)",
              "client USS MiB", "worker supervisor USS MiB", "client CPU %", "worker supervisor CPU %",
              "fds client / worker"]
    rows = []
    for r in report["measured"]:
        busy = [w for w in r["worker"] if w["links"]]
        rows.append([
            r["label"], str(r["max_peers"] or "none"), f"{_mean(c['links'] for c in r['client'] if c['links']):.1f}",
            f"{min((w['links'] for w in busy), default=0)} / {_mean(w['links'] for w in busy):.1f} / "
            f"{max((w['links'] for w in busy), default=0)}",
            f"{r['frames']['client_to_worker']:.2f} / {r['frames']['worker_to_client']:.2f}",
            f"{r['frames']['segments_both_ways']:.2f}, {r['frames']['bytes_both_ways']:.0f} B",
            f"{_mean(c['uss_mib'] for c in r['client'] if c['links']):.2f}", f"{_mean(w['uss_mib'] for w in busy):.2f}",
            f"{_mean(c['cpu_pct'] for c in r['client'] if c['links']):.3f}", f"{_mean(w['cpu_pct'] for w in busy):.3f}",
            f"{_mean(c['fds'] for c in r['client'] if c['links']):.0f} / {_mean(w['fds'] for w in busy):.0f}"])
    _table(header, rows)
    for r in report["measured"]:
        print(f"  {r['label']}: loopback (whole machine) {r['lo_packets_per_s']:,.0f} packets/s, "
              f"{r['lo_bytes_per_s']:,.0f} B/s; these {r['links_seen']} links' segments (ss): "
              f"{r['links_seen'] * r['frames']['segments_both_ways']:,.0f}/s")
    base = report.get("baseline", {})
    if base:
        print(f"  no links: client USS {base['client_uss_mib']:.2f} MiB, CPU {base['client_cpu_pct']:.3f} %; "
              f"worker supervisor USS {base['worker_uss_mib']:.2f} MiB, CPU {base['worker_cpu_pct']:.3f} %")
    # USS is what one more process costs; RSS adds shared libraries and, for the supervisor,
    # the pages it shares with its children since the fork.
    linked = [row for r in report["measured"] for row in r["client"] if row["links"]]
    workers = [row for r in report["measured"] for row in r["worker"]]
    print(f"  RSS, mean: client {_mean(c['rss_mib'] for c in linked):.1f} MiB, worker supervisor "
          f"{_mean(w['rss_mib'] for w in workers):.1f} MiB (+ its child's USS "
          f"{_mean(w['child_uss_mib'] for w in workers):.1f} MiB)")
    f = report["fits"]
    print(f"\nFITTED over every process above (base + slope x links), from {client_every} s / {worker_every} s "
          f"heartbeats = {1 / client_every:.0f} + {1 / worker_every:.0f} frames/s per link expected:")
    for side in ("client", "worker"):
        print(f"  {side}: USS {f[side]['uss_mib'][0]:.2f} MiB + {f[side]['uss_mib'][1] * 1024:.1f} KiB/link; "
              f"CPU {f[side]['cpu_pct'][0]:.3f} % + {f[side]['cpu_pct'][1]:.4f} %/link; "
              f"fds {f[side]['fds'][0]:.0f} + {f[side]['fds'][1]:.2f}/link")
    print(f"  worker's child (concurrency 1, not per link): USS {f['worker_child']['uss_mib']:.2f} MiB, "
          f"CPU {f['worker_child']['cpu_pct']:.3f} %")
    print("  probe, one client, addresses nobody listens on: "
          + "; ".join(f"{k}: {v}" for k, v in report["probe"].items()))
    print("\nCOMPUTED per host (links from the rule, frames from the constants, the rest from the fits), "
          "workers = clients:\n")
    header = ["workers x clients", "max_peers", "links per client / worker", "client frames/s out / in",
              "worker frames/s out / in", "client USS MiB", "worker supervisor USS MiB", "client CPU %",
              "worker supervisor CPU %", "fds client / worker", "mesh links", "mesh frames/s"]
    rows = [[f"{r['workers']:,} x {r['clients']:,}", str(r["max_peers"] or "none"),
             f"{r['client_links']:,.0f} / {r['worker_links']:,.0f}",
             f"{r['client_frames_out']:,.0f} / {r['client_frames_in']:,.0f}",
             f"{r['worker_frames_out']:,.0f} / {r['worker_frames_in']:,.0f}",
             f"{r['client']['uss_mib']:.1f}", f"{r['worker']['uss_mib']:.1f}",
             f"{r['client']['cpu_pct']:.2f}", f"{r['worker']['cpu_pct']:.2f}",
             f"{r['client']['fds']:,.0f} / {r['worker']['fds']:,.0f}",
             f"{r['mesh_links']:,.0f}", f"{r['mesh_frames']:,.0f}"] for r in report["computed"]]
    _table(header, rows)


# --- the run --------------------------------------------------------------------------------


def _start_workers(count: int) -> list[Worker]:
    """``count`` idle workers started side by side (each waits for its own banner); all or none."""
    futures: list[concurrent.futures.Future] = []
    ok = False
    try:
        # Leaving the block waits for every start, also on Ctrl-C: none is left unaccounted for.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(Worker, 1, "--no-journal") for _ in range(count)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} of {count} workers did not start: {errors[0]}")
        ok = True
    finally:
        started = [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
        if not ok:
            _stop_all(started, [])
    return started


def _start_clients(count: int, endpoints: list[str], cap: int | None, into: list[Client]) -> list[Client]:
    """``count`` clients of ``endpoints``, appended to ``into`` as they start (so a failure still stops them)."""
    batch = []
    for _ in range(count):
        client = Client(endpoints, cap)
        into.append(client)
        batch.append(client)
    for client in batch:
        client.wait_ready(90)
    return batch


def run(options: argparse.Namespace) -> dict:
    """Measure the sizes that fit on this box, fit, extrapolate; every process started is stopped."""
    from engine.transport.protocol import PEER_TIMEOUT

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
                    "date": time.strftime("%Y-%m-%d"), "idle_s": options.idle, "measured": []}
    # The limit probe first, while nothing else runs: a ZeroMQ context holds 1023 sockets, one per link.
    report["probe"] = {f"{count:,} addresses, max_peers {cap or 'none'}": _probe(count, cap)
                       for count, cap in ((1000, None), (1100, None), (1100, BOUND))}
    workers: list[Worker] = []
    clients: list[Client] = []
    try:
        print(f"starting {options.workers} workers ...", file=sys.stderr)
        workers = _start_workers(options.workers)
        endpoints = [w.endpoint for w in workers]
        ports = {int(e.rsplit(":", 1)[1]) for e in endpoints}
        small = max(1, options.workers // 2)
        plans = [(f"{small} x {options.small_clients}", small, options.small_clients, None),
                 (f"{options.workers} x {options.clients}", options.workers, options.clients, options.cap),
                 (f"{options.workers} x {options.clients}", options.workers, options.clients, None)]
        for number, (label, used, count, cap) in enumerate(plans):
            print(f"{label} (max_peers {cap or 'none'}): starting {count} clients ...", file=sys.stderr)
            batch = _start_clients(count, endpoints[:used], cap, clients)
            # The first size also has a client with no link: the intercept of the fits.
            lone = _start_clients(1, [], None, clients) if number == 0 else []
            _wait_linked(batch, ports, 30)
            time.sleep(options.settle)  # hellos answered, first credit frames exchanged
            print(f"  idle {options.idle} s ...", file=sys.stderr)
            result = measure(label, workers, batch + lone, cap, options.idle, ports)
            if lone:
                idle_workers = [w for w in result["worker"] if not w["links"]]
                report["baseline"] = {"client_uss_mib": result["client"][-1]["uss_mib"],
                                      "client_cpu_pct": result["client"][-1]["cpu_pct"],
                                      "worker_uss_mib": _mean(w["uss_mib"] for w in idle_workers),
                                      "worker_cpu_pct": _mean(w["cpu_pct"] for w in idle_workers)}
            report["measured"].append(result)
            for client in batch + lone:
                client.stop()
                clients.remove(client)
            if number + 1 < len(plans):
                # Workers forget a client once it is silent for PEER_TIMEOUT: wait, so the next
                # size's worker figures carry no state (nor heartbeats) for these clients.
                time.sleep(PEER_TIMEOUT + 1.5)
    finally:
        _stop_all(workers, clients)
    report["fits"] = _fits(report["measured"])
    report["computed"] = extrapolate(report["fits"])
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m bench mesh [options]`` (and ``_client``, the client processes' entry point)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return _client_main()
    parser = argparse.ArgumentParser(prog="python -m bench mesh", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=20, help="workers started (default 20)")
    parser.add_argument("--clients", type=int, default=50, help="clients of the large sizes (default 50)")
    parser.add_argument("--small-clients", type=int, default=10,
                        help="clients of the small size, linked to half the workers (default 10)")
    parser.add_argument("--cap", type=int, default=4, help="transport_max_peers of the bounded size (default 4)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idling measured per size (default 10)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between linking and measuring (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    options = parser.parse_args(argv)
    report = run(options)
    _print(report)
    if options.json:
        with open(options.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
