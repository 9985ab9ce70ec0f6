"""The backfill: conversations that predate tagging get their numbers in creation order,
continuing each (user, model)'s counter, one committed batch at a time; resumable after
a killed run; safe beside the application creating conversations on the same keys."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from tests.test_bulk import assert_gapless
from tests.test_migrations import _one_line_error, sessiontag_cli
from tests.test_tagging import register, sqlstate_of

T0 = datetime(2024, 3, 1, tzinfo=timezone.utc)


def untagged(conn, user, model, n: int, start: datetime = T0, same_time: bool = False) -> list[uuid.UUID]:
    """n conversations as they were before tagging: the model is untracked while they are made."""
    conn.execute("UPDATE sessiontag.llm_models SET tracked = false WHERE id = %s", [model])
    ids = [r[0] for r in conn.execute(
        "INSERT INTO sessiontag.conversations (user_id, llm_model_id, created_at)"
        " SELECT %s, %s, %s + CASE WHEN %s THEN interval '0' ELSE g * interval '1 minute' END"
        " FROM generate_series(1, %s) g RETURNING id", [user, model, start, same_time, n])]
    conn.execute("UPDATE sessiontag.llm_models SET tracked = true WHERE id = %s", [model])
    return ids


def backfill(conn, user=None, model=None, batch_size=10_000) -> int:
    return conn.execute("SELECT sessiontag.tag_untagged_conversations(%s, %s, %s)",
                        [user, model, batch_size]).fetchone()[0]


def numbered_in_order(conn, user, model) -> list[int]:
    """The numbers of a key's conversations, listed in creation order (created_at, id)."""
    return [r[0] for r in conn.execute(
        "SELECT session_counter FROM sessiontag.conversations WHERE user_id = %s AND llm_model_id = %s"
        " ORDER BY created_at, id", [user, model])]


def test_numbers_follow_creation_order_and_continue_each_counter(conn):
    gpt, claude, off = register(conn, "GPT-4o", "gpt"), register(conn, "Claude", "claude"), register(conn, "Off", "off")
    alice, bob = uuid.uuid4(), uuid.uuid4()
    untagged(conn, alice, gpt, 6, same_time=True)  # ties on created_at: id decides
    untagged(conn, alice, claude, 4)
    untagged(conn, bob, gpt, 3)
    untagged(conn, bob, off, 2)
    conn.execute("UPDATE sessiontag.llm_models SET tracked = false WHERE id = %s", [off])
    conn.execute("INSERT INTO sessiontag.conversations (user_id) VALUES (%s)", [bob])  # no model: stays untagged
    # live conversations were numbered after tracking began: the old ones continue after them
    for _ in range(2):
        conn.execute("SELECT sessiontag.create_conversation(%s, %s)", [alice, gpt])
    conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [bob, gpt])  # reserves bob's 1
    assert conn.execute("SELECT sessiontag.count_untagged_conversations()").fetchone()[0] == 13
    assert conn.execute("SELECT sessiontag.count_untagged_conversations(%s)", [alice]).fetchone()[0] == 10
    assert conn.execute("SELECT sessiontag.count_untagged_conversations(%s, %s)", [alice, claude]).fetchone()[0] == 4

    assert backfill(conn) == 13 and backfill(conn) == 0
    old_first = conn.execute("SELECT session_counter FROM sessiontag.conversations WHERE user_id = %s"
                             " AND llm_model_id = %s AND created_at = %s ORDER BY id", [alice, gpt, T0]).fetchall()
    assert [r[0] for r in old_first] == [3, 4, 5, 6, 7, 8], "in (created_at, id) order, after the live 1 and 2"
    assert numbered_in_order(conn, alice, claude) == [1, 2, 3, 4]
    assert numbered_in_order(conn, bob, gpt) == [2, 3, 4], "after the number generate_session_tag handed out"
    assert numbered_in_order(conn, bob, off) == [None, None], "an untracked model's conversations stay untagged"
    assert_gapless(conn, alice, gpt, 8)
    row = conn.execute("SELECT session_id, experiment_name FROM sessiontag.conversations WHERE user_id = %s"
                       " AND llm_model_id = %s AND session_counter = 4", [alice, claude]).fetchone()
    assert row == (f"chat_model_{claude.hex[:6]}_004", "Claude")


