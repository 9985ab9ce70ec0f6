"""Session tagging engine: models, gapless per-user-per-model counters, auto-tagging."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict

import psycopg
import pytest

from sessiontag import Client, DatabaseError
from tests.numbers import last_numbers, numbers_total


def register(conn, name="GPT-4o", key=None, owner=None, id=None) -> uuid.UUID:
    return conn.execute(
        "SELECT sessiontag.register_model(name => %s, model_key => %s, owner_id => %s, id => %s)",
        [name, key, owner, id]).fetchone()[0]


def sqlstate_of(conn, query, params=()) -> tuple[str, str]:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params)
    return info.value.sqlstate, info.value.diag.message_primary


def counts(conn) -> tuple[int, int]:
    return (conn.execute("SELECT count(*) FROM sessiontag.conversations").fetchone()[0],
            numbers_total(conn))


# -- models ---------------------------------------------------------------------------
def test_register_model_is_idempotent_and_short_id_is_the_uuid_prefix(conn):
    first = register(conn, "GPT-4o", "gpt-4o")
    assert register(conn, "GPT-4o renamed", "gpt-4o") == first
    short_id = conn.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s", [first]).fetchone()[0]
    assert short_id == first.hex[:6]
    owner = uuid.uuid4()
    own = register(conn, "GPT-4o", "gpt-4o", owner=owner)
    assert own != first
    assert conn.execute("SELECT sessiontag.model_id('gpt-4o', %s)", [owner]).fetchone()[0] == own
    assert conn.execute("SELECT sessiontag.model_id('gpt-4o', %s)", [uuid.uuid4()]).fetchone()[0] == first
    assert conn.execute("SELECT sessiontag.model_id('gpt-4o')").fetchone()[0] == first
    assert conn.execute("SELECT sessiontag.model_id('nope')").fetchone()[0] is None


def test_prefix_collision_lengthens_the_short_id_and_tags_stay_distinct(conn):
    a = uuid.UUID("3f9a1c00-0000-4000-8000-000000000001")
    b = uuid.UUID("3f9a1c00-0000-4000-8000-000000000002")
    c = uuid.UUID("3f9a1c40-0000-4000-8000-000000000003")
    d = uuid.UUID("3f9a1c40-0000-4000-8000-000000000004")
    for i, model in enumerate((a, b, c, d)):
        register(conn, f"M{i}", f"m{i}", id=model)
    short = dict(conn.execute("SELECT id, short_id FROM sessiontag.llm_models").fetchall())
    assert short == {a: "3f9a1c", b: "3f9a1c0", c: "3f9a1c4", d: "3f9a1c40"}
    user = uuid.uuid4()
    tags = {conn.execute("SELECT (sessiontag.generate_session_tag(%s, %s)).session_id", [user, m]).fetchone()[0]
            for m in (a, b, c, d)}
    assert tags == {"chat_model_3f9a1c_001", "chat_model_3f9a1c0_001", "chat_model_3f9a1c4_001",
                    "chat_model_3f9a1c40_001"}


def test_short_id_never_changes_and_cannot_be_given(conn):
    model = register(conn)
    state, message = sqlstate_of(conn, "UPDATE sessiontag.llm_models SET short_id = 'abcdef' WHERE id = %s", [model])
    assert state == "22023" and "never change" in message
    state, message = sqlstate_of(
        conn, "INSERT INTO sessiontag.llm_models (name, model_key, short_id) VALUES ('x', 'x', 'abcdef')")
    assert state == "22023" and "short_id" in message
    # renaming or untracking is fine
    conn.execute("UPDATE sessiontag.llm_models SET name = 'GPT-4o (2024-08)' WHERE id = %s", [model])


def test_concurrent_registrations_sharing_a_prefix_get_distinct_short_ids(dsn):
    ids = [uuid.UUID(f"abcdef{i:02x}-0000-4000-8000-{i:012x}") for i in range(16)]
    barrier = threading.Barrier(len(ids))
    errors = []

    def worker(model_id):
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                barrier.wait()
                register(c, f"model {model_id}", str(model_id), id=model_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(m,)) for m in ids]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    with psycopg.connect(dsn) as c:
        shorts = [r[0] for r in c.execute("SELECT short_id FROM sessiontag.llm_models")]
    assert len(shorts) == 16 == len(set(shorts))
    assert "abcdef" in shorts and all(s.startswith("abcdef") for s in shorts)


def test_model_errors_name_the_argument(conn):
    assert sqlstate_of(conn, "SELECT sessiontag.register_model(name => '')") == ("22023", "name must not be empty")
    assert sqlstate_of(conn, "SELECT sessiontag.register_model(name => NULL)") == ("22004", "name must not be NULL")
    assert sqlstate_of(conn, "SELECT sessiontag.register_model(name => 'ok', provider => '')") == (
        "22023", "provider must not be empty (NULL when unknown)")
    assert sqlstate_of(conn, "SELECT sessiontag.set_model_tracking(NULL, true)") == (
        "22004", "model_id must not be NULL")
    state, message = sqlstate_of(conn, "SELECT sessiontag.register_model(name => repeat('x', 201))")
    assert state == "22001" and message.startswith("name ")
    state, message = sqlstate_of(conn, "SELECT sessiontag.set_model_tracking(%s, false)", [uuid.uuid4()])
    assert state == "P0002" and "model_id" in message
    model = register(conn)
    other = uuid.UUID(int=model.int ^ 1)
    state, message = sqlstate_of(conn, "SELECT sessiontag.register_model('Other', model_key => 'other', id => %s)",
                                 [model])
    assert state == "23505" and str(model) in message
    assert conn.execute("SELECT count(*) FROM sessiontag.llm_models").fetchone()[0] == 1
    assert other != model


# -- generation ----------------------------------------------------------------------
def test_generate_session_tag_returns_null_and_takes_no_number_when_it_cannot_tag(conn):
    model = register(conn)
    user = uuid.uuid4()
    for args in ([None, model], [user, None], [None, None], [user, uuid.uuid4()]):
        assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s) IS NULL", args).fetchone()[0]
    conn.execute("SELECT sessiontag.set_model_tracking(%s, false)", [model])
    assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s) IS NULL", [user, model]).fetchone()[0]
    assert counts(conn) == (0, 0)
    conn.execute("SELECT sessiontag.set_model_tracking(%s, true)", [model])
    tag = conn.execute("SELECT * FROM sessiontag.generate_session_tag(%s, %s)", [user, model]).fetchone()
    assert tag == (f"chat_model_{model.hex[:6]}_001", "GPT-4o", 1, model, "GPT-4o")


def test_batch_of_tags_is_consecutive_and_numbering_continues(conn):
    model, user = register(conn), uuid.uuid4()
    rows = conn.execute("SELECT session_id, counter FROM sessiontag.generate_session_tags(%s, %s, 5)",
                        [user, model]).fetchall()
    assert [r[1] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4][0] == f"chat_model_{model.hex[:6]}_005"
    assert conn.execute("SELECT (sessiontag.generate_session_tag(%s, %s)).counter", [user, model]).fetchone()[0] == 6
    assert conn.execute("SELECT count(*) FROM sessiontag.generate_session_tags(%s, %s, 0)", [user, model]).fetchone()[0] == 0
    for bad in (-1, None, 100001):
        state, message = sqlstate_of(conn, "SELECT * FROM sessiontag.generate_session_tags(%s, %s, %s)",
                                     [user, model, bad])
        assert state == "22023" and message.startswith("n must be")


def test_counter_keeps_growing_past_999_and_badge_follows(conn):
    model, user = register(conn), uuid.uuid4()
    conn.execute("SELECT sessiontag.generate_session_tags(%s, %s, 998)", [user, model])
    c999 = conn.execute("SELECT * FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()
    c1000 = conn.execute("SELECT * FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()
    short = model.hex[:6]
    assert (c999[5], c999[9]) == (f"chat_model_{short}_999", 999)
    assert (c1000[5], c1000[9]) == (f"chat_model_{short}_1000", 1000)
    assert conn.execute("SELECT sessiontag.session_badge(%s)", [c1000[5]]).fetchone()[0] == "[GPT-4o #1000]"
    assert conn.execute("SELECT sessiontag.session_badge(%s)", [c999[5]]).fetchone()[0] == "[GPT-4o #999]"


def test_badge(conn):
    model, user = register(conn), uuid.uuid4()
    conn.execute("SELECT sessiontag.generate_session_tags(%s, %s, 6)", [user, model])
    tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    assert tag.endswith("_007")
    assert conn.execute("SELECT sessiontag.session_badge(%s)", [tag]).fetchone()[0] == "[GPT-4o #007]"
    assert conn.execute("SELECT sessiontag.session_badge(%s, %s)", [tag, user]).fetchone()[0] == "[GPT-4o #007]"
    assert conn.execute("SELECT sessiontag.session_badge(%s, %s)", [tag, uuid.uuid4()]).fetchone()[0] is None
    assert conn.execute("SELECT sessiontag.session_badge('chat_model_000000_001')").fetchone()[0] is None
    # the badge shows the model's name when the tag was made
    conn.execute("UPDATE sessiontag.llm_models SET name = 'GPT-4o (new)' WHERE id = %s", [model])
    assert conn.execute("SELECT sessiontag.session_badge(%s)", [tag]).fetchone()[0] == "[GPT-4o #007]"
    manual = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, session_id => 'qa-run-1')",
                          [user]).fetchone()[0]
    assert conn.execute("SELECT sessiontag.session_badge(%s)", [manual]).fetchone()[0] == "[qa-run-1]"


# -- conversations -------------------------------------------------------------------
def test_create_conversation_and_plain_insert_tag_alike(conn):
    model, user = register(conn), uuid.uuid4()
    first = conn.execute("SELECT session_id, experiment_name, session_counter FROM sessiontag.create_conversation(%s, %s)",
                         [user, model]).fetchone()
    conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id, title) VALUES (%s, %s, 'plain')",
                 [user, model])
    second = conn.execute("SELECT session_id, experiment_name, session_counter FROM sessiontag.conversations"
                          " WHERE title = 'plain'").fetchone()
    short = model.hex[:6]
    assert first == (f"chat_model_{short}_001", "GPT-4o", 1)
    assert second == (f"chat_model_{short}_002", "GPT-4o", 2)
    untagged = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    assert untagged is None


def test_rolled_back_transaction_gives_its_number_back(dsn):
    with psycopg.connect(dsn) as conn:
        model, user = register(conn), uuid.uuid4()
        conn.commit()
        conn.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
        conn.rollback()
        tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
        conn.commit()
    assert tag.endswith("_001")


def test_manual_tags_are_kept_unique_and_cannot_forge_automatic_ones(conn):
    model, user = register(conn), uuid.uuid4()
    row = conn.execute("SELECT session_id, session_counter FROM sessiontag.create_conversation(%s, %s, session_id => 'my-run')",
                       [user, model]).fetchone()
    assert row == ("my-run", None)
    assert counts(conn) == (1, 0), "a manual tag takes no number"
    state, message = sqlstate_of(conn, "SELECT sessiontag.create_conversation(%s, session_id => 'my-run')", [user])
    assert state == "23505" and "my-run" in message
    conn.execute("SELECT sessiontag.create_conversation(%s, session_id => 'my-run')", [uuid.uuid4()])  # other user: fine
    forged = f"chat_model_{model.hex[:6]}_001"
    state, message = sqlstate_of(conn, "SELECT sessiontag.create_conversation(%s, %s, session_id => %s)",
                                 [user, model, forged])
    assert state == "22023" and forged in message
    assert counts(conn) == (2, 0)
    # a tag issued by generate_session_tag in the same transaction is accepted and numbered
    with conn.transaction():
        issued = conn.execute("SELECT (sessiontag.generate_session_tag(%s, %s)).session_id", [user, model]).fetchone()[0]
        conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, %s)", [user, issued])
    row = conn.execute("SELECT llm_model_id, session_counter, experiment_name FROM sessiontag.conversations"
                       " WHERE session_id = %s", [issued]).fetchone()
    assert row == (model, 1, "GPT-4o")
    state, _ = sqlstate_of(conn, "INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, %s)",
                           [user, issued])
    assert state == "23505"


def test_a_tag_never_changes_and_counters_cannot_be_written(conn):
    model, user = register(conn), uuid.uuid4()
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    state, message = sqlstate_of(conn, "UPDATE sessiontag.conversations SET session_id = 'other' WHERE id = %s", [conv])
    assert state == "22023" and "never changes" in message
    state, _ = sqlstate_of(conn, "UPDATE sessiontag.conversations SET session_counter = 5 WHERE id = %s", [conv])
    assert state == "22023"
    state, message = sqlstate_of(conn, "INSERT INTO sessiontag.conversations (user_id, session_counter) VALUES (%s, 3)",
                                 [user])
    assert state == "22023" and "session_counter" in message
    # other columns stay editable
    conn.execute("UPDATE sessiontag.conversations SET title = 'renamed' WHERE id = %s", [conv])


def test_conversation_errors_name_the_argument_and_store_nothing(conn):
    model, user = register(conn), uuid.uuid4()
    cases = [
        ("SELECT sessiontag.create_conversation(NULL)", [], "22004", "user_id"),
        ("SELECT sessiontag.create_conversation(%s, %s)", [user, uuid.uuid4()], "23503", "model_id"),
        ("SELECT sessiontag.create_conversation(%s, title => repeat('x', 1001))", [user], "22001", "title"),
        ("SELECT sessiontag.create_conversation(%s, external_id => '')", [user], "22023", "external_id"),
        ("SELECT sessiontag.create_conversation(%s, analytics_enabled => NULL)", [user], "22004", "analytics_enabled"),
        ("SELECT sessiontag.ensure_session_tag(%s)", [uuid.uuid4()], "P0002", "conversation_id"),
        ("SELECT sessiontag.ensure_session_tag(NULL)", [], "22004", "conversation_id"),
        ("SELECT sessiontag.set_analytics_tracking(%s, false)", [uuid.uuid4()], "P0002", "conversation_id"),
        ("SELECT sessiontag.create_conversation('not-a-uuid')", [], "22P02", "uuid"),
    ]
    for query, params, state, word in cases:
        got_state, message = sqlstate_of(conn, query, params)
        assert (got_state, word in message) == (state, True), (query, got_state, message)
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, external_id => 'app-1')", [user]).fetchone()[0]
    state, message = sqlstate_of(conn, "SELECT sessiontag.create_conversation(%s, external_id => 'app-1')", [user])
    assert state == "23505" and "external_id" in message
    state, message = sqlstate_of(conn, "SELECT sessiontag.create_conversation(%s, id => %s)", [user, conv])
    assert state == "23505" and str(conv) in message
    state, message = sqlstate_of(conn, "SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, uuid.uuid4()])
    assert state == "P0002" and "model_id" in message
    assert counts(conn) == (1, 0)
    assert model is not None


def test_a_row_insert_on_conflict_never_stores_takes_no_number(conn):
    model, user = register(conn), uuid.uuid4()
    first = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    conn.execute("UPDATE sessiontag.conversations SET external_id = 'app-1' WHERE id = %s", [first])
    insert = "INSERT INTO sessiontag.conversations (user_id, id, external_id, llm_model_id) VALUES (%s, %s, %s, %s)"
    conn.execute(insert + " ON CONFLICT DO NOTHING", [user, first, None, model])
    conn.execute(insert + " ON CONFLICT (user_id, id) DO UPDATE SET title = 'again'", [user, first, None, model])
    conn.execute(insert + " ON CONFLICT DO NOTHING", [user, uuid.uuid4(), "app-1", model])
    conn.execute(insert + " ON CONFLICT (user_id, external_id) DO UPDATE SET title = 'again'",
                 [user, uuid.uuid4(), "app-1", model])
    state, _ = sqlstate_of(conn, insert, [user, first, None, model])
    assert state == "23505"
    assert counts(conn) == (1, 1)
    tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    assert tag == f"chat_model_{model.hex[:6]}_002"


def test_concurrent_creators_of_one_conversation_take_one_number(dsn):
    """16 connections insert the same new conversation at once (by id, then by external
    id), ON CONFLICT DO NOTHING: one row, one number, and the next conversation is _002/_003."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, user = register(conn), uuid.uuid4()
    for column, value in [("id", uuid.uuid4()), ("external_id", "app-conversation-7")]:
        barrier = threading.Barrier(16)
        errors = []

        def worker():
            try:
                with psycopg.connect(dsn) as c:
                    barrier.wait()
                    c.execute(f"INSERT INTO sessiontag.conversations (user_id, {column}, llm_model_id)"
                              " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", [user, value, model])
                    time.sleep(0.05)  # hold the counter a moment, so the others queue behind it
                    c.commit()
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
    with psycopg.connect(dsn) as c:
        assert counts(c) == (2, 2)
        assert sorted(r[0] for r in c.execute("SELECT session_counter FROM sessiontag.conversations")) == [1, 2]
        tag = c.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [user, model]).fetchone()[0]
    assert tag == f"chat_model_{model.hex[:6]}_003"


