"""ingest_otlp: OTLP/JSON with OpenTelemetry GenAI attributes becomes tagged spans."""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from datetime import datetime, timezone

import psycopg
import pytest

from sessiontag import Client
from tests.numbers import last_numbers

T0_NS = 1_732_000_000_000_000_000  # 2024-11-19 07:06:40 UTC


def attr(key, value):
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def span(span_id, name, attrs, parent="", start_ms=0, end_ms=1000, code=1, message=""):
    s = {"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": span_id, "parentSpanId": parent, "name": name,
         "kind": 3, "startTimeUnixNano": str(T0_NS + start_ms * 1_000_000),
         "attributes": [attr(k, v) for k, v in attrs.items()], "status": {"code": code, "message": message}}
    if end_ms is not None:
        s["endTimeUnixNano"] = str(T0_NS + end_ms * 1_000_000)
    return s


def request(*spans, resource=None):
    return {"resourceSpans": [{"resource": {"attributes": [attr(k, v) for k, v in (resource or {}).items()]},
                               "scopeSpans": [{"scope": {"name": "test"}, "spans": list(spans)}]}]}


def ingest(conn, payload, default_user=None):
    return conn.execute("SELECT sessiontag.ingest_otlp(%s, %s)", [json.dumps(payload), default_user]).fetchone()[0]


def counts(conn):
    return tuple(conn.execute(f"SELECT count(*) FROM sessiontag.{t}").fetchone()[0]
                 for t in ("conversations", "llm_traces", "session_counters"))


@pytest.fixture
def model(conn):
    return conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]


