"""Building schema sessiontag from sql/ and reading it back, for tests and `make catalog`."""

from __future__ import annotations

import subprocess

import psycopg

from sessiontag import catalog
from sessiontag.embedded import bindir
from sessiontag.resources import sql_files


def build_from_sql(dsn: str) -> None:
    """Run the SQL source files in order, in one transaction."""
    with psycopg.connect(dsn) as conn:
        for path in sql_files():
            conn.execute(path.read_text())


def catalog_of(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return catalog.snapshot(conn)


def pg_dump_schema(dsn: str) -> str:
    """pg_dump --schema-only of schema sessiontag, less pg_dump's random \\restrict keys."""
    result = subprocess.run(
        [str(bindir() / "pg_dump"), "--schema-only", "--no-owner", "-n", "sessiontag", "-d", dsn],
        capture_output=True, text=True, check=True,
    )
    return "".join(line for line in result.stdout.splitlines(keepends=True)
                   if not line.startswith(("\\restrict", "\\unrestrict")))
