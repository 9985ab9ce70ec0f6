"""Numbering many conversations in one statement or transaction: the same guarantees as
one at a time (gapless, unique, rolled-back transactions and savepoints give their
numbers back, ON CONFLICT-skipped rows take none), at a cost per conversation that does
not grow with how many the transaction already numbered."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from tests.numbers import last_number
from tests.test_tagging import register, sqlstate_of


def numbers(conn, user, model) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT session_counter FROM sessiontag.conversations WHERE user_id = %s AND llm_model_id = %s"
        " AND session_counter IS NOT NULL ORDER BY 1", [user, model])]


def assert_gapless(conn, user, model, count: int) -> None:
    assert numbers(conn, user, model) == list(range(1, count + 1))
    tags = conn.execute("SELECT count(DISTINCT session_id), min(session_id), max(session_id)"
                        " FROM sessiontag.conversations WHERE user_id = %s AND llm_model_id = %s",
                        [user, model]).fetchone()
    assert tags[0] == count
    assert last_number(conn, user, model) == count


def counter_writes(conn) -> int:
    """Rows this transaction has inserted or updated in session_counters so far."""
    return conn.execute("SELECT pg_stat_get_xact_tuples_inserted('sessiontag.session_counters'::regclass)"
                        " + pg_stat_get_xact_tuples_updated('sessiontag.session_counters'::regclass)").fetchone()[0]


BULK = ("INSERT INTO sessiontag.conversations (user_id, llm_model_id, title)"
        " SELECT %s, %s, 'bulk ' || g FROM generate_series(1, %s) g")


def test_insert_select_with_savepoints_rolled_back_is_gapless_and_writes_the_counter_once(dsn):
    with psycopg.connect(dsn) as conn:
        model, user = register(conn), uuid.uuid4()
        conn.commit()
        conn.execute(BULK, [user, model, 300])
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():  # a savepoint: its 200 numbers come back when it fails
                conn.execute(BULK, [user, model, 200])
                conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, 'x'), (%s, 'x')",
                             [user, user])
        with conn.transaction():  # a savepoint released: its numbers stay
            conn.execute(BULK, [user, model, 100])
            conn.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
        conn.execute("SAVEPOINT s")
        conn.execute(BULK, [user, model, 50])
        conn.execute("ROLLBACK TO SAVEPOINT s")
        assert counter_writes(conn) <= 3, "the counter row is written once per transaction, not once per number"
        conn.commit()
        assert_gapless(conn, user, model, 401)
        tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
        assert tag == f"chat_model_{model.hex[:6]}_402"


def test_a_rolled_back_bulk_insert_gives_every_number_back(dsn):
    with psycopg.connect(dsn) as conn:
        model, user = register(conn), uuid.uuid4()
        conn.execute(BULK, [user, model, 5])
        conn.commit()
        conn.execute(BULK, [user, model, 1000])
        conn.rollback()
        conn.execute(BULK, [user, model, 3])
        conn.commit()
        assert_gapless(conn, user, model, 8)


def test_many_keys_in_one_statement_each_count_from_one(conn):
    models = [register(conn, f"M{i}", f"m{i}") for i in range(3)]
    users = [uuid.uuid4() for _ in range(4)]
    conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id)"
                 " SELECT u, m FROM unnest(%s::uuid[]) u, unnest(%s::uuid[]) m, generate_series(1, 25)",
                 [users, models])
    for user in users:
        for model in models:
            assert_gapless(conn, user, model, 25)


def test_rows_on_conflict_skips_in_a_bulk_insert_take_no_number(conn):
    model, user = register(conn), uuid.uuid4()
    ids = [uuid.uuid4() for _ in range(10)]
    conn.execute("INSERT INTO sessiontag.conversations (id, user_id, llm_model_id) SELECT i, %s, %s FROM unnest(%s::uuid[]) i",
                 [user, model, ids[:5]])
    # half of these ids exist: those rows are skipped, the others numbered 6..10 without a gap
    conn.execute("INSERT INTO sessiontag.conversations (id, user_id, llm_model_id) SELECT i, %s, %s FROM unnest(%s::uuid[]) i"
                 " ON CONFLICT DO NOTHING", [user, model, ids])
    conn.execute("INSERT INTO sessiontag.conversations (id, user_id, llm_model_id, external_id)"
                 " SELECT gen_random_uuid(), %s, %s, 'app-' || (g %% 3) FROM generate_series(1, 9) g"
                 " ON CONFLICT DO NOTHING", [user, model])
    conn.execute("INSERT INTO sessiontag.conversations (id, user_id, llm_model_id, external_id)"
                 " SELECT gen_random_uuid(), %s, %s, 'app-' || g FROM generate_series(1, 4) g"
                 " ON CONFLICT (user_id, external_id) DO UPDATE SET title = 'seen again'", [user, model])
    assert_gapless(conn, user, model, 15)


def test_many_ensure_session_tag_and_generated_tags_in_one_transaction(dsn):
    with psycopg.connect(dsn) as conn:
        model, user = register(conn), uuid.uuid4()
        conn.commit()
        conversations = [r[0] for r in conn.execute(
            "INSERT INTO sessiontag.conversations (user_id) SELECT %s FROM generate_series(1, 400) RETURNING id",
            [user])]
        conn.commit()
        for i, conversation in enumerate(conversations[:300]):
            conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conversation, model])
        conn.execute("SAVEPOINT s")
        for conversation in conversations[300:350]:
            conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conversation, model])
        conn.execute("ROLLBACK TO SAVEPOINT s")
        assert counter_writes(conn) <= 2
        # generated tags reserve their numbers, and a conversation may carry them later
        tags = [r[0] for r in conn.execute("SELECT session_id FROM sessiontag.generate_session_tags(%s, %s, 5)",
                                           [user, model])]
        assert tags[0].endswith("_301") and tags[-1].endswith("_305")
        conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conversations[399], model])
        conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id) SELECT %s, t FROM unnest(%s::text[]) t",
                     [user, tags])
        conn.commit()
        assert_gapless(conn, user, model, 306)
        untagged = conn.execute("SELECT count(*) FROM sessiontag.conversations WHERE user_id = %s AND session_id IS NULL",
                                [user]).fetchone()[0]
        assert untagged == 99


def test_a_bulk_insert_beside_16_concurrent_creators_of_the_same_key(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, user = register(conn), uuid.uuid4()
    barrier = threading.Barrier(17)
    committed, errors, lock = [0], [], threading.Lock()

    def creator(i: int) -> None:
        try:
            with psycopg.connect(dsn) as c:
                barrier.wait()
                for k in range(25):
                    c.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
                    if (i + k) % 4 == 0:
                        c.rollback()
                    else:
                        c.commit()
                        with lock:
                            committed[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def bulk() -> None:
        try:
            with psycopg.connect(dsn) as c:
                barrier.wait()
                for _ in range(3):
                    c.execute(BULK, [user, model, 1500])
                    c.commit()
                    with lock:
                        committed[0] += 1500
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(16)] + [threading.Thread(target=bulk)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    with psycopg.connect(dsn) as conn:
        assert_gapless(conn, user, model, committed[0])


def test_a_deleted_conversation_keeps_its_number(conn):
    model, user = register(conn), uuid.uuid4()
    conn.execute(BULK, [user, model, 5])
    conn.execute("DELETE FROM sessiontag.conversations WHERE user_id = %s AND session_counter IN (3, 5)", [user])
    assert conn.execute("SELECT session_counter FROM sessiontag.create_conversation(%s, %s)",
                        [user, model]).fetchone()[0] == 6
    conn.execute("DELETE FROM sessiontag.conversations WHERE user_id = %s", [user])
    assert conn.execute("SELECT session_counter FROM sessiontag.create_conversation(%s, %s)",
                        [user, model]).fetchone()[0] == 7
    # a tag handed out once is never issued again, even when its conversation is gone
    tag = conn.execute("SELECT session_id FROM sessiontag.conversations WHERE user_id = %s", [user]).fetchone()[0]
    conn.execute("DELETE FROM sessiontag.conversations WHERE user_id = %s", [user])
    state, _ = sqlstate_of(conn, "INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, %s)",
                           [user, "chat_model_" + model.hex[:6] + "_008"])
    assert state == "22023", "_008 was never handed out"
    assert tag.endswith("_007")


def test_a_numbered_conversation_keeps_its_user_and_model(conn):
    model, other, user = register(conn), register(conn, "Claude", "claude"), uuid.uuid4()
    numbered = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    for column, value in (("llm_model_id", other), ("llm_model_id", None), ("user_id", uuid.uuid4())):
        state, message = sqlstate_of(conn, f"UPDATE sessiontag.conversations SET {column} = %s WHERE id = %s",
                                     [value, numbered])
        assert state == "22023" and "never change" in message, (column, message)
    manual = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, session_id => 'run-1')",
                          [user]).fetchone()[0]
    conn.execute("UPDATE sessiontag.conversations SET llm_model_id = %s WHERE id = %s", [other, manual])


def test_repeatable_read_creators_of_one_key_get_a_serialization_failure_not_a_duplicate(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, user = register(conn), uuid.uuid4()
        conn.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        for c in (first, second):
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            c.execute("SELECT 1 FROM sessiontag.conversations LIMIT 1")  # the snapshot is taken here
        first.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
        first.commit()
        state, _ = sqlstate_of(second, "SELECT sessiontag.create_conversation(%s, %s)", [user, model])
        assert state == "40001"
        second.rollback()
        assert_gapless(second, user, model, 2)


def test_badge_of_a_tag_handed_out_but_not_on_a_conversation(conn):
    model, user = register(conn, "Llama 3 70B", "llama3"), uuid.uuid4()
    tags = [r[0] for r in conn.execute("SELECT session_id FROM sessiontag.generate_session_tags(%s, %s, 15)",
                                       [user, model])]
    badge = "SELECT sessiontag.session_badge(%s, %s)"
    assert conn.execute(badge, [tags[14], None]).fetchone()[0] == "[Llama 3 70B #015]"
    assert conn.execute(badge, [tags[14], user]).fetchone()[0] == "[Llama 3 70B #015]"
    assert conn.execute(badge, [tags[14], uuid.uuid4()]).fetchone()[0] is None, "not handed out to that user"
    short = model.hex[:6]
    for unknown in (f"chat_model_{short}_16", f"chat_model_{short}_0015", "chat_model_000000_001", "chat_model_"):
        assert conn.execute(badge, [unknown, None]).fetchone()[0] is None, unknown
    assert conn.execute(badge, [f"chat_model_{short}_016", user]).fetchone()[0] is None, "not handed out yet"
