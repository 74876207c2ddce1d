"""The Redis result backend: ``redis://host:port/db`` (via redis-py).

Layout
    Each task's latest record is one hash under ``engine-result:<task_id>``
    with the fields ``state``, ``ready`` (1 for READY_STATES), ``strength``
    (:func:`engine.states.precedence`, lower is stronger), ``date_done``
    and, when present, ``result`` (the encoded bytes of
    :func:`engine.serialization.dumps`, stored untouched) and ``traceback``.
    A missing field means None. Every written key gets an expiry of
    ``result_expires`` seconds (none when that setting is 0 or None), so
    Redis itself drops old results and no cleanup job is needed.

Writes
    :meth:`RedisBackend.store` runs a small Lua script per batch. Redis runs a
    script atomically, so the compare-and-set of the precedence rule (a
    non-final state never overwrites a final one; a final one is replaced
    only by a stronger final one, the rule of the sqlite backend and the
    core's recorder) holds even when several workers write the same task id
    at once: no reader or writer ever sees a half-applied record. The script
    also PUBLISHes on the channel ``engine-result:<task_id>`` (the same name
    as the key; channels and keys are separate namespaces) whenever it wrote
    a ready state, and only then, so a dropped late or weaker write wakes
    nobody. Very large batches are cut into chunks of :data:`CHUNK` records so
    one script call never blocks the server for long.

Reads
    :meth:`RedisBackend.wait_for` subscribes to the task's channel *first*,
    waits for Redis to confirm the subscription, and only then reads the
    key: a result stored between the read and the subscription would
    otherwise be missed and the waiter would sleep until its timeout (a
    first read before subscribing only saves the subscription when the
    result is already there). It then blocks on the pub/sub connection,
    not polling. Each thread keeps one pub/sub connection for all its waits
    (subscribe, wait, unsubscribe), not one connection per wait. Pub/sub is
    fire-and-forget (a message sent while the pub/sub connection was
    reconnecting is lost), so the key is also re-read every
    :data:`RECHECK_EVERY` seconds as a safety net; that is one cheap read
    per waiter every few seconds, not a poll loop.

Processes
    Workers fork their children after the app (and so this backend) may
    already exist. A socket shared across a fork interleaves two processes'
    replies, so the client is created lazily and re-created whenever
    the process id changes; the parent's client is dropped in the child
    without being closed, which would disturb the parent's connections.

Limits: multi-key scripts need every key on one node, so Redis Cluster is not
supported; use one Redis server (or a primary with replicas) per backend URL.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from engine import states
from engine.backends.base import FIRER_TTL, Backend
from engine.core import StateRecord, records_from_flat
from engine.exceptions import ImproperlyConfigured, TimeoutError
from engine.utils import process

if TYPE_CHECKING:
    from redis.client import PubSub

    from engine.app import Engine

__all__ = ("CHUNK", "KEY_PREFIX", "RECHECK_EVERY", "RedisBackend")

logger = logging.getLogger(__name__)

#: Prefix of every result key and of every wake-up channel.
KEY_PREFIX = "engine-result:"
#: One message per stored batch that holds final states (the count): what a wait on many results listens to.
READY_CHANNEL = "engine-results:ready"
#: Largest number of records stored by one script call.
CHUNK = 1000
#: Seconds between two safety-net reads of the key while waiting on pub/sub.
RECHECK_EVERY = 2.0
#: Messages of READY_CHANNEL read at most per wake-up of a wait on many results.
DRAIN_AT_MOST = 1000
#: Values per record in the script's ARGV (keep in sync with STORE_SCRIPT).
_ARGS_PER_RECORD = 8

#: KEYS[i] is the key of record i. ARGV[1] is the expiry in milliseconds (0: none),
#: then 8 values per record: state, ready (1/0), strength, date_done, has_result,
#: result, has_traceback, traceback. Returns how many records were written.
STORE_SCRIPT = """
local ttl = tonumber(ARGV[1])
local written = 0
local finished = 0
for i = 1, #KEYS do
    local key = KEYS[i]
    local a = 1 + (i - 1) * 8
    local ready = ARGV[a + 2]
    local strength = tonumber(ARGV[a + 3])
    local old = redis.call('HMGET', key, 'ready', 'strength')
    -- The precedence rule: write when nothing final is stored, or when a final
    -- state is stronger (lower) than the stored final one.
    if (not old[1]) or old[1] == '0' or (ready == '1' and strength < tonumber(old[2])) then
        -- DEL first so a field the new record lacks (e.g. traceback) does not survive.
        redis.call('DEL', key)
        local fields = {'state', ARGV[a + 1], 'ready', ready, 'strength', ARGV[a + 3],
                        'date_done', ARGV[a + 4]}
        if ARGV[a + 5] == '1' then
            fields[#fields + 1] = 'result'
            fields[#fields + 1] = ARGV[a + 6]
        end
        if ARGV[a + 7] == '1' then
            fields[#fields + 1] = 'traceback'
            fields[#fields + 1] = ARGV[a + 8]
        end
        redis.call('HSET', key, unpack(fields))
        if ttl > 0 then
            redis.call('PEXPIRE', key, ttl)
        end
        if ready == '1' then
            redis.call('PUBLISH', key, ARGV[a + 1])
            finished = finished + 1
        end
        written = written + 1
    end
end
if finished > 0 then
    redis.call('PUBLISH', '@READY_CHANNEL@', finished)
end
return written
""".replace("@READY_CHANNEL@", READY_CHANNEL)

_FIELDS = ("state", "result", "traceback", "date_done")
#: The _FIELDS of every key in KEYS, as one flat array (nil where a key or field is missing):
#: one command for many ids instead of one HMGET each (redis-py packs each command in Python).
READ_MANY_SCRIPT = """
local out = {}
for i = 1, #KEYS do
    local values = redis.call('HMGET', KEYS[i], 'state', 'result', 'traceback', 'date_done')
    for j = 1, 4 do
        out[#out + 1] = values[j]
    end
end
return out
"""
#: Ids read by one pipelined round trip of a bulk read.
READ_MANY = 1000
#: Keys of a chord: its hash (size, done, fired, header, body) and the set of header tasks counted.
CHORD_PREFIX = "engine-chord:"
#: Counts header tasks of one chord (ARGV[1]: the firer or "", then their ids), each id once; returns
#: the chord's header and body to the one caller whose count completes it (the fired flag is set in
#: the same atomic script; a named firer also gets the chord in its set of chords being fired, KEYS[3]).
CHORD_PART_SCRIPT = """
local added = redis.call('SADD', KEYS[2], unpack(ARGV, 2))
if added == 0 then return false end
local done = redis.call('HINCRBY', KEYS[1], 'done', added)
local size = tonumber(redis.call('HGET', KEYS[1], 'size'))
if size == nil or done < size then return false end
if redis.call('HSETNX', KEYS[1], 'fired', 1) == 0 then return false end
if ARGV[1] ~= '' then
    redis.call('SADD', KEYS[3], KEYS[1])
end
return {redis.call('HGET', KEYS[1], 'header'), redis.call('HGET', KEYS[1], 'body')}
"""
#: Set of the chord keys a worker (the firer) completed and has not reported queued yet.
FIRING_PREFIX = "engine-chords-firing:"
#: Present while a chord-firing worker is alive (it expires FIRER_TTL after the worker last said so).
ALIVE_PREFIX = "engine-chords-firer-alive:"
#: Set of the firers that ever said they are alive: the only ones whose chords can be taken over.
FIRERS_KEY = "engine-chords-firers"
#: Move every chord of one firing set (KEYS[1]) to another (KEYS[2]) unless KEYS[3] (the first
#: firer's alive key, or "" for none) exists; returns the chord keys moved.
TAKE_OVER_SCRIPT = """
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local moved = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if redis.call('SMOVE', KEYS[1], KEYS[2], member) == 1 then table.insert(moved, member) end
end
return moved
"""
#: Task ids counted by one call of the script (Lua's unpack() has a limit of a few thousand values).
CHORD_PARTS_PER_CALL = 1000


def _expiry_ms(value: Any) -> int:
    """``result_expires`` (seconds, a timedelta, or 0/None for never) as whole milliseconds."""
    if not value:
        return 0
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    # At least 1 ms: a positive setting must never turn into "keep forever".
    return max(1, int(float(value) * 1000))


class RedisBackend(Backend):
    """Results in a Redis server shared by every worker and client, woken by pub/sub."""

    #: A ``redis://`` URL (``__init__`` refuses anything else).
    url: str

    def __init__(self, url: str | None = None, app: Engine | None = None) -> None:
        super().__init__(url, app)
        if not url or not url.startswith("redis://"):
            raise ImproperlyConfigured(f"redis backend URL must look like redis://host:port/db, got {url!r}")
        try:
            import redis  # noqa: F401 - fail at configuration time, not at the first result
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ImproperlyConfigured("the redis backend needs redis-py: pip install 'redis>=4.5'") from exc
        self.expires_ms = _expiry_ms(app.conf.result_expires if app is not None else 86400)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._redis: Any = None
        self._script: Any = None
        self._read_many: Any = None
        #: Per thread: the pub/sub connection waits reuse, and the client it came from.
        self._local = threading.local()

    @staticmethod
    def key(task_id: str) -> str:
        """The Redis key (and pub/sub channel) of ``task_id``."""
        return KEY_PREFIX + task_id

    @property
    def client(self) -> Any:
        """This process's ``redis.Redis`` client (created on first use and after a fork)."""
        pid = process.pid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    import redis

                    # decode_responses stays off: results are msgpack/pickle bytes.
                    client = redis.Redis.from_url(self.url)
                    self._script = client.register_script(STORE_SCRIPT)
                    self._read_many = client.register_script(READ_MANY_SCRIPT)
                    self._redis, self._pid = client, pid
        return self._redis

    def store(self, records: Iterable[StateRecord]) -> None:
        """Store a batch of encoded records atomically per record, keeping the strongest final state."""
        records = list(records)
        if not records:
            return
        client = self.client
        script = self._script
        now = time.time()
        # Once per result stored: key() and states.precedence() inlined.
        ready, strength, custom = states.READY_STATES, states.PRECEDENCE_INDEX.get, states.CUSTOM_PRECEDENCE
        for start in range(0, len(records), CHUNK):
            chunk = records[start:start + CHUNK]
            keys = []
            args: list[Any] = [self.expires_ms]
            for r in chunk:
                result = r.result
                if type(result) is not bytes and result is not None:
                    if not isinstance(result, (bytes, bytearray, memoryview)):
                        raise TypeError(f"RedisBackend.store takes encoded records (result bytes), "
                                        f"got {type(result).__name__} for task {r.task_id}")
                    result = bytes(result)
                state = r.state
                keys.append(KEY_PREFIX + r.task_id)
                args += [state, 1 if state in ready else 0, strength(state, custom), repr(float(r.timestamp or now)),
                         0 if result is None else 1, b"" if result is None else result,
                         0 if r.traceback is None else 1, r.traceback or ""]
            script(keys=keys, args=args, client=client)

    def get_encoded(self, task_id: str) -> StateRecord | None:
        """Return the stored record of ``task_id`` with its result still encoded, or None."""
        state, result, traceback, date_done = self.client.hmget(self.key(task_id), _FIELDS)
        if state is None:
            return None
        return StateRecord(task_id, state.decode(), result,
                           None if traceback is None else traceback.decode("utf-8", "replace"),
                           float(date_done) if date_done is not None else 0.0)

    supports_chords = True

    def chord_start(self, chord_id: str, header_ids: list[str], body: dict) -> None:
        """The chord's hash, expiring with the results (``result_expires``)."""
        import msgpack

        key = CHORD_PREFIX + chord_id
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key, key + ":parts")
        pipe.hset(key, mapping={"size": len(header_ids), "done": 0, "header": msgpack.packb(header_ids),
                                "body": msgpack.packb(body, use_bin_type=True)})
        if self.expires_ms:
            pipe.pexpire(key, self.expires_ms)
        pipe.execute()

    def chord_parts_done(self, parts: list[tuple[str, str]],
                         firer: str | None = None) -> list[tuple[str, list[str], dict]]:
        """One pipelined round trip: the counting script once per chord (and per 1000 of its parts)."""
        import msgpack

        if not parts:
            return []
        by_chord: dict[str, list[str]] = {}
        for chord_id, task_id in parts:
            by_chord.setdefault(chord_id, []).append(task_id)
        script = self.client.register_script(CHORD_PART_SCRIPT)
        pipe = self.client.pipeline(transaction=False)
        calls: list[str | None] = []
        for chord_id, task_ids in by_chord.items():
            key = CHORD_PREFIX + chord_id
            for start in range(0, len(task_ids), CHORD_PARTS_PER_CALL):
                script(keys=[key, key + ":parts", FIRING_PREFIX + (firer or "")],
                       args=[firer or "", *task_ids[start:start + CHORD_PARTS_PER_CALL]], client=pipe)
                calls.append(chord_id)
            if self.expires_ms:
                pipe.pexpire(key + ":parts", self.expires_ms)
                calls.append(None)
        completed = []
        for counted, reply in zip(calls, pipe.execute()):
            if counted is not None and reply:
                header, body = reply
                completed.append((counted, msgpack.unpackb(header, raw=False), msgpack.unpackb(body, raw=False)))
        return completed

    def chord_bodies_queued(self, chord_ids: list[str], firer: str) -> None:
        if chord_ids:
            self.client.srem(FIRING_PREFIX + firer, *(CHORD_PREFIX + chord_id for chord_id in chord_ids))

    def chords_firing(self, firer: str) -> list[tuple[str, list[str], dict]]:
        return self._chords_of(list(self.client.smembers(FIRING_PREFIX + firer)), firer)

    def firer_alive(self, firer: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(ALIVE_PREFIX + firer, 1, px=int(FIRER_TTL * 1000))
        pipe.sadd(FIRERS_KEY, firer)
        pipe.execute()

    def chords_take_over(self, from_firer: str, firer: str) -> list[tuple[str, list[str], dict]]:
        keys = [FIRING_PREFIX + from_firer, FIRING_PREFIX + firer, ""]
        return self._chords_of(self.client.register_script(TAKE_OVER_SCRIPT)(keys=keys), firer)

    def chords_abandoned(self, firer: str) -> list[tuple[str, list[str], dict]]:
        """Per registered firer whose alive key expired: its firing set moved to ``firer`` by one script.

        The script checks the alive key and moves the set's members in one step,
        so a firer that comes back (alive again, then reading its set) and a
        taker never both get a chord; SMOVE gives each member to one taker.
        """
        take_over = self.client.register_script(TAKE_OVER_SCRIPT)
        out = []
        for name in self.client.smembers(FIRERS_KEY):
            other = name.decode()
            if other == firer:
                continue
            keys = [FIRING_PREFIX + other, FIRING_PREFIX + firer, ALIVE_PREFIX + other]
            out.extend(self._chords_of(take_over(keys=keys), firer))
            if not self.client.exists(ALIVE_PREFIX + other, FIRING_PREFIX + other):
                self.client.srem(FIRERS_KEY, other)  # gone, nothing left to take: forgotten
        return out

    def _chords_of(self, keys: list[bytes], firer: str) -> list[tuple[str, list[str], dict]]:
        """``(chord id, header ids, body)`` of chord ``keys`` now fired by ``firer`` (expired ones: done)."""
        import msgpack

        out = []
        for key in keys:
            header, body = self.client.hmget(key, ("header", "body"))
            chord_id = key.decode()[len(CHORD_PREFIX):]
            if header is None:  # expired with the results: nothing left to send
                self.chord_bodies_queued([chord_id], firer)
                continue
            out.append((chord_id, msgpack.unpackb(header, raw=False), msgpack.unpackb(body, raw=False)))
        return out

    def get_many_encoded(self, task_ids: Sequence[str]) -> dict[str, StateRecord]:
        """One script call (one command, one flat reply) per :data:`READ_MANY` ids."""
        found: dict[str, StateRecord] = {}
        client = self.client
        read_many = self._read_many
        for start in range(0, len(task_ids), READ_MANY):
            chunk = task_ids[start:start + READ_MANY]
            flat = read_many(keys=[KEY_PREFIX + task_id for task_id in chunk], client=client)
            records_from_flat(chunk, flat, found)
        return found

    def forget(self, task_id: str) -> None:
        """Remove what is stored for ``task_id``."""
        self.client.delete(self.key(task_id))

    def forget_many(self, task_ids: Sequence[str]) -> None:
        """One DEL per :data:`READ_MANY` ids."""
        for start in range(0, len(task_ids), READ_MANY):
            self.client.delete(*(KEY_PREFIX + task_id for task_id in task_ids[start:start + READ_MANY]))

    def ttl(self, task_id: str) -> float | None:
        """Seconds until the record of ``task_id`` expires; None if it has no expiry or no record."""
        ms = self.client.pttl(self.key(task_id))
        return ms / 1000.0 if ms is not None and ms >= 0 else None

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5
                 ) -> StateRecord:
        """Wait until ``task_id`` is ready and return its decoded record, woken by pub/sub.

        ``interval`` is accepted for interface compatibility and unused: waiters
        block on the task's channel instead of polling. Raises
        ``engine.exceptions.TimeoutError`` when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float:
            left = RECHECK_EVERY if deadline is None else deadline - time.monotonic()
            return max(0.0, min(left, RECHECK_EVERY))

        def ready() -> StateRecord | None:
            record = self.get(task_id)
            return record if record is not None and record.state in states.READY_STATES else None

        # Fast path: most results read with get() are already stored, and subscribing
        # costs round trips, so look before subscribing.
        record = ready()
        if record is not None:
            return record
        channel = self.key(task_id)
        pubsub = self._pubsub()
        try:
            self._subscribe(pubsub, channel, remaining, deadline)
            while True:
                record = ready()
                if record is not None:
                    return record
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"the result of task {task_id} was not ready within {timeout}s")
                # Any message (or the RECHECK_EVERY safety net) leads to a fresh read of
                # the key: the key, not the message, is the source of truth.
                pubsub.get_message(timeout=remaining())
        except BaseException:
            self._drop_pubsub()  # its state is unknown (a broken connection, an interrupt)
            raise
        finally:
            if self._local.__dict__.get("pubsub") is pubsub:
                try:
                    pubsub.unsubscribe(channel)  # the confirmation is skipped by the next wait
                except Exception as exc:  # noqa: BLE001 - a broken pub/sub connection must not hide the outcome
                    logger.debug("unsubscribing from %s failed: %s", channel, exc)
                    self._drop_pubsub()

    @staticmethod
    def _subscribe(pubsub: PubSub, channel: str, remaining: Callable[[], float], deadline: float | None) -> None:
        """Subscribe and wait for Redis to confirm it (until ``deadline``).

        subscribe() only sends the command: without the confirmation a result
        published before the server handled SUBSCRIBE would be missed. The
        connection is reused, so a late message or confirmation of an earlier
        wait's channel may come first: only this channel's counts.
        """
        pubsub.subscribe(channel)
        wanted = channel.encode()
        while True:
            message = pubsub.get_message(timeout=remaining())
            if message is not None and message.get("type") == "subscribe" and message.get("channel") == wanted:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return  # the caller still reads the store once before giving up

    def wait_for_many(self, task_ids: Sequence[str], timeout: float | None = None,
                      interval: float = 0.5,
                      on_ready: Callable[[int], None] | None = None) -> dict[str, StateRecord]:
        """Wait for many results (see ``Backend.wait_for_many``), woken by one channel for every store.

        Workers publish on :data:`READY_CHANNEL` once per stored batch with final
        states; each message (or ``interval`` without one, as a safety net) leads
        to one pipelined read of the next ids waited for.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float:
            left = RECHECK_EVERY if deadline is None else deadline - time.monotonic()
            return max(0.0, min(left, RECHECK_EVERY))

        pubsub = self._pubsub()
        try:
            self._subscribe(pubsub, READY_CHANNEL, remaining, deadline)
            self._local.ready_pubsub = pubsub
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return super().wait_for_many(task_ids, left, min(interval, RECHECK_EVERY), on_ready)
        except BaseException:
            self._drop_pubsub()
            raise
        finally:
            self._local.ready_pubsub = None
            if self._local.__dict__.get("pubsub") is pubsub:
                try:
                    pubsub.unsubscribe(READY_CHANNEL)
                except Exception as exc:  # noqa: BLE001 - a broken pub/sub connection must not hide the outcome
                    logger.debug("unsubscribing from %s failed: %s", READY_CHANNEL, exc)
                    self._drop_pubsub()

    def _change_token(self) -> Any:
        # During wait_for_many: the subscribed connection whose next message says "stored".
        return self._local.__dict__.get("ready_pubsub")

    def _wait_for_change(self, seconds: float, token: Any) -> None:
        if token is None:
            time.sleep(seconds)
            return
        if token.get_message(timeout=seconds) is not None:
            # Several batches may have been stored meanwhile: one read covers them all.
            for _ in range(DRAIN_AT_MOST):
                if token.get_message(timeout=0) is None:
                    break

    def _pubsub(self) -> PubSub:
        """This thread's pub/sub connection, opened on first use and kept for the next waits.

        One connection per waiting thread, not per wait: opening and closing a
        connection per ``get()`` cost more than the wait itself. A pub/sub
        object is not thread-safe, hence one per thread; a fork gets new ones
        (the :attr:`client` changes with the pid).
        """
        client = self.client
        local = self._local.__dict__
        if local.get("client") is not client:
            local["pubsub"], local["client"] = client.pubsub(), client
        pubsub: PubSub = local["pubsub"]
        return pubsub

    def _drop_pubsub(self) -> None:
        pubsub = self._local.__dict__.pop("pubsub", None)
        self._local.__dict__.pop("client", None)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception as exc:  # noqa: BLE001 - already broken; nothing more to do
                logger.debug("closing a pub/sub connection failed: %s", exc)

    def close(self) -> None:
        """Disconnect this process's connections (a client inherited through fork is left alone)."""
        if self._local.__dict__.get("client") is self._redis and self._pid == process.pid():
            self._drop_pubsub()  # this thread's; other threads' close with the pool below
        with self._lock:
            if self._redis is not None and self._pid == process.pid():
                self._redis.connection_pool.disconnect()
            self._redis = self._script = self._pid = None
