"""Search speed on 1M spans: list_traces, page by page and against the query it runs.

1. list_traces of one session: the 40th page against the first. Goal: within 1.5x
   (keyset pagination costs the same at any depth).
2. list_traces (40th page) against the raw indexed query it runs, written by hand.
   Goal: within 1.5x (the function adds little to the query).
"""

from __future__ import annotations

import uuid

import psycopg

from bench.bench_tagging import pgbench
from bench.common import migrated_database, report

SPANS = 1_000_000
SESSION_SPANS = 4_000  # the measured session: 80 pages of 50
PAGE = 50


def load(dsn: str) -> tuple[uuid.UUID, str]:
    """1M spans over 5,000 sessions of 500 users, plus one big session to page through."""
    user = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, parent_span_id, span_name, operation_type,
                                              model_name, session_tag, start_time, end_time, status,
                                              input_tokens, output_tokens, cost_usd)
            SELECT ('00000000-0000-4000-8000-' || lpad((g %% 500)::text, 12, '0'))::uuid,
                   'trace-' || (g / 4), 'span-' || (g %% 4), CASE WHEN g %% 4 > 0 THEN 'span-0' END,
                   CASE WHEN g %% 4 = 0 THEN 'chat turn' ELSE 'completion' END,
                   CASE WHEN g %% 4 = 0 THEN 'chain' ELSE 'llm_call' END,
                   (ARRAY['GPT-4o', 'Claude', 'Llama'])[1 + g %% 3],
                   'chat_model_abcdef_' || lpad((g %% 10)::text, 3, '0'),
                   timestamptz '2026-01-01' + g * interval '2 seconds',
                   timestamptz '2026-01-01' + g * interval '2 seconds' + interval '800 ms',
                   CASE WHEN g %% 50 = 0 THEN 'error' ELSE 'success' END, 100, 50, 0.001
            FROM generate_series(1, %s) g""", [SPANS - SESSION_SPANS])
        conn.execute("""
            INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name, session_tag, start_time, status)
            SELECT %s, 'big-' || g, 'root', 'chat turn', 'chat_model_abcdef_999',
                   timestamptz '2026-06-01' + (g / 3) * interval '1 second', 'success'  -- ties on purpose
            FROM generate_series(1, %s) g""", [user, SESSION_SPANS])
        conn.execute("VACUUM ANALYZE sessiontag.llm_traces")
    return user, "chat_model_abcdef_999"


def main() -> list[dict]:
    results = []
    with migrated_database() as dsn:
        user, tag = load(dsn)
        with psycopg.connect(dsn) as conn:
            cursor = None
            for _ in range(39):  # the cursor that opens page 40
                rows = conn.execute("SELECT cursor FROM sessiontag.list_traces(user_id => %s, session_tag => %s, "
                                    "after => %s, page_size => %s)", [user, tag, cursor, PAGE]).fetchall()
                cursor = rows[-1][0]
            at = conn.execute("SELECT at, user_id, id FROM sessiontag._decode_cursor(%s, 'after')", [cursor]).fetchone()
        call = (f"SELECT * FROM sessiontag.list_traces(user_id => '{user}', session_tag => '{tag}', "
                f"page_size => {PAGE}{{after}});\n")
        first = call.format(after="")
        fortieth = call.format(after=f", after => '{cursor}'")
        raw = (f"SELECT t.*, '' AS cursor FROM sessiontag.llm_traces t WHERE t.user_id = '{user}' "
               f"AND t.session_tag = '{tag}' AND (t.start_time, t.user_id, t.id) < "
               f"('{at[0].isoformat()}', '{at[1]}', '{at[2]}') "
               f"ORDER BY t.start_time DESC, t.user_id DESC, t.id DESC LIMIT {PAGE};\n")
        lat = {"first": [], "fortieth": [], "raw": []}
        for _ in range(3):  # alternate, so drift hits all alike
            for name, script in (("first", first), ("fortieth", fortieth), ("raw", raw)):
                lat[name].append(pgbench(dsn, script, 1, 4)["latency_ms"])
        results.append(report(f"list_traces ms, page 40 vs page 1 of a {SESSION_SPANS:,}-span session in "
                              f"{SPANS:,} spans", min(lat["fortieth"]), min(lat["first"]), "<= 1.5", False))
        results.append(report("list_traces ms vs the raw indexed query (page 40)", min(lat["fortieth"]),
                              min(lat["raw"]), "<= 1.5", False))
    return results


if __name__ == "__main__":
    main()
