"""Rate limits: the task option ``rate_limit`` ("100/s", "10/m", "2/h", or a number per second).

Per worker (the default)
    As in Celery, a limit applies per worker and per task name. A task over
    its limit is not refused and does not spin: the supervisor reserves the
    next free slot of its kind and holds the task in its timer heap until
    then (where ETA tasks wait, journaled the same way), so tasks of other
    kinds go on meanwhile. Slots are spaced evenly (``1/rate`` apart): a
    burst of N tasks of a kind limited to R per second runs over N/R
    seconds, in the order they came.

Shared by the cluster (``rate_limit_url``)
    Per worker, ten workers of a task limited to "10/s" run it 100 times a
    second. Celery's limits are per worker only, a long-standing complaint
    (celery/celery#5732). Here, ``app.conf.rate_limit_url = "redis://host:6379/0"``
    (or ``rediss://``, ``unix:///path/redis.sock``) makes every worker of the
    app take its slots from one schedule per task name in that Redis
    (:class:`RedisRateLimiter`): ten workers then run that task 10 times a
    second between them. The schedule is the "next free slot" of the name
    (GCRA, the virtual-scheduling form of a token bucket without burst),
    moved by one Lua script, so reservations from many workers are atomic;
    the script reads Redis's clock and answers a delay, not a time, so hosts
    whose clocks disagree still share one schedule. To cut the round trips
    of the supervisor's single-threaded loop, each script call reserves a
    lease of the slots that cover :data:`LEASE_SECONDS`; when Redis does not
    answer, limits fall back to per worker until it does (see the class).
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from engine.exceptions import ImproperlyConfigured

__all__ = ("KEY_PREFIX", "LEASE_SECONDS", "RESERVE_SCRIPT", "RateLimiter", "RedisRateLimiter", "parse_rate")

logger = logging.getLogger(__name__)

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([smh]))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(value: object) -> float | None:
    """Tasks per second of a ``rate_limit`` value (None or 0: no limit); raises ValueError on a bad one."""
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"rate_limit must be >= 0, got {value!r}")
        return float(value)
    match = _RATE.match(str(value))
    if match is None:
        raise ValueError(f"rate_limit takes Celery's syntax ('100/s', '10/m', '2/h' or a number), got {value!r}")
    rate = float(match.group(1)) / _PER[match.group(2)]
    return rate or None


class RateLimiter:
    """The next free slot of each rate-limited task name (unix time)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._rates: dict[str, float | None] = {}

    def rate_of(self, task: object) -> float | None:
        """Tasks per second allowed for ``task`` (its ``rate_limit``), None when unlimited; cached per name."""
        name = getattr(task, "name", "")
        if name not in self._rates:
            try:
                self._rates[name] = parse_rate(getattr(task, "rate_limit", None))
            except ValueError:
                self._rates[name] = None  # reported when the task was registered; unlimited here
        return self._rates[name]

    def reserve(self, name: str, rate: float, now: float | None = None) -> float:
        """Reserve the next slot of ``name`` at ``rate`` per second: when the task may start (unix time)."""
        now = time.time() if now is None else now
        slot = max(now, self._next.get(name, 0.0))
        self._next[name] = slot + 1.0 / rate
        return slot

    def close(self) -> None:
        """Release what the limiter holds (nothing here; a connection in :class:`RedisRateLimiter`)."""


#: Prefix of the Redis key holding a task name's next free slot (``engine-rate:<task name>``).
KEY_PREFIX = "engine-rate:"
#: Seconds of slots one script call reserves for a name (at least one slot): see :class:`RedisRateLimiter`.
LEASE_SECONDS = 0.05
#: A leased slot at most this late (seconds, and at most half a slot) is still used; one later is wasted.
JUST_DUE = 0.002
#: Seconds between two attempts to reach Redis while it does not answer (limits per worker meanwhile).
RETRY_AFTER = 5.0
#: Connect and read timeout (seconds) of a reservation: the supervisor's loop waits that long at worst.
SOCKET_TIMEOUT = 0.25

#: KEYS[1]: the name's next free slot, in microseconds of Redis's clock. ARGV[1]: microseconds
#: between two slots (1/rate); ARGV[2]: how many consecutive slots to reserve. Returns the delay
#: of the first one from Redis's now and that now (microseconds). The key expires a second after
#: its last slot: by then max(now, next) is now, so an idle name costs no memory.
RESERVE_SCRIPT = """
-- Before Redis 5, TIME before a write needs effects replication (since 7, the call is gone or a no-op).
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local first = math.max(now, tonumber(redis.call('GET', KEYS[1]) or 0))
local after = first + tonumber(ARGV[1]) * tonumber(ARGV[2])
-- %.0f: tostring() of a number this large would round it to 14 digits
redis.call('SET', KEYS[1], string.format('%.0f', after),
           'PX', string.format('%.0f', math.ceil((after - now) / 1000) + 1000))
return {first - now, now}
"""


class _Lease:
    """Consecutive slots of one name reserved in Redis, handed out locally (unix times)."""

    __slots__ = ("count", "first", "grace", "interval", "rate", "taken")

    def __init__(self, first: float, interval: float, count: int, rate: float) -> None:
        self.first, self.interval, self.count, self.rate = first, interval, count, rate
        self.taken = 0
        self.grace = min(JUST_DUE, interval / 2)

    def take(self, now: float) -> float | None:
        """The next slot not yet past (None when none is left)."""
        # first + n * interval rather than a running sum: no rounding drift at unix-time magnitudes.
        slot = self.first + self.taken * self.interval
        if slot < now - self.grace:
            # Past slots are wasted, not used late: a late start would crowd the slot after it,
            # which may be another worker's, and the cluster would run above its rate.
            self.taken = math.ceil((now - self.grace - self.first) / self.interval)
            slot = self.first + self.taken * self.interval
        if self.taken >= self.count:
            return None
        self.taken += 1
        return slot


