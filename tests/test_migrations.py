"""Migrations: schema equality with sql/, lossless rollbacks, concurrency, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import psycopg
import pytest

from sessiontag import catalog, migrate
from sessiontag.resources import migrations_dir
from tests.schema_tools import build_from_sql, catalog_of, pg_dump_schema

MIGRATION_IDS = [p.name[:-4] for p in sorted(migrations_dir().glob("*.sql")) if not p.name.endswith(".rollback.sql")]


def test_every_migration_has_a_rollback_and_declares_its_dependency():
    for i, mid in enumerate(MIGRATION_IDS):
        assert (migrations_dir() / f"{mid}.rollback.sql").exists(), mid
        head = (migrations_dir() / f"{mid}.sql").read_text()
        expected = "-- depends:" if i == 0 else f"-- depends: {MIGRATION_IDS[i - 1]}"
        assert expected in head, f"{mid} must declare {expected!r}"


def test_schema_from_sql_equals_schema_from_migrations(empty_dsn, dsn):
    build_from_sql(empty_dsn)
    assert catalog.diff(catalog_of(empty_dsn), catalog_of(dsn)) == []


def test_expected_catalog_is_up_to_date(empty_dsn):
    build_from_sql(empty_dsn)
    assert catalog.expected() == catalog_of(empty_dsn), "run `make catalog` and commit the result"


def _seed(dsn: str) -> dict:
    """A model, a tagged conversation and two traces carrying its tag."""
    user = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
        conv, tag = conn.execute(
            "SELECT id, session_id FROM sessiontag.create_conversation(%s, %s, 'hello')", [user, model]
        ).fetchone()
        for span in ("a", "b"):
            conn.execute(
                "INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name, conversation_id, session_tag)"
                " VALUES (%s, 't1', %s, 'chat', %s, %s)", [user, span, conv, tag])
        short_id = conn.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s", [model]).fetchone()[0]
    return dict(user=user, model=model, conversation=conv, tag=tag, short_id=short_id)


def _traces(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT user_id, id, trace_id, span_id, conversation_id FROM sessiontag.llm_traces ORDER BY span_id"
        ).fetchall()


def test_apply_rollback_all_apply_gives_identical_schema(empty_dsn):
    migrate.apply(empty_dsn)
    before = pg_dump_schema(empty_dsn)
    assert "CREATE TABLE sessiontag.llm_traces" in before
    assert migrate.rollback(empty_dsn, everything=True) == list(reversed(MIGRATION_IDS))
    with psycopg.connect(empty_dsn) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sessiontag%'").fetchall()
    assert left == [], "an empty database rolls back to nothing"
    migrate.apply(empty_dsn)
    assert pg_dump_schema(empty_dsn) == before


def test_rollback_all_with_data_keeps_everything_and_applies_back(empty_dsn):
    migrate.apply(empty_dsn)
    before_schema = pg_dump_schema(empty_dsn)
    seed = _seed(empty_dsn)
    traces = _traces(empty_dsn)
    migrate.rollback(empty_dsn, everything=True)
    with psycopg.connect(empty_dsn) as conn:
        kept = conn.execute("SELECT count(*) FROM sessiontag_archive.llm_traces").fetchone()[0]
    assert kept == 2
    migrate.apply(empty_dsn)
    assert pg_dump_schema(empty_dsn) == before_schema
    assert _traces(empty_dsn) == traces
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('sessiontag_archive')").fetchone()[0] is None
        tags = conn.execute("SELECT DISTINCT session_tag FROM sessiontag.llm_traces").fetchall()
        assert tags == [(seed["tag"],)]
        assert conn.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s",
                            [seed["model"]]).fetchone()[0] == seed["short_id"]
        # numbering continues after the kept session
        nxt = conn.execute("SELECT counter FROM sessiontag.generate_session_tag(%s, %s)",
                           [seed["user"], seed["model"]]).fetchone()[0]
        assert nxt == 2


def test_rollback_of_session_tag_migration_keeps_traces_and_restores_tags(dsn):
    seed = _seed(dsn)
    traces = _traces(dsn)
    undone = migrate.rollback(dsn, to="0001_base_tables")
    assert undone[-1] == "0002_session_tag"
    with psycopg.connect(dsn) as conn:
        columns = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'sessiontag.llm_traces'::regclass AND attnum > 0"
            " AND NOT attisdropped")]
        assert "session_tag" not in columns
        kept = conn.execute("SELECT session_tag, count(*) FROM sessiontag_archive.llm_traces_session_tag"
                            " GROUP BY 1").fetchall()
        assert kept == [(seed["tag"], 2)]
    assert _traces(dsn) == traces
    migrate.apply(dsn)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT session_tag FROM sessiontag.llm_traces ORDER BY span_id").fetchall() == [
            (seed["tag"],), (seed["tag"],)]
    assert _traces(dsn) == traces


def test_concurrent_migrators_one_applies_the_others_wait(empty_dsn):
    results, errors = [], []
    barrier = threading.Barrier(6)

    def run():
        try:
            barrier.wait()
            results.append(migrate.apply(empty_dsn))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=len) == [[]] * 5 + [MIGRATION_IDS]
    assert all(s.applied for s in migrate.states(empty_dsn))


def test_plain_yoyo_apply_and_rollback(empty_dsn):
    yoyo = os.path.join(os.path.dirname(sys.executable), "yoyo")
    uri = migrate.yoyo_uri(empty_dsn)
    subprocess.run([yoyo, "apply", "--batch", "--database", uri, str(migrations_dir())], check=True,
                   capture_output=True)
    assert all(s.applied for s in migrate.states(empty_dsn))
    assert catalog.diff(catalog.expected(), catalog_of(empty_dsn)) == []
    # -r undoes a migration together with everything built on it
    subprocess.run([yoyo, "rollback", "--batch", "--database", uri, "-r", "0002_session_tag",
                    str(migrations_dir())], check=True, capture_output=True)
    assert [s.applied for s in migrate.states(empty_dsn)] == [True] + [False] * (len(MIGRATION_IDS) - 1)


def sessiontag_cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sessiontag.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=stdin, timeout=120)


def test_verify_passes_on_a_migrated_database(dsn):
    result = sessiontag_cli("--dsn", dsn, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_verify_catches_dropped_index_and_altered_function(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX sessiontag.idx_llm_traces_session_tag")
        conn.execute("""CREATE OR REPLACE FUNCTION sessiontag._format_tag(short_id text, counter bigint) RETURNS text
                        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
                        AS $$ BEGIN RETURN counter::text; END $$""")
        conn.execute("ALTER TABLE sessiontag.conversations ADD COLUMN extra int")
        conn.execute("ALTER TABLE sessiontag.conversations DISABLE TRIGGER _100_tag")
        conn.execute("ALTER TABLE sessiontag.conversations ENABLE REPLICA TRIGGER _200_trace_tags")
    result = sessiontag_cli("--dsn", dsn, "verify")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "missing index idx_llm_traces_session_tag" in lines
    assert any(line.startswith("changed function _format_tag(short_id text, counter bigint): ") and "body" in line
               for line in lines)
    assert "extra column conversations.extra" in lines
    assert "changed trigger conversations._100_tag: enabled: 'yes' -> 'no'" in lines
    assert "changed trigger conversations._200_trace_tags: enabled: 'yes' -> 'replica only'" in lines


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--dsn", "not a dsn", "migrations"], "invalid DSN"),
    (["--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=3", "migrate"], "cannot connect"),
    (["--dsn", "postgresql://127.0.0.1:1/x", "verify"], "cannot connect"),
])
def test_cli_connection_errors_are_one_line(args, expected):
    assert expected in _one_line_error(sessiontag_cli(*args))


def test_cli_unknown_migration_and_usage_errors_are_one_line(dsn):
    assert "unknown migration id 'nope'" in _one_line_error(sessiontag_cli("--dsn", dsn, "migrate", "--to", "nope"))
    assert "unknown migration id" in _one_line_error(sessiontag_cli("--dsn", dsn, "rollback", "--to", "nope", "--yes"))
    assert "exactly one of" in _one_line_error(sessiontag_cli("--dsn", dsn, "rollback", "--yes"))
    assert "No such command" in _one_line_error(sessiontag_cli("--dsn", dsn, "nonsense"))


def test_cli_rollback_asks_and_aborts_without_yes(dsn):
    result = sessiontag_cli("--dsn", dsn, "rollback", "--steps", "1", stdin="n\n")
    assert "will roll back: " + MIGRATION_IDS[-1] in result.stderr
    assert result.returncode == 1
    assert all(s.applied for s in migrate.states(dsn))
    result = sessiontag_cli("--dsn", dsn, "rollback", "--steps", "1", "--yes")
    assert result.returncode == 0 and f"rolled back {MIGRATION_IDS[-1]}" in result.stdout
    result = sessiontag_cli("--dsn", dsn, "migrations", "--format", "json")
    states = {row["id"]: row["status"] for row in json.loads(result.stdout)}
    assert states[MIGRATION_IDS[-1]] == "pending"
    assert sessiontag_cli("--dsn", dsn, "migrate").stdout.strip() == f"applied {MIGRATION_IDS[-1]}"
