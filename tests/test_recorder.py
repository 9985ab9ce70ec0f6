"""The non-blocking recorder: batches to ingest_traces, flushes on close, and never lets a
tracing failure (database down, bad data, full queue) reach the caller."""

from __future__ import annotations

import logging
import uuid

import psycopg
import pytest

from sessiontag.recorder import Recorder

LOGGER = "sessiontag.recorder"


def stored(dsn: str, where: str = "true", params=()) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute(f"SELECT count(*) FROM sessiontag.llm_traces WHERE {where}", params).fetchone()[0]


def test_close_flushes_what_the_queue_holds(dsn):
    user = uuid.uuid4()
    # an hour between flushes and room for 1000 per batch: only close() can send them
    recorder = Recorder(dsn, flush_interval=3600, batch_size=1000)
    for i in range(25):
        assert recorder.record(user_id=user, trace_id="t", span_id=f"s{i}", span_name="chat", input_tokens=i)
    assert stored(dsn) == 0
    recorder.close()
    assert stored(dsn) == 25
    assert recorder.stats == {"recorded": 25, "sent": 25, "dropped": 0, "lost": 0, "waiting": 0}
    assert recorder.record(user_id=user, trace_id="t", span_id="late", span_name="chat") is False


def test_spans_go_in_batches_and_carry_the_conversation_tag(dsn):
    user = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as c:
        model = c.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
        conv = c.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    with Recorder(dsn, batch_size=10, flush_interval=3600) as recorder:
        for i in range(35):
            recorder.record(user_id=user, trace_id=f"t{i}", span_id="s", span_name="chat", conversation_id=conv,
                            model_id=model if i == 0 else None)
        assert recorder.flush(timeout=60)
        assert stored(dsn) == 35
    with psycopg.connect(dsn) as c:
        tags = c.execute("SELECT DISTINCT t.session_tag = c.session_id FROM sessiontag.llm_traces t"
                         " JOIN sessiontag.conversations c ON c.id = t.conversation_id").fetchall()
    assert tags == [(True,)]


def test_span_context_records_usage_and_errors_and_reraises_the_callers_exception(dsn):
    user = uuid.uuid4()
    with Recorder(dsn, flush_interval=3600) as recorder:
        with recorder.span(user, "chat", model_name="gpt-4o", input_data={"q": "hi"}) as root:
            root.set_usage(input_tokens=10, output_tokens=20, cost_usd=0.001)
            root.set_output("hello")
            with recorder.span(None, "tool", parent=root, operation_type="tool_call"):
                pass
        with pytest.raises(KeyError):
            with recorder.span(user, "chat") as failing:
                raise KeyError("missing")
        assert recorder.flush(timeout=60)
    with psycopg.connect(dsn) as c:
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT span_id, parent_span_id, status, input_tokens, output_tokens, output_data, error_message,"
            " model_name, duration_ms >= 0 FROM sessiontag.llm_traces")}
    assert rows[root.span_id] == (None, "success", 10, 20, "hello", None, "gpt-4o", True)
    assert [r[:2] for s, r in rows.items() if s not in (root.span_id, failing.span_id)] == [(root.span_id, "success")]
    assert rows[failing.span_id][1] == "error" and rows[failing.span_id][5] == "KeyError: 'missing'"


def test_bad_data_is_logged_and_the_rest_of_the_batch_is_stored(dsn, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    user = uuid.uuid4()
    with Recorder(dsn, flush_interval=3600) as recorder:
        for i in range(6):
            recorder.record(user_id=user, trace_id="t", span_id=f"s{i}", span_name="chat",
                            input_tokens=-1 if i == 2 else 1)
        recorder.record(user_id=user, trace_id="t", span_id="odd", span_name="chat", metadata={"x": object()})
        assert recorder.flush(timeout=60)
        assert recorder.stats["lost"] == 2 and recorder.stats["sent"] == 5
    assert stored(dsn) == 5 and stored(dsn, "span_id = 's2'") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("dropped span (trace_id 't', span_id 's2')" in m and "input_tokens: must not be negative" in m
               for m in errors), errors
    assert any("span_id 'odd'" in m and "not JSON serializable" in m for m in errors), errors


def test_a_full_queue_drops_new_spans_without_blocking_or_raising(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # nothing listens there: every batch waits for a retry, and the queue fills up
    recorder = Recorder("host=127.0.0.1 port=1 dbname=x", batch_size=2, max_queue=3, retry_delay=0.01)
    accepted = [recorder.record(user_id=uuid.uuid4(), trace_id="t", span_id=f"s{i}", span_name="chat")
                for i in range(20)]
    # at most one batch in flight and max_queue waiting
    assert accepted.count(False) >= 20 - 2 - 3
    recorder.close(timeout=0.2)
    stats = recorder.stats
    assert stats["dropped"] == accepted.count(False)
    assert stats["lost"] == accepted.count(True) and stats["sent"] == 0
    text = caplog.text
    assert "queue is full (3 spans waiting); dropping new spans" in text
    assert "cannot connect to" in text and "lost" in text


def test_database_stopped_the_caller_sees_nothing_and_the_log_says_why(private_server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server, dsn = private_server
    user = uuid.uuid4()
    # sent on flush() and close() only, so the three spans recorded while it is down form one batch
    recorder = Recorder(dsn, flush_interval=3600, retry_delay=0.01, max_retry_delay=0.05, connect_timeout=2)
    with recorder.span(user, "before") as s:
        s.set_usage(1, 1)
    assert recorder.flush(timeout=60) and stored(dsn) == 1
    assert caplog.records == []

    server.stop()
    # the chat goes on: no exception from recording, only the caller's own exceptions pass
    with recorder.span(user, "during") as s:
        s.set_usage(2, 2)
    assert recorder.record(user_id=user, trace_id="t", span_id="plain", span_name="during")
    with pytest.raises(ZeroDivisionError):
        with recorder.span(user, "failing"):
            1 / 0
    recorder.close(timeout=0.5)

    assert recorder.stats["lost"] == 3 and recorder.stats["sent"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("sessiontag recorder: could not store 3 spans, retrying in") for m in warnings), warnings
    # the reason: the connection broke when the server went away, then nothing accepts connections
    assert any("cannot connect to" in m for m in warnings), warnings
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("sessiontag recorder: closing; lost 3 spans: cannot connect to")
