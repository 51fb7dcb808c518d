"""The store on Redis (plain Redis: no modules needed), shared by every worker and gateway.

Single node (``redis://host:port/db``, ``rediss://``, ``unix://``) or **Redis Cluster**
(``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` with TLS): the ``+cluster``
scheme makes the client :class:`redis.asyncio.cluster.RedisCluster`, started from those nodes
(any of the masters or replicas; the rest of the cluster is discovered). On a cluster every
multi-key operation must touch keys of one hash slot: the key schemes put a hash tag in braces
(``bud:{tenant}:...``, ``vx:{scope}:...``) so each script's keys share a slot while different
tenants and scopes spread over the cluster; :meth:`RedisStore.get_many` splits its keys per slot.
A ``key_prefix`` must not itself contain ``{`` (it would put every key in one slot).

A cluster's errors (nodes down, ``CLUSTERDOWN``, ``MOVED``/``ASK`` while a replica is promoted,
no node reachable) raise :class:`~extproc.state.store.StoreUnavailable` like a single node that is
gone, after a bounded retry (:data:`CLUSTER_RETRIES` retries, ``timeout`` per attempt), so policies
degrade exactly as they do for a single-node outage and no request waits on the cluster for long.
"""

from __future__ import annotations

from typing import Sequence
from urllib.parse import urlsplit

from extproc.state.lua import script
from extproc.state.store import StoreUnavailable


#: Retries of a cluster command after a connection error, a timeout or ``CLUSTERDOWN`` (each
#: attempt bounded by the store's ``timeout``; 0.25 s more before one after ``CLUSTERDOWN``): one
#: rides over a stale slot map; every node hanging fails a command in about 1 s (measured with
#: SIGSTOPped nodes; 2.6 s with 2 retries), against 0.5 s for a single node.
CLUSTER_RETRIES = 1