def test_genai_spans_are_tagged_by_user_conversation_and_model(conn, model):
    user = str(uuid.uuid4())
    payload = request(
        span("00f067aa0ba902b7", "chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                                                  "gen_ai.response.model": "gpt-4o-2024-08-06",
                                                  "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 34,
                                                  "gen_ai.conversation.id": "conv-1"}, end_ms=1500),
        span("00f067aa0ba902b8", "execute_tool search", {"gen_ai.operation.name": "execute_tool",
                                                          "gen_ai.conversation.id": "conv-1"},
             parent="00f067aa0ba902b7", start_ms=100, end_ms=200, code=2, message="tool failed"),
        span("00f067aa0ba902b9", "still streaming", {"session.id": "conv-1", "gen_ai.request.model": "gpt-4o"},
             start_ms=300, end_ms=None),
        resource={"user.id": user, "service.name": "chat-api"})
    assert ingest(conn, payload) == 3
    conv, tag, counter = conn.execute("SELECT id, session_id, session_counter FROM sessiontag.conversations"
                                      " WHERE external_id = 'conv-1'").fetchone()
    assert tag == f"chat_model_{model.hex[:6]}_001" and counter == 1
    rows = conn.execute("SELECT span_id, parent_span_id, user_id, conversation_id, session_tag, model_id, model_name,"
                        " operation_type, status, error_message, input_tokens, output_tokens, start_time, duration_ms,"
                        " metadata FROM sessiontag.llm_traces ORDER BY start_time").fetchall()
    first, tool, streaming = rows
    assert first[:12] == ("00f067aa0ba902b7", None, uuid.UUID(user), conv, tag, model, "GPT-4o", "llm_call",
                          "success", None, 12, 34)
    assert first[12] == datetime.fromtimestamp(T0_NS / 1e9, timezone.utc) and first[13] == 1500.0
    assert first[14]["otel"]["attributes"]["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert tool[1] == "00f067aa0ba902b7" and tool[7:10] == ("tool", "error", "tool failed") and tool[4] == tag
    assert streaming[8] == "running" and streaming[4] == tag
    # a retried export stores nothing twice
    assert ingest(conn, payload) == 0
    assert counts(conn) == (1, 3, 1)


def test_default_user_and_unregistered_models(conn, model):
    default = uuid.uuid4()
    payload = request(span("aaaaaaaaaaaaaaa1", "chat", {"gen_ai.request.model": "mistral-large",
                                                        "gen_ai.provider.name": "mistral"}))
    assert ingest(conn, payload, default) == 1
    row = conn.execute("SELECT user_id, model_id, model_name, model_provider, operation_type, session_tag"
                       " FROM sessiontag.llm_traces").fetchone()
    assert row == (default, None, "mistral-large", "mistral", "llm_call", None)


def test_the_conversation_existing_under_its_external_id_is_used(conn, model):
    user = uuid.uuid4()
    conv = Client(conn).create_conversation(user, model, external_id="app-42")
    ingest(conn, request(span("bbbbbbbbbbbbbbb1", "chat", {"user.id": str(user), "gen_ai.conversation.id": "app-42"})))
    assert conn.execute("SELECT conversation_id, session_tag FROM sessiontag.llm_traces").fetchone() == (
        conv.id, conv.session_id)
    assert counts(conn)[0] == 1


@pytest.mark.parametrize("mutate, sqlstate, message", [
    (lambda p: p.update(resourceSpans={}), "22023", "payload must be an OTLP/JSON ExportTraceServiceRequest"),
    (lambda p: p["resourceSpans"][0].update(scopeSpans={}), "22023", "payload.resourceSpans[0].scopeSpans: must be"),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"].append("x"), "22023",
     "payload.resourceSpans[0].scopeSpans[0].spans[2]: must be a span object"),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["attributes"].append(attr("user.id", "nope")),
     "22P02", "payload.resourceSpans[0].scopeSpans[0].spans[1].attributes[user.id]: 'nope' is not a uuid"),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"][1].update(spanId=""), "22023",
     "payload.resourceSpans[0].scopeSpans[0].spans[1].spanId: must be 16 hex digits, not all zero, got \"\""),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["attributes"].append(
        attr("gen_ai.usage.input_tokens", -5)), "22023", "payload.resourceSpans[0].scopeSpans[0].spans[1].input_tokens"),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"][1].update(startTimeUnixNano="abc"), "22023",
     'payload.resourceSpans[0].scopeSpans[0].spans[1].startTimeUnixNano: must be nanoseconds since the epoch,'
     ' got "abc"'),
    (lambda p: p["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(endTimeUnixNano=10 ** 23), "22023",
     "payload.resourceSpans[0].scopeSpans[0].spans[0].endTimeUnixNano: must be nanoseconds since the epoch,"
     " got 100000000000000000000000"),
])
def test_bad_requests_name_the_place_and_store_nothing(conn, model, mutate, sqlstate, message):
    user = str(uuid.uuid4())
    good = request(span("ccccccccccccccc1", "a", {"gen_ai.conversation.id": "c-new"}),
                   span("ccccccccccccccc2", "b", {"gen_ai.conversation.id": "c-new"}), resource={"user.id": user})
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(psycopg.Error) as info:
        ingest(conn, bad)
    assert info.value.sqlstate == sqlstate
    assert info.value.diag.message_primary.startswith(message), info.value.diag.message_primary
    assert counts(conn) == (0, 0, 0), "nothing stored, not even the new conversation"


