"""Row-level security across tenants on Citus: a user-scoped login sees and writes only
its own user's rows on every worker, with the user set by SET LOCAL; nothing of another
user without it; the backend and reader roles see everything."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

TABLES = ["conversations", "llm_traces", "feedback"]


@pytest.fixture(scope="module")
def tenants(cluster, distributed):
    roles = {kind: cluster.create_role(kind, member_of) for kind, member_of in (
        ("alice", "sessiontag_user"), ("app", "sessiontag_app"), ("reader", "sessiontag_reader"))}
    users = [uuid.uuid4() for _ in range(6)]  # spread over both workers
    with psycopg.connect(distributed, autocommit=True) as conn:
        model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
        for user in users:
            for n in range(3):
                conv = conn.execute("SELECT id FROM sessiontag.create_conversation(%s, %s)",
                                    [user, model]).fetchone()[0]
                conn.execute("SELECT sessiontag.record_trace(%s, %s, 'a', 'chat', conversation_id => %s)",
                             [user, f"t{n}", conv])
            conn.execute("SELECT sessiontag.record_feedback(%s, 'thumbs', 1, trace_id => 't0')", [user])
    return dict(roles=roles, users=users, model=model)


def login(dsn: str, role: str) -> psycopg.Connection:
    return psycopg.connect(make_conninfo(dsn, user=role))


def scoped(conn, user) -> None:
    conn.execute(f"SET LOCAL sessiontag.user_id = '{user}'")


def test_user_with_set_local_sees_and_writes_only_its_rows(distributed, tenants):
    alice = tenants["users"][0]
    with login(distributed, tenants["roles"]["alice"]) as conn:
        with conn.transaction():
            scoped(conn, alice)
            for table in TABLES:
                seen = {r[0] for r in conn.execute(f"SELECT user_id FROM sessiontag.{table}")}
                assert seen == {alice}, table
            assert {r[0] for r in conn.execute("SELECT user_id FROM sessiontag.list_traces(page_size => 1000)")} \
                == {alice}
            assert {r[0] for r in conn.execute("SELECT user_id FROM sessiontag.list_sessions(page_size => 1000)")} \
                == {alice}
            assert conn.execute("SELECT sessions FROM sessiontag.compare_models()").fetchall() == [(3,)]
        # Own writes: a plain INSERT (every defaulted column written by Citus) and UPDATE,
        # then the functions. Separate transactions: Citus refuses a transaction that
        # writes a shard as the caller and then reaches it as the functions' owner.
        with conn.transaction():
            scoped(conn, alice)
            conv = conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id) VALUES (%s, %s)"
                                " RETURNING id", [alice, tenants["model"]]).fetchone()[0]
            assert conn.execute("UPDATE sessiontag.conversations SET title = 'x'").rowcount == 4
        with conn.transaction():
            scoped(conn, alice)
            assert conn.execute("SELECT sessiontag.record_trace(%s, 'own', 'a', 'chat', conversation_id => %s)",
                                [alice, conv]).fetchone()[0]
            assert conn.execute("SELECT sessiontag.ingest_traces(%s)", [Jsonb([dict(
                user_id=str(alice), trace_id="own", span_id="b", span_name="tool")])]).fetchone()[0] == 1
        for other in tenants["users"][1:]:
            with conn.transaction():
                scoped(conn, alice)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT sessiontag.create_conversation(%s)", [other])
            with conn.transaction():
                scoped(conn, alice)
                with pytest.raises(psycopg.Error):
                    conn.execute("INSERT INTO sessiontag.conversations (user_id) VALUES (%s)", [other])


def test_user_without_the_setting_sees_nothing_of_anyone(distributed, tenants):
    with login(distributed, tenants["roles"]["alice"]) as conn:
        for table in TABLES:
            assert conn.execute(f"SELECT count(*) FROM sessiontag.{table}").fetchone()[0] == 0, table
        assert conn.execute("SELECT count(*) FROM sessiontag.list_traces(page_size => 1000)").fetchone()[0] == 0
        conn.rollback()
        # set_config(..., true) is not carried to the workers: still nothing of another user
        with conn.transaction():
            conn.execute("SELECT set_config('sessiontag.user_id', %s, true)", [str(tenants["users"][0])])
            for table in TABLES:
                assert {r[0] for r in conn.execute(f"SELECT user_id FROM sessiontag.{table}")} <= {
                    tenants["users"][0]}, table


def test_app_and_reader_see_every_user(distributed, tenants):
    for kind in ("app", "reader"):
        with login(distributed, tenants["roles"][kind]) as conn:
            with conn.transaction():
                scoped(conn, tenants["users"][0])  # the setting narrows nobody but sessiontag_user
                seen = {r[0] for r in conn.execute("SELECT user_id FROM sessiontag.conversations")}
                assert seen >= set(tenants["users"]), kind
    with login(distributed, tenants["roles"]["app"]) as conn:
        user = uuid.uuid4()
        assert conn.execute("INSERT INTO sessiontag.conversations (user_id, llm_model_id) VALUES (%s, %s)"
                            " RETURNING session_id", [user, tenants["model"]]).fetchone()[0].endswith("_001")
        conn.commit()
    with login(distributed, tenants["roles"]["reader"]) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO sessiontag.conversations (user_id) VALUES (%s)", [uuid.uuid4()])


def test_a_confined_login_ingests_otlp_for_its_user_only(distributed, tenants):
    """What `sessiontag serve` does for a token bound to a user, with a login that is a
    member of sessiontag_user (on Citus a SET ROLE to the NOLOGIN role cannot reach the
    workers: Citus connects to them as the current role)."""
    alice, bob = tenants["users"][0], tenants["users"][1]

    def span(user, span_id):
        return {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": span_id, "name": "chat",
                "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
                "attributes": [{"key": "user.id", "value": {"stringValue": str(user)}},
                               {"key": "gen_ai.conversation.id", "value": {"stringValue": "otlp-conv"}},
                               {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}}]}

    payload = {"resourceSpans": [{"scopeSpans": [{"spans": [span(alice, "eee19b7ec3c1b174"),
                                                            span(bob, "eee19b7ec3c1b175")]}]}]}
    with login(distributed, tenants["roles"]["alice"]) as conn:
        with conn.transaction():
            scoped(conn, alice)
            stored, rejected = conn.execute("SELECT stored, rejected FROM sessiontag.ingest_otlp_partial(%s, %s)",
                                            [Jsonb(payload), alice]).fetchone()
        assert stored == 1 and len(rejected) == 1 and "user" in str(rejected)
    with psycopg.connect(distributed, autocommit=True) as conn:
        owners = conn.execute("SELECT user_id FROM sessiontag.llm_traces WHERE trace_id ="
                              " '5b8efff798038103d269b633813fc60c'").fetchall()
        assert owners == [(alice,)]


READS = [
    "SELECT count(*) FROM sessiontag.list_traces(page_size => 1000)",
    "SELECT count(*) FROM sessiontag.get_trace(%(u)s, 't0')",
    "SELECT count(*) FROM sessiontag.list_sessions(page_size => 1000)",
    "SELECT count(*) FROM sessiontag.session_summary(%(tag)s)",
    "SELECT count(*) FROM sessiontag.compare_models()",
    "SELECT count(*) FROM sessiontag.compare_metrics(baseline_model_id => %(m)s, feedback_name => 'thumbs')",
    "SELECT count(*) FROM sessiontag.list_feedback()",
    "SELECT sessiontag.session_badge(%(tag)s)",
    "SELECT sessiontag.model_id('gpt-4o')",
    "SELECT count(*) FROM sessiontag.list_models()",
    "SELECT sessiontag.count_untagged_conversations()",
]


@pytest.mark.parametrize("kind", ["alice", "app", "reader"])
def test_every_read_runs_under_row_level_security(distributed, tenants, kind):
    alice = tenants["users"][0]
    with psycopg.connect(distributed, autocommit=True) as conn:
        tag = conn.execute("SELECT session_id FROM sessiontag.conversations WHERE user_id = %s"
                           " AND session_id IS NOT NULL LIMIT 1", [alice]).fetchone()[0]
    args = dict(u=alice, tag=tag, m=tenants["model"])
    with login(distributed, tenants["roles"][kind]) as conn:
        for query in READS:
            if kind == "alice" and "count_untagged" in query:
                continue  # not granted to sessiontag_user
            with conn.transaction():
                scoped(conn, alice)
                conn.execute(query, args).fetchall()