def test_batches_filters_and_traces_recorded_before(conn):
    gpt, claude = register(conn, "GPT-4o", "gpt"), register(conn, "Claude", "claude")
    users = [uuid.uuid4() for _ in range(3)]
    for user in users:
        untagged(conn, user, gpt, 9)
        untagged(conn, user, claude, 5)
    first = conn.execute("SELECT id FROM sessiontag.conversations WHERE user_id = %s AND llm_model_id = %s"
                         " ORDER BY created_at LIMIT 1", [users[0], gpt]).fetchone()[0]
    conn.execute("SELECT sessiontag.record_trace(%s, 't1', 's1', 'chat', conversation_id => %s)", [users[0], first])
    assert conn.execute("SELECT session_tag FROM sessiontag.llm_traces").fetchone()[0] is not None, \
        "a trace tags its conversation itself"
    assert backfill(conn, users[1], claude, 2) == 2
    assert conn.execute("SELECT sessiontag.count_untagged_conversations(%s, %s)", [users[1], claude]).fetchone()[0] == 3
    total = 2
    while (n := backfill(conn, batch_size=4)) > 0:
        assert n <= 4
        total += n
    assert total == 3 * 14 - 1
    for user in users:
        assert_gapless(conn, user, gpt, 9)
        assert_gapless(conn, user, claude, 5)
        assert numbered_in_order(conn, user, claude) == [1, 2, 3, 4, 5]


def test_traces_of_a_backfilled_conversation_get_its_tag(conn):
    model, user = register(conn), uuid.uuid4()
    conn.execute("UPDATE sessiontag.llm_models SET tracked = false WHERE id = %s", [model])
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    for span in ("a", "b"):
        conn.execute("SELECT sessiontag.record_trace(%s, 't', %s, 'chat', conversation_id => %s)", [user, span, conv])
    conn.execute("UPDATE sessiontag.llm_models SET tracked = true WHERE id = %s", [model])
    assert backfill(conn) == 1
    tag = conn.execute("SELECT session_id FROM sessiontag.conversations WHERE id = %s", [conv]).fetchone()[0]
    assert conn.execute("SELECT array_agg(DISTINCT session_tag) FROM sessiontag.llm_traces").fetchone()[0] == [tag]


def test_bad_arguments_and_privileges(conn):
    for size in (0, -1, 1_000_001, None):
        state, message = sqlstate_of(conn, "SELECT sessiontag.tag_untagged_conversations(batch_size => %s)", [size])
        assert state == "22023" and "batch_size" in message
    role = f"r{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} IN ROLE sessiontag_reader")
    conn.execute(f"SET ROLE {role}")
    state, _ = sqlstate_of(conn, "SELECT sessiontag.tag_untagged_conversations()")
    assert state == "42501", "a reader counts, but does not number"
    assert conn.execute("SELECT sessiontag.count_untagged_conversations()").fetchone()[0] == 0
    conn.execute("RESET ROLE")


