"""The backfill at scale: 1M untagged conversations over 10k users (100 each), as the
application left them before sessiontag tagged anything, numbered by `sessiontag backfill`.

Reports its rate (conversations per second), and the latency of a live create_conversation
(one client, users picked at random among the same 10k) while the backfill runs, against the
same live load before it: p95 while backfilling / p95 idle, goal <= 2.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time

import psycopg

from bench.common import migrated_database, report

USERS, PER_USER = int(os.environ.get("BENCH_USERS", 10_000)), 100
IDLE_SECONDS = 20
BACKFILL_ARGS = os.environ.get("BENCH_BACKFILL_ARGS", "").split()


def user(i: int) -> str:
    return f"md5('{i}')::uuid"


class LiveLoad:
    """One client creating conversations of random users, timing each call."""

    def __init__(self, dsn: str, model):
        self.dsn, self.model = dsn, model
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        rng = random.Random(7)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                i = rng.randrange(1, USERS + 1)
                start = time.perf_counter()
                conn.execute(f"SELECT sessiontag.create_conversation({user(i)}, %s)", [self.model])
                self.latencies.append((time.perf_counter() - start) * 1000)
                time.sleep(0.002)

    def __enter__(self) -> "LiveLoad":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def p95(self) -> float:
        return statistics.quantiles(self.latencies, n=20)[-1]


def main() -> list[dict]:
    with migrated_database() as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
            # Untracked while the conversations go in, as before tagging: they stay untagged.
            conn.execute("SELECT sessiontag.set_model_tracking(%s, false)", [model])
            start = time.perf_counter()
            conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id, created_at)"
                         " SELECT md5(u::text)::uuid, %s, timestamptz '2025-01-01' + make_interval(mins => n)"
                         " FROM generate_series(1, %s) u, generate_series(1, %s) n",
                         [model, USERS, PER_USER])
            conn.execute("VACUUM ANALYZE sessiontag.conversations")
            conn.execute("SELECT sessiontag.set_model_tracking(%s, true)", [model])
            print(f"{USERS * PER_USER:,} untagged conversations of {USERS:,} users loaded in"
                  f" {time.perf_counter() - start:.0f} s", flush=True)

        with LiveLoad(dsn, model) as idle:
            time.sleep(IDLE_SECONDS)
        with LiveLoad(dsn, model) as live:
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "sessiontag.cli", "--dsn", dsn, "backfill", "--no-progress", *BACKFILL_ARGS],
                                    capture_output=True, text=True)
            elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"backfill failed: {result.stderr.strip()}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            untagged, total, keys_ok = conn.execute(
                "SELECT count(*) FILTER (WHERE session_id IS NULL), count(*),"
                " bool_and(n = top) FROM (SELECT count(*) OVER w AS n, max(session_counter) OVER w AS top, session_id"
                "  FROM sessiontag.conversations WINDOW w AS (PARTITION BY user_id, llm_model_id)) x").fetchone()
        assert untagged == 0 and keys_ok, "the backfill left conversations untagged or numbers with gaps"
        print(f"backfill: {USERS * PER_USER:,} conversations in {elapsed:.0f} s, {USERS * PER_USER / elapsed:,.0f}/s;"
              f" {len(live.latencies):,} live create_conversation calls meanwhile (p50 "
              f"{statistics.median(live.latencies):.2f} ms), {len(idle.latencies):,} before it (p50"
              f" {statistics.median(idle.latencies):.2f} ms); {total:,} conversations, every key gapless", flush=True)
        for name, load in (("idle", idle), ("backfilling", live)):
            q = statistics.quantiles(load.latencies, n=100)
            print(f"  {name}: p50 {q[49]:.2f} p90 {q[89]:.2f} p95 {q[94]:.2f} p99 {q[98]:.2f} ms", flush=True)
        return [report("live create_conversation p95 ms while backfilling 1M conversations vs idle",
                       live.p95(), idle.p95(), "<= 2", False)]


if __name__ == "__main__":
    main()
