"""Fixtures for the tests on a real Citus cluster.

SESSIONTAG_TEST_CITUS_DSN names a database on the coordinator, as a superuser, in which
the citus extension is installed and the worker nodes are added (citus_add_node); the
workers accept the same credentials. Each test module gets databases of its own, made on
the coordinator and on every worker (citus, then the nodes added), and dropped after.
Without the variable every test here is skipped.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sessiontag import migrate

ENV = "SESSIONTAG_TEST_CITUS_DSN"


@dataclass
class Cluster:
    dsn: str
    coordinator: tuple[str, int]
    workers: list[tuple[str, int]]
    roles: list[str] = field(default_factory=list)

    def node_dsn(self, node: tuple[str, int], dbname: str, **kwargs) -> str:
        return make_conninfo(self.dsn, host=node[0], port=str(node[1]), dbname=dbname, **kwargs)

    def create_database(self, migrated: bool = True) -> str:
        """A new database on every node, with citus and the workers added; migrated."""
        name = f"st_{uuid.uuid4().hex[:10]}"
        for node in [self.coordinator, *self.workers]:
            with psycopg.connect(self.node_dsn(node, conninfo_to_dict(self.dsn).get("dbname", "postgres")),
                                 autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            with psycopg.connect(self.node_dsn(node, name), autocommit=True) as conn:
                conn.execute("SET client_min_messages = warning")
                conn.execute("CREATE EXTENSION citus")
        dsn = self.node_dsn(self.coordinator, name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", self.coordinator)
            for worker in self.workers:
                conn.execute("SELECT citus_add_node(%s, %s)", worker)
        if migrated:
            migrate.apply(dsn)
        return dsn

    def drop_database(self, dsn: str) -> None:
        name = conninfo_to_dict(dsn)["dbname"]
        for node in [self.coordinator, *self.workers]:
            with psycopg.connect(self.node_dsn(node, conninfo_to_dict(self.dsn).get("dbname", "postgres")),
                                 autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def create_role(self, kind: str, member_of: str | None) -> str:
        """A login role (created in the cluster's own database: Citus propagates it)."""
        role = f"{kind}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN" + (f" IN ROLE {member_of}" if member_of else ""))
        self.roles.append(role)
        return role


@pytest.fixture(scope="session")
def cluster():
    dsn = os.environ.get(ENV)
    if not dsn:
        pytest.skip(f"{ENV} is not set: these tests need a Citus coordinator with worker nodes")
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
            pytest.fail(f"{ENV} names a database without the citus extension")
        nodes = conn.execute("SELECT groupid, nodename, nodeport FROM pg_dist_node"
                             " WHERE noderole = 'primary' AND isactive ORDER BY groupid").fetchall()
        # The roles the migrations create must exist on every node before any database
        # uses them; created here, in a database with citus, they are propagated.
        for role in ("sessiontag_app", "sessiontag_user", "sessiontag_reader"):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                conn.execute(f"CREATE ROLE {role} NOLOGIN")
    params = conninfo_to_dict(dsn)
    coordinator = next(((h, p) for g, h, p in nodes if g == 0),
                       (params.get("host", "localhost"), int(params.get("port", 5432))))
    workers = [(h, p) for g, h, p in nodes if g != 0]
    if not workers:
        pytest.fail(f"{ENV}: the coordinator has no worker nodes (citus_add_node)")
    c = Cluster(dsn, coordinator, workers)
    try:
        yield c
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for role in c.roles:
                conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def distributed(cluster):
    """A migrated and distributed database of this module's own (its DSN)."""
    dsn = cluster.create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute("SELECT * FROM sessiontag.distribute()")
    try:
        yield dsn
    finally:
        cluster.drop_database(dsn)


def retrying(conn: psycopg.Connection, work, attempts: int = 20):
    """Runs work(conn) in a transaction, again when Citus cancels it as a distributed
    deadlock (40P01) or it fails to serialize (40001), as docs/scaling.md tells callers to."""
    for attempt in range(attempts):
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.errors.DeadlockDetected:
            continue
        except psycopg.errors.SerializationFailure:
            continue
    raise AssertionError(f"still deadlocked after {attempts} attempts")
