"""Budget reservations on a :class:`~extproc.state.redis_store.RedisStore`: the Lua scripts in
``lua/`` (package data), run with EVALSHA."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from typing import Mapping, Sequence

from extproc.state.lua import script
from extproc.state.redis_store import RedisStore, hash_tag
from extproc.state.store import StoreUnavailable
from extproc_plugins.budgets.reservations import HELD_SUFFIX, Charge, ReservePlan, ReserveResult


#: Each script with the record parser it shares (lua/records.lua), as Redis runs it.
SCRIPTS = {name: script(__package__, "records") + script(__package__, name) for name in ("reserve", "settle")}
SHAS = {name: hashlib.sha1(source.encode()).hexdigest().encode() for name, source in SCRIPTS.items()}
_backend_ids = itertools.count()
#: Reservation ids whose hash tag a backend remembers until they are settled (the oldest go past it:
#: ids of admissions that failed with the store down, which the budgets policy does not settle).
MAX_TAGS = 65536


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _unpack(packed: bytes) -> list[bytes]:
    """The arguments of one packed command (a RESP array of bulk strings), for the cluster client."""
    count_end = packed.index(b"\r\n")
    items, pos = int(packed[1:count_end]), count_end + 2
    out = []
    for _ in range(items):
        end = packed.index(b"\r\n", pos)
        size = int(packed[pos + 1:end])
        out.append(packed[end + 2:end + 2 + size])
        pos = end + 4 + size
    return out


def _tagged(prefix: str, tag: str | None) -> str:
    """Where a reservation's record and due index live: ``res:{tag}:`` (its counters' slot)."""
    return f"{prefix}res:{{{tag}}}:" if tag else prefix + "res:"


class _Lane:
    """A connection for reservation scripts and its auto-pipeline: the batch waiting for the wire."""

    __slots__ = ("conn", "busy", "batch", "task")

    def __init__(self):
        self.conn = None
        self.task = None
        self.busy = False
        self.batch: list = []


class RedisReservations:
    """Reservations as one Lua script per operation, run with EVALSHA (a script Redis forgot, e.g.
    after a restart, is loaded and the call sent again). Plain Redis, no modules; not Redis
    Under concurrency the client's per-command CPU, not Redis,
    is the cost, so these calls skip redis-py's command layer: each is packed straight into the
    RESP protocol (the constant part of a plan once), and they go out on a connection of their
    own (one for admissions, one for settlements); calls made while one batch is on the wire wait
    and go out together as the next one (auto-pipelining: one write and one read for many calls;
    each script still runs atomically).

    Every key of one reservation shares a hash slot: the counters carry their tenant's hash tag
    (``bud:{tenant}:...``, :func:`~extproc_plugins.budgets.ledger.counter_key`), and the
    reservation record and the index of reservations by due time take the same tag
    (``res:{tenant}:<id>``, ``res:{tenant}:due``: one due index per tenant, swept by that tenant's
    admissions). On a Redis Cluster (``redis+cluster://``) the calls go through the cluster
    client instead (it routes each script to its slot's master, follows ``MOVED``/``ASK``), one
    command per call.
    """

    def __init__(self, store: RedisStore):
        self.store = store
        # Admissions and settlements each have a connection of their own, so a reconcile being
        # written never makes the next request's admission wait for it.
        self._admit_lane, self._settle_lane = _Lane(), _Lane()
        self._token = next(_backend_ids)  # names this backend's pre-encoded plans
        self._due_key = _bulk((store.prefix + "res:due").encode())  # keys without a hash tag
        # reservation id -> hash tag of its keys, until settled (the settle call only has the id)
        self._tags: dict[str, str] = {}
        self.sweep_every = 32  # admissions between two looks for orphaned reservations
        self._admissions = 0
        store.on_close(self._disconnect)

    def holdings(self) -> dict[str, int]:
        """What it keeps in process, for memory diagnostics (``extproc.observability.memdiag``)."""
        return {"reservation_tags": len(self._tags), "max_reservation_tags": MAX_TAGS}

    async def _disconnect(self) -> None:
        for lane in (self._admit_lane, self._settle_lane):
            if lane.conn is not None:
                await lane.conn.disconnect()
                lane.conn = None

    async def _call_script(self, lane: "_Lane", name: str, packed: bytes):
        """Send one packed EVALSHA on ``lane``; while a batch is on its wire, wait and go out with the next."""
        if self.store.cluster:
            return await self._call_cluster(name, packed)
        if lane.busy:
            future = asyncio.get_running_loop().create_future()
            lane.batch.append((name, packed, future))
            return await future
        lane.busy = True
        try:
            result = (await self._send_scripts(lane, [(name, packed, None)]))[0]
        finally:
            self._next_script_batch(lane)
        if isinstance(result, BaseException):
            raise StoreUnavailable(str(result)) from result
        return result

    async def _call_cluster(self, name: str, packed: bytes):
        """The call through the cluster client (routed to its keys' slot; MOVED/ASK followed)."""
        from redis.exceptions import NoScriptError

        args: list = _unpack(packed)
        args[0] = args[0].decode()  # the command name: str for the cluster client's routing tables
        client = self.store.client
        try:
            try:
                return await client.execute_command(*args)
            except NoScriptError:  # a master that never saw it (new, promoted, restarted)
                await client.script_load(SCRIPTS[name])
                return await client.execute_command(*args)
        except self.store.errors as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _next_script_batch(self, lane: "_Lane") -> None:
        if lane.batch:
            batch, lane.batch = lane.batch, []
            # stays busy; the lane keeps the task (the loop holds tasks only weakly)
            lane.task = asyncio.get_running_loop().create_task(self._flush_scripts(lane, batch))
        else:
            lane.busy = False

    async def _flush_scripts(self, lane: "_Lane", batch: list) -> None:
        try:
            results = await self._send_scripts(lane, batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():  # its caller went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(StoreUnavailable(str(result)))
                else:
                    future.set_result(result)
        except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"batch failed: {exc!r}"))
            raise
        finally:
            self._next_script_batch(lane)

    async def _send_scripts(self, lane: "_Lane", batch: list) -> list:
        """Write the packed calls at once and read every answer (a value or the exception)."""
        from redis.exceptions import NoScriptError, ResponseError

        if lane.conn is None:
            lane.conn = self.store.client.connection_pool.make_connection()
        conn = lane.conn
        results: list = []
        try:
            await conn.send_packed_command(b"".join(packed for _, packed, _ in batch), check_health=False)
            for _ in batch:
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
        except self.store.errors as exc:  # the connection broke: the calls not answered fail
            await conn.disconnect(nowait=True)
            results += [exc] * (len(batch) - len(results))
            return results
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:  # Redis restarted (or SCRIPT FLUSH): load the scripts and send those calls again
            try:
                for name in {batch[i][0] for i in again}:
                    await self.store.client.script_load(SCRIPTS[name])
                retried = await self._send_scripts(lane, [batch[i] for i in again])
            except self.store.errors as exc:
                retried = [exc] * len(again)
            for i, r in zip(again, retried):
                results[i] = r
        return results

    def _packed_plan(self, plan: ReservePlan) -> tuple[bytes, bytes, str | None, bytes]:
        """The constant parts of a plan's EVALSHA (head: command and keys but the reservation's;
        tail: constant arguments), the hash tag of its keys and its due index (packed)."""
        cached = plan.encoded.get(self._token)
        if cached is not None:
            return cached
        p = self.store.prefix
        n, m = len(plan.keys), len(plan.guards)
        keys = [(p + k).encode() for k in plan.keys] + [(p + k).encode() for k in plan.guards]
        args = [str(n).encode(), str(m).encode(),
                " ".join(str(i) for i in plan.metrics).encode(),
                " ".join("-1" if x is None else str(int(x)) for x in plan.limits).encode(),
                " ".join(str(int(e * 1000)) for e in plan.expire_at).encode(),
                *[b"0" if v is None else b"1" + bytes(v) for v in plan.expected]]
        # EVALSHA sha numkeys, keys (+ reservation, due index), args (+ ttl, amounts, sweep)
        items = 3 + len(keys) + 2 + len(args) + 3
        head = b"".join([b"*%d\r\n" % items, _bulk(b"EVALSHA"), _bulk(SHAS["reserve"]),
                         _bulk(str(len(keys) + 2).encode()), *map(_bulk, keys)])
        tail = b"".join(map(_bulk, args))
        tag = hash_tag(plan.keys[0]) if plan.keys else (hash_tag(plan.guards[0]) if plan.guards else None)
        due_key = _bulk((_tagged(p, tag) + "due").encode()) if tag else self._due_key
        cached = plan.encoded[self._token] = (head, tail, tag, due_key)
        return cached

    async def reserve_plan(self, reservation_id: str, plan: ReservePlan, amounts: Sequence[int],
                           ttl: float) -> ReserveResult:
        head, tail, tag, due_key = self._packed_plan(plan)
        self._admissions += 1
        sweep = b"16" if self._admissions % self.sweep_every == 0 else b"0"
        base = _tagged(self.store.prefix, tag)
        packed = b"".join((head, _bulk((base + reservation_id).encode()), due_key, tail,
                           _bulk(b"%d" % max(1, int(ttl * 1000))),
                           _bulk(" ".join(str(int(a)) for a in amounts).encode()), _bulk(sweep)))
        if tag:  # before the call: a call that timed out may still have reserved (released later)
            tags = self._tags
            if len(tags) >= MAX_TAGS:  # ids whose admission failed and that nobody settles: oldest out
                for old in list(itertools.islice(tags, MAX_TAGS // 4)):
                    del tags[old]
            tags[reservation_id] = tag
        result = await self._call_script(self._admit_lane, "reserve", packed)
        status, failed, *rest = result
        if status != 1:
            self._tags.pop(reservation_id, None)  # nothing was reserved
        if status == 2:
            return ReserveResult(False, stale=[None if v == b"0" else bytes(v[1:]) for v in rest])
        return ReserveResult(bool(status), [int(v) for v in rest], None if status else int(failed) - 1)

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], ttl: float) -> ReserveResult:
        plan = ReservePlan([c.key for c in charges], list(range(len(charges))), [c.limit for c in charges],
                           [c.expire_at for c in charges])
        return await self.reserve_plan(reservation_id, plan, [c.amount for c in charges], ttl)

    async def _settle(self, reservation_id: str, mode: bytes, args: Sequence[bytes] = ()) -> bool:
        tag = self._tags.get(reservation_id)
        if tag is None and self.store.cluster:
            return False  # not reserved here (refused, or long forgotten): on a cluster, no slot to ask
        base = _tagged(self.store.prefix, tag)
        packed = b"".join((b"*%d\r\n" % (6 + len(args)), _bulk(b"EVALSHA"), _bulk(SHAS["settle"]), _bulk(b"2"),
                           _bulk((base + reservation_id).encode()), _bulk((base + "due").encode()) if tag
                           else self._due_key, _bulk(mode), *map(_bulk, args)))
        settled = bool(int(await self._call_script(self._settle_lane, "settle", packed)))
        self._tags.pop(reservation_id, None)  # settled now, or already (or expired: orphaned)
        return settled
        return bool(int(await self._call_script(self._settle_lane, "settle", packed)))

    async def commit(self, reservation_id: str, actual: Mapping[str, int]) -> bool:
        args: list[bytes] = []
        for key, amount in actual.items():
            args += [(self.store.prefix + key).encode(), b"%d" % int(amount)]
        return await self._settle(reservation_id, b"key", args)

    async def commit_metrics(self, reservation_id: str, actual: Sequence[int]) -> bool:
        """Reconcile to the real amount per metric (indexes as in the plan; negative: keep the reserved)."""
        return await self._settle(reservation_id, b"metric", [" ".join(str(int(a)) for a in actual).encode()])

    async def release(self, reservation_id: str) -> bool:
        return await self._settle(reservation_id, b"release")

    async def read_counters(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        if not keys:
            return []
        both = []
        for k in keys:
            both += [k, k + HELD_SUFFIX]
        values = await self.store.get_many(both)
        ints = [int(v) if v is not None else 0 for v in values]
        return [(ints[i], ints[i + 1]) for i in range(0, len(ints), 2)]
