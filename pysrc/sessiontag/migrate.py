"""Applying and rolling back the migrations in migrations/ with yoyo.

Everything here also works with plain ``yoyo apply`` / ``yoyo rollback``; this module adds
a session-level advisory lock, so two migrators started at once never fail: one applies,
the other waits and then finds nothing left to do.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, urlencode

import psycopg
from yoyo import get_backend, read_migrations

from .connection import connect
from .errors import DatabaseError, SessiontagError
from .resources import migrations_dir, query

LOCK_KEY = "sessiontag.migrate"


class HistoryUnreadable(SessiontagError):
    """The connection may not read yoyo's record of applied migrations."""


@dataclass(frozen=True)
class MigrationState:
    id: str
    applied: bool
    applied_at: datetime | None


def yoyo_uri(dsn: str) -> str:
    """The yoyo URI (psycopg 3 driver) for a libpq DSN or URL."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise SessiontagError(f"invalid DSN: {str(exc).strip().splitlines()[0]}") from None
    dbname = params.pop("dbname", "") or ""
    # yoyo keeps its bookkeeping tables in the connection's current schema; pin it, or
    # a role named like a schema ("$user" in search_path) would move them mid-way.
    params["schema"] = "public"
    query = urlencode({k: str(v) for k, v in params.items()})
    return f"postgresql+psycopg:///{quote(dbname)}" + (f"?{query}" if query else "")


@contextmanager
def _locked_backend(dsn: str):
    """A yoyo backend, used only while this process holds the migration lock."""
    with connect(dsn, autocommit=True) as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [LOCK_KEY])
        try:
            backend = get_backend(yoyo_uri(dsn))
        except psycopg.Error as exc:
            raise DatabaseError.from_psycopg(exc) from None
        try:
            yield backend
        finally:
            backend.connection.close()


def _all_migrations():
    return read_migrations(str(migrations_dir()))


def _check_id(migrations, migration_id: str):
    for m in migrations:
        if m.id == migration_id:
            return m
    known = ", ".join(m.id for m in migrations)
    raise SessiontagError(f"unknown migration id {migration_id!r} (known: {known})")


def states(dsn: str) -> list[MigrationState]:
    """Every migration with whether and when it was applied, oldest first. Only reads:
    no lock, so a role that may not migrate (sessiontag_reader) can list and verify."""
    migrations = _all_migrations()
    with connect(dsn, autocommit=True) as conn:
        try:
            rows = conn.execute(query("applied_migrations")).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []  # yoyo never ran here: nothing is applied
        except psycopg.errors.InsufficientPrivilege as exc:
            raise HistoryUnreadable(f"cannot read which migrations are applied (public._yoyo_migration): "
                                    f"{exc.diag.message_primary}; grant SELECT on it, or connect as the role "
                                    "that migrates") from None
    applied = {row[0] for row in rows}
    when = {row[1]: row[2].replace(tzinfo=timezone.utc) for row in rows}  # yoyo stores naive UTC
    return [MigrationState(m.id, m.hash in applied, when.get(m.id)) for m in migrations]


def require(dsn: str, migration_id: str, purpose: str) -> None:
    """Raises, naming what is missing, unless migration_id and those before it are applied.
    A role that may not read the history (sessiontag_reader) is let through: the call
    itself will then say what is missing."""
    try:
        found = states(dsn)
    except HistoryUnreadable:
        return
    needed = [s.id for s in found[:[s.id for s in found].index(migration_id) + 1] if not s.applied]
    if needed:
        raise SessiontagError(f"{purpose} needs migration{'s' if len(needed) > 1 else ''} {', '.join(needed)}, "
                              "not applied to this database: run 'sessiontag migrate' first")


def apply(dsn: str, to: str | None = None) -> list[str]:
    """Apply pending migrations (up to and including ``to``); returns the ids applied."""
    migrations = _all_migrations()
    target = _check_id(migrations, to) if to else None
    with _locked_backend(dsn) as backend:
        pending = backend.to_apply(migrations)
        if target is not None:
            from yoyo.migrations import ancestors

            wanted = ancestors(target, migrations) | {target}
            pending = pending.filter(lambda m: m in wanted)
        _run(backend.apply_migrations, pending)
        return [m.id for m in pending]


def plan_rollback(dsn: str, to: str | None = None, steps: int | None = None, everything: bool = False) -> list[str]:
    """The ids a rollback would undo, newest first."""
    with _locked_backend(dsn) as backend:
        return [m.id for m in _select_rollback(backend, to, steps, everything)]


def rollback(dsn: str, to: str | None = None, steps: int | None = None, everything: bool = False) -> list[str]:
    """Roll back: until ``to`` is the newest applied, the newest ``steps``, or everything."""
    with _locked_backend(dsn) as backend:
        chosen = _select_rollback(backend, to, steps, everything)
        _run(backend.rollback_migrations, chosen)
        return [m.id for m in chosen]


def _select_rollback(backend, to, steps, everything):
    if sum(x is not None and x is not False for x in (to, steps, everything)) != 1:
        raise SessiontagError("say what to roll back: exactly one of --to ID, --steps N, --all")
    migrations = _all_migrations()
    applied = backend.to_rollback(migrations)  # newest first
    if everything:
        return applied
    if steps is not None:
        if steps < 1:
            raise SessiontagError(f"--steps must be at least 1, got {steps}")
        if steps > len(applied):
            raise SessiontagError(f"--steps {steps} is more than the {len(applied)} applied migration(s); "
                                  "--all rolls back every one")
        return applied.filter(lambda m: m in list(applied)[:steps])
    target = _check_id(migrations, to)
    if target not in applied:
        raise SessiontagError(f"migration {to} is not applied")
    from yoyo.migrations import descendants

    later = descendants(target, migrations) - {target}
    return applied.filter(lambda m: m in later)


def _run(action, migrations) -> None:
    try:
        action(migrations)
    except psycopg.Error as exc:
        raise DatabaseError.from_psycopg(exc) from None