def test_a_tag_taken_then_inserted_does_not_deadlock_with_a_concurrent_creator(dsn):
    """One transaction takes a tag with generate_session_tag and then inserts its
    conversation; meanwhile another creates a conversation of the same user and model. The
    second waits for the counter and takes the next number; nothing deadlocks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, user = register(conn), uuid.uuid4()
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        tag = first.execute("SELECT session_id FROM sessiontag.generate_session_tag(%s, %s)",
                            [user, model]).fetchone()[0]
        result = {}

        def create():
            try:
                result["tag"] = second.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)",
                                               [user, model]).fetchone()[0]
                second.commit()
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=create)
        thread.start()
        time.sleep(0.3)  # the creator is waiting for the first transaction by now
        first.execute("INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, %s)", [user, tag])
        first.commit()
        thread.join()
    assert "error" not in result, result.get("error")
    assert (tag, result["tag"]) == (f"chat_model_{model.hex[:6]}_001", f"chat_model_{model.hex[:6]}_002")


def test_another_users_private_model_is_unknown_to_a_conversation_whoever_calls(conn):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    private = register(conn, "Alice's fine-tune", "ft-alice", owner=alice)
    assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [bob, private]).fetchone()[0] is None
    assert list(conn.execute("SELECT * FROM sessiontag.generate_session_tags(%s, %s, 3)", [bob, private])) == []
    state, message = sqlstate_of(conn, "SELECT sessiontag.create_conversation(%s, %s)", [bob, private])
    assert state == "23503" and message.startswith("model_id "), message
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [bob]).fetchone()[0]
    state, message = sqlstate_of(conn, "SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, private])
    assert state == "P0002" and "model_id" in message
    state, message = sqlstate_of(conn, "SELECT sessiontag.record_trace(%s, 't1', 's1', 'chat', model_id => %s)",
                                 [bob, private])
    assert state == "P0002" and "model_id" in message
    state, message = sqlstate_of(conn, "SELECT sessiontag.ingest_traces(%s::jsonb)", [
        f'[{{"user_id": "{bob}", "trace_id": "t2", "span_id": "s1", "span_name": "chat", "model_id": "{private}"}}]'])
    assert state == "P0002" and message.startswith("spans[0].model_id")
    assert counts(conn) == (1, 0)
    assert conn.execute("SELECT count(*) FROM sessiontag.llm_traces").fetchone()[0] == 0
    # Its owner uses it as any model.
    tag = conn.execute("SELECT session_id FROM sessiontag.create_conversation(%s, %s)", [alice, private]).fetchone()[0]
    assert tag == f"chat_model_{private.hex[:6]}_001"


def test_ensure_session_tag_tags_once_and_returns_the_existing_tag(conn):
    model, user = register(conn), uuid.uuid4()
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    assert conn.execute("SELECT sessiontag.ensure_session_tag(%s)", [conv]).fetchone()[0] is None, "no model known"
    tag = conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, model]).fetchone()[0]
    assert tag == f"chat_model_{model.hex[:6]}_001"
    other = register(conn, "Claude", "claude")
    assert conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, other]).fetchone()[0] == tag
    assert conn.execute("SELECT llm_model_id, session_counter FROM sessiontag.conversations WHERE id = %s",
                        [conv]).fetchone() == (model, 1)
    # with the conversation's own model
    conv2 = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    conn.execute("UPDATE sessiontag.conversations SET llm_model_id = %s WHERE id = %s", [model, conv2])
    assert conn.execute("SELECT sessiontag.ensure_session_tag(%s)", [conv2]).fetchone()[0].endswith("_002")


def test_analytics_tracking_toggle(conn):
    user = uuid.uuid4()
    conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    assert conn.execute("SELECT sessiontag.set_analytics_tracking(%s, false)", [conv]).fetchone()[0] is False
    assert conn.execute("SELECT analytics_enabled FROM sessiontag.conversations WHERE id = %s", [conv]).fetchone()[0] is False
    assert conn.execute("SELECT sessiontag.set_analytics_tracking(%s, true, %s)", [conv, user]).fetchone()[0] is True
    state, _ = sqlstate_of(conn, "SELECT sessiontag.set_analytics_tracking(%s, NULL)", [conv])
    assert state == "22004"


# -- concurrency ---------------------------------------------------------------------
def _hammer(dsn, workers: int, per_worker: int, keys: list[tuple[uuid.UUID, uuid.UUID]], rollback_share: float):
    """Each worker creates conversations on random keys, rolling back a share of them."""
    committed: dict = defaultdict(int)
    errors: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(workers)

    def worker(seed: int):
        rng = random.Random(seed)
        try:
            with psycopg.connect(dsn) as conn:
                barrier.wait()
                for _ in range(per_worker):
                    user, model = rng.choice(keys)
                    path = rng.randrange(3)
                    if path == 0:
                        conn.execute("SELECT sessiontag.create_conversation(%s, %s)", [user, model])
                    elif path == 1:
                        conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id) VALUES (%s, %s)",
                                     [user, model])
                    else:
                        conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
                        conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, model])
                    if rng.random() < rollback_share:
                        conn.rollback()
                    else:
                        conn.commit()
                        with lock:
                            committed[(user, model)] += 1
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    return committed


def _assert_gapless(dsn, committed):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT user_id, llm_model_id, array_agg(session_counter ORDER BY session_counter),"
                            " count(DISTINCT session_id) FROM sessiontag.conversations"
                            " WHERE session_id IS NOT NULL GROUP BY 1, 2").fetchall()
        last = last_numbers(conn)
    assert {(u, m): len(nums) for u, m, nums, _ in rows} == dict(committed)
    for user, model, numbers, distinct in rows:
        assert numbers == list(range(1, len(numbers) + 1)), "gapless from 1"
        assert distinct == len(numbers), "tags unique"
        assert last[(user, model)] == len(numbers), "the counter stops at the last committed number"


@pytest.mark.slow
def test_32_connections_on_one_hot_key_with_rollbacks(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        key = (uuid.uuid4(), register(conn))
    committed = _hammer(dsn, workers=32, per_worker=20, keys=[key], rollback_share=0.25)
    assert 300 < committed[key] < 640
    _assert_gapless(dsn, committed)


@pytest.mark.slow
def test_32_connections_on_many_keys_with_rollbacks(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        models = [register(conn, f"M{i}", f"m{i}") for i in range(3)]
    users = [uuid.uuid4() for _ in range(8)]
    keys = [(u, m) for u in users for m in models]
    committed = _hammer(dsn, workers=32, per_worker=20, keys=keys, rollback_share=0.25)
    assert len(committed) > 15
    _assert_gapless(dsn, committed)


def test_first_message_race_gives_one_tag_and_takes_one_number(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, user = register(conn), uuid.uuid4()
        conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    barrier = threading.Barrier(16)
    tags, errors = [], []

    def worker():
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                barrier.wait()
                tags.append(c.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [conv, model]).fetchone()[0])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert len(tags) == 16 and set(tags) == {f"chat_model_{model.hex[:6]}_001"}
    with psycopg.connect(dsn) as c:
        assert counts(c) == (1, 1)


# -- static checks -------------------------------------------------------------------
def test_plpgsql_check_finds_nothing_in_any_function(conn):
    conn.execute("CREATE EXTENSION plpgsql_check")
    # The batch functions read this session's span staging: make it, so they are checked too.
    conn.execute("SELECT sessiontag.create_span_staging()")
    findings = conn.execute("""
        SELECT p.oid::regprocedure::text, r.level, r.message, r.lineno
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        CROSS JOIN LATERAL plpgsql_check_function_tb(
            p.oid,
            coalesce((SELECT t.tgrelid FROM pg_trigger t WHERE t.tgfoid = p.oid LIMIT 1), 0),
            extra_warnings => true, performance_warnings => false, security_warnings => true) r
        WHERE n.nspname = 'sessiontag' AND l.lanname = 'plpgsql'
    """).fetchall()
    checked = conn.execute("""SELECT count(*) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                              WHERE p.pronamespace = 'sessiontag'::regnamespace AND l.lanname = 'plpgsql'""").fetchone()[0]
    assert checked >= 10
    assert findings == []


# -- Python client and CLI -------------------------------------------------------------
def test_client_returns_typed_results(dsn):
    with Client.connect(dsn) as client:
        model = client.register_model("GPT-4o", provider="openai", model_key="gpt-4o")
        assert isinstance(model, uuid.UUID) and client.model_id("gpt-4o") == model
        user = uuid.uuid4()
        tag = client.generate_session_tag(user, model)
        assert (tag.session_id, tag.counter, tag.badge) == (f"chat_model_{model.hex[:6]}_001", 1, "[GPT-4o #001]")
        assert client.generate_session_tag(user, uuid.uuid4()) is None
        assert [t.counter for t in client.generate_session_tags(user, model, 3)] == [2, 3, 4]
        conv = client.create_conversation(user, model, title="hi")
        assert (conv.session_counter, conv.title, conv.analytics_enabled) == (5, "hi", True)
        assert client.session_badge(conv.session_id) == "[GPT-4o #005]"
        bare = client.create_conversation(str(user))
        assert client.ensure_session_tag(bare.id, model).endswith("_006")
        assert client.set_analytics_tracking(bare.id, False) is False
        assert client.set_model_tracking(model, False) is False
        assert [m.tracked for m in client.list_models()] == [False]
        with pytest.raises(DatabaseError) as info:
            client.create_conversation("not-a-uuid")
        assert info.value.sqlstate == "22P02"


def test_cli_models_and_tracking(dsn):
    from tests.test_migrations import _one_line_error, sessiontag_cli

    added = sessiontag_cli("--dsn", dsn, "models", "add", "GPT-4o", "--provider", "openai", "--key", "gpt-4o",
                           "--format", "json")
    assert added.returncode == 0, added.stderr
    import json

    model = json.loads(added.stdout)[0]
    assert model["short_id"] == model["id"].replace("-", "")[:6] and model["tracked"] is True
    assert sessiontag_cli("--dsn", dsn, "models", "untrack", "gpt-4o").returncode == 0
    listed = sessiontag_cli("--dsn", dsn, "models", "list", "--format", "csv").stdout.splitlines()
    assert listed[0].startswith("id,short_id,name") and listed[1].endswith(",False," + listed[1].split(",")[-1])
    assert sessiontag_cli("--dsn", dsn, "models", "track", model["id"]).returncode == 0
    assert "no model with name, key or id 'nope'" in _one_line_error(sessiontag_cli("--dsn", dsn, "models", "track", "nope"))
    with Client.connect(dsn) as client:
        conv = client.create_conversation(uuid.uuid4())
    off = sessiontag_cli("--dsn", dsn, "sessions", "tracking", str(conv.id), "off")
    assert off.returncode == 0 and "analytics tracking off" in off.stdout
    with Client.connect(dsn) as client:
        assert client.conn.execute("SELECT analytics_enabled FROM sessiontag.conversations").fetchone()[0] is False
    missing = _one_line_error(sessiontag_cli("--dsn", dsn, "sessions", "tracking", str(uuid.uuid4()), "on"))
    assert "conversation_id" in missing and "P0002" in missing
