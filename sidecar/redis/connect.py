"""The one place that turns `RedisConfig` into a client: standalone, TLS, ACL, Sentinel, Cluster.

Every topology gets the same client settings: raw bytes replies, bounded connect and socket
timeouts, a periodic health check of idle connections and a short, bounded retry on
connection errors (a failover or a dropped connection is retried briefly, then surfaces as
`StoreUnavailable` at the store's boundary; requests never hang on a dead Redis). Passwords
go only into the connection arguments: they are never logged, and the clients' reprs and the
errors of this module do not contain them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any, Final, TypeAlias

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from yarl import URL

from sidecar.config import RedisConfig

__all__ = ["RedisClient", "close", "connect", "describe", "is_cluster"]

log = logging.getLogger("sidecar.redis")

RedisClient: TypeAlias = "redis.Redis | RedisCluster"

CONNECT_TIMEOUT: Final = 2.0  # seconds to open a TCP (+TLS) connection
SOCKET_TIMEOUT: Final = 5.0  # seconds to wait for a reply
HEALTH_CHECK_INTERVAL: Final = 15  # an idle connection is PINGed before reuse after this long
MASTER_CHECK_INTERVAL: Final = 0.5  # seconds between asking the sentinels who the master is
_RETRIES: Final = 2  # per command, on connection errors and timeouts only
# Connections per process (per node on Cluster). redis-py 8 defaults to 100 and then fails
# commands outright: a burst of concurrent requests must not turn into 503s.
MAX_CONNECTIONS: Final = 2048


def connect(config: RedisConfig) -> RedisClient:
    """A client for the configured topology; nothing is contacted until the first command.

    `username`/`password` from the config override credentials in the URL. With `sentinel`
    or `cluster`, the URL contributes only its scheme (`rediss` = TLS), credentials and
    database; the servers come from the sentinels or the seed nodes.
    """
    url = parse_url(config.url)
    url.pop("connection_class", None)
    tls = URL(config.url).scheme == "rediss"
    username = config.username if config.username is not None else url.pop("username", None)
    password = (
        config.password.get_secret_value()
        if config.password is not None
        else url.pop("password", None)
    )
    url.pop("username", None)
    url.pop("password", None)
    common: dict[str, Any] = {
        "username": username,
        "password": password,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": _retry(),
        "max_connections": MAX_CONNECTIONS,
    }
    if tls:
        common.update(_tls(config))
    log.info("redis: %s", describe(config))
    if config.cluster is not None:
        if int(url.pop("db", 0)) != 0:
            raise ValueError("redis.url: Redis Cluster has only database 0")
        return RedisCluster(
            startup_nodes=[ClusterNode(*_host_port(n)) for n in config.cluster.nodes],
            decode_responses=False,
            **common,
        )
    if config.sentinel is not None:
        sentinel_auth: dict[str, Any] = {
            "username": config.sentinel.username,
            "password": (
                config.sentinel.password.get_secret_value()
                if config.sentinel.password is not None
                else None
            ),
        }
        sentinel_kwargs = {
            **{k: v for k, v in common.items() if k not in ("username", "password")},
            **sentinel_auth,
        }
        sentinel = Sentinel(
            [_host_port(a) for a in config.sentinel.addresses],
            sentinel_kwargs=sentinel_kwargs,
            decode_responses=False,
            db=int(url.get("db", 0)),
            **common,
        )
        client: redis.Redis = sentinel.master_for(
            config.sentinel.master_name, connection_pool_class=_MasterFollowingPool
        )
        return client
    options: dict[str, Any] = {**url, **common}
    options.pop("ssl", None)  # a pool takes the TLS connection class instead
    if "path" in options:
        options["connection_class"] = redis.UnixDomainSocketConnection
    elif tls:
        options["connection_class"] = SSLConnection
    pool = ConnectionPool(decode_responses=False, **options)
    return redis.Redis.from_pool(pool)


async def close(client: RedisClient) -> None:
    """Close the client, its pool and, for Sentinel, the connections to the sentinels."""
    pool = getattr(client, "connection_pool", None)
    await client.aclose()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            with suppress(RedisError, OSError):  # closing a dead connection is no error
                await sentinel.aclose()


def is_cluster(client: RedisClient) -> bool:
    """Whether `client` talks to a Redis Cluster (sharded pub/sub, one slot per session)."""
    return isinstance(client, RedisCluster)


def describe(config: RedisConfig) -> str:
    """The topology in words, for logs: addresses and user, never a password."""
    url = URL(config.url)
    user = config.username or url.user
    who = f" as {user}" if user else ""
    tls = " over TLS" if url.scheme == "rediss" else ""
    if config.cluster is not None:
        where = f"cluster seeds {', '.join(config.cluster.nodes)}"
    elif config.sentinel is not None:
        where = (
            f"sentinel master {config.sentinel.master_name!r} "
            f"via {', '.join(config.sentinel.addresses)}"
        )
    else:
        where = str(url.with_user(None).with_password(None))
    return f"{where}{who}{tls}"


class _MasterFollowingPool(SentinelConnectionPool):
    """Follows the master promptly and asks every sentinel, trusting the newest epoch.

    redis-py's pool asks one sentinel, and only when it opens a connection. After a planned
    failover (`SENTINEL FAILOVER`) the old master keeps accepting writes until Sentinel
    demotes it about ten seconds later, and sentinels learn of the switch up to two seconds
    apart: pooled connections, or a sentinel not yet told, would keep a process writing to
    the old master, and those writes are lost. Here the sentinels are asked at most every
    `MASTER_CHECK_INTERVAL` on checkout, the answer with the highest config epoch wins, and
    a connection still open to another address is reconnected before use.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._checked_at = -MASTER_CHECK_INTERVAL

    async def get_master_address(self) -> tuple[str, int]:
        manager = self.sentinel_manager
        answers = await asyncio.gather(
            *(s.sentinel_masters() for s in manager.sentinels), return_exceptions=True
        )
        best: dict[str, Any] | None = None
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            state = answer.get(self.service_name)
            if not state or not manager.check_master_state(state, self.service_name):
                continue
            if best is None or state["config-epoch"] > best["config-epoch"]:
                best = state
        if best is None:
            address: tuple[str, int] = await super().get_master_address()  # type: ignore[no-untyped-call]
            return address
        address = (best["ip"], int(best["port"]))
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)  # idle ones reconnect to it
        return address

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_INTERVAL:
            self._checked_at = now
            # An unreachable set of sentinels is reported by the connection attempt itself.
            with suppress(RedisError, OSError):
                await self.get_master_address()
        connection = await super().get_connection(  # type: ignore[no-untyped-call]
            command_name, *keys, **options
        )
        master = self.master_address
        if master is not None and (connection.host, connection.port) != master:
            try:  # in use while the master moved: reconnect (it asks the sentinels again)
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection


def _tls(config: RedisConfig) -> dict[str, Any]:
    # Certificates and host names are verified; tls_ca_file replaces the system store.
    options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if config.tls_ca_file is not None:
        options["ssl_ca_certs"] = config.tls_ca_file
    return options


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), _RETRIES)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
