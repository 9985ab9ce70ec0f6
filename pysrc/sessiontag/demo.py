"""`sessiontag demo`: a realistic workload through the SQL API.

Several users chat with three models; every conversation has a few turns, and every turn
is a trace: a root span, a retrieval step, the LLM call, and now and then a tool call
with a nested LLM call. Models differ in latency, error rate, price and quality: users
give most turns a thumbs up or down (feedback "thumbs" on the turn's trace), and one model
pleases them clearly less often, so `compare --baseline gpt-4o --feedback thumbs` has a
verdict to give. Most conversations are tagged at creation, the others by their
first trace. The turns span the past week; when the connection may (as the schema owner
on the local server does), each conversation is dated back to its first turn, so that
filters by time agree on sessions and traces.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg

from .client import Client
from .resources import query


@dataclass(frozen=True)
class DemoModel:
    name: str
    provider: str
    key: str
    latency_ms: tuple[int, int]   # typical range of one completion
    error_rate: float
    usd_per_1k_tokens: Decimal
    thumbs_up: float              # chance that a rated turn gets a thumbs up


MODELS = [
    DemoModel("GPT-4o", "openai", "gpt-4o", (600, 2400), 0.04, Decimal("0.0075"), 0.85),
    DemoModel("Claude 3.5 Sonnet", "anthropic", "claude-3-5-sonnet", (800, 3000), 0.03, Decimal("0.0090"), 0.88),
    DemoModel("Llama 3.1 70B", "meta", "llama-3.1-70b", (400, 5200), 0.09, Decimal("0.0009"), 0.45),
]
TITLES = ["Refactor a SQL query", "Plan a trip to Lisbon", "Explain keyset pagination", "Draft a cover letter",
          "Debug a flaky test", "Summarize a paper", "Name a new product", "Write a haiku about Postgres",
          "Compare two laptops", "Translate a menu"]
ERRORS = ["rate limit exceeded (429)", "context length exceeded", "upstream timeout after 30s"]


@dataclass
class DemoResult:
    users: int
    sessions: int
    traces: int
    spans: int
    feedback: int = 0
    example: tuple[str, uuid.UUID] | None = None  # (session tag, user id) of a session it loaded


def _completion(rng: random.Random, model: DemoModel, model_id, start: datetime, name: str) -> dict:
    low, high = model.latency_ms
    latency = rng.uniform(low, high) * (4 if rng.random() < 0.05 else 1)  # a few slow calls
    failed = rng.random() < model.error_rate
    input_tokens = rng.randint(200, 2500)
    output_tokens = 0 if failed else rng.randint(50, 900)
    return dict(span_name=name, operation_type="llm_call", model_id=str(model_id), model_name=model.name,
                model_provider=model.provider, start_time=start.isoformat(),
                end_time=(start + timedelta(milliseconds=latency)).isoformat(),
                status="error" if failed else "success",
                error_message=rng.choice(ERRORS) if failed else None,
                input_tokens=input_tokens, output_tokens=output_tokens,
                cost_usd=str((model.usd_per_1k_tokens * (input_tokens + output_tokens) / 1000).quantize(Decimal("1e-8"))))


def _turn(rng: random.Random, model: DemoModel, model_id, user_id, conversation_id, start: datetime) -> list[dict]:
    """The spans of one chat turn, children first-class: each carries its own usage only."""
    trace_id = uuid.uuid4().hex
    base = dict(user_id=str(user_id), trace_id=trace_id, conversation_id=str(conversation_id))
    spans = []
    t = start + timedelta(milliseconds=rng.randint(5, 40))
    retrieval_end = t + timedelta(milliseconds=rng.randint(30, 250))
    spans.append(dict(base, span_id="retrieve", parent_span_id="turn", span_name="retrieve context",
                      operation_type="retrieval", start_time=t.isoformat(), end_time=retrieval_end.isoformat(),
                      status="success"))
    t = retrieval_end
    if rng.random() < 0.25:  # a tool call that itself asks the model to summarize
        tool_end = t + timedelta(milliseconds=rng.randint(300, 1500))
        spans.append(dict(base, span_id="tool", parent_span_id="turn", span_name="tool: web_search",
                          operation_type="tool", start_time=t.isoformat(), end_time=tool_end.isoformat(),
                          status="success"))
        summary = _completion(rng, model, model_id, t + timedelta(milliseconds=100), "summarize results")
        summary_end = datetime.fromisoformat(summary["end_time"])
        if summary_end > tool_end:
            spans[-1]["end_time"] = summary_end.isoformat()
        spans.append(dict(base, span_id="tool-llm", parent_span_id="tool", **summary))
        t = max(tool_end, summary_end)
    answer = _completion(rng, model, model_id, t, "completion")
    spans.append(dict(base, span_id="llm", parent_span_id="turn", **answer))
    end = datetime.fromisoformat(answer["end_time"]) + timedelta(milliseconds=rng.randint(2, 20))
    failed = any(s["status"] == "error" for s in spans)
    spans.insert(0, dict(base, span_id="turn", span_name="chat turn", operation_type="chain",
                         model_id=str(model_id), start_time=start.isoformat(), end_time=end.isoformat(),
                         status="error" if failed else "success",
                         error_message=next((s["error_message"] for s in spans if s.get("error_message")), None)))
    return spans


def run(client: Client, seed: int | None = None, users: int = 5) -> DemoResult:
    """Register the models and load conversations with their traces."""
    rng = random.Random(seed)
    model_ids = [client.register_model(m.name, m.provider, m.key) for m in MODELS]
    now = datetime.now(timezone.utc)
    sessions = traces = spans = feedback = 0
    conversation_ids = []
    for _ in range(users):
        user_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        for _ in range(rng.randint(4, 8)):
            pick = rng.randrange(len(MODELS))
            model, model_id = MODELS[pick], model_ids[pick]
            title = rng.choice(TITLES)
            if rng.random() < 0.7:
                conversation = client.create_conversation(user_id, model_id, title=title)  # tagged at creation
            else:
                conversation = client.create_conversation(user_id, title=title)  # tagged by its first trace
            start = now - timedelta(days=rng.uniform(0.1, 7))
            batch = []
            thumbs = []
            for _ in range(rng.randint(2, 6)):
                turn = _turn(rng, model, model_id, user_id, conversation.id, start)
                batch += turn
                start = datetime.fromisoformat(turn[0]["end_time"]) + timedelta(seconds=rng.randint(10, 240))
                traces += 1
                if rng.random() < 0.8:  # most turns are rated; a failed one never pleases
                    good = turn[0]["status"] == "success" and rng.random() < model.thumbs_up
                    thumbs.append((turn[0]["trace_id"], 1 if good else 0))
            spans += client.ingest(batch)
            for trace_id, value in thumbs:
                client.record_feedback(user_id, "thumbs", value=value, trace_id=trace_id)
            feedback += len(thumbs)
            sessions += 1
            conversation_ids.append(conversation.id)
    try:
        with client.conn.transaction():
            client.conn.execute(query("demo_backdate"), {"conversation_ids": conversation_ids})
    except psycopg.errors.InsufficientPrivilege:
        pass  # an application role: the conversations keep today's date
    # The last conversation's tag, as its spans carry it (it may have been tagged by them).
    last = client.list_traces(user_id=user_id, conversation_id=conversation_ids[-1], page_size=1)
    example = (last[0].session_tag, user_id) if last and last[0].session_tag else None
    return DemoResult(users=users, sessions=sessions, traces=traces, spans=spans, feedback=feedback, example=example)
