"""Several "hosts" on this machine for the tests: network namespaces joined by a bridge.

A :class:`Lab` makes one Linux bridge in the test's own namespace and, per
host, a network namespace linked to the bridge by a veth pair, with its own
address on a private subnet. Programs run in a host with ``ip netns exec``,
which also bind-mounts ``/etc/netns/NS/hosts`` over ``/etc/hosts``: that is how
a host gets a name resolving to other hosts, as a DNS round-robin name or a
Kubernetes headless Service would. Cutting a host off sets its end of the
link down (packets are dropped, no connection is reset), as a failed switch
port or a partitioned node does.

Everything the lab makes (namespaces, links, hosts files, processes started
in the hosts) is removed by :meth:`Lab.close`, by name and by pid. Nothing
leaves the machine: the subnet is private and the bridge has no uplink.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

__all__ = ("Lab", "unavailable")

#: Where ``ip netns exec`` looks for a namespace's own copy of files under /etc.
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """None when this process can build network namespaces here, else why not."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    probe = f"eprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Host:
    """One namespace of the lab: its name, address and the interface that links it to the bridge."""

    def __init__(self, lab: Lab, name: str, address: str, namespace: str, link: str) -> None:
        self.lab = lab
        self.name = name
        self.address = address
        self.namespace = namespace
        #: The veth end on the bridge's side: down means the host is cut off.
        self.link = link

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside this host."""
        return ["ip", "netns", "exec", self.namespace]

    def write_hosts(self, entries: dict[str, list[str]]) -> None:
        """Make ``/etc/hosts`` inside this host map each name to its addresses.

        Written in place (same file), so programs already running in the host
        see the change at their next lookup: the bind mount follows the inode.
        """
        lines = ["127.0.0.1 localhost"]
        lines += [f"{address} {name}" for name, addresses in entries.items() for address in addresses]
        path = NETNS_ETC / self.namespace / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fh.seek(0)
            fh.truncate()
            fh.write("\n".join(lines) + "\n")

    def cut(self) -> None:
        """Cut the host off the network (its link down; packets dropped, connections not reset)."""
        _ip("link", "set", self.link, "down")

    def reconnect(self) -> None:
        """Bring the host's link back up."""
        _ip("link", "set", self.link, "up")


class Lab:
    """A bridge and the hosts on it; a context manager that removes everything it made."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        # A private /24 of its own (by its tag), so labs of runs side by side do not meet.
        self.subnet = f"10.213.{int(self.tag[:2], 16)}"
        self.bridge = f"ebr{self.tag}"
        self.hosts: dict[str, Host] = {}
        self._pids: list[int] = []
        try:
            # A fixed address: a bridge otherwise takes the lowest of its ports' and changes it when
            # a host joins or is cut off, and the hosts' cached ARP entries for the store go stale.
            _ip("link", "add", self.bridge, "address", f"02:00:00:00:{self.tag[:2]}:{self.tag[2:]}",
                "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @property
    def gateway(self) -> str:
        """The address of this (the test's) namespace on the bridge: a "store" host for shared services."""
        return f"{self.subnet}.254"

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge with the next free address."""
        number = len(self.hosts) + 1
        namespace = f"e{self.tag}{name}"
        outside, inside = f"v{self.tag}{name}", f"i{self.tag}{name}"
        address = f"{self.subnet}.{number}"
        _ip("netns", "add", namespace)
        self.hosts[name] = host = Host(self, name, address, namespace, outside)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", namespace)
        run = ["netns", "exec", namespace, "ip"]
        _ip(*run, "link", "set", "lo", "up")
        _ip(*run, "addr", "add", f"{address}/24", "dev", inside)
        _ip(*run, "link", "set", inside, "up")
        host.write_hosts({})
        return host

    def started(self, pid: int) -> int:
        """Remember a process started in a host, to be killed by :meth:`close` if still there."""
        self._pids.append(pid)
        return pid

    def close(self) -> None:
        """Kill what runs in the hosts, then remove the namespaces, links, bridge and hosts files."""
        for pid in self._pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for host in self.hosts.values():
            listed = _ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in listed:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("link", "del", host.link, check=False)
            _ip("netns", "del", host.namespace, check=False)
            shutil.rmtree(NETNS_ETC / host.namespace, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
