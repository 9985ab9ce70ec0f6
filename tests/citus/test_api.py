"""The SQL API end to end on a distributed database, as an application calls it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


def one(conn, query, *params):
    return conn.execute(query, params).fetchone()


def otlp(user, conversation: str, trace: str, span: str, end: bool = True) -> dict:
    start = int(T0.timestamp() * 1e9)
    attributes = [{"key": "user.id", "value": {"stringValue": str(user)}},
                  {"key": "gen_ai.conversation.id", "value": {"stringValue": conversation}},
                  {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
                  {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "7"}}]
    span_json = {"traceId": trace, "spanId": span, "name": "chat", "startTimeUnixNano": str(start),
                 "attributes": attributes}
    if end:
        span_json["endTimeUnixNano"] = str(start + 1_500_000_000)
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span_json]}]}]}


@pytest.fixture(scope="module")
def model(distributed):
    with psycopg.connect(distributed, autocommit=True) as conn:
        return one(conn, "SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')")[0]


def test_tags_and_conversations(distributed, model):
    user = uuid.uuid4()
    with psycopg.connect(distributed, autocommit=True) as conn:
        conv, tag, counter = one(conn, "SELECT id, session_id, session_counter FROM"
                                       " sessiontag.create_conversation(%s, %s, 'hello')", user, model)
        assert counter == 1 and tag.endswith("_001")
        bare = one(conn, "SELECT id FROM sessiontag.create_conversation(%s)", user)[0]
        assert one(conn, "SELECT sessiontag.ensure_session_tag(%s, %s)", bare, model)[0].endswith("_002")
        assert one(conn, "SELECT sessiontag.ensure_session_tag(%s)", bare)[0].endswith("_002")
        assert one(conn, "SELECT (sessiontag.generate_session_tag(%s, %s)).counter", user, model)[0] == 3
        assert [r[0] for r in conn.execute("SELECT counter FROM sessiontag.generate_session_tags(%s, %s, 3)",
                                           [user, model])] == [4, 5, 6]
        assert one(conn, "SELECT sessiontag.session_badge(%s)", tag)[0] == "[GPT-4o #001]"
        assert one(conn, "SELECT sessiontag.session_badge(%s, %s)", tag[:-3] + "006", user)[0] == "[GPT-4o #006]"
        assert one(conn, "SELECT sessiontag.set_analytics_tracking(%s, false)", bare)[0] is False
        assert one(conn, "SELECT sessiontag.set_analytics_tracking(%s, true)", bare)[0] is True
        # a plain INSERT is tagged the same way; a manual tag is kept
        assert one(conn, "INSERT INTO sessiontag.conversations (user_id, llm_model_id) VALUES (%s, %s)"
                         " RETURNING session_id", user, model)[0].endswith("_007")
        assert one(conn, "INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, 'mine')"
                         " RETURNING session_id", user)[0] == "mine"
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, 'mine')", [user])
        assert one(conn, "SELECT sessiontag.model_id('gpt-4o')")[0] == model
        assert one(conn, "SELECT count(*) FROM sessiontag.list_models()")[0] >= 1
        assert one(conn, "SELECT sessiontag.set_model_tracking(%s, true)", model)[0] is True
        # backfill
        untracked = one(conn, "SELECT id FROM sessiontag.create_conversation(%s)", user)[0]
        conn.execute("UPDATE sessiontag.conversations SET title = 'x' WHERE user_id = %s AND id = %s",
                     [user, untracked])
        assert one(conn, "SELECT sessiontag.count_untagged_conversations(%s)", user)[0] == 0


def test_traces_search_and_compare(distributed, model):
    user, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(distributed, autocommit=True) as conn:
        conv, tag = one(conn, "SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)", user, model)
        one(conn, "SELECT sessiontag.create_conversation(%s, %s)", other, model)  # the same tag text, another user
        root = one(conn, "SELECT sessiontag.start_trace(%s, 'tr', 'root', 'chat', conversation_id => %s,"
                         " start_time => %s)", user, conv, T0)[0]
        assert one(conn, "SELECT sessiontag.start_trace(%s, 'tr', 'root', 'chat', conversation_id => %s,"
                         " start_time => %s)", user, conv, T0)[0] == root  # retried: the same row
        one(conn, "SELECT sessiontag.record_trace(%s, 'tr', 'llm', 'llm', parent_span_id => 'root',"
                  " conversation_id => %s, model_id => %s, start_time => %s, end_time => %s, input_tokens => 5,"
                  " output_tokens => 7, cost_usd => 0.01)", user, conv, model, T0, T0 + timedelta(seconds=2))
        assert one(conn, "SELECT sessiontag.end_trace(%s, 'tr', 'root', end_time => %s)",
                   user, T0 + timedelta(seconds=3))[0] == root
        rows = conn.execute("SELECT span_id, session_tag FROM sessiontag.list_traces(user_id => %s)",
                            [user]).fetchall()
        assert sorted(rows) == [("llm", tag), ("root", tag)]
        page = conn.execute("SELECT span_id, cursor FROM sessiontag.list_traces(session_tag => %s,"
                            " user_id => %s, page_size => 1)", [tag, user]).fetchall()
        rest = conn.execute("SELECT span_id FROM sessiontag.list_traces(session_tag => %s, user_id => %s,"
                            " after => %s)", [tag, user, page[0][1]]).fetchall()
        assert sorted([page[0][0], rest[0][0]]) == ["llm", "root"] and len(rest) == 1
        assert [(r[0], r[1]) for r in conn.execute("SELECT span_id, depth FROM sessiontag.get_trace(%s, 'tr')",
                                                   [user])] == [("root", 0), ("llm", 1)]
        summary = one(conn, "SELECT session_id, trace_count, input_tokens, cost_usd"
                            " FROM sessiontag.session_summary(%s, %s)", tag, user)
        assert summary[:3] == (tag, 1, 5) and float(summary[3]) == pytest.approx(0.01)
        sessions = conn.execute("SELECT user_id, trace_count FROM sessiontag.list_sessions(user_id => %s)",
                                [user]).fetchall()
        assert sessions == [(user, 1)]
        assert {r[0] for r in conn.execute("SELECT user_id FROM sessiontag.session_summary(%s)", [tag])} >= {
            user, other}
        compared = one(conn, "SELECT sessions, traces FROM sessiontag.compare_models(user_id => %s)", user)
        assert compared == (1, 1)
        assert one(conn, "SELECT count(*) FROM sessiontag.compare_metrics(user_id => %s)", user)[0] > 0
        fb = one(conn, "SELECT sessiontag.record_feedback(%s, 'thumbs', 1, trace_id => 'tr')", user)[0]
        assert one(conn, "SELECT id FROM sessiontag.list_feedback(%s)", user)[0] == fb
        # a deleted conversation keeps its traces, with conversation_id NULL
        conn.execute("DELETE FROM sessiontag.conversations WHERE user_id = %s AND id = %s", [user, conv])
        assert conn.execute("SELECT conversation_id, session_tag FROM sessiontag.llm_traces WHERE user_id = %s",
                            [user]).fetchall() == [(None, tag), (None, tag)]


def test_a_subquery_argument_is_refused_not_answered_per_shard(distributed, model):
    user = uuid.uuid4()
    with psycopg.connect(distributed, autocommit=True) as conn:
        conv = one(conn, "SELECT id FROM sessiontag.create_conversation(%s, %s)", user, model)[0]
        one(conn, "SELECT sessiontag.record_trace(%s, 'sq', 'a', 'chat', conversation_id => %s)", user, conv)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="list_traces"):
            conn.execute("SELECT * FROM sessiontag.list_traces(session_tag =>"
                         " (SELECT session_id FROM sessiontag.conversations WHERE id = %s))", [conv])
        # what docs/scaling.md says to do instead: the value first
        rows = conn.execute("""WITH t AS MATERIALIZED (SELECT session_id, user_id FROM sessiontag.conversations
                                                       WHERE id = %s)
            SELECT l.user_id, l.trace_id FROM t, sessiontag.list_traces(session_tag => t.session_id,
                                                                        user_id => t.user_id) l""",
                            [conv]).fetchall()
        assert rows == [(user, "sq")]


def test_retried_ingests_store_each_span_once(distributed, model):
    user = uuid.uuid4()
    with psycopg.connect(distributed, autocommit=True) as conn:
        conv = one(conn, "SELECT id FROM sessiontag.create_conversation(%s)", user)[0]
        started = [dict(user_id=str(user), trace_id="in", span_id="a", span_name="chat", status="running",
                        conversation_id=str(conv), model_id=str(model), start_time=T0.isoformat())]
        finished = [dict(started[0], status="success", end_time=(T0 + timedelta(seconds=1)).isoformat(),
                         input_tokens=4),
                    dict(user_id=str(user), trace_id="in", span_id="b", span_name="tool", parent_span_id="a",
                         conversation_id=str(conv), start_time=T0.isoformat(),
                         end_time=(T0 + timedelta(seconds=1)).isoformat())]
        assert one(conn, "SELECT sessiontag.ingest_traces(%s)", Jsonb(started))[0] == 1
        assert one(conn, "SELECT sessiontag.ingest_traces(%s)", Jsonb(started))[0] == 0
        assert one(conn, "SELECT sessiontag.ingest_traces(%s)", Jsonb(finished))[0] == 2  # ends a, stores b
        assert one(conn, "SELECT sessiontag.ingest_traces(%s)", Jsonb(finished))[0] == 0
        rows = conn.execute("SELECT span_id, status, input_tokens, session_tag IS NOT NULL FROM sessiontag.llm_traces"
                            " WHERE user_id = %s ORDER BY span_id", [user]).fetchall()
        assert rows == [("a", "success", 4, True), ("b", "success", None, True)]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"spans\[1\]\.status"):
            conn.execute("SELECT sessiontag.ingest_traces(%s)",
                         [Jsonb([dict(finished[1], span_id="c"), dict(finished[1], span_id="d", status="odd")])])
        # OTLP, sent twice
        payload = otlp(user, "ext-1", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
        assert one(conn, "SELECT sessiontag.ingest_otlp(%s)", Jsonb(payload))[0] == 1
        assert one(conn, "SELECT sessiontag.ingest_otlp(%s)", Jsonb(payload))[0] == 0
        assert one(conn, "SELECT count(*) FROM sessiontag.llm_traces WHERE user_id = %s AND session_tag IS NOT NULL",
                   user)[0] == 3
    # the COPY path: the session's staging, then the mover; twice
    rows = [(user, "cp", f"s{i}", "chat", conv, T0, T0 + timedelta(seconds=1)) for i in range(50)]
    with psycopg.connect(distributed) as conn:
        for expected in (50, 0):
            with conn.transaction():
                conn.execute("SELECT sessiontag.create_span_staging()")
                with conn.cursor().copy("COPY pg_temp.sessiontag_spans (user_id, trace_id, span_id, span_name,"
                                        " conversation_id, start_time, end_time) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                assert one(conn, "SELECT sessiontag.ingest_staged_spans()")[0] == expected
        assert one(conn, "SELECT count(*) FROM sessiontag.llm_traces WHERE user_id = %s AND trace_id = 'cp'",
                   user)[0] == 50


def test_client_ingest_through_copy_and_a_bad_row_named(distributed):
    from sessiontag import Client

    user = uuid.uuid4()
    spans = [dict(user_id=user, trace_id="cl", span_id=f"s{i}", span_name="chat", start_time=T0,
                  end_time=T0 + timedelta(seconds=1)) for i in range(200)]
    with Client.connect(distributed) as client:
        assert client.ingest(spans) == 200
        assert client.ingest(spans) == 0
        bad = [dict(spans[0], span_id="x1"), dict(spans[0], span_id="x2", status="odd")]
        with pytest.raises(Exception, match=r"row 2: status"):
            client.ingest(bad)
    with psycopg.connect(distributed, autocommit=True) as conn:
        assert one(conn, "SELECT count(*) FROM sessiontag.llm_traces WHERE user_id = %s", user)[0] == 200
