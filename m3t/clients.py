"""Clients for the project's services, built from Settings (the only place that knows how)."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable

import hiredis
import redis

from m3t.credentials import login, triton_admin_key
from m3t.settings import Role, Settings

log = logging.getLogger(__name__)


def redis_client(settings: Settings, *, role: Role = "stream") -> redis.Redis:
    """A Redis client signed in as ``role``'s ACL user (``m3t.settings.Role``); a Redis
    Cluster client (``redis.RedisCluster``) where the settings name a cluster."""
    cfg = settings.redis
    if cfg.is_cluster:
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in cfg.startup_nodes]
        client = redis.RedisCluster(startup_nodes=nodes, **_redis_options(settings, role))
        _script_keys_read_locally(client.commands_parser)
        return client
    return redis.Redis(host=cfg.host, port=cfg.port, db=cfg.db, **_redis_options(settings, role))


def _script_keys_read_locally(parser) -> None:
    """A script call's keys read from its arguments, as redis-py does when routing one
    command: its pipeline asks a node (COMMAND GETKEYS) for every EVALSHA queued, a round
    trip each, and fails while that node is down, though the script's own node is up."""
    ask_the_server = parser.get_keys

    def get_keys(redis_conn, *args):
        if len(args) > 2 and str(args[0]).upper() in ("EVAL", "EVALSHA"):
            return list(args[3 : 3 + int(args[2])])
        return ask_the_server(redis_conn, *args)

    parser.get_keys = get_keys


def redis_node(
    settings: Settings, port: int, *, host: str | None = None, role: Role = "admin"
) -> redis.Redis:
    """A client of one Redis server (a cluster's node, say), on the settings' host unless
    another is given."""
    host = host or settings.redis.host
    return redis.Redis(host=host, port=port, **_redis_options(settings, role))


def _redis_options(settings: Settings, role: Role) -> dict:
    cfg = settings.redis
    username, password = login(settings, "redis", role)
    options = {}
    if cfg.tls:
        from m3t import tls  # the CA's code (cryptography) only where TLS is on

        options = {"ssl": True, "ssl_ca_certs": str(cfg.ca_file or tls.ca_file(settings))}
    return options | dict(
        username=username,
        password=password,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        # A batch read's replies run to hundreds of KB: large pieces mean fewer recv calls
        # and parser feeds from Python. The buffer is per connection.
        socket_read_size=1 << 20,
    )


class LuaScript:
    """A Lua script sent by EVALSHA alone (see ``run_scripts``)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # the name Redis gives it

    def __call__(self, commands: Commands, keys, args) -> None:
        commands.evalsha(self.sha, len(keys), *keys, *args)


class Commands(list):
    """Commands for one round trip, each packed by hiredis as it is queued.

    What redis-py's Pipeline does, without its per-argument Python: on this project's hot
    paths (a feature write of a poll's admissions, a batch's scores, a batch read) packing
    and queueing cost more than Redis took to run the commands.
    """

    def evalsha(self, *args) -> None:
        self.append(hiredis.pack_command(("EVALSHA", *args)))

    def mget(self, keys) -> None:
        self.append(hiredis.pack_command(("MGET", *keys)))

    def get(self, name) -> None:
        self.append(hiredis.pack_command(("GET", name)))

    def hget(self, name, key) -> None:
        self.append(hiredis.pack_command(("HGET", name, key)))

    def hmget(self, name, keys) -> None:
        self.append(hiredis.pack_command(("HMGET", name, *keys)))


class ClusterCommands:
    """``Commands``' methods on a Redis Cluster client's pipeline, which sends each node its
    commands and reads the nodes' replies after writing to all of them. An MGET, whose keys
    lie in many slots, goes as one GET per key and comes back as one list."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.shapes: list[int | None] = []  # per command queued: None, or an MGET's key count

    def _queue(self, *args) -> None:
        self.pipe.execute_command(*args)
        self.shapes.append(None)

    def evalsha(self, *args) -> None:
        self._queue("EVALSHA", *args)

    def get(self, name) -> None:
        self._queue("GET", name)

    def hget(self, name, key) -> None:
        self._queue("HGET", name, key)

    def hmget(self, name, keys) -> None:
        self._queue("HMGET", name, *keys)

    def mget(self, keys) -> None:
        for key in keys:
            self.pipe.execute_command("GET", key)
        self.shapes.append(len(keys))

    def replies(self, raw: list) -> list:
        """The pipeline's replies, one per command queued here."""
        replies, at = [], 0
        for shape in self.shapes:
            if shape is None:
                replies.append(raw[at])
                at += 1
            else:
                replies.append(raw[at : at + shape])
                at += shape
        return replies


_MULTI, _EXEC = hiredis.pack_command(("MULTI",)), hiredis.pack_command(("EXEC",))


