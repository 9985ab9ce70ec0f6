"""`sessiontag distribute` on a real Citus cluster: a fresh database, one holding data,
and again (idempotent)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sessiontag.cli", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=300)


def placement(conn) -> dict:
    return dict(conn.execute("""SELECT logicalrelid::regclass::text,
               CASE WHEN partmethod = 'h' THEN 'hash:' || colocationid::text ELSE repmodel::text END
        FROM pg_dist_partition WHERE logicalrelid::regclass::text LIKE 'sessiontag.%'""").fetchall())


@pytest.fixture
def fresh(cluster):
    dsn = cluster.create_database()
    yield dsn
    cluster.drop_database(dsn)


def test_distribute_a_fresh_database_then_again(fresh):
    first = cli(fresh, "distribute", "--format", "csv")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[1:] == [
        "llm_models,reference,yes", "conversations,distributed by user_id,yes", "feedback,distributed by user_id,yes",
        "llm_traces,distributed by user_id,yes", "session_counters,distributed by user_id,yes"]
    with psycopg.connect(fresh, autocommit=True) as conn:
        kinds = placement(conn)
        assert kinds["sessiontag.llm_models"] == "t"
        colocations = {v for k, v in kinds.items() if k != "sessiontag.llm_models"}
        assert len(colocations) == 1 and next(iter(colocations)).startswith("hash:")
        # every function exists on every node
        missing = conn.execute("""SELECT p.oid::regprocedure::text FROM pg_proc p
            WHERE p.pronamespace = 'sessiontag'::regnamespace
              AND NOT EXISTS (SELECT FROM pg_dist_object o WHERE o.classid = 'pg_proc'::regclass AND o.objid = p.oid)
            """).fetchall()
        assert missing == []
        fks = conn.execute("""SELECT conname FROM pg_constraint WHERE contype = 'f'
            AND connamespace = 'sessiontag'::regnamespace ORDER BY 1""").fetchall()
        assert len(fks) == 5
    again = cli(fresh, "distribute", "--format", "csv")
    assert again.returncode == 0, again.stderr
    assert all(line.endswith(",no") for line in again.stdout.splitlines()[1:])
    verified = cli(fresh, "verify")  # the distributed schema is still the expected one
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_distribute_a_database_holding_data_keeps_every_row_and_number(fresh):
    users = [uuid.uuid4() for _ in range(6)]
    with psycopg.connect(fresh, autocommit=True) as conn:
        model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
        other = conn.execute("SELECT sessiontag.register_model('Claude', 'anthropic', 'claude', %s)",
                             [users[0]]).fetchone()[0]
        for i, user in enumerate(users):
            for n in range(5):
                conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)",
                                    [user, other if (i == 0 and n % 2) else model]).fetchone()[0]
                conn.execute("SELECT sessiontag.record_trace(%s, %s, 'root', 'chat', conversation_id => %s,"
                             " start_time => %s, end_time => %s, input_tokens => 3)",
                             [user, f"t{i}{n}", conv, T0, T0 + timedelta(seconds=1)])
            conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [user, model])  # handed out, unused
        conn.execute("SELECT sessiontag.record_feedback(%s, 'thumbs', 1, trace_id => 't00')", [users[0]])
        untagged = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [users[1]]).fetchone()[0]
        conn.execute("DELETE FROM sessiontag.conversations WHERE user_id = %s AND session_counter = 5", [users[2]])
        before = {t: conn.execute(f"SELECT * FROM sessiontag.{t} ORDER BY 1, 2").fetchall()
                  for t in ("llm_models", "conversations", "llm_traces", "session_counters", "feedback")}
    result = cli(fresh, "distribute")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(fresh, autocommit=True) as conn:
        after = {t: conn.execute(f"SELECT * FROM sessiontag.{t} ORDER BY 1, 2").fetchall() for t in before}
        assert after == before
        assert placement(conn)["sessiontag.llm_models"] == "t"
        # numbering goes on where it was: 5 conversations and one handed-out tag each
        for user in users[1:]:
            tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)",
                               [user, model]).fetchone()[0]
            assert tag.endswith("_007"), (user, tag)
        assert conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [untagged, model]).fetchone()[0] \
            .endswith("_008")
        short_id = conn.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s", [model]).fetchone()[0]
        third = conn.execute("SELECT sessiontag.register_model('Third', NULL, 'third')").fetchone()[0]
        assert conn.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s", [third]).fetchone()[0] \
            != short_id
    again = cli(fresh, "distribute", "--format", "csv")
    assert again.returncode == 0 and all(line.endswith(",no") for line in again.stdout.splitlines()[1:])


def test_later_migration_statements_run_on_the_distributed_schema(fresh):
    """What docs/scaling.md tells migration authors: the forms that Citus takes."""
    assert cli(fresh, "distribute").returncode == 0
    with psycopg.connect(fresh, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL citus.multi_shard_modify_mode = sequential")
            conn.execute("ALTER TABLE sessiontag.conversations ADD COLUMN scratch_note text")
            conn.execute("ALTER TABLE sessiontag.conversations ADD CONSTRAINT conversations_scratch_note_check"
                         " CHECK (length(scratch_note) <= 10)")
            conn.execute("CREATE OR REPLACE FUNCTION sessiontag._scratch() RETURNS int LANGUAGE plpgsql"
                         " SET search_path = pg_catalog, pg_temp AS $$ BEGIN RETURN 1; END $$")
        with conn.transaction():
            conn.execute("SET LOCAL citus.multi_shard_modify_mode = sequential")
            conn.execute("ALTER TABLE sessiontag.conversations DROP COLUMN scratch_note")
            conn.execute("DROP FUNCTION sessiontag._scratch()")


def test_rolling_back_0014_is_refused_on_a_distributed_database(fresh):
    assert cli(fresh, "distribute").returncode == 0
    result = cli(fresh, "rollback", "--to", "0013_otlp_receiver", "--yes")  # the later ones first
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: sessiontag is distributed by Citus")