#: The URL schemes that mean "a Redis Cluster": ``redis+cluster://h:p[,h:p]``.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def hash_tag(key: str) -> str | None:
    """The hash tag of ``key`` as Redis Cluster reads it (the text in the first ``{...}``, when
    not empty), or None: only that part is hashed, so keys with one tag share a slot."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1:end] if end > start + 1 else None


def is_cluster_url(url: str | None) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return bool(url) and url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``(plain URL of the first node, [(host, port), ...])`` of a ``redis+cluster://`` URL.

    The user, password and query of the URL (``?ssl_cert_reqs=...``) apply to every node."""
    scheme, rest = url.split("://", 1)
    parts = urlsplit(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host:
            host, port = hostport.strip(), "6379"
        nodes.append((host.strip("[]"), int(port)))
    if not nodes or not nodes[0][0]:
        raise ValueError(f"state.redis_url: no node in {url!r} (redis+cluster://host:port[,host:port])")
    netloc = (userinfo + "@" if userinfo else "") + f"{nodes[0][0]}:{nodes[0][1]}"
    first = f"{parts.scheme}://{netloc}{parts.path if parts.path not in ('', '/0') else ''}"
    return first + (f"?{parts.query}" if parts.query else ""), nodes


def cluster_client(url: str, *, timeout: float, max_connections: int):
    """A :class:`redis.asyncio.cluster.RedisCluster` for a ``redis+cluster://`` URL, with bounded retries."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    first, nodes = cluster_nodes(url)
    return RedisCluster.from_url(
        first, startup_nodes=[ClusterNode(h, p) for h, p in nodes], max_connections=max_connections,
        socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), CLUSTER_RETRIES))


def sync_client(url: str, timeout: float = 5.0):
    """A blocking client for ``url`` (a single node or a ``redis+cluster://`` cluster), for commands."""
    if is_cluster_url(url):
        from redis.cluster import ClusterNode, RedisCluster

        first, nodes = cluster_nodes(url)
        return RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                                     socket_timeout=timeout, socket_connect_timeout=timeout)
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class RedisStore:
    """The same interface on Redis (plain Redis: no modules needed), a single node or a cluster.

    :param url: ``redis://``, ``rediss://``, ``unix://`` (one node) or ``redis+cluster://host:port[,...]``.
    :param max_connections: a single node's pool size (past it a command waits for a free
        connection); on a cluster the per-node limit is 8 times higher, since redis-py's cluster
        client raises instead of waiting.
    """

    def __init__(self, url: str, prefix: str = "extproc:", timeout: float = 0.5, max_connections: int = 64):
        import redis.asyncio as redis
        from redis.exceptions import RedisClusterException

        self.prefix = prefix
        self.cluster = is_cluster_url(url)
        if self.cluster and "{" in prefix:
            raise ValueError(f"state.key_prefix {prefix!r}: no '{{' on a Redis Cluster (a hash tag in the prefix "
                             "would put every key in one slot)")
        if self.cluster:
            self._redis = cluster_client(url, timeout=timeout, max_connections=8 * max_connections)
        else:
            # A blocking pool: past max_connections a command waits for a free connection (commands
            # take well under a millisecond) instead of failing with "Too many connections" when a
            # worker has more requests in flight than connections.
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=max(2.0, 4 * timeout),
                socket_timeout=timeout, socket_connect_timeout=timeout)
            self._redis = redis.Redis(connection_pool=pool)
        # RedisClusterException (no node reachable, slot not covered) is not a RedisError
        self._errors = (redis.RedisError, RedisClusterException, OSError)
        self._scripts: dict = {}
        self._on_close: list = []  # connections of its own that others opened (reservation lanes)

    async def _do(self, coro):
        try:
            return await coro
        except self._errors as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def get(self, key: str) -> bytes | None:
        return await self._do(self._redis.get(self.prefix + key))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        px = int(ttl * 1000) if ttl else None
        await self._do(self._redis.set(self.prefix + key, value, px=px))

    async def delete(self, key: str) -> None:
        await self._do(self._redis.delete(self.prefix + key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        key = self.prefix + key
        if ttl is None:
            return int(await self._do(self._redis.incrby(key, amount)))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            pipe.pexpire(key, int(ttl * 1000), nx=True)
            value, _ = await self._do(pipe.execute())
        return int(value)

    async def stream_add(self, key: str, entries: list[bytes], maxlen: int) -> None:
        """XADD each entry (field ``r``) to a stream capped near ``maxlen`` (``MAXLEN ~``), one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xadd(self.prefix + key, {"r": entry}, maxlen=maxlen, approximate=True)
            await self._do(pipe.execute())

    async def stream_range(self, key: str, count: int | None = None) -> list[bytes]:
        """The stream's entries (field ``r``), oldest first."""
        rows = await self._do(self._redis.xrange(self.prefix + key, count=count))
        return [fields[b"r"] for _id, fields in rows if b"r" in fields]

    # Compare-and-act scripts (lua/*.lua): atomic on the server (EVALSHA; plain Redis, no modules).
    def _script(self, name: str):
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = self._redis.register_script(script(__package__, name))
        return found

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """SET NX PX: set ``key`` only if it is absent (a lock or a claim); True when this call set it."""
        return bool(await self._do(self._redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)), nx=True)))

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (release a lock this caller owns)."""
        return bool(await self._do(self._script("delete_if")(keys=[self.prefix + key], args=[expected])))

    async def expire_if(self, key: str, expected: bytes, ttl: float) -> bool:
        """Give ``key`` a new TTL only if it still holds ``expected`` (keep an owned lock alive)."""
        run = self._script("expire_if")
        return bool(await self._do(run(keys=[self.prefix + key], args=[expected, max(1, int(ttl * 1000))])))

    @property
    def client(self):
        """The ``redis.asyncio`` client, for shared-state modules with their own data layout
        (:mod:`extproc_plugins.caching.vector_index`, budget reservations); policies use the methods above. Errors it raises are in
        :attr:`errors`."""
        return self._redis

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "Redis unavailable" (to map to :class:`StoreUnavailable`)."""
        return self._errors

    async def ping(self) -> bool:
        try:
            return bool(await self._do(self._redis.ping()))
        except StoreUnavailable:
            return False

    def on_close(self, disconnect) -> None:
        """Have :meth:`close` also await ``disconnect()`` (a connection taken from :attr:`client`'s pool)."""
        self._on_close.append(disconnect)

    async def close(self) -> None:
        for disconnect in self._on_close:
            await disconnect()
        await self._redis.aclose()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self.cluster:  # one MGET per slot (keys of several slots: CROSSSLOT otherwise)
            return await self._do(self._redis.mget_nonatomic([self.prefix + k for k in keys]))
        return await self._do(self._redis.mget([self.prefix + k for k in keys]))

    async def put_record(self, key: str, value: bytes) -> None:
        await self._do(self._redis.set(self.prefix + key, value))

    async def get_record(self, key: str) -> bytes | None:
        return await self._do(self._redis.get(self.prefix + key))

    async def get_records(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.get_many(keys)

    async def delete_record(self, key: str) -> bool:
        return bool(await self._do(self._redis.delete(self.prefix + key)))
