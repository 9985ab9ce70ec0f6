"""The COPY path: spans streamed with COPY into the session's staging table
(create_span_staging) and moved by ingest_staged_spans, through Client.ingest and raw COPY.

It keeps every rule of ingest_traces: the same validation cases (named by row, counted from
1), retries, analytics off, first-trace tagging, all or nothing, a staging left empty."""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from datetime import timedelta

import psycopg
import pytest

from sessiontag.client import Client
from sessiontag.embedded import bindir
from sessiontag.errors import DatabaseError
from tests.test_traces import (BAD_ELEMENTS, T0, _state, bad_batch, conversation, conversation_tag, count, register,  # noqa: F401
                               shared, span, world)

COLUMNS = ("user_id", "trace_id", "span_id", "span_name", "conversation_id", "start_time", "end_time")


def staged(conn) -> int:
    """Rows waiting in this session's staging (none when a rolled-back transaction made it)."""
    if conn.execute("SELECT to_regclass('pg_temp.sessiontag_spans')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT count(*) FROM pg_temp.sessiontag_spans").fetchone()[0]


def finished(user, trace_id, span_id, **extra) -> dict:
    return span(user, trace_id, span_id, **{"start_time": T0, "end_time": T0 + timedelta(seconds=1), **extra})


# -- every validation case of ingest_traces, named by row ---------------------------------------
# What Python judges before COPY (a text field of another type, a span that is no mapping)
# is said in Python's words; everything else is the database's message with "row N: ".
PYTHON_WORDS = {
    "span_name: must be a JSON string, got number 5": "span_name: must be a string, got int 5",
    'trace_id: must be a JSON string, got array ["t"]': "trace_id: must be a string, got list ['t']",
    'error_message: must be a JSON string, got object {"code": 1}':
        "error_message: must be a string, got dict {'code': 1}",
    "must be a JSON object, got string": "must be a mapping, got str",
}


def as_row(index: int, message: str) -> str:
    rest = re.sub(r"^spans\[\d+\](\.|: )", "", message)
    for json_words, python_words in PYTHON_WORDS.items():
        if rest == json_words or (rest.startswith(json_words) and "metadata" not in rest):
            rest = python_words
    return f"row {index + 1}: {rest}"


@pytest.mark.parametrize("index, change, sqlstate, message", BAD_ELEMENTS,
                         ids=[m.split(":")[0] + "-" + m.split(":")[1][:30].strip() for _, _, _, m in BAD_ELEMENTS])
def test_copy_path_is_all_or_nothing_and_names_the_row_and_field(shared, index, change, sqlstate, message):
    user, spans = shared["user"], bad_batch(shared, index, change)
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        before = _state(c)
        with pytest.raises(DatabaseError) as info:
            Client(c).ingest(spans)
        assert info.value.sqlstate == sqlstate
        assert str(info.value).startswith(as_row(index, message)), str(info.value)
        assert _state(c) == before
        assert staged(c) == 0  # the next batch starts from an empty staging
        assert Client(c).ingest([finished(user, "next", f"n{index}")]) == 1
        c.execute("DELETE FROM sessiontag.llm_traces WHERE trace_id = 'next'")


def test_copy_path_names_an_end_before_a_start_staged_earlier(shared):
    user = shared["user"]
    spans = [span(user, "pair", "a", status="running", start_time=T0),
             span(user, "pair", "a", start_time=T0 - timedelta(hours=2), end_time=T0 - timedelta(hours=1))]
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        before = _state(c)
        with pytest.raises(DatabaseError, match=r"^row 2: end_time: .* is before start_time"):
            Client(c).ingest(spans)
        assert _state(c) == before