def _redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    return re.sub(r"//[^/@]*@", "//***@", url)


class RedisRateLimiter(RateLimiter):
    """Slots shared by every worker using one Redis (``rate_limit_url``); per worker while it is down.

    :meth:`reserve` takes the name's slots from :data:`RESERVE_SCRIPT`, one
    atomic script per call, so two workers never get the same slot and their
    slots are ``1/rate`` apart on Redis's clock. The script answers delays
    from Redis's now, turned into this host's time on arrival (its clock,
    right after the reply), so clock skew between hosts does not matter; a
    slot is late on this host's clock by at most the round trip, never early.

    Leases (the cost trade-off): the supervisor runs one thread, and a round
    trip per limited task would stall everything it does. One script call
    therefore reserves the consecutive slots covering :data:`LEASE_SECONDS`
    at the task's rate (at least one), and later tasks of the name take them
    locally: at 1000/s that is one call per 50 tasks, at 10/s one per task
    (which is cheap at that rate). A leased slot is used only while it is
    in the future or just due (:data:`JUST_DUE`); slots left when a burst
    ends, or passed while no task of the name came, are wasted, never used
    late, so the cluster never runs above the limit. The price: a worker
    that stops receiving a name may leave up to ``LEASE_SECONDS`` of its
    slots unused, so the cluster can run a little below the limit when bursts
    are short; and another worker's next task may wait behind such a lease.

    Outages: when Redis does not answer (or errors), the task is not held or
    lost; its slot comes from the per-worker limiter (this class's base), so
    **while Redis is unreachable the limit applies per worker**, as without
    ``rate_limit_url``. One warning is logged per outage, and Redis is tried
    again every :data:`RETRY_AFTER` seconds. An attempt holds the loop at
    most four :data:`SOCKET_TIMEOUT` (a connect and a read, tried twice: the
    retry on a fresh connection hides a Redis restart); a stopped Redis on
    a live host refuses the connection at once. When Redis answers again,
    the shared schedule does not know the per-worker slots given meanwhile,
    so the first shared slots may come early for a moment.

    Keys are ``engine-rate:<task name>``: apps whose task names coincide
    share a limit when they name the same Redis database (use another
    database number to keep them apart). The client is a plain Redis client:
    a Redis Cluster is not supported (its redirections would read as an
    outage, and limits would fall back to per worker).
    """

    def __init__(self, url: str, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__()
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ImproperlyConfigured("rate_limit_url needs redis-py: pip install 'redis>=4.5'") from exc
        self.url = url
        self.lease_seconds = lease_seconds
        # Short timeouts and one retry without backoff: redis-py's default retries with growing
        # sleeps would stall the supervisor's loop for seconds on every attempt during an outage.
        # No connection is made here (only at the first reservation), so nothing is shared by a fork.
        self._client: Any = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                                 socket_connect_timeout=SOCKET_TIMEOUT,
                                                 retry=Retry(NoBackoff(), 1))
        self._script: Any = self._client.register_script(RESERVE_SCRIPT)
        self._leases: dict[str, _Lease] = {}
        #: While Redis is down: the monotonic time of the next attempt (0.0 while it answers).
        self._retry_at = 0.0

    def reserve(self, name: str, rate: float, now: float | None = None) -> float:
        """Reserve the next slot of ``name`` shared by the cluster: when the task may start (unix time)."""
        now = time.time() if now is None else now
        lease = self._leases.get(name)
        if lease is not None and lease.rate == rate:
            slot = lease.take(now)
            if slot is not None:
                return slot
        if self._retry_at and time.monotonic() < self._retry_at:
            return super().reserve(name, rate, now)
        interval_us = math.ceil(1e6 / rate)  # rounded up: never a hair above the rate
        count = max(1, int(rate * self.lease_seconds))
        try:
            delay_us, _ = self._script(keys=[KEY_PREFIX + name], args=[interval_us, count])
        except Exception as exc:  # noqa: BLE001 - whatever fails, the task must go on with a local slot
            self._unreachable(exc)
            return super().reserve(name, rate, now)
        answered = time.time()
        if self._retry_at:
            self._retry_at = 0.0
            logger.warning("Redis at %s answers again: rate limits are shared by the cluster again",
                           _redacted(self.url))
        delay, interval = int(delay_us) / 1e6, interval_us / 1e6
        first = answered + delay
        lease = self._leases[name] = _Lease(first, interval, count, rate)
        lease.taken = 1  # the first slot is this task's
        # Due at once on Redis's clock: start now rather than after a trip through the timer heap
        # (the task cannot start before this answer came, so it is not early on Redis's clock).
        return now if delay <= 0 else first

    def _unreachable(self, exc: BaseException) -> None:
        """Fall back to per-worker slots for a while; warn once per outage."""
        if not self._retry_at:
            logger.warning("rate limits are per worker until Redis at %s answers (tried again every %.0f s): %s",
                           _redacted(self.url), RETRY_AFTER, exc)
        else:
            logger.debug("Redis at %s still does not answer: %s", _redacted(self.url), exc)
        self._retry_at = time.monotonic() + RETRY_AFTER

    def close(self) -> None:
        """Close the connection to Redis."""
        self._client.close()
