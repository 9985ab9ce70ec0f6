"""Tag generation speed: create_conversation against a plain counter, history, bulk numbering.

1. Throughput on one hot (user, model) key with 16 pgbench clients: create_conversation
   against the textbook gapless counter (an upsert on a counter row and the conversation
   insert, in one statement and transaction) into trigger-free copies of the same tables:
   same columns, indexes, checks and foreign key to llm_models, so the comparison is of
   the tagging machinery alone. Goal: >= 0.8. Both run as an application's login role
   (a member of sessiontag_app, not a superuser), as in production.
2. Latency of create_conversation on a key with 200k earlier conversations against a key
   with none. Goal: within 1.2x (no scan of history).
3. Bulk numbering: the cost per conversation of one INSERT ... SELECT of 100k
   conversations of one (user, model) against one of 1k. Goal: <= 1.3 (no cost grows
   with how many the transaction already numbered).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from bench.common import best_of, migrated_database, report
from sessiontag.embedded import bindir

SECONDS = 10
CLIENTS = 16
HISTORY = 200_000
BULK_SMALL, BULK_LARGE = 1_000, 100_000


def pgbench(dsn: str, script: str, clients: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run([str(bindir() / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                              "-M", "prepared", "-f", f.name, dsn], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out.stderr.strip()[-500:]}")
        out = out.stdout
    finally:
        Path(f.name).unlink()
    return {"tps": float(re.search(r"tps = ([\d.]+)", out).group(1)),
            "latency_ms": float(re.search(r"latency average = ([\d.]+) ms", out).group(1))}


APP_ROLE = "bench_app"


def as_app(dsn: str) -> str:
    return f"{dsn} user={APP_ROLE}"


def setup_baseline(conn) -> None:
    conn.execute(f"DROP ROLE IF EXISTS {APP_ROLE}")
    conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN IN ROLE sessiontag_app")
    conn.execute("""
        CREATE TABLE bench_counters (user_id uuid, model_id uuid, last_value bigint NOT NULL,
                                     PRIMARY KEY (user_id, model_id));
        CREATE TABLE bench_conversations (LIKE sessiontag.conversations INCLUDING DEFAULTS INCLUDING INDEXES
                                          INCLUDING CONSTRAINTS,
                                          FOREIGN KEY (llm_model_id) REFERENCES sessiontag.llm_models (id));
    """)
    conn.execute(f"GRANT SELECT, INSERT, UPDATE ON bench_counters, bench_conversations TO {APP_ROLE}")


def main() -> list[dict]:
    results = []
    with migrated_database() as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
            short = conn.execute("SELECT short_id FROM sessiontag.llm_models").fetchone()[0]
            setup_baseline(conn)
        hot_user, textbook_user = uuid.uuid4(), uuid.uuid4()
        ours = f"SELECT sessiontag.create_conversation('{hot_user}'::uuid, '{model}'::uuid);\n"
        textbook = (
            "WITH n AS (INSERT INTO bench_counters AS c VALUES "
            f"('{textbook_user}'::uuid, '{model}'::uuid, 1) ON CONFLICT (user_id, model_id) "
            "DO UPDATE SET last_value = c.last_value + 1 RETURNING last_value) "
            "INSERT INTO bench_conversations (user_id, llm_model_id, session_id, experiment_name, session_counter) "
            f"SELECT '{textbook_user}'::uuid, '{model}'::uuid, 'chat_model_{short}_' || "
            "CASE WHEN n.last_value < 1000 THEN lpad(n.last_value::text, 3, '0') ELSE n.last_value::text END, "
            "'GPT-4o', n.last_value FROM n;\n")
        # alternate, so drift in the machine's speed hits both alike
        mine, base = [], []
        for _ in range(3):
            base.append(pgbench(as_app(dsn), textbook, CLIENTS, SECONDS)["tps"])
            mine.append(pgbench(as_app(dsn), ours, CLIENTS, SECONDS)["tps"])
        results.append(report(f"hot-key tags/s, {CLIENTS} clients", max(mine), max(base), ">= 0.8", True))

        with psycopg.connect(dsn, autocommit=True) as conn:
            deep_user = uuid.uuid4()
            for _ in range(HISTORY // 100_000):
                conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id) "
                             "SELECT %s, session_id FROM sessiontag.generate_session_tags(%s, %s, 100000)",
                             [deep_user, deep_user, model])
            conn.execute("VACUUM ANALYZE sessiontag.conversations")
        fresh_user = uuid.uuid4()
        fresh, deep = [], []
        for _ in range(3):
            fresh.append(pgbench(as_app(dsn), f"SELECT sessiontag.create_conversation('{fresh_user}'::uuid, '{model}'::uuid);\n",
                                 1, 5)["latency_ms"])
            deep.append(pgbench(as_app(dsn), f"SELECT sessiontag.create_conversation('{deep_user}'::uuid, '{model}'::uuid);\n",
                                1, 5)["latency_ms"])
        results.append(report(f"tag latency ms, {HISTORY:,} earlier vs none", min(deep), min(fresh), "<= 1.2", False))

        with psycopg.connect(dsn, autocommit=True) as conn:
            def bulk(n: int) -> None:
                conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id)"
                             " SELECT %s, %s FROM generate_series(1, %s)", [uuid.uuid4(), model, n])

            small = best_of(5, lambda: bulk(BULK_SMALL)) / BULK_SMALL
            large = best_of(2, lambda: bulk(BULK_LARGE)) / BULK_LARGE
        results.append(report(f"bulk numbering us per conversation, {BULK_LARGE:,} in one INSERT ... SELECT vs"
                              f" {BULK_SMALL:,}", large * 1e6, small * 1e6, "<= 1.3", False))
    return results


if __name__ == "__main__":
    main()
