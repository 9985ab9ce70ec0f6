"""A/B comparison speed on 1M spans in 50,000 sessions.

compare_metrics with a baseline and a feedback name (per-session reduction, intervals,
differences, verdicts) against compare_models on the same data. Goal: within 2x.
"""

from __future__ import annotations

import psycopg

from bench.common import best_of, migrated_database, report

USERS = 1_000
SESSIONS = 50_000
SPANS_PER_SESSION = 20  # 1M spans


def load(dsn: str) -> str:
    """Three models; 50,000 conversations tagged by the product's own trigger (one
    INSERT ... SELECT), 20 spans each (a root and 19 LLM calls, some failing), one thumbs
    per session. Returns the baseline model's id."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        models = [conn.execute("SELECT sessiontag.register_model(%s, 'bench', %s)", [name, key]).fetchone()[0]
                  for name, key in (("GPT-4o", "gpt-4o"), ("Claude", "claude"), ("Llama", "llama"))]
        conn.execute("""
            INSERT INTO sessiontag.conversations (user_id, llm_model_id, created_at)
            SELECT ('00000000-0000-4000-8000-' || lpad((g %% %s)::text, 12, '0'))::uuid,
                   (%s::uuid[])[1 + g %% 3], timestamptz '2026-01-01' + g * interval '10 seconds'
            FROM generate_series(0, %s - 1) g""", [USERS, models, SESSIONS])
        conn.execute("""
            INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, parent_span_id, span_name, operation_type,
                                              conversation_id, session_tag, start_time, end_time, status, cost_usd)
            SELECT c.user_id, 'trace-' || c.id, 'span-' || s, CASE WHEN s > 0 THEN 'span-0' END,
                   CASE WHEN s = 0 THEN 'chat turn' ELSE 'completion' END,
                   CASE WHEN s = 0 THEN 'chain' ELSE 'llm_call' END,
                   c.id, c.session_id, c.created_at,
                   c.created_at + (200 + (hashint4(s * 7919 + c.session_counter::int) & 2047)) * interval '1 ms',
                   CASE WHEN (hashint4(s + c.session_counter::int * 31) & 255) = 0 THEN 'error' ELSE 'success' END,
                   CASE WHEN s > 0 THEN 0.0001 * (1 + (hashint4(s * 31 + c.session_counter::int) & 63)) END
            FROM sessiontag.conversations c, generate_series(0, %s - 1) s""", [SPANS_PER_SESSION])
        conn.execute("""
            INSERT INTO sessiontag.feedback (user_id, conversation_id, name, value)
            SELECT c.user_id, c.id, 'thumbs', (hashint4(c.session_counter::int) & 1)
            FROM sessiontag.conversations c""")
        conn.execute("VACUUM ANALYZE")
        return models[0]


def main() -> list[dict]:
    with migrated_database() as dsn:
        baseline = load(dsn)
        with psycopg.connect(dsn) as conn:
            spans = conn.execute("SELECT count(*) FROM sessiontag.llm_traces").fetchone()[0]
            ours = best_of(3, lambda: conn.execute(
                "SELECT * FROM sessiontag.compare_metrics(baseline_model_id => %s, feedback_name => 'thumbs')",
                [baseline]).fetchall())
            theirs = best_of(3, lambda: conn.execute("SELECT * FROM sessiontag.compare_models()").fetchall())
        return [report(f"compare_metrics (baseline, feedback) s vs compare_models over {spans:,} spans in "
                       f"{SESSIONS:,} sessions", ours, theirs, "<= 2", False)]


if __name__ == "__main__":
    main()