def test_concurrent_exports_of_one_new_conversation_make_one_session(dsn):
    """8 exporters send spans of the same new conversation at once, naming a registered
    model or one sessiontag does not know: one conversation, every span on it, and no
    session number lost to the exporters whose conversation insert was skipped (a new
    conversation is inserted untagged, then tagged under its row lock)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
    user, barrier, errors = str(uuid.uuid4()), threading.Barrier(8), []

    def exporter(i):
        payload = request(span(f"{i + 1:016x}", "chat", {"gen_ai.conversation.id": "shared-chat",
                                                     "gen_ai.request.model": "gpt-4o" if i % 2 else "local-llm"}),
                          resource={"user.id": user})
        try:
            with psycopg.connect(dsn) as c:
                barrier.wait()
                ingest(c, payload)
                time.sleep(0.05)  # hold the new conversation uncommitted: the others must wait for it
                c.commit()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=exporter, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    with psycopg.connect(dsn) as conn:
        (conversation, tag, number), = conn.execute(
            "SELECT id, session_id, session_counter FROM sessiontag.conversations").fetchall()
        assert conn.execute("SELECT count(*), count(DISTINCT conversation_id), min(conversation_id::text)"
                            " FROM sessiontag.llm_traces").fetchone() == (8, 1, str(conversation))
        counter = max([n for (_, m), n in last_numbers(conn).items() if m == model], default=0)
        assert counter == (number or 0) and number in (None, 1), (tag, number, counter)
        assert conn.execute("SELECT count(DISTINCT session_tag) FROM sessiontag.llm_traces").fetchone()[0] == (
            1 if tag else 0)


def test_no_user_anywhere_is_refused(conn):
    with pytest.raises(psycopg.Error) as info:
        ingest(conn, request(span("ddddddddddddddd1", "a", {})))
    assert info.value.sqlstate == "22004" and "default_user_id" in info.value.diag.message_primary


def test_a_user_scoped_caller_ingests_only_for_its_user(conn, dsn, model):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    role = f"otlp_alice_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE sessiontag_user")
    try:
        with psycopg.connect(f"{dsn} user={role}", autocommit=True) as scoped:
            scoped.execute("SELECT set_config('sessiontag.user_id', %s, false)", [str(alice)])
            with pytest.raises(psycopg.Error) as info:
                ingest(scoped, request(span("eeeeeeeeeeeeeee1", "a", {"gen_ai.conversation.id": "x"}),
                                       resource={"user.id": str(bob)}))
            assert info.value.sqlstate == "42501"
            assert ingest(scoped, request(span("eeeeeeeeeeeeeee2", "a", {"gen_ai.conversation.id": "x"}),
                                          resource={"user.id": str(alice)})) == 1
        assert conn.execute("SELECT DISTINCT user_id FROM sessiontag.llm_traces").fetchall() == [(alice,)]
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_client_and_cli_take_otlp_json(dsn, tmp_path, model):
    from tests.test_migrations import _one_line_error, sessiontag_cli

    user = uuid.uuid4()
    payload = request(span("fffffffffffffff1", "chat", {"gen_ai.request.model": "gpt-4o"}), resource={"user.id": str(user)})
    with Client.connect(dsn) as client:
        assert client.ingest_otlp(payload) == 1
    other = request(span("fffffffffffffff2", "chat", {"gen_ai.request.model": "gpt-4o"}))
    path = tmp_path / "export.json"
    path.write_text(json.dumps(other))
    result = sessiontag_cli("--dsn", dsn, "ingest", "--default-user", str(user), str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stored 1 of 1 spans (OTLP)"
    again = sessiontag_cli("--dsn", dsn, "ingest", "--default-user", str(user), str(path))
    assert again.stdout.strip() == ("stored 0 of 1 spans (OTLP) (1 skipped: already stored, or of conversations"
                                    " with tracking off)")
    # Errors speak of the command's options, and a malformed request is the database's to name.
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(path)))
    assert "--default-user" in error and "default_user_id" not in error and error.endswith("nothing was stored")
    path.write_text(json.dumps({"resourceSpans": 5}))
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", str(path)))
    assert error.startswith("error: payload must be an OTLP/JSON ExportTraceServiceRequest"), error


def test_opentelemetry_sdk_exporter_stores_genai_spans_tagged(dsn, model, caplog):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    from sessiontag.otel import SessiontagSpanExporter

    user = uuid.uuid4()
    provider = TracerProvider(resource=Resource.create({"user.id": str(user), "service.name": "chat"}))
    provider.add_span_processor(SimpleSpanProcessor(SessiontagSpanExporter(dsn)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("chat turn", attributes={"gen_ai.conversation.id": "otel-1"}):
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.conversation.id": "otel-1", "gen_ai.usage.input_tokens": 21,
                "gen_ai.usage.output_tokens": 8}) as llm:
            llm.set_status(Status(StatusCode.ERROR, "rate limited"))
    provider.shutdown()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT span_name, parent_span_id IS NULL, session_tag, model_id, status, error_message,"
                            " input_tokens, output_tokens FROM sessiontag.llm_traces ORDER BY start_time").fetchall()
    tag = f"chat_model_{model.hex[:6]}_001"
    assert rows == [("chat turn", True, tag, None, "success", None, None, None),
                    ("chat gpt-4o", False, tag, model, "error", "rate limited", 21, 8)]

    # the database gone: the exporter reports a failure and logs why, the application goes on
    broken = SessiontagSpanExporter("host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    provider = TracerProvider(resource=Resource.create({"user.id": str(user)}))
    provider.add_span_processor(SimpleSpanProcessor(broken))
    with caplog.at_level("WARNING", logger="sessiontag.otel"):
        with provider.get_tracer("test").start_as_current_span("lost"):
            pass
    provider.shutdown()
    assert "spans not exported" in caplog.text and "cannot connect" in caplog.text


def test_default_user_is_refused_for_plain_span_files(dsn, tmp_path):
    from tests.test_migrations import _one_line_error, sessiontag_cli

    path = tmp_path / "spans.jsonl"
    path.write_text(json.dumps({"user_id": str(uuid.uuid4()), "trace_id": "t", "span_id": "s", "span_name": "x"}))
    message = _one_line_error(sessiontag_cli("--dsn", dsn, "ingest", "--default-user", str(uuid.uuid4()), str(path)))
    assert "--default-user applies to OTLP exports only" in message


# -- the mapping, attribute by attribute ---------------------------------------------------
def _one(conn, columns):
    return conn.execute(f"SELECT {columns} FROM sessiontag.llm_traces").fetchone()


@pytest.mark.parametrize("attrs, expected", [
    ({"user.id": "U1"}, "U1"),
    ({"enduser.id": "U1"}, "U1"),
    ({"langfuse.user.id": "U1"}, "U1"),
    ({"traceloop.association.properties.user_id": "U1"}, "U1"),
    ({"user.id": "U1", "enduser.id": "U2", "langfuse.user.id": "U2"}, "U1"),
    ({"enduser.id": "U1", "langfuse.user.id": "U2", "traceloop.association.properties.user_id": "U2"}, "U1"),
    ({"langfuse.user.id": "U1", "traceloop.association.properties.user_id": "U2"}, "U1"),
    ({}, "DEFAULT"),
])
def test_user_attributes_in_order_then_the_default(conn, attrs, expected):
    users = {"U1": str(uuid.uuid4()), "U2": str(uuid.uuid4()), "DEFAULT": str(uuid.uuid4())}
    ingest(conn, request(span("a1a1a1a1a1a1a1a1", "x", {k: users[v] for k, v in attrs.items()})), users["DEFAULT"])
    assert str(_one(conn, "user_id")[0]) == users[expected]


@pytest.mark.parametrize("attrs, expected", [
    ({"langfuse.session.id": "A"}, "A"),
    ({"session.id": "A"}, "A"),
    ({"gen_ai.conversation.id": "A"}, "A"),
    ({"traceloop.association.properties.session_id": "A"}, "A"),
    ({"langsmith.metadata.session_id": "A"}, "A"),
    ({"langfuse.session.id": "A", "session.id": "B", "gen_ai.conversation.id": "B"}, "A"),
    ({"session.id": "A", "gen_ai.conversation.id": "B", "traceloop.association.properties.session_id": "B"}, "A"),
    ({"gen_ai.conversation.id": "A", "traceloop.association.properties.session_id": "B",
      "langsmith.metadata.session_id": "B"}, "A"),
    ({"traceloop.association.properties.session_id": "A", "langsmith.metadata.session_id": "B"}, "A"),
])
def test_conversation_attributes_in_order(conn, model, attrs, expected):
    ingest(conn, request(span("a2a2a2a2a2a2a2a2", "x", attrs)), str(uuid.uuid4()))
    assert conn.execute("SELECT c.external_id FROM sessiontag.llm_traces t JOIN sessiontag.conversations c"
                        " ON c.id = t.conversation_id").fetchone() == (expected,)


def test_model_response_before_request_and_provider_before_system(conn, model):
    other = conn.execute("SELECT sessiontag.register_model('GPT-4o mini', 'openai', 'gpt-4o-mini')").fetchone()[0]
    user = str(uuid.uuid4())
    ingest(conn, request(
        span("b1b1b1b1b1b1b1b1", "both registered", {"gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-mini",
                                                    "gen_ai.provider.name": "azure.ai.openai", "gen_ai.system": "openai"}),
        span("b1b1b1b1b1b1b1b2", "response unregistered", {"gen_ai.request.model": "gpt-4o",
                                                           "gen_ai.response.model": "gpt-4o-2024-08-06",
                                                           "gen_ai.system": "openai"}),
        span("b1b1b1b1b1b1b1b3", "none registered", {"gen_ai.request.model": "llama", "gen_ai.response.model": "llama-3.1"}),
        resource={"user.id": user}))
    rows = conn.execute("SELECT span_name, model_id, model_name, model_provider FROM sessiontag.llm_traces"
                        " ORDER BY span_id").fetchall()
    assert rows == [("both registered", other, "GPT-4o mini", "azure.ai.openai"),
                    ("response unregistered", model, "GPT-4o", "openai"),
                    ("none registered", None, "llama-3.1", None)]


def test_usage_operation_messages_and_resource(conn):
    user = str(uuid.uuid4())
    messages = '[{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]'
    structured = {"key": "gen_ai.output.messages", "value": {"arrayValue": {"values": [{"kvlistValue": {"values": [
        {"key": "role", "value": {"stringValue": "assistant"}},
        {"key": "finish_reason", "value": {"stringValue": "stop"}}]}}]}}}
    s = span("c1c1c1c1c1c1c1c1", "chat", {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 100,
                                          "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 80,
                                          "gen_ai.usage.cache_creation.input_tokens": 5,
                                          "gen_ai.usage.reasoning.output_tokens": 12, "gen_ai.input.messages": messages})
    s["attributes"].append(structured)
    ingest(conn, request(s, span("c1c1c1c1c1c1c1c2", "embed", {"gen_ai.operation.name": "embeddings",
                                                                "gen_ai.input.messages": "plain text"}),
                         resource={"user.id": user, "service.name": "chat-api", "deployment.environment": "prod"}))
    (op, inp, out, itok, otok, meta), (op2, inp2) = [
        (r[0], r[1], r[2], r[3], r[4], r[5]) if i == 0 else (r[0], r[1]) for i, r in enumerate(conn.execute(
            "SELECT operation_type, input_data, output_data, input_tokens, output_tokens, metadata"
            " FROM sessiontag.llm_traces ORDER BY span_id"))]
    assert (op, itok, otok) == ("llm_call", 100, 20)
    assert inp == [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    assert out == [{"role": "assistant", "finish_reason": "stop"}]
    assert meta["usage"] == {"cache_read.input_tokens": 80, "cache_creation.input_tokens": 5,
                             "reasoning.output_tokens": 12}
    assert meta["otel"]["resource"] == {"user.id": user, "service.name": "chat-api", "deployment.environment": "prod"}
    assert meta["otel"]["scope"] == {"name": "test"}
    assert "gen_ai.input.messages" not in meta["otel"]["attributes"], "kept once, as input_data"
    assert (op2, inp2) == ("embedding", "plain text")


def test_ids_are_stored_lower_case(conn):
    s = span("00F067AA0BA902B7", "x", {}, parent="AAAAAAAAAAAAAAAA")
    s["traceId"] = "5B8EFFF798038103D269B633813FC60C"
    ingest(conn, request(s), str(uuid.uuid4()))
    assert _one(conn, "trace_id, span_id, parent_span_id") == (
        "5b8efff798038103d269b633813fc60c", "00f067aa0ba902b7", "aaaaaaaaaaaaaaaa")


def test_one_conversation_per_trace_even_when_one_span_names_it(conn, model):
    user = str(uuid.uuid4())
    # children first, in their own export, naming nothing; then the root naming the conversation
    ingest(conn, request(span("d1d1d1d1d1d1d1d2", "tool", {}, parent="d1d1d1d1d1d1d1d1"), resource={"user.id": user}))
    ingest(conn, request(span("d1d1d1d1d1d1d1d1", "turn", {"session.id": "chat-9", "gen_ai.request.model": "gpt-4o"}),
                         span("d1d1d1d1d1d1d1d3", "llm", {"gen_ai.request.model": "gpt-4o"}, parent="d1d1d1d1d1d1d1d1"),
                         resource={"user.id": user}))
    # a later export of the same trace, naming nothing
    ingest(conn, request(span("d1d1d1d1d1d1d1d4", "late", {}, parent="d1d1d1d1d1d1d1d1"), resource={"user.id": user}))
    rows = conn.execute("SELECT DISTINCT t.conversation_id, t.session_tag, c.external_id FROM sessiontag.llm_traces t"
                        " LEFT JOIN sessiontag.conversations c ON c.id = t.conversation_id").fetchall()
    assert rows == [(rows[0][0], f"chat_model_{model.hex[:6]}_001", "chat-9")]
    assert counts(conn) == (1, 4, 1)


def test_partial_refuses_bad_spans_and_stores_the_rest(conn, model):
    user = str(uuid.uuid4())
    payload = request(span("e1e1e1e1e1e1e1e1", "good", {"session.id": "p-1", "gen_ai.request.model": "gpt-4o"}),
                      span("e1e1e1e1e1e1e1e2", "bad usage", {"gen_ai.usage.input_tokens": -5, "session.id": "p-2",
                                                             "gen_ai.request.model": "gpt-4o"}),
                      span("e1e1e1e1e1e1e1e3", "bad user", {"user.id": "nope"}),
                      span("e1e1e1e1e1e1e1e4", "bad time", {}, start_ms=0),
                      span("e1e1e1e1e1e1e1e5", "good too", {}),
                      resource={"user.id": user})
    payload["resourceSpans"][0]["scopeSpans"][0]["spans"][3]["startTimeUnixNano"] = "soon"
    stored, rejected = conn.execute("SELECT stored, rejected FROM sessiontag.ingest_otlp_partial(%s)",
                                    [json.dumps(payload)]).fetchone()
    assert stored == 2
    assert [(r["span_id"], r["field"], r["sqlstate"]) for r in rejected] == [
        ("e1e1e1e1e1e1e1e2", "input_tokens", "22023"), ("e1e1e1e1e1e1e1e3", "attributes[user.id]", "22P02"),
        ("e1e1e1e1e1e1e1e4", "startTimeUnixNano", "22023")]
    assert rejected[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rejected[0]["path"] == "payload.resourceSpans[0].scopeSpans[0].spans[1]"
    # the refused span's new conversation was not kept, and took no session number
    assert conn.execute("SELECT external_id, session_counter FROM sessiontag.conversations").fetchall() == [("p-1", 1)]
    assert counts(conn) == (1, 2, 1)


@pytest.mark.parametrize("payload", [
    {}, {"resourceSpans": None}, {"resourceSpans": []}, {"resourceSpans": [{}]},
    {"resourceSpans": [{"resource": {}, "scopeSpans": None}]}, {"resourceSpans": [{"scopeSpans": [{}]}]},
    {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "x"}, "spans": None}]}]},
])
def test_a_request_of_no_spans_is_valid_and_stores_nothing(conn, payload):
    """proto3 JSON: a repeated field left out (or null) is empty."""
    assert ingest(conn, payload) == 0
    assert conn.execute("SELECT stored, rejected FROM sessiontag.ingest_otlp_partial(%s)",
                        [json.dumps(payload)]).fetchone() == (0, [])
    assert counts(conn) == (0, 0, 0)


@pytest.mark.parametrize("payload, message", [
    ([], "payload must be an OTLP/JSON ExportTraceServiceRequest"),
    ({"resourceSpans": 5}, "payload must be an OTLP/JSON ExportTraceServiceRequest"),
    ({"resourceSpans": [{"scopeSpans": {}}]}, "payload.resourceSpans[0].scopeSpans: must be an array"),
])
def test_a_request_that_is_no_export_request_still_raises(conn, payload, message):
    for function in ("ingest_otlp", "ingest_otlp_partial"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(message)):
            with conn.transaction():
                conn.execute(f"SELECT * FROM sessiontag.{function}(%s)", [json.dumps(payload)])


BAD_IDS = [  # (key, value, field, what the problem says)
    ("traceId", "4bf92f3577b34da6a3ce929d0e0e473", "traceId", "must be 32 hex digits"),     # 31 digits
    ("traceId", "4bf92f3577b34da6a3ce929d0e0e4736ff", "traceId", "must be 32 hex digits"),  # 34
    ("traceId", "zbf92f3577b34da6a3ce929d0e0e4736", "traceId", "must be 32 hex digits"),
    ("traceId", "0" * 32, "traceId", "not all zero"),
    ("traceId", None, "traceId", "got none"),
    ("spanId", "e1e1e1e1", "spanId", "must be 16 hex digits"),
    ("spanId", "0" * 16, "spanId", "not all zero"),
    ("spanId", "", "spanId", "must be 16 hex digits"),
    ("spanId", 12, "spanId", "must be 16 hex digits"),
    ("parentSpanId", "abc", "parentSpanId", "must be 16 hex digits"),
    ("parentSpanId", "0" * 16, "parentSpanId", "not all zero"),
]


@pytest.mark.parametrize("key, value, field, problem", BAD_IDS)
def test_a_span_with_an_invalid_id_is_refused_not_stored(conn, key, value, field, problem):
    user = str(uuid.uuid4())
    bad = span("e2e2e2e2e2e2e2e2", "bad id", {})
    if value is None:
        del bad[key]
    else:
        bad[key] = value
    payload = request(span("e2e2e2e2e2e2e2e1", "good", {}), bad, span("e2e2e2e2e2e2e2e3", "root", {}, parent=""),
                      resource={"user.id": user})
    path = "payload.resourceSpans[0].scopeSpans[0].spans[1]"
    with pytest.raises(psycopg.errors.InvalidParameterValue) as caught:
        with conn.transaction():
            ingest(conn, payload)
    assert str(caught.value).startswith(f"{path}.{field}: {problem}" if problem.startswith("must")
                                        else f"{path}.{field}: must be"), caught.value
    assert problem in str(caught.value)
    assert counts(conn) == (0, 0, 0)
    stored, rejected = conn.execute("SELECT stored, rejected FROM sessiontag.ingest_otlp_partial(%s)",
                                    [json.dumps(payload)]).fetchone()
    assert stored == 2 and [(r["path"], r["field"], r["sqlstate"]) for r in rejected] == [(path, field, "22023")]
    assert problem in rejected[0]["problem"]
    assert [r[0] for r in conn.execute("SELECT span_id FROM sessiontag.llm_traces ORDER BY span_id")] == [
        "e2e2e2e2e2e2e2e1", "e2e2e2e2e2e2e2e3"]
