"""Which database to use, decided in one place: --dsn, else DATABASE_URL, else the
embedded local server (started on demand)."""

from __future__ import annotations

import os
from typing import Callable

import psycopg

from .errors import SessiontagError


def resolve_dsn(dsn: str | None = None, notice: Callable[[str], None] | None = None) -> str:
    """The DSN to use; ``notice`` hears when the local server had to be started."""
    if dsn:
        return dsn
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from .embedded import LocalServer

    return LocalServer().ensure_running(notice)


def describe(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    params.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in params.items())


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    """Open a connection, turning driver failures into one-line errors."""
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.ProgrammingError as exc:
        raise SessiontagError(f"invalid DSN: {str(exc).strip().splitlines()[0]}") from None
    except psycopg.OperationalError as exc:
        # libpq: 'connection to server at "h", port p failed: <reason>' then hints.
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = "; ".join([lines[0].rsplit("failed: ", 1)[-1], *lines[1:]]) if lines else "unknown error"
        raise SessiontagError(f"cannot connect to {describe(dsn)}: {reason}") from None
