"""Fixtures: one PostgreSQL server for the session, one migrated template database,
and a fresh clone of it for every test that asks for `dsn`."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest

from sessiontag import migrate
from tests.pgcluster import Postgresql

TEMPLATE = "sessiontag_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server():
    server = Postgresql()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin_dsn(pg_server):
    return pg_server.libpq_dsn("postgres")


@pytest.fixture(scope="session")
def template_db(pg_server, admin_dsn):
    """A database with every migration applied, cloned for each test."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate.apply(pg_server.libpq_dsn(TEMPLATE))
    return TEMPLATE


def new_database(admin_dsn: str, pg_server, template: str = "template0") -> tuple[str, str]:
    name = f"t{next(_counter)}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return name, pg_server.libpq_dsn(name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(pg_server, admin_dsn, template_db):
    """A migrated database of this test's own."""
    name, url = new_database(admin_dsn, pg_server, template_db)
    yield url
    drop_database(admin_dsn, name)


@pytest.fixture
def private_server():
    """A server of this test's own, with a migrated database, that the test may stop
    and start again; yields (server, dsn)."""
    server = Postgresql()
    try:
        with psycopg.connect(server.libpq_dsn("postgres"), autocommit=True) as c:
            c.execute("CREATE DATABASE private")
        dsn = server.libpq_dsn("private")
        migrate.apply(dsn)
        yield server, dsn
    finally:
        server.stop()


@pytest.fixture
def empty_dsn(pg_server, admin_dsn):
    """An empty database of this test's own (no migrations applied)."""
    name, url = new_database(admin_dsn, pg_server)
    yield url
    drop_database(admin_dsn, name)


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection
