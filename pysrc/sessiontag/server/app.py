"""The receiver: a Starlette application served by uvicorn, writing through a psycopg
connection pool.

Why this stack: uvicorn and Starlette are the most used, best kept small ASGI server
and framework in Python (the base of FastAPI), with graceful shutdown built in; the
receiver needs two routes, streaming request bodies and nothing else, so a full web
framework would add only weight. The database calls are blocking psycopg calls on a
psycopg_pool ConnectionPool, run in Starlette's thread pool: the request's work is
one SQL call, and the sync pool is psycopg's most used and best tested one.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID

import psycopg
import uvicorn
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import migrate
from ..errors import SessiontagError
from . import otlp
from .auth import Token, find_token

log = logging.getLogger("sessiontag.serve")

MIB = 1024 * 1024


@dataclass
class ServerConfig:
    dsn: str
    host: str = "127.0.0.1"
    port: int = 4318
    tokens: list[Token] = field(default_factory=list)
    default_user_id: UUID | None = None
    max_body: int = 64 * MIB
    pool_size: int = 8
    # How long a request waits for a connection before the answer is 429/503: short,
    # so the exporter's retry (after Retry-After) fits its own time budget (~10 s).
    pool_timeout: float = 2.0
    retry_after: int = 1


def loopback_only(host: str) -> bool:
    """Whether HOST is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refused(Exception):
    """A request answered with an error status; the message is the one log line and the
    google.rpc.Status message."""

    def __init__(self, http: int, code: int, message: str, retry: bool = False):
        super().__init__(message)
        self.http, self.code, self.retry = http, code, retry


# SQLSTATE classes of a request the database refused as bad input: 400, not worth a retry.
_BAD_INPUT = ("22", "23", "42501")
# Worth a retry: the database went away, is shutting down, or a transaction lost a race.
_RETRYABLE = ("08", "40", "53", "55P03", "57")


def _for_serve(message: str) -> str:
    """A database message in serve's words: the SQL functions' default_user_id is the
    --default-user option here (as `sessiontag ingest` says too)."""
    return message.replace("default_user_id", "--default-user")


def _describe(exc: psycopg.Error) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return _for_serve(primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0])


# The span fields whose problem makes the span's ids no name for it: the path names it.
_ID_FIELDS = ("traceId", "spanId")


def _rejections(rejected: list[dict]) -> str:
    """error_message of partial_success: each refused span by its ids (by its place in
    the request when an id is what is wrong), and why."""
    parts = []
    for r in rejected:
        where = (f"span {r['span_id']} of trace {r['trace_id']}"
                 if r.get("span_id") and r.get("trace_id") and r.get("field") not in _ID_FIELDS else r["path"])
        what = f"{r['field']}: {r['problem']}" if r.get("field") else r["problem"]
        parts.append(f"{where}: {what}")
    return _for_serve("; ".join(parts))


class PoolLogFilter(logging.Filter):
    """psycopg_pool's warnings as serve logs them: one line each (its connection errors
    carry libpq's hint on a second line), and the same line again within `window`
    seconds dropped, counted in the next one let through. The pool retries a lost
    database every 1 to 10 s; /healthz and each refused request say 503 on their own."""

    def __init__(self, pool_name: str = "", window: float = 60.0):
        super().__init__()
        self.pool_name, self.window = pool_name, window
        self._seen: dict[str, list] = {}  # line -> [when last let through, dropped since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        line = "; ".join(part.strip() for part in record.getMessage().splitlines() if part.strip())
        if self.pool_name:
            line = line.replace(f"error connecting in {self.pool_name!r}: ", "cannot connect to the database: ")
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(line)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return False
            dropped = seen[1] if seen else 0
            # Forget the lines of past windows (some name a connection, so they vary).
            for key in [k for k, (when, _) in self._seen.items() if now - when >= self.window]:
                del self._seen[key]
            self._seen[line] = [now, 0]
        if dropped:
            line += f" (and {dropped} more times in the last {int(now - seen[0])} s)"
        record.msg, record.args = line, None
        return True


POOL_NAME = "sessiontag-serve"