@pytest.mark.slow
def test_backfill_beside_live_creators_of_the_same_keys(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        models = [register(conn, f"M{i}", f"m{i}") for i in range(2)]
        users = [uuid.uuid4() for _ in range(4)]
        for user in users:
            for model in models:
                untagged(conn, user, model, 150)
    stop, errors, live = threading.Event(), [], []

    def creator(seed: int) -> None:
        try:
            with psycopg.connect(dsn) as c:
                k = 0
                while not stop.is_set():
                    user, model = users[(seed + k) % 4], models[k % 2]
                    c.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
                    if k % 5 == 0:
                        c.rollback()
                    else:
                        c.commit()
                        live.append((user, model))
                    k += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    try:
        result = sessiontag_cli("--dsn", dsn, "backfill", "--batch-size", "37", "--progress")
    finally:
        stop.set()
        [t.join() for t in threads]
    assert errors == [] and result.returncode == 0, (errors, result.stderr)
    assert result.stdout.strip() == "tagged 1200 conversations"
    assert "tagging: 1200 of 1200 conversations" in result.stderr
    with psycopg.connect(dsn) as conn:
        for user in users:
            for model in models:
                assert_gapless(conn, user, model, 150 + live.count((user, model)))
                old = [n for n, created in conn.execute(
                    "SELECT session_counter, created_at FROM sessiontag.conversations WHERE user_id = %s"
                    " AND llm_model_id = %s AND created_at < %s ORDER BY created_at, id",
                    [user, model, T0 + timedelta(days=1)])]
                assert old == sorted(old), "the old conversations keep their creation order"


@contextmanager
def last_user_held(dsn: str, users: list):
    """Row locks on the conversations of the user the backfill reaches last (it goes by
    user_id), held until the block ends: a run then cannot finish before the test stops it,
    however fast it goes."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT id FROM sessiontag.conversations WHERE user_id = %s FOR UPDATE", [max(users)])
        yield
        conn.rollback()


def test_a_killed_backfill_leaves_a_consistent_state_and_a_second_run_finishes(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        model = register(conn)
        users = [uuid.uuid4() for _ in range(40)]
        for user in users:
            untagged(conn, user, model, 50)
    with last_user_held(dsn, users):  # so the run cannot end before it is killed
        process = subprocess.Popen([sys.executable, "-m", "sessiontag.cli", "--dsn", dsn, "backfill", "--batch-size",
                                    "20", "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:  # a line per batch: kill it after a few, mid-run
            if line.startswith("tagging: 100 of"):
                process.send_signal(signal.SIGKILL)
                break
        process.wait()
    with psycopg.connect(dsn) as conn:
        done = conn.execute("SELECT count(session_id) FROM sessiontag.conversations").fetchone()[0]
        assert 100 <= done < 2000
        for user in users:
            numbers = [n for n in numbered_in_order(conn, user, model) if n is not None]
            assert numbers == list(range(1, len(numbers) + 1)), "each key's oldest, gapless"
    result = sessiontag_cli("--dsn", dsn, "backfill")
    assert result.returncode == 0 and result.stdout.strip() == f"tagged {2000 - done} conversations"
    with psycopg.connect(dsn) as conn:
        for user in users:
            assert_gapless(conn, user, model, 50)
            assert numbered_in_order(conn, user, model) == list(range(1, 51))
    assert sessiontag_cli("--dsn", dsn, "backfill").stdout.strip() == "tagged 0 conversations: none was left untagged"


def test_ctrl_c_keeps_the_batches_done(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        model = register(conn)
        users = [uuid.uuid4() for _ in range(30)]
        for user in users:
            untagged(conn, user, model, 40)
    with last_user_held(dsn, users):  # so the run cannot end before Ctrl-C
        # SIGINT as at a terminal, even where this test runs with it ignored (a background job)
        process = subprocess.Popen([sys.executable, "-m", "sessiontag.cli", "--dsn", dsn, "backfill", "--batch-size",
                                    "10", "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in process.stderr:
            if line.startswith("tagging: 50 of"):
                process.send_signal(signal.SIGINT)
                break
        rest = process.stderr.read()
        assert process.wait() == 130
    error = rest.strip().splitlines()[-1]
    assert error.startswith("error: interrupted: ") and "run the same command again" in error
    with psycopg.connect(dsn) as conn:
        done = conn.execute("SELECT count(session_id) FROM sessiontag.conversations").fetchone()[0]
    assert f"{done} conversations were tagged" in error


def test_cli_filters_and_a_database_without_the_migration(dsn, empty_dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        gpt, claude = register(conn, "GPT-4o", "gpt-4o"), register(conn, "Claude", "claude")
        alice, bob = uuid.uuid4(), uuid.uuid4()
        for user in (alice, bob):
            untagged(conn, user, gpt, 3)
            untagged(conn, user, claude, 2)
    result = sessiontag_cli("--dsn", dsn, "backfill", "--user", str(alice), "--model", "Claude")
    assert (result.returncode, result.stdout.strip()) == (0, "tagged 2 conversations")
    assert sessiontag_cli("--dsn", dsn, "backfill", "--model", "gpt-4o").stdout.strip() == "tagged 6 conversations"
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "backfill", "--model", "nope"))
    assert "no model with name, key or id 'nope'" in error
    assert sessiontag_cli("--dsn", dsn, "backfill").stdout.strip() == "tagged 2 conversations"

    subprocess.run([sys.executable, "-m", "sessiontag.cli", "--dsn", empty_dsn, "migrate", "--to", "0009_input_checks"],
                   check=True, capture_output=True)
    error = _one_line_error(sessiontag_cli("--dsn", empty_dsn, "backfill"))
    assert "needs migration 0010_bulk_numbering" in error and "sessiontag migrate" in error
