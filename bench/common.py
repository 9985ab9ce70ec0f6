"""Shared pieces of the benchmarks: a throwaway migrated database, timing, reporting.

Every benchmark reports a ratio against a baseline measured in the same run on the same
server, never an absolute time threshold.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg

from sessiontag import migrate
from tests.pgcluster import Postgresql


@contextmanager
def migrated_database():
    """A fresh server with one migrated database; yields its DSN."""
    server = Postgresql()
    try:
        with psycopg.connect(server.libpq_dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        dsn = server.libpq_dsn("bench")
        migrate.apply(dsn)
        yield dsn
    finally:
        server.stop()


def best_of(runs: int, fn) -> float:
    """The fastest of several timed runs of fn(), in seconds (least disturbed by noise)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, ours: float, baseline: float, goal: str, higher_is_better: bool) -> dict:
    """Print one line: the two figures, their ratio and the goal."""
    ratio = ours / baseline if baseline else float("nan")

    def fmt(v: float) -> str:
        return f"{v:,.1f}" if v >= 10 else f"{v:.3f}"

    print(f"{name}: ours {fmt(ours)}, baseline {fmt(baseline)}, ratio {ratio:.2f} (goal: {goal})", flush=True)
    return {"name": name, "ours": ours, "baseline": baseline, "ratio": ratio,
            "higher_is_better": higher_is_better}
