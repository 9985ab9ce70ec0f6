"""`sessiontag serve`: a real receiver process on loopback, real PostgreSQL, and the
official OTLP/HTTP exporter or raw posts."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.test_otlp import attr, request, span

SESSIONTAG = str(Path(sys.executable).with_name("sessiontag"))


class Receiver:
    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url, self.lines = process, url, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout=20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


def start_receiver(dsn: str, *args: str) -> Receiver:
    process = subprocess.Popen([SESSIONTAG, "--dsn", dsn, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = process.stderr.readline()
    found = re.search(r"listening on (http://\S+)/v1/traces", first)
    if not found:
        process.kill()
        raise AssertionError(f"serve did not start: {first}{process.stderr.read()}")
    return Receiver(process, found.group(1))


@contextmanager
def receiver(dsn: str, *args: str):
    r = start_receiver(dsn, *args)
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log


def post(url: str, body: bytes, content_type: str = "application/json", headers: dict | None = None,
         path: str = "/v1/traces"):
    """(status, headers, body) of one POST."""
    req = urllib.request.Request(url + path, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def get(url: str, path: str = "/healthz"):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stored(dsn: str, columns: str = "span_id", where: str = "true") -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT {columns} FROM sessiontag.llm_traces WHERE {where} ORDER BY span_id").fetchall()


def sdk_provider(url: str, user: str | None = None, headers: dict | None = None, **resource):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.name": "chat-api", **resource}
    if user:
        attributes["user.id"] = user
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers=headers),
                                                   schedule_delay_millis=50))
    return provider


def chat_turn(tracer, conversation: str, model: str = "gpt-4o", tokens=(12, 34)):
    with tracer.start_as_current_span("chat turn", attributes={"session.id": conversation}):
        with tracer.start_as_current_span(f"chat {model}", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": model, "gen_ai.provider.name": "openai",
                "gen_ai.usage.input_tokens": tokens[0], "gen_ai.usage.output_tokens": tokens[1]}):
            pass


@pytest.fixture
def model(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]


def test_sdk_exporter_spans_become_a_tagged_session(dsn, model):
    user = str(uuid.uuid4())
    with receiver(dsn) as r:
        assert get(r.url) == (200, {"status": "ok"})
        provider = sdk_provider(r.url, user)
        tracer = provider.get_tracer("test")
        chat_turn(tracer, "support-17")
        chat_turn(tracer, "support-17", tokens=(5, 6))
        assert provider.force_flush(10_000)
        provider.shutdown()
    rows = stored(dsn, "span_name, session_tag, model_id, model_provider, input_tokens, metadata -> 'otel' -> 'resource'"
                       " ->> 'service.name', trace_id ~ '^[0-9a-f]{32}$'")
    tag = f"chat_model_{model.hex[:6]}_001"
    assert sorted(rows) == sorted([("chat turn", tag, None, None, None, "chat-api", True)] * 2 + [
        ("chat gpt-4o", tag, model, "openai", 12, "chat-api", True),
        ("chat gpt-4o", tag, model, "openai", 5, "chat-api", True)])


def test_json_and_gzip_answered_in_the_request_encoding(dsn, model):
    user = str(uuid.uuid4())
    first = request(span("AAAAAAAAAAAAAAA1", "chat", {"gen_ai.request.model": "gpt-4o", "session.id": "j"}),
                    resource={"user.id": user})
    with receiver(dsn) as r:
        status, headers, body = post(r.url, json.dumps(first).encode())
        assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", {})
        second = request(span("aaaaaaaaaaaaaaa2", "chat", {"session.id": "j"}), resource={"user.id": user})
        status, headers, body = post(r.url, gzip.compress(json.dumps(second).encode()),
                                     headers={"Content-Encoding": "gzip"})
        assert (status, json.loads(body)) == (200, {})
        proto = ExportTraceServiceRequest()
        s = proto.resource_spans.add().scope_spans.add().spans.add()
        s.trace_id, s.span_id, s.name = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("aaaaaaaaaaaaaaa3"), "p"
        s.start_time_unix_nano, s.end_time_unix_nano = 1_732_000_000_000_000_000, 1_732_000_001_000_000_000
        kv = s.attributes.add()
        kv.key, kv.value.string_value = "user.id", user
        status, headers, body = post(r.url, gzip.compress(proto.SerializeToString()), "application/x-protobuf",
                                     {"Content-Encoding": "gzip"})
        assert (status, headers["Content-Type"]) == (200, "application/x-protobuf")
        assert not ExportTraceServiceResponse.FromString(body).HasField("partial_success")
    assert stored(dsn, "span_id, trace_id, session_tag IS NOT NULL") == [
        ("aaaaaaaaaaaaaaa1", "4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("aaaaaaaaaaaaaaa2", "4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("aaaaaaaaaaaaaaa3", "4bf92f3577b34da6a3ce929d0e0e4736", True)]


def test_one_bad_span_is_refused_by_partial_success_and_the_others_stored(dsn):
    user = str(uuid.uuid4())
    spans = [span(f"b{i:015x}", f"s{i}", {}) for i in range(5)]
    spans[2]["attributes"].append(attr("gen_ai.usage.output_tokens", -1))
    with receiver(dsn) as r:
        status, _, body = post(r.url, json.dumps(request(*spans, resource={"user.id": user})).encode())
        answer = json.loads(body)["partialSuccess"]
        assert status == 200 and int(answer["rejectedSpans"]) == 1
        assert answer["errorMessage"] == ("span b000000000000002 of trace 4bf92f3577b34da6a3ce929d0e0e4736: "
                                          "output_tokens: must not be negative, got -1")
        # the same through protobuf, from the official exporter's encoder
        proto = ExportTraceServiceRequest()
        rs = proto.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "user.id", "not-a-uuid"
        s = rs.scope_spans.add().spans.add()
        s.trace_id, s.span_id, s.name, s.start_time_unix_nano = b"\x01" * 16, b"\x02" * 8, "p", 1
        status, _, body = post(r.url, proto.SerializeToString(), "application/x-protobuf")
        partial = ExportTraceServiceResponse.FromString(body).partial_success
        assert status == 200 and partial.rejected_spans == 1
        assert partial.error_message.startswith("span 0202020202020202 of trace 01010101010101010101010101010101: "
                                                "attributes[user.id]: 'not-a-uuid' is not a uuid")
    assert [row[0] for row in stored(dsn)] == [f"b{i:015x}" for i in (0, 1, 3, 4)]
    assert "refused 1 spans: span b000000000000002" in r.log


def test_an_empty_request_is_200_and_spans_with_bad_ids_are_refused_by_name(dsn):
    user = str(uuid.uuid4())
    with receiver(dsn) as r:
        for empty in (b"{}", b'{"resourceSpans": []}', b'{"resourceSpans": [{"scopeSpans": [{}]}]}'):
            assert post(r.url, empty)[:3:2] == (200, b"{}"), empty
        assert post(r.url, ExportTraceServiceRequest().SerializeToString(), "application/x-protobuf")[0] == 200
        spans = [span("a100000000000001", "good", {}), span("a100000000000002", "short trace", {}),
                 span("a100000000000003", "zero span", {}), span("a100000000000004", "bad parent", {}, parent="xyz")]
        spans[1]["traceId"] = "4bf92f35"
        spans[2]["spanId"] = "0" * 16
        status, _, body = post(r.url, json.dumps(request(*spans, resource={"user.id": user})).encode())
        answer = json.loads(body)["partialSuccess"]
        where = "payload.resourceSpans[0].scopeSpans[0].spans"
        assert status == 200 and answer["rejectedSpans"] == "3"
        assert answer["errorMessage"] == (
            f'{where}[1]: traceId: must be 32 hex digits, not all zero, got "4bf92f35"; '
            f'{where}[2]: spanId: must be 16 hex digits, not all zero, got "0000000000000000"; '
            'span a100000000000004 of trace 4bf92f3577b34da6a3ce929d0e0e4736: parentSpanId: must be 16 hex digits,'
            ' not all zero, or empty for a root span, got "xyz"')
        # protobuf: ids of the wrong length, an all-zero trace id
        proto = ExportTraceServiceRequest()
        rs = proto.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "user.id", user
        ss = rs.scope_spans.add()
        for trace_id, span_id in ((b"\x01" * 16, b"\x02" * 8), (b"\x00" * 16, b"\x03" * 8), (b"\x01" * 16, b"\x04" * 4)):
            s = ss.spans.add()
            s.trace_id, s.span_id, s.name, s.start_time_unix_nano = trace_id, span_id, "p", 1
        status, _, body = post(r.url, proto.SerializeToString(), "application/x-protobuf")
        partial = ExportTraceServiceResponse.FromString(body).partial_success
        assert status == 200 and partial.rejected_spans == 2
        assert partial.error_message == (
            f'{where}[1]: traceId: must be 32 hex digits, not all zero, got "{"0" * 32}"; '
            f'{where}[2]: spanId: must be 16 hex digits, not all zero, got "04040404"')
        # the user is missing: the message names serve's option, not the SQL parameter
        status, _, body = post(r.url, json.dumps(request(span("a100000000000005", "x", {}))).encode())
        answer = json.loads(body)["partialSuccess"]
        assert status == 200 and answer["errorMessage"].endswith("or --default-user"), answer
    assert stored(dsn) == [("0202020202020202",), ("a100000000000001",)]
    assert "default_user_id" not in r.log and "refused 1 spans: span a100000000000005" in r.log


def test_an_unreachable_database_is_logged_one_line_at_a_time():
    with receiver("host=127.0.0.1 port=1 dbname=x connect_timeout=2") as r:
        time.sleep(4.5)  # the pool retries after ~1, 2 and 4 s
        assert get(r.url) == (503, {"status": "unavailable", "reason": "the database is unreachable"})
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ sessiontag serve: ", line) for line in r.lines[1:]), r.log
    failures = [line for line in r.lines if "cannot connect to the database: " in line]
    assert len(failures) == 1 and "Connection refused; Is the server running" in failures[0], r.log
    assert r.log.count("GET /healthz: 503: the database is unreachable") == 1


def test_undecodable_bodies_are_400_and_oversize_413(dsn):
    with receiver(dsn, "--max-body", "1") as r:
        status, _, body = post(r.url, b"\xff\x00garbage", "application/x-protobuf")
        assert status == 400 and status_pb2.Status.FromString(body).code == 3
        status, _, body = post(r.url, b"{not json", "application/json")
        assert status == 400 and json.loads(body)["message"].startswith("the body is not JSON")
        status, _, body = post(r.url, b"not gzip", "application/json", {"Content-Encoding": "gzip"})
        assert status == 400 and "gzip" in json.loads(body)["message"]
        status, _, body = post(r.url, json.dumps({"resourceSpans": [{"scopeSpans": 5}]}).encode())
        assert status == 400 and "scopeSpans: must be an array" in json.loads(body)["message"]
        status, _, _ = post(r.url, b"x", "text/plain")
        assert status == 415
        status, _, body = post(r.url, b" " * (2 * 1024 * 1024))
        assert status == 413
        bomb = gzip.compress(b" " * (3 * 1024 * 1024))  # a few kilobytes that inflate past the cap
        assert len(bomb) < 1024 * 1024
        status, _, body = post(r.url, bomb, headers={"Content-Encoding": "gzip"})
        assert status == 413 and "inflated" in json.loads(body)["message"]
    assert r.log.count("POST /v1/traces: 4") == 7


def test_tokens_missing_or_wrong_401_and_a_user_token_writes_only_its_user(dsn, tmp_path):
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(dsn, autocommit=True) as conn:
        role = f"serve_{uuid.uuid4().hex[:8]}"  # a login like production's: may act as a user, not superuser
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE sessiontag_app, sessiontag_user")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# the team's collector\nteam-secret\nalice-secret:{alice}\n")
    payload = lambda user, sid: json.dumps(request(span(sid, "x", {}), resource={"user.id": user})).encode()
    try:
        with receiver(f"{dsn} user={role}", "--tokens-file", str(tokens)) as r:
            assert post(r.url, payload(alice, "c000000000000001"))[0] == 401
            assert post(r.url, payload(alice, "c000000000000001"), headers={"Authorization": "Bearer nope"})[0] == 401
            status, _, body = post(r.url, payload(bob, "c000000000000002"),
                                   headers={"Authorization": "Bearer alice-secret"})
            answer = json.loads(body)["partialSuccess"]
            assert status == 200 and answer["rejectedSpans"] == "1"
            assert "is not the user of this session" in answer["errorMessage"]
            no_user = json.dumps(request(span("c000000000000003", "x", {}))).encode()
            assert post(r.url, no_user, headers={"Authorization": "Bearer alice-secret"})[:3:2] == (200, b"{}")
            assert post(r.url, payload(bob, "c000000000000004"), headers={"Authorization": "Bearer team-secret"})[0] == 200
        assert stored(dsn, "span_id, user_id::text") == [("c000000000000003", alice), ("c000000000000004", bob)]
        assert r.log.count(": 401: ") == 2
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_cli_refuses_an_open_host_without_tokens_and_bad_tokens(dsn, tmp_path):
    for args, message in [(["--host", "0.0.0.0"], "error: --host 0.0.0.0 is reachable from other machines: give"
                                                   " --token or --tokens-file"),
                          (["--token", "t:bob"], "error: --token: 'bob' is not a user id"),
                          (["--tokens-file", str(tmp_path / "none")], "error: cannot read the tokens file")]:
        result = subprocess.run([SESSIONTAG, "--dsn", dsn, "serve", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_healthz_names_what_is_missing(empty_dsn):
    with receiver(empty_dsn) as r:
        status, answer = get(r.url)
        assert status == 503 and "migrations not applied: 0001_base_tables" in answer["reason"]
        status, _, body = post(r.url, json.dumps(request(span("d000000000000001", "x", {}))).encode())
        assert status == 503 and "migrate" in json.loads(body)["message"]


def test_sigterm_drains_in_flight_requests(dsn):
    user = str(uuid.uuid4())
    results = []
    with psycopg.connect(dsn) as blocker:
        # Hold the table so the requests wait inside the database when SIGTERM comes.
        blocker.execute("LOCK TABLE sessiontag.llm_traces IN EXCLUSIVE MODE")
        r = start_receiver(dsn)

        def send(i):
            results.append(post(r.url, json.dumps(request(span(f"e{i:015x}", "x", {}), resource={"user.id": user}))
                                .encode())[0])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 10
        while blocker.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation ="
                              " 'sessiontag.llm_traces'::regclass").fetchone()[0] < 4:
            assert time.monotonic() < deadline, r.log
            time.sleep(0.05)
        r.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            post(r.url, b"{}")
        blocker.rollback()
        [t.join(30) for t in threads]
    assert r.stop() == 0, r.log
    assert results == [200] * 4
    assert len(stored(dsn)) == 4


def test_every_connection_busy_is_429_with_retry_after_and_nothing_lost(dsn):
    """One pooled connection, held by a request waiting inside the database: the next
    request is 429 with Retry-After (so an exporter retries), and both are stored after."""
    user = str(uuid.uuid4())
    results = {}
    with psycopg.connect(dsn) as blocker, receiver(dsn, "--pool-size", "1") as r:
        get(r.url)  # the pool's one connection is open
        blocker.execute("LOCK TABLE sessiontag.llm_traces IN EXCLUSIVE MODE")

        def send(name):
            results[name] = post(r.url, json.dumps(request(span(f"{name:0>16}", "x", {}),
                                                           resource={"user.id": user})).encode())

        first = threading.Thread(target=send, args=("a",))
        first.start()
        deadline = time.monotonic() + 10
        while blocker.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation ="
                              " 'sessiontag.llm_traces'::regclass").fetchone()[0] < 1:
            assert time.monotonic() < deadline, r.log
            time.sleep(0.05)
        send("b")
        status, headers, _ = results["b"]
        assert status == 429 and int(headers["Retry-After"]) >= 1, results["b"]
        blocker.rollback()
        first.join(30)
        assert results["a"][0] == 200
        send("b")  # the exporter's retry
        assert results["b"][0] == 200
    assert [row[0] for row in stored(dsn)] == ["000000000000000a", "000000000000000b"]
    assert "429" in r.log


def test_database_down_mid_stream_503_then_every_span_once(private_server):
    own_server, dsn = private_server
    user = str(uuid.uuid4())
    with receiver(dsn) as r:
        provider = sdk_provider(r.url, user)
        tracer = provider.get_tracer("test")
        chat_turn(tracer, "resilient")
        assert provider.force_flush(10_000)
        own_server.terminate(signal.SIGINT)  # fast shutdown: connections are cut
        for _ in range(3):
            chat_turn(tracer, "resilient")  # exported while the database is down
        status, headers, body = post(r.url, json.dumps(request(span("f000000000000001", "x", {}),
                                                               resource={"user.id": user})).encode())
        assert status == 503 and headers["Retry-After"] == "1", body
        own_server.start()
        assert provider.force_flush(20_000)
        provider.shutdown()
        assert post(r.url, json.dumps(request(span("f000000000000001", "x", {}),
                                              resource={"user.id": user})).encode())[0] == 200
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT (trace_id, span_id)), count(DISTINCT session_tag)"
                            " FROM sessiontag.llm_traces").fetchone() == (9, 9, 0)
    assert ": 503: " in r.log


# -- make demo's OpenTelemetry step and its example ----------------------------------------
REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent


def make_demo_otel(dsn: str, port: int) -> subprocess.CompletedProcess:
    """`make demo-otel` (the last step of `make demo`) against DSN, on PORT, with this venv."""
    return subprocess.run(["make", "--no-print-directory", "-o", "install", "demo-otel", f"OTLP_PORT={port}",
                           f"VENV={VENV}"], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "DATABASE_URL": dsn})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_make_demo_sends_the_example_through_serve(dsn, model):
    result = make_demo_otel(dsn, free_port())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "$ OTEL_EXPORTER_OTLP_ENDPOINT=" in result.stdout and "(sessiontag serve stopped)" in result.stdout
    assert len(stored(dsn)) == 6


def test_make_demo_fails_with_the_serve_log_when_serve_cannot_start(dsn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = make_demo_otel(dsn, port)
    assert result.returncode != 0
    assert f"sessiontag serve did not start (no answer from /healthz on 127.0.0.1:{port})" in result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in result.stdout  # the example never ran
    assert stored(dsn) == []


def test_the_example_exits_1_when_its_export_is_refused(dsn):
    with receiver(dsn, "--token", "secret") as r:  # the example sends no token: 401
        result = subprocess.run([sys.executable, str(REPO / "examples" / "otel_chat.py")], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": r.url})
    assert result.returncode == 1 and result.stdout == ""
    assert "could not export the spans of conversation" in result.stderr and "refused" in result.stderr
    assert ": 401: " in r.log
