"""The schema stays distributable on Citus: patterns that work on plain PostgreSQL but
break, or silently change meaning, once the tables are distributed by user_id. Checked
over pg_catalog (and the text of function bodies) of a database built from sql/, so
they run everywhere, without Citus."""

from __future__ import annotations

import re


import pytest

from tests.schema_tools import build_from_sql


@pytest.fixture(scope="module")
def catalog_conn(pg_server, admin_dsn):
    import psycopg

    from tests.conftest import drop_database, new_database

    name, dsn = new_database(admin_dsn, pg_server)
    build_from_sql(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield conn
    finally:
        drop_database(admin_dsn, name)


def rows(conn, query: str) -> list:
    return conn.execute(query).fetchall()


def bodies(conn) -> dict[str, str]:
    """Function signature -> body (prosrc), for every function of schema sessiontag."""
    return dict(rows(conn, """SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc p
        WHERE p.pronamespace = 'sessiontag'::regnamespace"""))


def test_no_restrictive_policy(catalog_conn):
    # Citus writes a policy on every shard without AS RESTRICTIVE: a restrictive one
    # becomes permissive there and widens what it was meant to narrow.
    assert rows(catalog_conn, """SELECT c.relname, p.polname FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        WHERE c.relnamespace = 'sessiontag'::regnamespace AND NOT p.polpermissive""") == []


def test_policies_have_no_subquery_and_call_only_builtins(catalog_conn):
    # Citus refuses subqueries in policies; the expression runs on the workers as written.
    found = rows(catalog_conn, """SELECT c.relname || '.' || p.polname,
               concat_ws(' ', pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
        FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        WHERE c.relnamespace = 'sessiontag'::regnamespace""")
    assert found
    for name, expr in found:
        assert "SELECT" not in expr.upper(), name
        assert not re.search(r"sessiontag\.\w+\(", expr), name


def test_no_set_null_or_set_default_on_a_key_with_user_id(catalog_conn):
    # Citus refuses ON DELETE/UPDATE SET NULL or SET DEFAULT when the foreign key holds
    # the distribution column.
    assert rows(catalog_conn, """SELECT c.conname FROM pg_constraint c
        WHERE c.connamespace = 'sessiontag'::regnamespace AND c.contype = 'f'
          AND (c.confdeltype IN ('n', 'd') OR c.confupdtype IN ('n', 'd'))
          AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                      AND a.attname = 'user_id')""") == []


def test_per_user_tables_key_on_user_id(catalog_conn):
    # Every primary key and unique constraint of a table with user_id includes it.
    assert rows(catalog_conn, """SELECT c.conname FROM pg_constraint c
        WHERE c.connamespace = 'sessiontag'::regnamespace AND c.contype IN ('p', 'u')
          AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attname = 'user_id')
          AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                          AND a.attname = 'user_id')""") == []


def test_no_function_takes_a_table_row_type(catalog_conn):
    # On a shard the row type is the shard's (conversations_102011): no such function there.
    assert rows(catalog_conn, """SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'sessiontag'::regnamespace
          AND EXISTS (SELECT FROM unnest(p.proargtypes::oid[]) t JOIN pg_class c ON c.reltype = t
                      WHERE c.relnamespace = 'sessiontag'::regnamespace AND c.relkind IN ('r', 'p'))""") == []


def test_no_sql_function_with_parameters_reads_a_table(catalog_conn):
    # Citus cannot plan a LANGUAGE sql function's parameterized query over a distributed
    # table ("could not create distributed plan"); PL/pgSQL passes values.
    tables = [r[0] for r in rows(catalog_conn, """SELECT relname FROM pg_class
        WHERE relnamespace = 'sessiontag'::regnamespace AND relkind IN ('r', 'p')""")]
    found = rows(catalog_conn, """SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc p
        WHERE p.pronamespace = 'sessiontag'::regnamespace AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql') AND p.pronargs > 0""")
    readers = [sig for sig, src in found
               if any(re.search(rf"\bsessiontag\.{t}\b", src) for t in tables)]
    assert readers == []


def test_no_row_count_after_on_conflict(catalog_conn):
    # Citus reports the ROW_COUNT of INSERT ... ON CONFLICT as the rows attempted: count
    # with RETURNING instead.
    found = []
    for sig, src in bodies(catalog_conn).items():
        for statement in src.split(";"):
            if re.search(r"ON\s+CONFLICT", statement, re.I) and re.search(r"ROW_COUNT", statement, re.I):
                found.append(sig)
        if re.search(r"ON\s+CONFLICT", src, re.I) and re.search(r"GET\s+DIAGNOSTICS[^;]*ROW_COUNT", src, re.I):
            found.append(sig)
    assert sorted(set(found)) == []


def test_every_for_update_names_user_id(catalog_conn):
    # A row lock on a distributed table must route to one shard: by user_id.
    found = []
    for sig, src in bodies(catalog_conn).items():
        for statement in re.split(r";", src):
            if re.search(r"\bFOR\s+(NO\s+KEY\s+)?UPDATE\b|\bFOR\s+(KEY\s+)?SHARE\b", statement, re.I) \
                    and "user_id" not in statement:
                found.append(sig)
    assert found == []


def test_no_volatile_function_in_a_modification_where(catalog_conn):
    # Citus refuses VOLATILE functions in the WHERE of UPDATE/DELETE on distributed
    # tables; _raise and _invalid_span are the volatile guards that might creep in.
    found = []
    for sig, src in bodies(catalog_conn).items():
        for statement in src.split(";"):
            m = re.search(r"\b(UPDATE|DELETE\s+FROM)\s+sessiontag\.\w+.*?\bWHERE\b(.*)", statement, re.I | re.S)
            if m and re.search(r"sessiontag\._(raise|invalid_span)\(", m.group(2)):
                found.append(sig)
    assert found == []


def test_distribute_without_citus_is_one_clear_error(dsn):
    import psycopg

    from tests.test_migrations import _one_line_error, sessiontag_cli

    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="distribute needs the citus extension"):
            conn.execute("SELECT * FROM sessiontag.distribute()")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="shard_count"):
            conn.execute("SELECT * FROM sessiontag.distribute(shard_count => 0)")
        # nothing changed: the settings are the transaction's, refused with it
        assert conn.execute("SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
                            " WHERE d.datname = current_database()").fetchone()[0] == 0
    line = _one_line_error(sessiontag_cli("--dsn", dsn, "distribute"))
    assert "distribute needs the citus extension" in line


def test_search_functions_refuse_to_run_in_a_citus_shard_query(conn):
    # Citus names its connections to the workers citus_internal; a search function run
    # there would answer for one shard only.
    conn.execute("SET application_name = 'citus_internal gpid=1'")
    with pytest.raises(Exception, match="cannot run inside a query Citus sends to each shard"):
        conn.execute("SELECT * FROM sessiontag.list_traces()")
    conn.execute("RESET application_name")
    assert conn.execute("SELECT count(*) FROM sessiontag.list_traces()").fetchone()[0] == 0
