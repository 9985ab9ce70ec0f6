"""`make catalog`: print the catalog of a database built from sql/ (the expected schema)."""

from __future__ import annotations

import sys

import psycopg

from sessiontag import catalog
from tests.pgcluster import Postgresql
from tests.schema_tools import build_from_sql, catalog_of


def main() -> None:
    server = Postgresql()
    try:
        with psycopg.connect(server.libpq_dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE from_sql")
        dsn = server.libpq_dsn("from_sql")
        build_from_sql(dsn)
        sys.stdout.write(catalog.dumps(catalog_of(dsn)))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