def send(client: redis.Redis, commands: Commands, *, atomic: bool = False) -> list:
    """Send the commands in one write and read every reply; raise the first error reply.

    ``atomic``: as one MULTI/EXEC transaction. Under ``appendfsync always`` Redis syncs its
    append-only file once per event-loop pass that wrote, and a large write arrives over
    many passes (16 KB a read); queued, it is applied, and synced, once. A user whose ACL
    refuses MULTI still gets its commands run, one by one as without ``atomic``.

    A Redis Cluster client has no single connection to send them on: use its pipeline.
    """
    if not commands:
        return []
    atomic = atomic and len(commands) > 1
    packed = [_MULTI, *commands, _EXEC] if atomic else commands
    pool = client.connection_pool
    connection = pool.get_connection()  # a connection the server dropped is replaced here
    try:
        connection.send_packed_command([b"".join(packed)], check_health=False)
        replies = []
        for _ in packed:
            try:
                replies.append(connection.read_response())
            except redis.exceptions.ResponseError as exc:  # the other replies still come
                replies.append(exc)
        if atomic:
            replies = _transaction_replies(replies, connection)
    except BaseException:
        connection.disconnect()  # replies may be left unread on it
        raise
    finally:
        pool.release(connection)
    error = next((r for r in replies if isinstance(r, redis.exceptions.ResponseError)), None)
    if error is not None:
        raise error
    return replies


@functools.cache
def _warn_unwrapped(reason: str) -> None:
    log.warning("Redis refused MULTI (%s): writes go one command at a time", reason)


def _transaction_replies(replies: list, connection) -> list:
    """The commands' own replies among MULTI's, the QUEUED ones and EXEC's."""
    opened, *queued, executed = replies
    if isinstance(opened, redis.exceptions.ResponseError):  # MULTI refused: each ran alone
        _warn_unwrapped(type(opened).__name__)
        return queued
    if isinstance(executed, redis.exceptions.ResponseError):
        # None ran. A command refused as it was queued comes first, the reason to raise (EXEC
        # only says EXECABORT); were EXEC itself refused, the transaction would stay open.
        connection.disconnect()
        return [*queued, executed]
    return executed


def mget(client: redis.Redis, keys: list[bytes]) -> list[bytes | None]:
    """MGET in one round trip (see ``Commands``); a Redis Cluster client splits it by slot."""
    if not keys:
        return []
    if is_cluster(client):
        return client.mget_nonatomic(keys)
    commands = Commands()
    commands.mget(keys)
    return send(client, commands)[0]


def unlink(client: redis.Redis, keys: Iterable) -> int:
    """UNLINK ``keys`` (a list, or a SCAN's iterator) 1,000 to a command; returns how many."""
    keys = list(keys)
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])
    return len(keys)


def run_scripts(
    client: redis.Redis, queue: Callable[[Commands], None], *scripts: LuaScript
) -> list:
    """Queue script calls with ``queue(commands)``, send them in one round trip, return
    their replies.

    Each is sent as EVALSHA alone: redis-py's Script asks the server SCRIPT EXISTS before
    every pipeline that uses it, a round trip each time (with its per-call overhead, a
    pipeline of 20 calls took 35% longer). Scripts are loaded only when the server answers
    NOSCRIPT (its script cache is empty after a restart); then none of them ran, and the
    calls are sent again.
    """
    try:
        replies = round_trip(client, queue, atomic=True)
    except redis.exceptions.NoScriptError:
        for script in scripts:
            client.script_load(script.source)
        replies = round_trip(client, queue, atomic=True)
    if is_cluster(client):
        replicated(client)
    return replies


# How long a write waits for a replica's acknowledgement before it is taken as done anyway
# (a primary without a live replica still takes writes).
REPLICA_WAIT_MS = 1000


def replicated(client) -> None:
    """Wait until each primary's replica has the writes sent so far (WAIT): a primary that
    dies next cannot take them with it when its replica is promoted, so offsets committed
    after this point cover only writes that survive a failover."""
    client.execute_command("WAIT", 1, REPLICA_WAIT_MS, target_nodes=client.PRIMARIES)


def round_trip(
    client: redis.Redis, queue: Callable[[Commands], None], *, atomic: bool = False
) -> list:
    """Queue commands with ``queue(commands)`` (``Commands``' methods, named as redis-py's
    pipeline has them) and send them in one round trip; their replies. ``atomic``: as one
    transaction (``send``) on a single server; a cluster's commands span slots, so go apart."""
    if is_cluster(client):  # its pipeline routes each call by slot
        with client.pipeline(transaction=False) as pipe:
            commands = ClusterCommands(pipe)
            queue(commands)
            return commands.replies(pipe.execute())
    commands = Commands()
    queue(commands)
    return send(client, commands, atomic=atomic)


def is_cluster(client) -> bool:
    """A Redis Cluster client: no single connection pool to send commands on."""
    return not hasattr(client, "connection_pool")


def triton_client(settings: Settings):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=settings.triton.grpc_url)


# The header that carries the admin key to Triton's restricted APIs (loading and unloading
# models, the repository index, shared memory, trace and log settings) over HTTP; inference
# and health need none. Over gRPC Triton expects it under its own prefix.
TRITON_ADMIN_HEADER = "m3t-admin-key"
TRITON_ADMIN_GRPC_HEADER = f"triton-grpc-protocol-{TRITON_ADMIN_HEADER}"


def triton_admin_headers(settings: Settings) -> dict[str, str]:
    """The gRPC metadata for a call to one of Triton's restricted APIs."""
    return {TRITON_ADMIN_GRPC_HEADER: triton_admin_key(settings)}
