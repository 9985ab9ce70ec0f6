"""Throwaway PostgreSQL clusters for the tests, built on testing.postgresql.

Runs the server as an unprivileged user when the tests run as root (see
sessiontag.embedded), so the suite works as root and as a normal user.
"""

from __future__ import annotations

import os
import subprocess

import testing.postgresql

from sessiontag.embedded import bindir, hand_over, pg_argv

# Fast and disposable: durability is off unless a test asks for it (crash tests).
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
COMMON = "-h 127.0.0.1 -F -c logging_collector=off -c max_connections=300 -c shared_buffers=256MB"


class Postgresql(testing.postgresql.Postgresql):
    """testing.postgresql's server, started as the server user when we are root."""

    def __init__(self, durable: bool = False, **kwargs):
        kwargs.setdefault("postgres_args", COMMON if durable else f"{COMMON} {FAST}")
        kwargs.setdefault("initdb", str(bindir() / "initdb"))
        kwargs.setdefault("postgres", str(bindir() / "postgres"))
        super().__init__(**kwargs)

    def initialize_database(self):
        hand_over(self.base_dir)
        if os.path.exists(os.path.join(self.base_dir, "data", "PG_VERSION")):
            return
        result = subprocess.run(
            pg_argv("initdb", "-D", os.path.join(self.base_dir, "data"), "--lc-messages=C",
                    "-U", "postgres", "-A", "trust", "--encoding=UTF8", "--locale=C.UTF-8"),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr}")

    def get_server_commandline(self):
        argv = super().get_server_commandline()
        return pg_argv("postgres", *argv[1:])

    def libpq_dsn(self, database: str = "test") -> str:
        return f"host=127.0.0.1 port={self.settings['port']} user=postgres dbname={database}"


class PostgresqlFactory(testing.postgresql.PostgresqlFactory):
    target_class = Postgresql
