"""`sessiontag serve` against calling ingest_otlp directly, in the same run on the same server.

Ours: 4 exporter processes post protobuf ExportTraceServiceRequests of 512 spans each
to a `sessiontag serve` process (pool of 4 connections), over keep-alive HTTP/1.1.
Baseline: 4 processes, each with its own connection, call sessiontag.ingest_otlp with
the same requests as OTLP/JSON (what an application with a database connection would
do). Both store the same shape of spans (GenAI turns: a root naming the conversation, a
model call with usage, a tool call) under fresh ids. The ratio is spans/s through serve
÷ spans/s direct (goal ≥ 0.7); serve's request latency is reported as p50/p99.
"""

from __future__ import annotations

import http.client
import multiprocessing
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from bench.common import migrated_database, report

PROCESSES = 4
BATCH = 512
BATCHES_PER_PROCESS = 12
T0_NS = 1_750_000_000_000_000_000


def _kv(key, value):
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=v)


def make_batches(seed: int, users: list[str], n: int) -> list[bytes]:
    """n protobuf requests of BATCH spans each: turns of 3 spans, one user per request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    rng = random.Random(seed)
    batches = []
    for b in range(n):
        request = ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        rs.resource.attributes.extend([_kv("service.name", "chat-api"), _kv("user.id", rng.choice(users)),
                                       _kv("deployment.environment", "prod")])
        ss = rs.scope_spans.add()
        ss.scope.name, ss.scope.version = "bench", "1.0"
        while len(ss.spans) < BATCH:
            trace, root = rng.randbytes(16), rng.randbytes(8)
            start = T0_NS + rng.randrange(10**15)
            conversation = f"conv-{rng.randrange(50)}"
            for k, (name, attrs) in enumerate([
                    ("chat turn", [_kv("session.id", conversation)]),
                    ("chat gpt-4o", [_kv("gen_ai.operation.name", "chat"), _kv("gen_ai.request.model", "gpt-4o"),
                                     _kv("gen_ai.response.model", "gpt-4o-2024-08-06"),
                                     _kv("gen_ai.provider.name", "openai"),
                                     _kv("gen_ai.usage.input_tokens", rng.randrange(20, 2000)),
                                     _kv("gen_ai.usage.output_tokens", rng.randrange(10, 800)),
                                     _kv("gen_ai.usage.cache_read.input_tokens", rng.randrange(0, 20))]),
                    ("execute_tool search", [_kv("gen_ai.operation.name", "execute_tool"),
                                             _kv("gen_ai.tool.name", "search")])]):
                if len(ss.spans) == BATCH:
                    break
                span = ss.spans.add()
                span.trace_id, span.span_id, span.name, span.kind = trace, root if k == 0 else rng.randbytes(8), name, 1
                if k:
                    span.parent_span_id = root
                span.start_time_unix_nano = start + k * 1_000_000
                span.end_time_unix_nano = start + (k + 1) * 400_000_000
                span.attributes.extend(attrs)
                span.status.code = 2 if rng.random() < 0.05 else 1
        batches.append(request.SerializeToString())
    return batches


def _direct(dsn: str, payloads: list[str], start, results) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        start.wait()
        for payload in payloads:
            conn.execute("SELECT sessiontag.ingest_otlp(%s::jsonb)", [payload])
    results.put([])


def _export(host: str, port: int, bodies: list[bytes], start, results) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    latencies = []
    start.wait()
    for body in bodies:
        began = time.perf_counter()
        conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
        answer = conn.getresponse()
        answer.read()
        latencies.append(time.perf_counter() - began)
        if answer.status != 200:
            raise SystemExit(f"serve answered {answer.status}")
    conn.close()
    results.put(latencies)


def _run(target, per_process: list[list], *args) -> tuple[float, list[float]]:
    """Wall time of PROCESSES processes running target over their share, and the latencies."""
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(PROCESSES + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, share, start, results)) for share in per_process]
    [p.start() for p in procs]
    start.wait()
    began = time.perf_counter()
    latencies = [x for _ in procs for x in results.get(timeout=600)]
    elapsed = time.perf_counter() - began
    [p.join() for p in procs]
    return elapsed, latencies


def main() -> None:
    from sessiontag.server.otlp import protobuf_to_json

    users = [str(uuid.uuid4()) for _ in range(20)]
    n = PROCESSES * BATCHES_PER_PROCESS
    with migrated_database() as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')")
        # Warm both paths up (plans, caches, the conversations) on spans of their own.
        warm = make_batches(0, users, 8)
        direct_batches = make_batches(1, users, n)
        serve_batches = make_batches(2, users, n)
        direct_json = [protobuf_to_json(b)[0] for b in direct_batches]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for b in warm[:4]:
                conn.execute("SELECT sessiontag.ingest_otlp(%s::jsonb)", [protobuf_to_json(b)[0]])
            conn.execute("VACUUM ANALYZE")

        server = subprocess.Popen([str(Path(sys.executable).with_name("sessiontag")), "--dsn", dsn, "serve",
                                   "--port", "0", "--pool-size", str(PROCESSES)], stderr=subprocess.PIPE, text=True)
        try:
            host, port = re.search(r"http://([\d.]+):(\d+)/", server.stderr.readline()).groups()
            _run(_export, [warm[4:6], warm[6:7], warm[7:8], []], host, int(port))
            shares = lambda items: [items[i::PROCESSES] for i in range(PROCESSES)]
            direct_time, _ = _run(_direct, shares(direct_json), dsn)
            serve_time, latencies = _run(_export, shares(serve_batches), host, int(port))
        finally:
            server.terminate()
            server.wait(30)
        with psycopg.connect(dsn) as conn:
            total = conn.execute("SELECT count(*) FROM sessiontag.llm_traces").fetchone()[0]
        assert total == (2 * n + 8) * BATCH, f"stored {total} spans"

    spans = n * BATCH
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    print(f"{spans} spans each way in requests of {BATCH}, {PROCESSES} processes;"
          f" serve request latency p50 {statistics.median(latencies) * 1000:.0f} ms,"
          f" p99 {p99 * 1000:.0f} ms; rates in spans/s", flush=True)
    report("sessiontag serve (protobuf over OTLP/HTTP) vs ingest_otlp called directly (OTLP/JSON)",
           spans / serve_time, spans / direct_time, ">= 0.7", True)


if __name__ == "__main__":
    main()