# -- raw COPY, as any language speaks it ------------------------------------------------------
def raw_copy(conn, lines: list[str]) -> int:
    """COPY text rows into the staging and move them, in one transaction."""
    with conn.transaction():
        conn.execute("SELECT sessiontag.create_span_staging()")
        with conn.cursor().copy(f"COPY pg_temp.sessiontag_spans ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            copy.write("".join(line + "\n" for line in lines))
        return conn.execute("SELECT sessiontag.ingest_staged_spans()").fetchone()[0]


@pytest.mark.parametrize("bad, sqlstate, message", [
    ("{u}\tt\tx\tchat\t\\N\t2026-02-01 09:00:00+00", "22P04", "missing data for column \"end_time\""),
    ("{u}\tt\tx\tchat\t\\N\t2026-02-01 09:00:00+00\t2026-02-01 09:00:01+00\textra", "22P04",
     "extra data after last expected column"),
    ("not-a-uuid\tt\tx\tchat\t\\N\t2026-02-01 09:00:00+00\t2026-02-01 09:00:01+00", "22P02",
     'invalid input syntax for type uuid: "not-a-uuid"'),
    ("{u}\tt\tx\tchat\t\\N\tsoon\t\\N", "22007", "invalid input syntax for type timestamp with time zone"),
])
def test_malformed_copy_data_is_one_clear_error_naming_the_line(conn, world, bad, sqlstate, message):
    user = world["user"]
    good = f"{user}\tt\tok\tchat\t\\N\t2026-02-01 09:00:00+00\t2026-02-01 09:00:01+00"
    with pytest.raises(psycopg.Error) as info:
        raw_copy(conn, [good, bad.format(u=user)])
    assert info.value.sqlstate == sqlstate and message in info.value.diag.message_primary
    assert "line 2" in info.value.diag.context
    assert count(conn) == 0 and staged(conn) == 0
    with pytest.raises(DatabaseError, match=re.escape(f"row 2: ") + r"\w+: "):  # Client.ingest names it as a row
        Client(conn).ingest([finished(user, "t", "ok"), finished(user, "t", "x", start_time="2026-02-01 soon")])
    assert raw_copy(conn, [good]) == 1


def test_ingest_staged_spans_names_the_row_it_judges(conn, world):
    user = world["user"]
    with pytest.raises(psycopg.Error) as info:
        raw_copy(conn, [f"{user}\tt\ta\tchat\t\\N\t2026-02-01 09:00:00+00\t2026-02-01 09:00:01+00",
                        f"{user}\tt\tb\tchat\t{uuid.uuid4()}\t2026-02-01 09:00:00+00\t2026-02-01 09:00:01+00"])
    assert info.value.sqlstate == "P0002"
    assert info.value.diag.message_primary.startswith("row 2: conversation_id: ")
    assert conn.execute("SELECT sessiontag.ingest_staged_spans()").fetchone()[0] == 0  # nothing staged


def test_the_documented_psql_copy_works(conn, world, dsn, tmp_path):
    """The docs' example: BEGIN; \\copy from a file; SELECT sessiontag.ingest_staged_spans(); COMMIT."""
    user = world["user"]
    conv, tag = conversation(conn, user, world["model"])
    (tmp_path / "spans.tsv").write_text(
        f"{user}\ttr-1\tsp-1\tchat\t{conv}\t2026-02-01 09:00:00+00\t2026-02-01 09:00:02+00\n"
        f"{user}\ttr-1\tsp-2\tretrieve\t{conv}\t2026-02-01 09:00:00.5+00\t2026-02-01 09:00:01+00\n")
    script = (f"BEGIN;\nSELECT sessiontag.create_span_staging();\n"
              f"\\copy pg_temp.sessiontag_spans ({', '.join(COLUMNS)}) FROM '{tmp_path / 'spans.tsv'}'\n"
              "SELECT sessiontag.ingest_staged_spans();\nCOMMIT;\n")
    result = subprocess.run([str(bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn],
                            input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sessiontag_spans", "2"]
    assert [r[0] for r in conn.execute("SELECT DISTINCT session_tag FROM sessiontag.llm_traces")] == [tag]


# -- the rules of ingest_traces ---------------------------------------------------------------
def test_copy_path_retries_store_nothing_twice_and_finish_started_spans(conn, world):
    user, client = world["user"], Client(conn)
    conv, tag = conversation(conn, user, world["model"])
    batch = [finished(user, "t1", f"s{i}", conversation_id=conv) for i in range(5)]
    assert client.ingest(batch) == 5
    assert client.ingest(batch) == 0  # sent again: nothing changes
    started = span(user, "t2", "r", conversation_id=conv, status="running", start_time=T0)
    assert client.ingest([started]) == 1
    assert client.ingest([started, finished(user, "t2", "r", conversation_id=conv, status="error",
                                            error_message="boom", output_tokens=7)]) == 1
    assert conn.execute("SELECT status, error_message, output_tokens, session_tag FROM sessiontag.llm_traces"
                        " WHERE trace_id = 't2'").fetchone() == ("error", "boom", 7, tag)
    # started and finished in one batch: stored finished, counted once per row that took effect
    assert client.ingest([span(user, "t3", "x", status="running", start_time=T0),
                          finished(user, "t3", "x")]) == 2
    assert count(conn, "trace_id = 't3' AND status = 'success'") == 1
    assert count(conn) == 7


def test_copy_path_tags_on_first_trace_and_skips_analytics_off(conn, world):
    user, client = world["user"], Client(conn)
    untagged, _ = conversation(conn, user)  # no model: tagged by its first span's tracked model
    off, _ = conversation(conn, user, world["model"], analytics_enabled=False)
    stored = client.ingest([finished(user, "a", "1", conversation_id=untagged, model_id=world["untracked"]),
                            finished(user, "a", "2", conversation_id=untagged, model_id=world["model"]),
                            finished(user, "b", "1", conversation_id=off)])
    assert stored == 2
    tag = conversation_tag(conn, untagged)
    assert tag is not None and tag.startswith(f"chat_model_{world['model'].hex[:6]}_")
    assert {r[0] for r in conn.execute("SELECT session_tag FROM sessiontag.llm_traces")} == {tag}
    assert count(conn, "conversation_id = %s", [off]) == 0


@pytest.mark.slow
def test_a_100k_span_batch(conn, world):
    user = world["user"]
    convs = [conversation(conn, user, world["model"]) for _ in range(20)]
    spans = [finished(user, f"t{i // 4}", f"s{i}", conversation_id=convs[i % 20][0]) for i in range(100_000)]
    assert Client(conn).ingest(spans) == 100_000
    assert conn.execute("SELECT count(*), count(DISTINCT session_tag), count(*) FILTER (WHERE session_tag IS NULL)"
                        " FROM sessiontag.llm_traces").fetchone() == (100_000, 20, 0)


def test_sessions_ingesting_at_once_each_use_their_own_staging(dsn, conn, world):
    """8 connections ingest at once, half of the spans in two sessions each: every span is
    stored once, and each session's count is what its own staging held."""
    user = world["user"]
    conv, _ = conversation(conn, user, world["model"])
    barrier, results, errors = threading.Barrier(8), {}, []

    def worker(k: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                mine = [finished(user, f"own{k}", f"s{i}", conversation_id=conv) for i in range(2_000)]
                shared_spans = [finished(user, f"pair{k // 2}", f"s{i}", conversation_id=conv) for i in range(1_000)]
                barrier.wait()
                results[k] = Client(c).ingest(mine + shared_spans)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(results.values()) == count(conn) == 8 * 2_000 + 4 * 1_000
    assert all(results[k] >= 2_000 for k in range(8))


def test_a_user_scoped_caller_copies_only_its_own_spans(pg_server, dsn, conn, world):
    user, other = world["user"], world["other"]
    role = f"copy_user_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE sessiontag_user")
    try:
        scoped = dsn.replace("user=postgres", f"user={role}")
        with psycopg.connect(scoped, autocommit=True, options=f"-c sessiontag.user_id={user}") as c:
            assert Client(c).ingest([finished(user, "mine", "1")]) == 1
            with pytest.raises(DatabaseError, match=rf"^row 2: user_id: {other} is not the user of this session") \
                    as info:
                Client(c).ingest([finished(user, "mine", "2"), finished(other, "theirs", "1")])
            assert info.value.sqlstate == "42501"
        with psycopg.connect(scoped, autocommit=True) as c:  # no user set: refused before anything
            with pytest.raises(psycopg.Error, match="sessiontag.user_id is not set"):
                c.execute("SELECT sessiontag.create_span_staging()")
        assert count(conn) == 1
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_a_staging_table_made_by_the_caller_is_refused(dsn, conn, world):
    """The functions read the staging as its owner: a table of that name made by the caller
    (with whatever columns, rules or triggers) is not read."""
    role = f"copy_app_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE sessiontag_app")
    try:
        with psycopg.connect(dsn.replace("user=postgres", f"user={role}"), autocommit=True) as c:
            c.execute("CREATE TEMP TABLE sessiontag_spans (user_id uuid)")
            for call in ("sessiontag.ingest_staged_spans()", "sessiontag.create_span_staging()"):
                with pytest.raises(psycopg.Error, match="was not created by sessiontag.create_span_staging") as info:
                    c.execute(f"SELECT {call}")
                assert info.value.sqlstate == "42P07"
            c.execute("DROP TABLE pg_temp.sessiontag_spans")
            assert Client(c).ingest([finished(world["user"], "t", "s")]) == 1
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_ingest_traces_refuses_while_copied_rows_wait(conn, world):
    user = world["user"]
    with conn.transaction():
        conn.execute("SELECT sessiontag.create_span_staging()")
        with conn.cursor().copy("COPY pg_temp.sessiontag_spans (user_id, trace_id, span_id, span_name) FROM STDIN") \
                as copy:
            copy.write_row([user, "t", "s", "chat"])
        with pytest.raises(psycopg.Error, match="the span staging holds rows not yet ingested") as info:
            conn.execute("SELECT sessiontag.ingest_traces('[{\"user_id\": \"%s\"}]'::jsonb)" % user)
        assert info.value.sqlstate == "55000"
        raise psycopg.Rollback
    assert count(conn) == 0