def configure_logging() -> None:
    """serve's log: one line per event, with the time, on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sessiontag serve: %(message)s")
    pool_log = logging.getLogger("psycopg.pool")
    pool_log.setLevel(logging.WARNING)
    pool_log.addFilter(PoolLogFilter(POOL_NAME))


class Receiver:
    """The state behind the routes: the configuration and the connection pool."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.pool = ConnectionPool(config.dsn, min_size=1, max_size=config.pool_size, open=False,
                                   check=ConnectionPool.check_connection, name=POOL_NAME)
        self._acting_role: str | None = None

    @asynccontextmanager
    async def lifespan(self, app):
        # Not waiting for a first connection: the server starts while the database is
        # down, answers 503 until it is back, and /healthz says why.
        self.pool.open(wait=False)
        try:
            yield
        finally:
            self.pool.close()

    # -- POST /v1/traces ------------------------------------------------------------------
    async def traces(self, request: Request) -> Response:
        kind = otlp.media_type(request.headers.get("content-type"))
        answer_kind = kind or otlp.JSON
        try:
            token = self._authorize(request)
            if kind is None:
                raise Refused(415, otlp.INVALID_ARGUMENT, f"unsupported Content-Type "
                              f"{request.headers.get('content-type')!r}: send {otlp.PROTOBUF} or {otlp.JSON}")
            body = await self._body(request)
            stored, rejected = await run_in_threadpool(self._ingest, kind, body, token)
        except Refused as refused:
            log.warning("%s POST /v1/traces: %d: %s", _peer(request), refused.http, refused)
            headers = {"Retry-After": str(self.config.retry_after)} if refused.retry else None
            if refused.http == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            return Response(otlp.status(answer_kind, refused.code, str(refused)), refused.http, headers,
                            media_type=answer_kind)
        message = ""
        if rejected:
            message = _rejections(rejected)
            log.warning("%s POST /v1/traces: stored %d, refused %d spans: %s", _peer(request), stored,
                        len(rejected), message)
        return Response(otlp.export_response(kind, len(rejected), message), 200, media_type=kind)

    def _authorize(self, request: Request) -> Token | None:
        if not self.config.tokens:
            return None
        token = find_token(self.config.tokens, request.headers.get("authorization"))
        if token is None:
            given = "wrong" if request.headers.get("authorization") else "missing"
            raise Refused(401, otlp.UNAUTHENTICATED, f"{given} bearer token (Authorization: Bearer <token>)")
        return token

    async def _body(self, request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            raise Refused(415, otlp.INVALID_ARGUMENT, f"unsupported Content-Encoding {encoding!r}: send gzip or none")
        cap = self.config.max_body
        length = request.headers.get("content-length", "")
        inflater = otlp.Inflater(encoding == "gzip", cap)
        refused: Refused | None = None
        if length.isdigit() and int(length) > cap:
            refused = Refused(413, otlp.INVALID_ARGUMENT, f"the body ({length} bytes) is over the {cap} byte limit")
        # Past the cap the rest is read and dropped: a client still sending its body
        # would otherwise see a broken pipe instead of the 413, and retry.
        async for chunk in request.stream():
            if refused is None:
                try:
                    inflater.feed(chunk)
                except otlp.TooLarge as exc:
                    refused = Refused(413, otlp.INVALID_ARGUMENT, str(exc))
                except otlp.BadRequest as exc:
                    refused = Refused(400, otlp.INVALID_ARGUMENT, str(exc))
        if refused is not None:
            raise refused
        try:
            return inflater.body()
        except otlp.TooLarge as exc:
            raise Refused(413, otlp.INVALID_ARGUMENT, str(exc)) from None
        except otlp.BadRequest as exc:
            raise Refused(400, otlp.INVALID_ARGUMENT, str(exc)) from None

    def _ingest(self, kind: str, body: bytes, token: Token | None) -> tuple[int, list[dict]]:
        """Decodes the body and stores its spans in one transaction (in a worker thread)."""
        try:
            if kind == otlp.PROTOBUF:
                text, count = otlp.protobuf_to_json(body)
                if count == 0:  # nothing to store (an exporter's empty batch)
                    return 0, []
            else:
                text = otlp.json_request(body)
        except otlp.BadRequest as exc:
            raise Refused(400, otlp.INVALID_ARGUMENT, str(exc)) from None
        user = token.user_id if token and token.user_id else self.config.default_user_id
        try:
            with self.pool.connection(timeout=self.config.pool_timeout) as conn:
                if token is not None and token.user_id is not None:
                    # The token's user, through the database: row-level security and the
                    # functions' own checks confine this transaction to it. SET LOCAL (not
                    # set_config) is the form Citus propagates to the workers. A login that
                    # is itself confined needs no SET ROLE (which on Citus would open the
                    # worker connections as the NOLOGIN role, and fail).
                    role = "" if self._any_user_role(conn) else "SET LOCAL ROLE sessiontag_user; "
                    conn.execute(f"{role}SET LOCAL sessiontag.user_id = '{token.user_id}'")
                elif self._any_user_role(conn):
                    conn.execute(f"SET LOCAL ROLE {self._any_user_role(conn)}")
                stored, rejected = conn.execute(
                    "SELECT stored, rejected FROM sessiontag.ingest_otlp_partial(%s::jsonb, %s)", [text, user]
                ).fetchone()
            return stored, rejected
        except PoolTimeout:
            stats = self.pool.get_stats()
            if stats.get("pool_size", 0) >= self.config.pool_size and stats.get("pool_available", 0) == 0:
                raise Refused(429, otlp.RESOURCE_EXHAUSTED, "every database connection is busy; retry later",
                              retry=True) from None
            raise Refused(503, otlp.UNAVAILABLE, "the database is unreachable; retry later", retry=True) from None
        except psycopg.Error as exc:
            sqlstate = getattr(exc, "sqlstate", None) or ""
            if (isinstance(exc, psycopg.OperationalError) and not sqlstate) or sqlstate.startswith(_RETRYABLE):
                raise Refused(503, otlp.UNAVAILABLE, f"the database is unavailable ({_describe(exc)}); retry later",
                              retry=True) from None
            if sqlstate.startswith(_BAD_INPUT):
                raise Refused(400, otlp.INVALID_ARGUMENT, _describe(exc)) from None
            if sqlstate in ("3F000", "42883", "42P01"):
                raise Refused(503, otlp.UNAVAILABLE, f"{_describe(exc)}: is the database migrated? run "
                              "'sessiontag migrate'", retry=True) from None
            raise Refused(500, otlp.INTERNAL, f"{_describe(exc)} (SQLSTATE {sqlstate})") from None

    def _any_user_role(self, conn: psycopg.Connection) -> str | None:
        """The role for spans of any user: none (the login's own) unless the login is
        itself confined to one user (a member of sessiontag_user, to serve user-bound
        tokens), then sessiontag_app. Asked of the database once."""
        if self._acting_role is None:
            confined = conn.execute(
                "SELECT NOT r.rolsuper AND NOT r.rolbypassrls AND pg_has_role(current_user, 'sessiontag_user', 'USAGE')"
                " FROM pg_roles r WHERE r.rolname = current_user").fetchone()[0]
            self._acting_role = "sessiontag_app" if confined else ""
        return self._acting_role or None

    # -- GET /healthz ---------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        problem = await run_in_threadpool(self._health_problem)
        if problem:
            log.warning("%s GET /healthz: 503: %s", _peer(request), problem)
            return JSONResponse({"status": "unavailable", "reason": problem}, 503)
        return JSONResponse({"status": "ok"})

    def _health_problem(self) -> str | None:
        try:
            with self.pool.connection(timeout=self.config.pool_timeout) as conn:
                conn.execute("SELECT 1")
        except PoolTimeout:
            return "the database is unreachable"
        except psycopg.Error as exc:
            return f"the database is unavailable: {_describe(exc)}"
        try:
            pending = [s.id for s in migrate.states(self.config.dsn) if not s.applied]
        except migrate.HistoryUnreadable:
            # A login that may not read the migration history: the receiver's function will do.
            with self.pool.connection(timeout=self.config.pool_timeout) as conn:
                found = conn.execute("SELECT to_regprocedure('sessiontag.ingest_otlp_partial(jsonb, uuid)')"
                                     " IS NOT NULL").fetchone()[0]
            return None if found else "the database is not migrated: run 'sessiontag migrate'"
        except SessiontagError as exc:
            return str(exc)
        if pending:
            return f"migrations not applied: {', '.join(pending)}; run 'sessiontag migrate'"
        return None


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def create_app(config: ServerConfig) -> Starlette:
    receiver = Receiver(config)
    return Starlette(routes=[Route("/v1/traces", receiver.traces, methods=["POST"]),
                             Route("/healthz", receiver.healthz, methods=["GET"])],
                     lifespan=receiver.lifespan)


class _Server(uvicorn.Server):
    """uvicorn's server, less one habit: after a graceful shutdown on SIGTERM it raises
    the signal again, so the process would die of it (status 143). SIGTERM is how
    service managers stop a server that did nothing wrong: exit 0 after the drain.
    SIGINT keeps uvicorn's behaviour (the CLI reports an interruption)."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening before the server starts: a port in use
    is one clear error, port 0 picks a free one, and a client that connects as soon as
    the address is printed waits in the backlog instead of being refused."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise SessiontagError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(config: ServerConfig, sock: socket.socket | None = None) -> None:
    """Serves until SIGTERM (drains in-flight requests, then returns) or SIGINT."""
    sock = sock or listen(config.host, config.port)
    server = _Server(uvicorn.Config(create_app(config), access_log=False, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=None))
    server.run(sockets=[sock])
