"""Trace recording: tag inheritance, first-trace tagging, tracking off, idempotent and
concurrent retries, validation that stores nothing, ingest_traces, Client.trace, CLI ingest."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from sessiontag import Client, DatabaseError, migrate
from tests.conftest import drop_database, new_database
from tests.test_migrations import _one_line_error, sessiontag_cli
from tests.numbers import last_number, numbers_total

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)


# -- helpers ---------------------------------------------------------------------------
def call(conn, function: str, **args):
    """SELECT sessiontag.function(name => value, ...): explicit NULLs included."""
    named = sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in args)
    query = sql.SQL("SELECT sessiontag.{}({})").format(sql.Identifier(function), named)
    return conn.execute(query, args).fetchone()[0]


def count(conn, where: str = "true", params=()) -> int:
    return conn.execute(f"SELECT count(*) FROM sessiontag.llm_traces WHERE {where}", params).fetchone()[0]


def register(conn, name: str, key: str, tracked: bool = True) -> uuid.UUID:
    model = conn.execute("SELECT sessiontag.register_model(%s, 'provider', %s)", [name, key]).fetchone()[0]
    if not tracked:
        conn.execute("SELECT sessiontag.set_model_tracking(%s, false)", [model])
    return model


def conversation(conn, user, model=None, analytics_enabled=True) -> tuple[uuid.UUID, str | None]:
    return conn.execute("SELECT id, session_id FROM sessiontag.create_conversation(%s, %s, analytics_enabled => %s)",
                        [user, model, analytics_enabled]).fetchone()


def conversation_tag(conn, conv) -> str | None:
    return conn.execute("SELECT session_id FROM sessiontag.conversations WHERE id = %s", [conv]).fetchone()[0]


def tags_of(conn, conv) -> list:
    return [r[0] for r in conn.execute(
        "SELECT session_tag FROM sessiontag.llm_traces WHERE conversation_id = %s ORDER BY start_time, span_id",
        [conv])]


def span(user, trace_id, span_id, **extra) -> dict:
    """One ingest_traces element."""
    return {"user_id": str(user), "trace_id": trace_id, "span_id": span_id, "span_name": "chat", **extra}


def ingest(conn, spans) -> int:
    return conn.execute("SELECT sessiontag.ingest_traces(%s)", [Jsonb(spans)]).fetchone()[0]


@pytest.fixture
def world(conn):
    """A tracked model, an untracked one, a user and another user."""
    return dict(model=register(conn, "GPT-4o", "gpt-4o"), untracked=register(conn, "Old", "old", tracked=False),
                user=uuid.uuid4(), other=uuid.uuid4())


# -- inheritance -------------------------------------------------------------------------
def test_every_message_carries_the_conversation_tag_streaming_or_not_with_or_without_a_model(dsn, conn, world):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user, model)
    assert tag.startswith("chat_model_")
    t = [T0 + timedelta(minutes=i) for i in range(6)]
    # message 1, streaming, names the model
    call(conn, "start_trace", user_id=user, trace_id="m1", span_id="s", span_name="chat", conversation_id=conv,
         model_id=model, start_time=t[0])
    call(conn, "end_trace", user_id=user, trace_id="m1", span_id="s", end_time=t[0] + timedelta(seconds=2))
    # message 2, not streaming, names no model
    call(conn, "record_trace", user_id=user, trace_id="m2", span_id="s", span_name="chat", conversation_id=conv,
         start_time=t[1], end_time=t[1])
    # message 3, streaming, names no model, with a child span
    call(conn, "start_trace", user_id=user, trace_id="m3", span_id="s", span_name="chat", conversation_id=conv,
         start_time=t[2])
    call(conn, "record_trace", user_id=user, trace_id="m3", span_id="c", parent_span_id="s", span_name="tool",
         operation_type="tool_call", conversation_id=conv, start_time=t[2], end_time=t[2])
    # message 4 in a batch, message 5 through the Python client
    assert ingest(conn, [span(user, "m4", "s", conversation_id=str(conv), start_time=t[3].isoformat())]) == 1
    with Client.connect(dsn) as client:
        with client.trace(user, "chat", conversation_id=conv, model_id=model):
            pass
    # the caller may pass the tag it knows; the conversation's own is accepted
    call(conn, "record_trace", user_id=user, trace_id="m6", span_id="s", span_name="chat", conversation_id=conv,
         session_tag=tag, start_time=t[5], end_time=t[5])
    assert count(conn, "conversation_id = %s", [conv]) == 7
    assert set(tags_of(conn, conv)) == {tag}
    # another conversation of the same user and model has its own tag
    conv2, tag2 = conversation(conn, user, model)
    call(conn, "record_trace", user_id=user, trace_id="m7", span_id="s", span_name="chat", conversation_id=conv2)
    assert tags_of(conn, conv2) == [tag2] and tag2 != tag


def test_first_trace_tags_an_untagged_conversation_with_the_trace_model(conn, world):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user)
    assert tag is None
    call(conn, "start_trace", user_id=user, trace_id="m1", span_id="s", span_name="chat", conversation_id=conv,
         model_id=model, start_time=T0)
    tag = conversation_tag(conn, conv)
    assert tag.endswith("_001")
    call(conn, "record_trace", user_id=user, trace_id="m2", span_id="s", span_name="chat", conversation_id=conv,
         start_time=T0 + timedelta(minutes=1), end_time=T0 + timedelta(minutes=1))
    assert tags_of(conn, conv) == [tag, tag]
    # the trace's model is filled in from the registry when the call gives only its id
    assert conn.execute("SELECT model_name, model_provider FROM sessiontag.llm_traces WHERE trace_id = 'm1'"
                        ).fetchone() == ("GPT-4o", "provider")
    # the next conversation of this user and model takes the next number, once
    conv2, _ = conversation(conn, user)
    for i in range(3):
        call(conn, "record_trace", user_id=user, trace_id=f"n{i}", span_id="s", span_name="chat",
             conversation_id=conv2, model_id=model)
    assert conversation_tag(conn, conv2).endswith("_002")
    assert last_number(conn, user, model) == 2


def test_first_trace_without_a_model_tags_with_the_conversation_model(conn, world):
    user, model, untracked = world["user"], world["model"], world["untracked"]
    # the conversation's model was untracked at creation (so no tag) and is tracked now
    conv, tag = conversation(conn, user, untracked)
    assert tag is None
    conn.execute("SELECT sessiontag.set_model_tracking(%s, true)", [untracked])
    call(conn, "record_trace", user_id=user, trace_id="m1", span_id="s", span_name="chat", conversation_id=conv)
    assert tags_of(conn, conv) == [conversation_tag(conn, conv)]
    assert conn.execute("SELECT llm_model_id FROM sessiontag.conversations WHERE id = %s", [conv]).fetchone()[0] \
        == untracked
    # a trace naming an untracked model falls back to the conversation's tracked model
    conv2, _ = conversation(conn, user)
    conn.execute("UPDATE sessiontag.conversations SET llm_model_id = %s WHERE id = %s", [model, conv2])
    conn.execute("SELECT sessiontag.set_model_tracking(%s, false)", [untracked])
    call(conn, "record_trace", user_id=user, trace_id="m2", span_id="s", span_name="chat", conversation_id=conv2,
         model_id=untracked)
    assert conversation_tag(conn, conv2).endswith("_001")
    assert conn.execute("SELECT experiment_name FROM sessiontag.conversations WHERE id = %s",
                        [conv2]).fetchone()[0] == "GPT-4o"


def test_traces_recorded_before_a_conversation_is_tagged_get_its_tag(conn, world):
    user, untracked, model = world["user"], world["untracked"], world["model"]
    conv, _ = conversation(conn, user)
    # no tracked model known yet: the traces are untagged, like their conversation
    call(conn, "record_trace", user_id=user, trace_id="m1", span_id="s", span_name="chat", conversation_id=conv,
         model_id=untracked, start_time=T0, end_time=T0)
    call(conn, "start_trace", user_id=user, trace_id="m2", span_id="s", span_name="chat", conversation_id=conv,
         start_time=T0 + timedelta(minutes=1))
    assert tags_of(conn, conv) == [None, None]
    # a later trace that names a tracked model tags the conversation, and every trace with it
    call(conn, "record_trace", user_id=user, trace_id="m3", span_id="s", span_name="chat", conversation_id=conv,
         model_id=model, start_time=T0 + timedelta(minutes=2), end_time=T0 + timedelta(minutes=2))
    tag = conversation_tag(conn, conv)
    assert tag is not None and tags_of(conn, conv) == [tag] * 3
    # so does ensure_session_tag called by the application
    conv2, _ = conversation(conn, user)
    call(conn, "record_trace", user_id=user, trace_id="m4", span_id="s", span_name="chat", conversation_id=conv2)
    conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conv2, model])
    assert tags_of(conn, conv2) == [conversation_tag(conn, conv2)]


def test_a_contradicting_session_tag_is_refused(conn, world):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user, model)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        call(conn, "record_trace", user_id=user, trace_id="m1", span_id="s", span_name="chat", conversation_id=conv,
             session_tag="chat_model_ffffff_001")
    assert info.value.diag.message_primary.startswith("session_tag 'chat_model_ffffff_001' contradicts the session tag")
    assert info.value.diag.column_name == "session_tag"
    untagged, _ = conversation(conn, user)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="has no session tag"):
        call(conn, "start_trace", user_id=user, trace_id="m2", span_id="s", span_name="chat",
             conversation_id=untagged, model_id=model, session_tag="my-own-tag")
    assert count(conn) == 0 and conversation_tag(conn, untagged) is None
    # without a conversation, a caller's own tag is stored as given
    call(conn, "record_trace", user_id=user, trace_id="m3", span_id="s", span_name="batch", session_tag="nightly-eval")
    assert conn.execute("SELECT session_tag FROM sessiontag.llm_traces").fetchone()[0] == "nightly-eval"


# -- tracking off ------------------------------------------------------------------------
def test_tracking_off_records_nothing_and_does_not_tag(conn, world):
    user, model = world["user"], world["model"]
    conv, _ = conversation(conn, user, analytics_enabled=False)
    args = dict(user_id=user, span_name="chat", conversation_id=conv, model_id=model)
    assert call(conn, "start_trace", trace_id="m1", span_id="s", **args) is None
    assert call(conn, "record_trace", trace_id="m2", span_id="s", **args) is None
    assert ingest(conn, [span(user, "m3", "s", conversation_id=str(conv), model_id=str(model))]) == 0
    assert count(conn) == 0
    assert conversation_tag(conn, conv) is None  # not even tagged
    conn.execute("SELECT sessiontag.set_analytics_tracking(%s, true)", [conv])
    started = call(conn, "start_trace", trace_id="m4", span_id="s", **args)
    assert started is not None and count(conn) == 1 and conversation_tag(conn, conv) is not None
    # off again: nothing new, but the span started while on is still answered and can end
    conn.execute("SELECT sessiontag.set_analytics_tracking(%s, false)", [conv])
    assert call(conn, "start_trace", trace_id="m4", span_id="s", **args) == started
    assert call(conn, "record_trace", trace_id="m5", span_id="s", **args) is None
    assert call(conn, "end_trace", user_id=user, trace_id="m4", span_id="s") == started
    assert count(conn) == 1 and count(conn, "status = 'success'") == 1


# -- idempotency ---------------------------------------------------------------------------
def test_retries_return_the_same_row_and_never_undo_an_end(conn, world):
    user, model = world["user"], world["model"]
    conv, _ = conversation(conn, user, model)
    args = dict(user_id=user, trace_id="t", span_id="s", span_name="chat", conversation_id=conv, start_time=T0)
    first = call(conn, "start_trace", **args)
    assert call(conn, "start_trace", **args) == first
    ended = call(conn, "end_trace", user_id=user, trace_id="t", span_id="s", input_tokens=5, output_tokens=7,
                 cost_usd=Decimal("0.01"), end_time=T0 + timedelta(seconds=3))
    assert ended == first
    # a late retry of the start, or of the end with other values, changes nothing
    assert call(conn, "start_trace", **dict(args, start_time=T0 + timedelta(seconds=10))) == first
    assert call(conn, "end_trace", user_id=user, trace_id="t", span_id="s", status="error",
                end_time=T0 + timedelta(seconds=9)) == first
    row = conn.execute("SELECT status, start_time, duration_ms, input_tokens, output_tokens FROM sessiontag.llm_traces"
                       ).fetchone()
    assert row == ("success", T0, 3000.0, 5, 7)
    # record_trace: same row again; on a span still running it ends it
    recorded = call(conn, "record_trace", **dict(args, span_id="r"))
    assert call(conn, "record_trace", **dict(args, span_id="r", status="error")) == recorded
    running = call(conn, "start_trace", **dict(args, span_id="late"))
    assert call(conn, "record_trace", **dict(args, span_id="late", status="cancelled", output_tokens=3,
                                              end_time=T0 + timedelta(seconds=1))) == running
    assert conn.execute("SELECT status, duration_ms, output_tokens FROM sessiontag.llm_traces WHERE span_id = 'late'"
                        ).fetchone() == ("cancelled", 1000.0, 3)
    assert count(conn) == 3


def test_ingest_retries_store_nothing_twice_and_finish_started_spans(conn, world):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user, model)
    started = [span(user, "t", f"s{i}", conversation_id=str(conv), status="running",
                    start_time=T0.isoformat(), input_tokens=10) for i in range(3)]
    assert ingest(conn, started) == 3
    assert ingest(conn, started) == 0  # a retried batch
    assert count(conn, "status = 'running' AND end_time IS NULL") == 3
    # the finished spans arrive: they end the running ones, keeping the start and usage
    finished = [dict(s, status="success", end_time=(T0 + timedelta(seconds=2)).isoformat(), output_tokens=4)
                for s in started]
    assert ingest(conn, finished + [span(user, "t", "new", conversation_id=str(conv))]) == 4
    assert ingest(conn, finished) == 0
    rows = conn.execute("SELECT status, duration_ms, input_tokens, output_tokens, session_tag"
                        " FROM sessiontag.llm_traces WHERE span_id LIKE 's%' ORDER BY span_id").fetchall()
    assert rows == [("success", 2000.0, 10, 4, tag)] * 3
    # a running element after the end changes nothing; start and end in one batch work too
    assert ingest(conn, started) == 0
    both = [span(user, "u", "x", status="running", start_time=T0.isoformat()),
            span(user, "u", "x", start_time=T0.isoformat(), end_time=(T0 + timedelta(seconds=1)).isoformat())]
    assert ingest(conn, both) == 2  # one inserted, then ended
    assert conn.execute("SELECT status, duration_ms FROM sessiontag.llm_traces WHERE trace_id = 'u'"
                        ).fetchone() == ("success", 1000.0)
    assert count(conn) == 5


def _concurrently(dsn: str, n: int, work) -> list:
    """Runs work(conn) on n connections at once; returns the results (re-raises errors)."""
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                barrier.wait()
                results[i] = work(c)
        except Exception as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_retries_make_one_row_and_one_tag(dsn, conn, world):
    user, model = world["user"], world["model"]
    conv, _ = conversation(conn, user)  # untagged: the first trace tags it, once
    args = dict(user_id=user, trace_id="t", span_id="s", span_name="chat", conversation_id=conv, model_id=model)
    ids = _concurrently(dsn, 8, lambda c: call(c, "start_trace", **args))
    assert len(set(ids)) == 1 and count(conn) == 1
    ids = _concurrently(dsn, 8, lambda c: call(c, "record_trace", **dict(args, span_id="r")))
    assert len(set(ids)) == 1 and count(conn) == 2
    batch = [span(user, "b", f"s{i}", conversation_id=str(conv)) for i in range(50)]
    stored = _concurrently(dsn, 6, lambda c: ingest(c, batch))
    assert sum(stored) == 50 and count(conn) == 52
    assert last_number(conn, user) == 1
    assert set(tags_of(conn, conv)) == {conversation_tag(conn, conv)}


def test_a_retry_waiting_on_an_uncommitted_twin_returns_its_row(dsn, conn, world):
    """The retry arrives while the first call's transaction is still open: it waits for it
    and then answers the same row instead of failing or duplicating."""
    user = world["user"]
    args = dict(user_id=user, trace_id="t", span_id="s", span_name="chat")
    results = []

    def retry():
        with psycopg.connect(dsn, autocommit=True) as c:
            results.append(call(c, "start_trace", **args))

    with psycopg.connect(dsn) as first:  # not autocommit: stays open until commit
        original = call(first, "start_trace", **args)
        waiter = threading.Thread(target=retry)
        waiter.start()
        while not conn.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND query LIKE '%%start_trace%%')").fetchone()[0]:
            assert waiter.is_alive()
            time.sleep(0.01)
        first.commit()
    waiter.join()
    assert results == [original] and count(conn) == 1


# -- validation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(pg_server, admin_dsn, template_db):
    """One database for the validation cases: none of them may store anything."""
    name, url = new_database(admin_dsn, pg_server, template_db)
    with psycopg.connect(url, autocommit=True) as c:
        user, other = uuid.uuid4(), uuid.uuid4()
        model = register(c, "GPT-4o", "gpt-4o")
        untagged, _ = conversation(c, user)
        others, _ = conversation(c, other, model)
        tagged, tag = conversation(c, user, model)
        call(c, "start_trace", user_id=user, trace_id="running", span_id="s", span_name="chat", start_time=T0)
        yield dict(dsn=url, user=user, model=model, untagged=untagged, others=others, tagged=tagged, tag=tag)
    drop_database(admin_dsn, name)


def _state(c) -> tuple:
    """What a failed call must leave unchanged: the traces, the tags and the counters."""
    return (c.execute("SELECT count(*), max(end_time) FROM sessiontag.llm_traces").fetchone(),
            c.execute("SELECT count(session_id) FROM sessiontag.conversations").fetchone(),
            numbers_total(c))


START = dict(trace_id="t", span_id="s", span_name="chat")
CASES = [
    # function, arguments (besides user_id and the untagged conversation), SQLSTATE, message
    ("start_trace", dict(START, user_id=None), "22004", "user_id must not be NULL"),
    ("start_trace", dict(START, trace_id=None), "22004", "trace_id must not be NULL"),
    ("start_trace", dict(START, trace_id=""), "22023", "trace_id must not be empty"),
    ("start_trace", dict(START, trace_id="abc\n"), "22023", "trace_id must not contain whitespace"),
    ("start_trace", dict(START, span_id="a b"), "22023", "span_id must not contain whitespace"),
    ("start_trace", dict(START, span_id="x" * 129), "22001", "span_id is longer than 128 characters"),
    ("start_trace", dict(START, parent_span_id="s"), "22023", "parent_span_id must differ from span_id"),
    ("start_trace", dict(START, span_name=None), "22004", "span_name must not be NULL"),
    ("start_trace", dict(START, span_name=""), "22023", "span_name must not be empty"),
    ("start_trace", dict(START, span_name="n" * 201), "22001", "span_name is longer than 200 characters"),
    ("start_trace", dict(START, operation_type="o" * 101), "22001", "operation_type is longer than 100"),
    ("start_trace", dict(START, model_name="m" * 201), "22001", "model_name is longer than 200 characters"),
    ("start_trace", dict(START, model_provider=""), "22023", "model_provider must not be empty"),
    ("start_trace", dict(START, message_id="m" * 201), "22001", "message_id is longer than 200 characters"),
    ("start_trace", dict(START, metadata=Jsonb([1, 2])), "22023", "metadata must be a JSON object, got array"),
    ("start_trace", dict(START, start_time=None), "22004", "start_time must not be NULL"),
    ("start_trace", dict(START, model_id=uuid.UUID(int=7)), "P0002",
     "model_id 00000000-0000-0000-0000-000000000007 is not a registered model"),
    ("start_trace", dict(START, conversation_id=uuid.UUID(int=8)), "P0002",
     "conversation_id 00000000-0000-0000-0000-000000000008 not found for user_id"),
    ("start_trace", dict(START, conversation_id="others"), "P0002", "not found for user_id"),
    ("start_trace", dict(START, conversation_id="tagged", session_tag="chat_model_000000_001"), "22023",
     "session_tag 'chat_model_000000_001' contradicts"),
    ("record_trace", dict(START, status="done"), "22023", "status must be success, error or cancelled, got 'done'"),
    ("record_trace", dict(START, status="running"), "22023",
     "status must be success, error or cancelled, got 'running'"),
    ("record_trace", dict(START, status=None), "22004", "status must not be NULL"),
    ("record_trace", dict(START, input_tokens=-1), "22023", "input_tokens must not be negative, got -1"),
    ("record_trace", dict(START, output_tokens=-5), "22023", "output_tokens must not be negative, got -5"),
    ("record_trace", dict(START, cost_usd=Decimal("-0.01")), "22023", "cost_usd must not be negative"),
    ("record_trace", dict(START, cost_usd=Decimal("1e12")), "22003", "cost_usd must be less than 10000000000"),
    ("record_trace", dict(START, cost_usd=Decimal("NaN")), "22023", "cost_usd must be a number, got NaN"),
    ("record_trace", dict(START, start_time=T0, end_time=T0 - timedelta(seconds=1)), "22023",
     "end_time 2026-02-01 08:59:59+00 is before start_time 2026-02-01 09:00:00+00"),
    ("record_trace", dict(START, end_time=None), "22004", "end_time must not be NULL"),
    ("record_trace", dict(START, end_time="infinity"), "22008", "end_time must be a finite time"),
    ("end_trace", dict(trace_id="nope", span_id="s"), "P0002", "span (trace_id nope, span_id s) of user_id"),
    ("end_trace", dict(trace_id="running", span_id="s", end_time=T0 - timedelta(hours=1)), "22023",
     "end_time 2026-02-01 08:00:00+00 is before start_time"),
    ("end_trace", dict(trace_id="running", span_id="s", status="ok"), "22023",
     "status must be success, error or cancelled, got 'ok'"),
    ("end_trace", dict(trace_id="running", span_id="s", input_tokens=-2), "22023", "input_tokens must not be negative"),
    ("end_trace", dict(trace_id="running", span_id="s", user_id=None), "22004", "user_id must not be NULL"),
]


@pytest.mark.parametrize("function, args, sqlstate, message", CASES,
                         ids=[f"{c[0]}-{c[3][:40]}" for c in CASES])
def test_bad_input_raises_a_named_error_and_stores_nothing(shared, function, args, sqlstate, message):
    args = {"user_id": shared["user"], **args}
    if function != "end_trace":
        args.setdefault("conversation_id", shared["untagged"])  # a failed call must not tag it either
        args.setdefault("model_id", shared["model"])
    if args.get("conversation_id") in ("others", "tagged"):
        args["conversation_id"] = shared[args["conversation_id"]]
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        before = _state(c)
        with pytest.raises(psycopg.Error) as info:
            call(c, function, **args)
        assert info.value.sqlstate == sqlstate, info.value.diag.message_primary
        assert message in info.value.diag.message_primary
        assert _state(c) == before


def test_malformed_jsonb_and_uuids_are_refused_before_anything_is_stored(shared):
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        before = _state(c)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="json"):
            c.execute("SELECT sessiontag.start_trace(user_id => %s, trace_id => 't', span_id => 's',"
                      " span_name => 'x', input_data => '{not json'::text::jsonb)", [shared["user"]])
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="uuid"):
            c.execute("SELECT sessiontag.record_trace(user_id => 'not-a-uuid', trace_id => 't', span_id => 's',"
                      " span_name => 'x')")
        assert _state(c) == before


def test_client_errors_carry_sqlstate_and_the_argument(dsn, world):
    with Client.connect(dsn) as client:
        with pytest.raises(DatabaseError) as info:
            client.record_trace(world["user"], "t", "s", "chat", input_tokens=-1)
        assert info.value.sqlstate == "22023"
        assert str(info.value) == "input_tokens must not be negative, got -1 (SQLSTATE 22023)"
        with pytest.raises(DatabaseError, match="P0002"):
            client.end_trace(world["user"], "t", "s")


def test_duration_is_derived_never_taken(conn, world):
    user = world["user"]
    call(conn, "record_trace", user_id=user, trace_id="t", span_id="s", span_name="chat", start_time=T0,
         end_time=T0 + timedelta(milliseconds=1250))
    assert conn.execute("SELECT duration_ms FROM sessiontag.llm_traces").fetchone()[0] == 1250.0
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"spans\[0\]\.duration_ms: is derived from start_time and end_time"):
        ingest(conn, [span(user, "t", "d", duration_ms=5)])
    with pytest.raises(psycopg.errors.UndefinedFunction):  # no such parameter
        conn.execute("SELECT sessiontag.record_trace(user_id => %s, trace_id => 'x', span_id => 'y',"
                     " span_name => 'z', duration_ms => 5)", [user])
    assert count(conn) == 1


# -- ingest_traces -----------------------------------------------------------------------------
def test_ingest_of_10k_spans_tags_every_span_and_each_new_conversation_once(conn, world):
    user, model = world["user"], world["model"]
    other_user = world["other"]
    tagged = [conversation(conn, u, model)[0] for u in (user, other_user) for _ in range(5)]
    off = conversation(conn, user, model, analytics_enabled=False)[0]  # tagged at creation: number 6
    untagged = [conversation(conn, user)[0] for _ in range(4)]
    owner = {c: conn.execute("SELECT user_id FROM sessiontag.conversations WHERE id = %s", [c]).fetchone()[0]
             for c in tagged + untagged + [off]}
    spans = []
    for i in range(10_000):
        conv = (tagged + untagged)[i % (len(tagged) + len(untagged))]
        root = i % 3 == 0
        spans.append(span(owner[conv], f"trace-{i // 3}", f"span-{i}", conversation_id=str(conv),
                          parent_span_id=None if root else f"span-{i - i % 3}",
                          model_id=str(model) if root else None, start_time=(T0 + timedelta(seconds=i)).isoformat(),
                          end_time=(T0 + timedelta(seconds=i, milliseconds=250)).isoformat(),
                          input_tokens=i % 500, output_tokens=7, cost_usd="0.0003",
                          input_data={"messages": [{"role": "user", "content": f"question {i}"}]}))
    spans += [span(user, "off", f"s{i}", conversation_id=str(off)) for i in range(5)]  # tracking off: skipped
    assert ingest(conn, spans) == 10_000
    assert count(conn) == 10_000
    # every span carries its conversation's tag; the untagged conversations were tagged once each
    assert conn.execute("""SELECT count(*) FROM sessiontag.llm_traces t JOIN sessiontag.conversations c
                           ON c.user_id = t.user_id AND c.id = t.conversation_id
                           WHERE t.session_tag IS NOT DISTINCT FROM c.session_id AND c.session_id IS NOT NULL"""
                        ).fetchone()[0] == 10_000
    assert sorted(conn.execute("SELECT session_counter FROM sessiontag.conversations WHERE id = ANY(%s)",
                               [untagged]).fetchall()) == [(7,), (8,), (9,), (10,)]
    assert last_number(conn, user, model) == 10
    assert conn.execute("SELECT sum(duration_ms), sum(input_tokens) FROM sessiontag.llm_traces").fetchone() == (
        2_500_000.0, sum(i % 500 for i in range(10_000)))
    assert conversation_tag(conn, off) is not None and count(conn, "conversation_id = %s", [off]) == 0


BAD_ELEMENTS = [
    # (index, element change, SQLSTATE, message)
    (3, dict(user_id="nope"), "22P02", 'spans[3].user_id: invalid input syntax for type uuid: "nope"'),
    (3, dict(user_id=None), "22004", "spans[3].user_id: must not be NULL"),
    (4, dict(status="done"), "22023", "spans[4].status: must be running, success, error or cancelled, got 'done'"),
    (5, dict(input_tokens=-3), "22023", "spans[5].input_tokens: must not be negative, got -3"),
    (5, dict(output_tokens=1.5), "22P02", 'spans[5].output_tokens: invalid input syntax for type integer: "1.5"'),
    (5, dict(input_tokens=2 ** 40), "22003", "spans[5].input_tokens: value \"1099511627776\" is out of range"),
    (6, dict(cost_usd=-1), "22023", "spans[6].cost_usd: must not be negative"),
    (6, dict(cost_usd=1e11), "22003", "spans[6].cost_usd: must be less than 10000000000"),
    (6, dict(cost_usd="1e400"), "22003", "spans[6].cost_usd: must be less than 10000000000, got 1.000000e+400"),
    (6, dict(cost_usd="NaN"), "22023", "spans[6].cost_usd: must be a number, got NaN"),
    (7, dict(start_time="2026-13-45"), "22008", 'spans[7].start_time: date/time field value out of range'),
    (7, dict(start_time="yesterday"), "22007", 'spans[7].start_time: must be an ISO 8601 time, got "yesterday"'),
    (7, dict(end_time="now"), "22007", 'spans[7].end_time: must be an ISO 8601 time, got "now"'),
    (7, dict(end_time="2/1/2026"), "22007", 'spans[7].end_time: must be an ISO 8601 time, got "2/1/2026"'),
    (7, dict(end_time="2026-02-01 soon"), "22007", 'spans[7].end_time: invalid input syntax for type timestamp'),
    (7, dict(start_time="Feb 1 2026"), "22007", 'spans[7].start_time: must be an ISO 8601 time, got "Feb 1 2026"'),
    (7, dict(end_time=(T0 - timedelta(days=1)).isoformat()), "22023",
     "spans[7].end_time: 2026-01-31 09:00:00+00 is before"),
    (7, dict(status="running", end_time=T0.isoformat()), "22023",
     "spans[7].end_time: must be absent while status is running"),
    (8, dict(span_name="n" * 201), "22001", "spans[8].span_name: is longer than 200 characters"),
    (8, dict(span_name=""), "22023", "spans[8].span_name: must not be empty"),
    (8, dict(trace_id=" t"), "22023", "spans[8].trace_id: must not contain whitespace"),
    (8, dict(parent_span_id="s8"), "22023", "spans[8].parent_span_id: must differ from span_id"),
    (8, dict(span_name=5), "22023", "spans[8].span_name: must be a JSON string, got number 5"),
    (8, dict(trace_id=["t"]), "22023", 'spans[8].trace_id: must be a JSON string, got array ["t"]'),
    (8, dict(error_message={"code": 1}), "22023",
     'spans[8].error_message: must be a JSON string, got object {"code": 1}'),
    (8, dict(metadata="flat"), "22023", "spans[8].metadata: must be a JSON object, got string"),
    (9, dict(tokens=5), "22023", "spans[9].tokens: is not a span field"),
    (9, dict(conversation_id="others"), "P0002", "spans[9].conversation_id: "),
    (9, dict(model_id=str(uuid.UUID(int=9))), "P0002",
     "spans[9].model_id: 00000000-0000-0000-0000-000000000009 is not a registered model"),
    (9, dict(session_tag="chat_model_abcdef_001"), "22023",
     "spans[9].session_tag: 'chat_model_abcdef_001' contradicts"),
    (9, "not an object", "22023", "spans[9]: must be a JSON object, got string"),
]


def bad_batch(shared, index: int, change) -> list:
    """20 good spans, but for CHANGE at INDEX and a later bad one (the first is named)."""
    user = shared["user"]
    spans = [span(user, "batch", f"s{i}", conversation_id=str(shared["untagged"] if i % 2 else shared["tagged"]),
                  model_id=str(shared["model"]), start_time=T0.isoformat(),
                  end_time=(T0 + timedelta(seconds=1)).isoformat()) for i in range(20)]
    if isinstance(change, dict):
        if change.get("conversation_id") == "others":
            change = dict(change, conversation_id=str(shared["others"]))
        if "session_tag" in change:
            spans[index]["conversation_id"] = str(shared["tagged"])
        spans[index] = {k: v for k, v in {**spans[index], **change}.items()}
    else:
        spans[index] = change
    spans[15]["status"] = "bogus"
    return spans


@pytest.mark.parametrize("index, change, sqlstate, message", BAD_ELEMENTS,
                         ids=[m.split(":")[0] + "-" + m.split(":")[1][:30].strip() for _, _, _, m in BAD_ELEMENTS])
def test_ingest_is_all_or_nothing_and_names_the_index_and_field(shared, index, change, sqlstate, message):
    spans = bad_batch(shared, index, change)
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        before = _state(c)
        with pytest.raises(psycopg.Error) as info:
            ingest(c, spans)
        assert info.value.sqlstate == sqlstate
        assert info.value.diag.message_primary.startswith(message), info.value.diag.message_primary
        assert _state(c) == before


def test_ingest_names_an_end_before_a_start_stored_earlier_in_the_batch(shared):
    user = shared["user"]
    spans = [span(user, "pair", "a", status="running", start_time=T0.isoformat()),
             span(user, "pair", "a", start_time=(T0 - timedelta(hours=2)).isoformat(),
                  end_time=(T0 - timedelta(hours=1)).isoformat())]
    with psycopg.connect(shared["dsn"], autocommit=True) as c:
        before = _state(c)
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=r"^spans\[1\]\.end_time: .* is before start_time"):
            ingest(c, spans)
        assert _state(c) == before


# ingest_traces judges a time's text without a regular expression (for speed); it must take
# exactly the times _iso_time_pattern() takes, the rule its error messages state.
TIME_TEXTS = ["2026-02-01T09:00:00Z", "2026-02-01", "2026-02-01 09:00:00.123456+02:00", " 2026-02-01",
              "2026-2-01 09:00", "\uff12\uff10\uff12\uff16-02-01", "20260-02-01", "+2026-02-01", "2026/02/01",
              "2026-02-0", "2026-02-O1", "epoch", "infinity", "J2461073", ""]


@pytest.mark.parametrize("field", ["start_time", "end_time"])
@pytest.mark.parametrize("text", TIME_TEXTS, ids=[repr(t) for t in TIME_TEXTS])
def test_ingest_takes_exactly_the_times_that_begin_with_an_iso_date(conn, world, field, text):
    user = world["user"]
    rule = conn.execute("SELECT %s ~ sessiontag._iso_time_pattern()", [text]).fetchone()[0]
    times = {"start_time": "2026-01-01T00:00:00Z", "end_time": "2026-12-31T00:00:00Z", field: text}
    spans = [span(user, "times", "a", start_time=times["start_time"], end_time=times["end_time"])]
    if rule:
        assert ingest(conn, spans) == 1
        assert count(conn) == 1
    else:
        with pytest.raises(psycopg.errors.InvalidDatetimeFormat, match=rf"^spans\[0\]\.{field}: must be an ISO 8601"):
            ingest(conn, spans)
        assert count(conn) == 0


def test_ingest_argument_errors(conn):
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="spans must not be NULL"):
        conn.execute("SELECT sessiontag.ingest_traces(NULL)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="spans must be a JSON array, got object"):
        conn.execute("SELECT sessiontag.ingest_traces('{}')")
    assert conn.execute("SELECT sessiontag.ingest_traces('[]')").fetchone()[0] == 0


# -- Client.trace ------------------------------------------------------------------------------
def test_client_trace_records_usage_status_and_errors(dsn, conn, world):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user, model)
    with Client.connect(dsn) as client:
        with client.trace(user, "chat", conversation_id=conv, model_id=model, input_data={"q": "hi"},
                          metadata={"app": "test"}) as root:
            root.set_usage(input_tokens=12, output_tokens=30, cost_usd=0.0025)
            root.set_output({"text": "hello"})
            with client.trace(None, "retrieve", parent=root, operation_type="retrieval") as child:
                pass
        with pytest.raises(ValueError, match="boom"):
            with client.trace(user, "chat", conversation_id=conv) as failing:
                failing.set_usage(input_tokens=3)
                raise ValueError("boom")
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT span_id, trace_id, parent_span_id, status, input_tokens, output_tokens, cost_usd, output_data,"
        " error_message, session_tag, duration_ms >= 0, model_name FROM sessiontag.llm_traces")}
    assert rows[root.span_id] == (root.trace_id, None, "success", 12, 30, Decimal("0.0025"), {"text": "hello"},
                                  None, tag, True, "GPT-4o")
    assert rows[child.span_id][:3] == (root.trace_id, root.span_id, "success")
    assert rows[child.span_id][8] == tag  # the child inherits the conversation
    assert rows[failing.span_id][2:4] == ("error", 3)
    assert rows[failing.span_id][7] == "ValueError: boom"
    assert root.id is not None and len(root.trace_id) == 32 and len(root.span_id) == 16


def test_client_trace_with_tracking_off_records_nothing_and_raises_nothing(dsn, conn, world):
    conv, _ = conversation(conn, world["user"], world["model"], analytics_enabled=False)
    with Client.connect(dsn) as client:
        with client.trace(world["user"], "chat", conversation_id=conv) as s:
            s.set_usage(1, 2, 3)
            s.set_status("cancelled")
    assert s.id is None and count(conn) == 0


def test_client_methods_ingest_and_record(dsn, conn, world):
    user = world["user"]
    with Client.connect(dsn) as client:
        rid = client.record_trace(user, "t", "s", "chat", start_time=T0, end_time=T0 + timedelta(seconds=1),
                                  cost_usd=0.5, input_data=["a", "b"], metadata={"k": uuid.UUID(int=1)})
        assert client.ingest([{"user_id": user, "trace_id": "t", "span_id": "i", "span_name": "x",
                               "start_time": T0, "cost_usd": Decimal("0.125")}]) == 1
        sid = client.start_trace(user, "t", "r", "chat")
        assert client.end_trace(user, "t", "r", status="cancelled") == sid
    assert conn.execute("SELECT id, cost_usd, input_data, metadata FROM sessiontag.llm_traces WHERE span_id = 's'"
                        ).fetchone() == (rid, Decimal("0.5"), ["a", "b"], {"k": "00000000-0000-0000-0000-000000000001"})
    assert conn.execute("SELECT cost_usd FROM sessiontag.llm_traces WHERE span_id = 'i'").fetchone()[0] \
        == Decimal("0.125")


# -- migration: legacy traces get their tag back -----------------------------------------------
def test_migration_0004_tags_legacy_traces_and_its_rollback_keeps_every_trace(dsn):
    migrate.rollback(dsn, to="0003_tagging")
    with psycopg.connect(dsn, autocommit=True) as c:
        model = register(c, "GPT-4o", "gpt-4o")
        user = uuid.uuid4()
        conv, tag = conversation(c, user, model)
        # as the original application stored them: the tag on the first message only
        for i, stored_tag in enumerate([tag, None, None]):
            c.execute("INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name, conversation_id,"
                      " session_tag) VALUES (%s, %s, 's', 'chat', %s, %s)", [user, f"m{i}", conv, stored_tag])
    migrate.apply(dsn)
    with psycopg.connect(dsn) as c:
        assert tags_of(c, conv) == [tag] * 3
    migrate.rollback(dsn, to="0003_tagging")
    with psycopg.connect(dsn) as c:
        assert tags_of(c, conv) == [tag] * 3
    migrate.apply(dsn)


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_ingest_json_array_and_json_lines(dsn, conn, world, tmp_path):
    user, model = world["user"], world["model"]
    conv, tag = conversation(conn, user, model)
    spans = [span(user, "cli", f"s{i}", conversation_id=str(conv)) for i in range(7)]
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(spans))
    result = sessiontag_cli("--dsn", dsn, "ingest", str(path), "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stored 7 of 7 spans"
    lines = "\n".join(json.dumps(span(user, "lines", f"s{i}", conversation_id=str(conv))) for i in range(4))
    result = sessiontag_cli("--dsn", dsn, "ingest", "-", "--batch-size", "2", "--progress",
                            stdin=lines + "\n\n" + json.dumps(spans[0]) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("stored 4 of 5 spans"
                                     " (1 skipped: already stored, or of conversations with tracking off)")
    assert "ingesting" in result.stderr
    assert count(conn) == 11 and set(tags_of(conn, conv)) == {tag}


def test_cli_ingest_bad_input_is_one_line_naming_line_and_field_and_stores_nothing(dsn, conn, world, tmp_path):
    user = world["user"]
    good = [json.dumps(span(user, "cli", f"s{i}")) for i in range(6)]
    bad = json.dumps(span(user, "cli", "bad", input_tokens=-4))
    # the bad span is in the second batch: the first one must not stay stored either
    text = "\n".join(good[:3]) + "\n\n" + "\n".join(good[3:]) + "\n" + bad + "\n"
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", "-", "--batch-size", "4", stdin=text))
    assert error == ("error: line 8: input_tokens: must not be negative, got -4 (SQLSTATE 22023);"
                     " nothing was stored")
    path = tmp_path / "spans.json"
    path.write_text(json.dumps([span(user, "cli", "a"), span(user, "cli", "b", status="finished")]))
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(path)))
    assert error.startswith("error: spans[1].status: must be running, success, error or cancelled, got 'finished'")
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", "-", stdin=good[0] + "\n{\"user_id\": \n"))
    assert error == "error: line 2: invalid JSON: Expecting value (column 13)"
    assert "No such file" in _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(tmp_path / "missing.json")))
    empty = tmp_path / "empty.json"
    empty.write_text(" \n")
    assert _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(empty))) == f"error: {empty}: no spans (it is empty)"
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps([span(user, "cli", "x", span_name="caf\u00e9")], ensure_ascii=False).encode("latin-1"))
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(latin1)))
    assert error.startswith(f"error: {latin1}: not UTF-8 text (invalid continuation byte at byte ")
    assert count(conn) == 0
