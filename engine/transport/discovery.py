"""Workers found by DNS: a transport entry ``dns+tcp://NAME:PORT`` stands for every address NAME resolves to.

A Kubernetes headless Service, a DNS round-robin name or ``/etc/hosts`` lists
the workers; the client resolves the name when it starts and again every
``transport_dns_refresh`` seconds, connects to each new address at once, and
stops using an address that is gone (what it sent there and was not
acknowledged goes to another worker, as for a worker that died). Plain
``tcp://``, ``ipc://`` entries can be mixed in and stay as they are.

A client links to at most ``transport_max_peers`` of the resolved workers,
picked by rendezvous hashing on its id: many clients spread over the workers,
and a change in the name's addresses moves few links.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from engine.exceptions import ImproperlyConfigured

__all__ = ("SCHEME", "EndpointSet", "expand", "is_dns", "rendezvous", "resolve")

logger = logging.getLogger("engine.transport")

#: The prefix of a transport entry resolved by DNS.
SCHEME = "dns+"


def is_dns(endpoint: str) -> bool:
    """True for a ``dns+tcp://NAME:PORT`` entry."""
    return endpoint.startswith(SCHEME)


def resolve(endpoint: str) -> list[str]:
    """The ``tcp://ADDRESS:PORT`` endpoints a ``dns+tcp://NAME:PORT`` entry stands for now, sorted.

    Raises ImproperlyConfigured for an entry that is not ``dns+tcp://NAME:PORT``
    and OSError when the name does not resolve.
    """
    parts = urlsplit(endpoint[len(SCHEME):])
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ImproperlyConfigured(f"a DNS transport entry looks like dns+tcp://NAME:PORT, got {endpoint!r}")
    infos = socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"tcp://[{a}]:{parts.port}" if ":" in a else f"tcp://{a}:{parts.port}" for a in addresses]


def rendezvous(endpoints: Iterable[str], key: str, most: int | None) -> list[str]:
    """The ``most`` of ``endpoints`` that rank highest for ``key`` (highest random weight), sorted."""
    endpoints = sorted(set(endpoints))
    if most is None or len(endpoints) <= most:
        return endpoints

    def weight(endpoint: str) -> bytes:
        return hashlib.blake2b(f"{key}|{endpoint}".encode(), digest_size=8).digest()

    return sorted(sorted(endpoints, key=weight, reverse=True)[:most])


def expand(entries: Iterable[str]) -> list[str]:
    """Every concrete endpoint of ``entries`` now (DNS names resolved; all their addresses)."""
    out: list[str] = []
    for entry in entries:
        out += resolve(entry) if is_dns(entry) else [entry]
    return out


class EndpointSet:
    """A client's transport entries, resolved: what it should be linked to now."""

    def __init__(self, entries: Iterable[str], key: str, most: int | None = None, refresh: float = 5.0) -> None:
        self.entries = list(entries)
        self.key = key
        self.most = most
        self.refresh = refresh
        #: True when some entry is resolved by DNS (the set can change).
        self.dynamic = any(is_dns(entry) for entry in self.entries)
        self._known: dict[str, list[str]] = {}
        self.next_refresh = 0.0

    def current(self, now: float | None = None) -> list[str]:
        """The concrete endpoints to link to (a name that fails to resolve keeps its last addresses)."""
        now = time.monotonic() if now is None else now
        self.next_refresh = now + self.refresh
        static: list[str] = []
        resolved: list[str] = []
        for entry in self.entries:
            if not is_dns(entry):
                static.append(entry)
                continue
            try:
                self._known[entry] = resolve(entry)
            except OSError as exc:
                logger.warning("could not resolve %s (%s): keeping its %d last address(es)", entry, exc,
                               len(self._known.get(entry, [])))
            resolved += self._known.get(entry, [])
        return static + rendezvous(resolved, self.key, self.most)
