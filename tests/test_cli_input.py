"""What a user hands the CLI: files to ingest (odd numbers, text PostgreSQL cannot hold, a
byte order mark, broken JSON), Ctrl-C in the middle, progress off a terminal, and
migration targets that do not fit the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from tests.test_migrations import MIGRATION_IDS, _one_line_error, sessiontag_cli

USER = str(uuid.uuid4())


def span(span_id: str, **fields) -> dict:
    return {"user_id": USER, "trace_id": "t1", "span_id": span_id, "span_name": "chat", **fields}


def ingest(dsn, tmp_path, text: str | bytes, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "spans.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return sessiontag_cli("--dsn", dsn, "ingest", str(path), *args)


def stored(dsn: str, sql: str = "SELECT count(*) FROM sessiontag.llm_traces"):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchone()[0]


def lines(*spans: dict | str) -> str:
    """JSON lines of the spans; a str is a line's text as it is (what json.dumps does not write)."""
    return "".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in spans)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_ingest_names_where_a_number_json_has_not_is(dsn, tmp_path, constant):
    bad = f'{{"user_id": "{USER}", "trace_id": "t1", "span_id": "c", "span_name": "chat", "cost_usd": {constant}}}'
    error = _one_line_error(ingest(dsn, tmp_path, lines(span("a"), span("b"), bad, span("d"))))
    assert error == f"error: line 3: cost_usd: {constant} is not a number JSON allows"
    array = f'[{json.dumps(span("a"))}, {{"user_id": "{USER}", "input_data": {{"v": [1, {constant}]}}}}]'
    error = _one_line_error(ingest(dsn, tmp_path, array))
    assert error == f"error: spans[1].input_data.v[1]: {constant} is not a number JSON allows"
    assert stored(dsn) == 0


def test_ingest_keeps_every_digit_of_a_number(dsn, tmp_path):
    exact = f'{{"user_id": "{USER}", "trace_id": "t1", "span_id": "a", "span_name": "chat",' \
            ' "input_data": {"huge": 1e400, "fine": 0.1000000000000000000000001}, "cost_usd": 1234567890.12345678}'
    result = ingest(dsn, tmp_path, exact + "\n")
    assert result.returncode == 0, result.stderr
    assert stored(dsn, "SELECT input_data->>'fine' FROM sessiontag.llm_traces") == "0.1000000000000000000000001"
    assert stored(dsn, "SELECT input_data->'huge' = '1e400'::jsonb FROM sessiontag.llm_traces")
    assert str(stored(dsn, "SELECT cost_usd FROM sessiontag.llm_traces")) == "1234567890.12345678"
    # 1e400 is a JSON number: a column that cannot hold it says so, naming line and field
    too_big = json.dumps(span("b")).replace('"chat"', '"chat", "cost_usd": 1e400')
    assert _one_line_error(ingest(dsn, tmp_path, lines(too_big))).startswith("error: line 1: cost_usd: ")


@pytest.mark.parametrize("text, expected", [
    (lines(span("a"), span("b", span_name="n\u0000x")),
     "error: line 2: span_name: holds U+0000, which PostgreSQL text cannot store"),
    (json.dumps([span("a", metadata={"k\u0000": 1})]),
     "error: spans[0].metadata: a key holds U+0000, which PostgreSQL text cannot store"),
    (json.dumps([span("a", input_data={"messages": [{"content": "\ud800"}]})]),
     "error: spans[0].input_data.messages[0].content: holds U+D800, which PostgreSQL text cannot store"),
])
def test_ingest_names_where_text_postgresql_cannot_hold_is(dsn, tmp_path, text, expected):
    assert "\\u" in text, "written as JSON escapes, as a file would have them"
    assert _one_line_error(ingest(dsn, tmp_path, text)) == expected
    assert stored(dsn) == 0


def test_ingest_reads_a_file_that_starts_with_a_byte_order_mark(dsn, tmp_path):
    result = ingest(dsn, tmp_path, b"\xef\xbb\xbf" + lines(span("a"), span("b")).encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stored 2 of 2 spans"
    piped = sessiontag_cli("--dsn", dsn, "ingest", "-", stdin="\ufeff" + json.dumps([span("c")]))
    assert piped.returncode == 0 and stored(dsn) == 3, piped.stderr


def test_ingest_says_where_a_pretty_printed_document_breaks(dsn, tmp_path):
    otlp = '{\n  "resourceSpans": [\n    {"scopeSpans": [],}\n  ]\n}\n'
    error = _one_line_error(ingest(dsn, tmp_path, otlp))
    assert error == "error: line 3: invalid JSON: Expecting property name enclosed in double quotes (column 23)"
    # a span written over several lines is one document, not JSON lines
    result = ingest(dsn, tmp_path, json.dumps(span("a"), indent=2))
    assert result.returncode == 0 and stored(dsn) == 1, result.stderr
    # JSON lines still say which line breaks
    error = _one_line_error(ingest(dsn, tmp_path, lines(span("b")) + '{"user_id": }\n'))
    assert error == "error: line 2: invalid JSON: Expecting value (column 13)"


def test_ingest_progress_off_a_terminal_is_a_line_per_batch(dsn, tmp_path):
    result = ingest(dsn, tmp_path, lines(*(span(f"s{i}") for i in range(5))), "--progress", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"ingesting: {n} of 5 spans sent" for n in (2, 4, 5)]
    assert result.stdout.strip() == "stored 5 of 5 spans"


def test_ctrl_c_during_ingest_is_one_line_and_stores_nothing(dsn, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(span(f"s{i}", trace_id=f"t{i // 10}")) + "\n" for i in range(300_000)))
    process = subprocess.Popen([sys.executable, "-m", "sessiontag.cli", "--dsn", dsn, "ingest", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:  # wait until it is storing batches
            deadline = time.monotonic() + 60
            while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND query LIKE '%sessiontag%spans%' AND pid <> pg_backend_pid()").fetchone()[0]:
                assert time.monotonic() < deadline and process.poll() is None, "ingest never started storing"
                time.sleep(0.02)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, err, out) == (130, "error: interrupted; nothing was stored\n", "")
    assert stored(dsn) == 0


def test_rollback_refuses_more_steps_than_are_applied(dsn):
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "rollback", "--steps", "99", "--yes"))
    assert error == (f"error: --steps 99 is more than the {len(MIGRATION_IDS)} applied migration(s); "
                     "--all rolls back every one")
    listed = json.loads(sessiontag_cli("--dsn", dsn, "migrations", "--format", "json").stdout)
    assert all(m["status"] == "applied" for m in listed)


def test_migrate_to_an_older_migration_says_the_database_is_past_it(dsn):
    result = sessiontag_cli("--dsn", dsn, "migrate", "--to", "0003_tagging")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"nothing to apply: the database is already past 0003_tagging (up to "
                                     f"{MIGRATION_IDS[-1]} is applied); 'sessiontag rollback --to 0003_tagging' "
                                     "goes back to it")
    newest = sessiontag_cli("--dsn", dsn, "migrate", "--to", MIGRATION_IDS[-1])
    assert newest.stdout.strip() == "nothing to apply: up to date"
