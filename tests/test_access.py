"""Access control with real login roles: PUBLIC refused, the three roles' matrix,
cross-tenant reads and writes refused through every table and function, a hostile
search_path with look-alike functions, and a table of bad input that stores nothing."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import drop_database, new_database
from tests.numbers import numbers_total

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
TABLES = ["llm_models", "conversations", "llm_traces", "session_counters", "feedback"]


# -- fixtures --------------------------------------------------------------------------
class Env:
    """One database for the module, login roles of each kind, and seeded data."""

    def __init__(self, pg_server, name: str):
        self.pg_server, self.name = pg_server, name
        self.admin = pg_server.libpq_dsn(name)
        suffix = uuid.uuid4().hex[:8]
        self.roles = {
            "alice": (f"alice_{suffix}", "sessiontag_user"),
            "app": (f"app_{suffix}", "sessiontag_app"),
            "reader": (f"reader_{suffix}", "sessiontag_reader"),
            "nobody": (f"nobody_{suffix}", None),
        }

    def login(self, kind: str, user_id=None, **kwargs) -> psycopg.Connection:
        role = self.roles[kind][0]
        options = f"-c sessiontag.user_id={user_id}" if user_id else ""
        return psycopg.connect(self.admin.replace("user=postgres", f"user={role}"), autocommit=True,
                               options=options, **kwargs)


@pytest.fixture(scope="module")
def env(pg_server, admin_dsn, template_db):
    name, dsn = new_database(admin_dsn, pg_server, template_db)
    e = Env(pg_server, name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for role, member_of in e.roles.values():
            conn.execute(f"CREATE ROLE {role} LOGIN" + (f" IN ROLE {member_of}" if member_of else ""))
            conn.execute(f"GRANT CREATE ON DATABASE {name} TO {role}")  # for the hostile search_path test
    try:
        yield e
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for role, _ in e.roles.values():
                conn.execute(f"DROP OWNED BY {role}")
        drop_database(admin_dsn, name)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for role, _ in e.roles.values():
                conn.execute(f"DROP ROLE {role}")


@pytest.fixture
def admin(env):
    with psycopg.connect(env.admin, autocommit=True) as conn:
        yield conn


@pytest.fixture
def seed(env, admin):
    """Alice and Bob (fresh ids per test): a shared model, a private model each, Bob's two
    tagged conversations (one holding the same tag text as Alice's), an untagged one, spans."""
    alice, bob = uuid.uuid4(), uuid.uuid4()
    one = lambda q, *p: admin.execute(q, p).fetchone()  # noqa: E731
    s = dict(alice=alice, bob=bob)
    s["shared"] = one("SELECT sessiontag.register_model('GPT-4o', 'openai', %s)", f"gpt-{alice}")[0]
    s["bob_model"] = one("SELECT sessiontag.register_model('Bob private', NULL, 'bob-only', %s)", bob)[0]
    s["alice_model"] = one("SELECT sessiontag.register_model('Alice private', NULL, 'alice-only', %s)", alice)[0]
    s["bob_conv"], s["bob_tag"] = one("SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)",
                                      bob, s["shared"])
    s["bob_private_conv"], s["bob_private_tag"] = one(
        "SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)", bob, s["bob_model"])
    s["bob_untagged"] = one("SELECT id FROM sessiontag.create_conversation(%s)", bob)[0]
    s["alice_conv"], s["alice_tag"] = one("SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)",
                                          alice, s["shared"])
    s["alice_untagged"] = one("SELECT id FROM sessiontag.create_conversation(%s)", alice)[0]
    assert s["alice_tag"] == s["bob_tag"]  # each user numbers their own sessions
    for user, conv, trace in ((bob, s["bob_conv"], "tb"), (bob, s["bob_private_conv"], "tb2"),
                              (alice, s["alice_conv"], "ta")):
        one("SELECT sessiontag.record_trace(%s, %s, 'root', 'chat', conversation_id => %s, model_id => %s,"
            " start_time => %s, end_time => %s)", user, trace, conv, s["shared"], T0, T0 + timedelta(seconds=1))
    one("SELECT sessiontag.start_trace(%s, 'tb', 'running', 'chat', parent_span_id => 'root')", bob)
    return s


def bob_state(admin, s) -> dict:
    """Everything of Bob's, as the owner sees it."""
    q = lambda sql: admin.execute(sql, [s["bob"]]).fetchall()  # noqa: E731
    return {
        "conversations": q("SELECT * FROM sessiontag.conversations WHERE user_id = %s ORDER BY id"),
        "traces": q("SELECT * FROM sessiontag.llm_traces WHERE user_id = %s ORDER BY id"),
        "counters": q("SELECT * FROM sessiontag.session_counters WHERE user_id = %s ORDER BY model_id"),
        "models": q("SELECT * FROM sessiontag.llm_models WHERE owner_id = %s ORDER BY id"),
    }


def counts(admin) -> dict:
    return {t: admin.execute(f"SELECT count(*) FROM sessiontag.{t}").fetchone()[0] for t in TABLES} | {
        "counter_sum": numbers_total(admin)}


def refused(conn, query: str, params=(), sqlstate: str = "42501", match: str | None = None) -> str:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params)
    assert info.value.sqlstate == sqlstate, f"{query}: {info.value.sqlstate} {info.value}"
    if match:
        assert match in str(info.value), str(info.value)
    return str(info.value)


def rows(conn, query: str, params=()) -> list:
    return conn.execute(query, params).fetchall()


# Every public function, called with plausible arguments ({u} a user, {m} a model, {c} a
# conversation): for the PUBLIC and reader refusals.
WRITE_CALLS = [
    "SELECT sessiontag.register_model('x')",
    "SELECT sessiontag.set_model_tracking({m}, false)",
    "SELECT sessiontag.generate_session_tag({u}, {m})",
    "SELECT * FROM sessiontag.generate_session_tags({u}, {m}, 2)",
    "SELECT * FROM sessiontag.create_conversation({u}, {m})",
    "SELECT sessiontag.ensure_session_tag({c})",
    "SELECT sessiontag.set_analytics_tracking({c}, false)",
    "SELECT sessiontag.start_trace({u}, 't9', 's9', 'chat')",
    "SELECT sessiontag.end_trace({u}, 'tb', 'running')",
    "SELECT sessiontag.record_trace({u}, 't9', 's9', 'chat')",
    "SELECT sessiontag.ingest_traces(jsonb_build_array(jsonb_build_object('user_id', {u}, 'trace_id', 't9',"
    " 'span_id', 's9', 'span_name', 'chat')))",
    "SELECT sessiontag.create_span_staging()",
    "SELECT sessiontag.ingest_staged_spans()",
]
READ_CALLS = [
    "SELECT sessiontag.model_id('gpt-4o')",
    "SELECT * FROM sessiontag.list_models()",
    "SELECT sessiontag.session_badge('chat_model_000000_001')",
    "SELECT * FROM sessiontag.list_traces()",
    "SELECT * FROM sessiontag.get_trace({u}, 'tb')",
    "SELECT * FROM sessiontag.list_sessions()",
    "SELECT * FROM sessiontag.session_summary('chat_model_000000_001')",
    "SELECT * FROM sessiontag.compare_models()",
]


def fill(call: str, s: dict, user_key: str = "bob") -> str:
    return call.format(u=f"'{s[user_key]}'::uuid", m=f"'{s['shared']}'::uuid", c=f"'{s['bob_untagged']}'::uuid")


# -- the privilege matrix --------------------------------------------------------------
def test_no_function_or_table_is_granted_to_public_and_only_definers_are_the_writers(admin):
    public = rows(admin, """
        SELECT p.oid::regprocedure::text FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        WHERE p.pronamespace = 'sessiontag'::regnamespace AND a.grantee = 0""")
    assert public == []
    public = rows(admin, """
        SELECT c.relname FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
        WHERE c.relnamespace = 'sessiontag'::regnamespace AND a.grantee = 0""")
    assert public == []
    definers = {r[0] for r in rows(admin, """SELECT proname FROM pg_proc
        WHERE pronamespace = 'sessiontag'::regnamespace AND prosecdef""")}
    assert definers == {"generate_session_tag", "generate_session_tags", "ensure_session_tag", "start_trace",
                        "end_trace", "record_trace", "ingest_traces", "create_span_staging", "ingest_staged_spans",
                        "_conversations_tag", "_conversations_keep_traces", "_otlp_ingest",
                        "_conversations_trace_tags", "_llm_models_short_id", "_conversations_keep_numbers",
                        "_handed_out", "tag_untagged_conversations", "record_feedback", "delete_feedback",
                        "_otlp_problems", "_otlp_link_traces"}
    unpinned = rows(admin, """SELECT oid::regprocedure::text FROM pg_proc
        WHERE pronamespace = 'sessiontag'::regnamespace
          AND NOT coalesce(proconfig, '{}') @> '{"search_path=pg_catalog, pg_temp"}'""")
    assert unpinned == []
    rls = rows(admin, """SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class
        WHERE relnamespace = 'sessiontag'::regnamespace AND relkind = 'r' ORDER BY relname""")
    assert rls == [(t, True, True) for t in sorted(TABLES)]


def test_privilege_matrix(env, admin):
    def executable(role):
        return {r[0] for r in rows(admin, """SELECT proname FROM pg_proc
            WHERE pronamespace = 'sessiontag'::regnamespace AND has_function_privilege(%s, oid, 'EXECUTE')""",
                                   [role])}

    def writable(role):
        """(table.column, privilege) a role may write."""
        return {(f"{r[0]}.{r[1]}", r[2]) for r in rows(admin, """
            SELECT c.relname, a.attname, p FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid,
                 unnest(ARRAY['INSERT', 'UPDATE']) p
            WHERE c.relnamespace = 'sessiontag'::regnamespace AND c.relkind = 'r' AND a.attnum > 0
              AND NOT a.attisdropped AND has_column_privilege(%s, c.oid, a.attnum, p)""", [role])} | {
            (r[0], "DELETE") for r in rows(admin, """SELECT relname FROM pg_class
                WHERE relnamespace = 'sessiontag'::regnamespace AND relkind = 'r'
                  AND has_table_privilege(%s, oid, 'DELETE, TRUNCATE')""", [role])}

    reads = {"model_id", "list_models", "session_badge", "list_traces", "get_trace", "list_sessions",
             "session_summary", "compare_models", "_badge", "_encode_cursor", "_decode_cursor",
             "_check_page_size", "_check_range", "_summarize", "_format_tag", "_tag_parts", "_handed_out",
             "list_feedback", "compare_metrics", "_lgamma", "_beta_inc", "_binom_cdf", "_norm_quantile", "_t_cdf",
             "_t_quantile", "_z", "_wilson", "_newcombe", "_t_interval", "_welch", "_median", "_median_interval",
             "_median_se", "_median_diff", "_min_sessions", "_verdict", "_float", "_not_on_a_shard"}
    user = reads | {"generate_session_tag", "generate_session_tags", "create_conversation", "ensure_session_tag",
                    "set_analytics_tracking", "start_trace", "end_trace", "record_trace", "ingest_traces",
                    "create_span_staging", "ingest_staged_spans",
                    "_lock_conversation", "ingest_otlp", "_otlp_attributes", "_otlp_time", "record_feedback",
                    "delete_feedback", "ingest_otlp_partial", "_otlp_ingest", "_otlp_value", "_otlp_json",
                    "_otlp_problems", "_otlp_link_traces", "_check_user"}
    app = user | {"register_model", "set_model_tracking", "count_untagged_conversations", "tag_untagged_conversations"}
    names = {k: v[0] for k, v in env.roles.items()}
    assert executable(names["reader"]) == reads | {"count_untagged_conversations"}
    assert executable(names["alice"]) == user
    assert executable(names["app"]) == app
    assert executable(names["nobody"]) == set()
    conversation_writes = {(f"conversations.{c}", "INSERT") for c in (
        "id", "user_id", "external_id", "title", "llm_model_id", "session_id", "analytics_enabled", "created_at")} | {
        (f"conversations.{c}", "UPDATE") for c in ("external_id", "title", "analytics_enabled")}
    assert writable(names["reader"]) == writable(names["nobody"]) == set()
    assert writable(names["alice"]) == conversation_writes
    assert writable(names["app"]) == conversation_writes | {
        (f"llm_models.{c}", "INSERT") for c in ("id", "owner_id", "name", "provider", "model_key", "tracked",
                                                 "created_at")} | {
        ("llm_models.tracked", "UPDATE")}
    for role in names.values():
        assert not admin.execute("SELECT has_table_privilege(%s, 'sessiontag.session_counters',"
                                 " 'SELECT, INSERT, UPDATE, DELETE')", [role]).fetchone()[0]


# -- PUBLIC ----------------------------------------------------------------------------
def test_public_is_refused_every_table_and_function(env, admin, seed):
    before = counts(admin)
    with env.login("nobody") as conn:
        for table in TABLES:
            refused(conn, f"SELECT * FROM sessiontag.{table}")
            refused(conn, f"DELETE FROM sessiontag.{table}")
        for call in WRITE_CALLS + READ_CALLS:
            refused(conn, fill(call, seed))
        for name in ("_lock_numbers(%s, %s)", "_reserve_numbers(%s, %s, 1)", "_next_free_short_id(%s)"):
            refused(conn, f"SELECT sessiontag.{name}", [seed["bob"], seed["shared"]][: name.count("%s")])
    assert counts(admin) == before


# -- sessiontag_user: one user's rows only ----------------------------------------------
def test_user_sees_only_its_rows_through_every_table(env, admin, seed):
    alice, bob = seed["alice"], seed["bob"]
    with env.login("alice", alice) as conn:
        assert {r[0] for r in rows(conn, "SELECT user_id FROM sessiontag.conversations")} == {alice}
        assert {r[0] for r in rows(conn, "SELECT user_id FROM sessiontag.llm_traces")} == {alice}
        owners = {r[0] for r in rows(conn, "SELECT owner_id FROM sessiontag.llm_models")}
        assert alice in owners and bob not in owners and None in owners
        refused(conn, "SELECT * FROM sessiontag.session_counters")


def test_user_cannot_write_other_rows_nor_counters_short_ids_or_tags(env, admin, seed):
    alice, bob = seed["alice"], seed["bob"]
    before, before_counts = bob_state(admin, seed), counts(admin)
    with env.login("alice", alice) as conn:
        # INSERT for Bob: refused by the tag trigger (before row-level security would).
        refused(conn, "INSERT INTO sessiontag.conversations (user_id, title) VALUES (%s, 'x')", [bob])
        refused(conn, "INSERT INTO sessiontag.conversations (user_id, session_id) VALUES (%s, 'mine')", [bob])
        refused(conn, "INSERT INTO sessiontag.conversations (user_id, session_counter) VALUES (%s, 5)", [alice])
        refused(conn, "INSERT INTO sessiontag.conversations (user_id, experiment_name) VALUES (%s, 'x')", [alice])
        refused(conn, "INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name)"
                      " VALUES (%s, 't', 's', 'n')", [alice])
        refused(conn, "INSERT INTO sessiontag.llm_models (name, model_key) VALUES ('m', 'k')")
        refused(conn, "INSERT INTO sessiontag.session_counters VALUES (%s, %s, 0)", [alice, seed["shared"]])
        # UPDATE: Bob's rows are invisible (0 rows); tag, counter and short id columns refused.
        assert conn.execute("UPDATE sessiontag.conversations SET title = 'pwned' WHERE user_id = %s",
                            [bob]).rowcount == 0
        assert conn.execute("UPDATE sessiontag.conversations SET analytics_enabled = false WHERE id = %s",
                            [seed["bob_conv"]]).rowcount == 0
        for column, value in (("session_id", "'x'"), ("session_counter", "9"), ("experiment_name", "'x'"),
                              ("user_id", f"'{bob}'"), ("llm_model_id", "NULL")):
            refused(conn, f"UPDATE sessiontag.conversations SET {column} = {value} WHERE id = %s",
                    [seed["alice_conv"]])
        refused(conn, "UPDATE sessiontag.llm_traces SET session_tag = 'x'")
        refused(conn, "UPDATE sessiontag.llm_models SET short_id = 'abcdef'")
        refused(conn, "UPDATE sessiontag.llm_models SET tracked = false")
        refused(conn, "UPDATE sessiontag.session_counters SET last_value = 0")
        for table in TABLES:
            refused(conn, f"DELETE FROM sessiontag.{table}")
            refused(conn, f"TRUNCATE sessiontag.{table}")
    assert bob_state(admin, seed) == before and counts(admin) == before_counts


def test_user_reads_only_its_rows_through_every_function(env, seed):
    alice, bob = seed["alice"], seed["bob"]
    with env.login("alice", alice) as conn:
        for user in (None, alice, bob):
            listed = rows(conn, "SELECT user_id FROM sessiontag.list_traces(user_id => %s)", [user])
            assert {r[0] for r in listed} <= {alice} and len(listed) == (0 if user == bob else 1)
            sessions = rows(conn, "SELECT user_id FROM sessiontag.list_sessions(user_id => %s)", [user])
            assert [r[0] for r in sessions] == ([] if user == bob else [alice])
            compared = rows(conn, "SELECT model_id, sessions, traces FROM sessiontag.compare_models(user_id => %s)",
                            [user])
            assert compared == ([] if user == bob else [(seed["shared"], 1, 1)])
        assert rows(conn, "SELECT * FROM sessiontag.list_traces(trace_id => 'tb')") == []
        assert rows(conn, "SELECT * FROM sessiontag.list_traces(search => 'tb')") == []
        assert rows(conn, "SELECT * FROM sessiontag.get_trace(%s, 'tb')", [bob]) == []
        assert rows(conn, "SELECT * FROM sessiontag.get_trace(%s, 'tb')", [alice]) == []
        # Bob holds the same tag text: Alice gets her own session, never Bob's, never an ambiguity error.
        assert [r[0] for r in rows(conn, "SELECT user_id FROM sessiontag.session_summary(%s)",
                                   [seed["bob_tag"]])] == [alice]
        assert rows(conn, "SELECT * FROM sessiontag.session_summary(%s, %s)", [seed["bob_tag"], bob]) == []
        assert rows(conn, "SELECT * FROM sessiontag.session_summary(%s)", [seed["bob_private_tag"]]) == []
        assert conn.execute("SELECT sessiontag.session_badge(%s)", [seed["bob_private_tag"]]).fetchone()[0] is None
        assert conn.execute("SELECT sessiontag.session_badge(%s, %s)", [seed["bob_tag"], bob]).fetchone()[0] is None
        assert conn.execute("SELECT sessiontag.model_id('bob-only', %s)", [bob]).fetchone()[0] is None
        assert conn.execute("SELECT sessiontag.model_id('alice-only', %s)", [alice]).fetchone()[0] == \
            seed["alice_model"]
        listed_models = {r[0] for r in rows(conn, "SELECT id FROM sessiontag.list_models()")}
        assert seed["bob_model"] not in listed_models and seed["alice_model"] in listed_models


def test_user_cannot_write_for_another_user_through_any_function(env, admin, seed):
    alice, bob = seed["alice"], seed["bob"]
    before, before_counts = bob_state(admin, seed), counts(admin)
    with env.login("alice", alice) as conn:
        span = dict(trace_id="tx", span_id="sx", span_name="chat")
        refused(conn, "SELECT sessiontag.create_conversation(%s, %s)", [bob, seed["shared"]])
        refused(conn, "SELECT sessiontag.create_conversation(%s)", [bob])
        refused(conn, "SELECT sessiontag.start_trace(%s, 'tx', 'sx', 'chat')", [bob], match="user_id")
        refused(conn, "SELECT sessiontag.record_trace(%s, 'tx', 'sx', 'chat')", [bob], match="user_id")
        refused(conn, "SELECT sessiontag.end_trace(%s, 'tb', 'running')", [bob], match="user_id")
        refused(conn, "SELECT sessiontag.ingest_traces(%s)",
                [Jsonb([dict(span, user_id=str(alice)), dict(span, user_id=str(bob))])], match="spans[1].user_id")
        refused(conn, "SELECT sessiontag.ensure_session_tag(%s, %s, %s)",
                [seed["bob_untagged"], seed["shared"], bob])
        refused(conn, "SELECT sessiontag.register_model('mine')")
        refused(conn, "SELECT sessiontag.set_model_tracking(%s, false)", [seed["shared"]])
        # Bob's conversation does not exist for Alice, whatever it holds.
        for conv in ("bob_untagged", "bob_conv"):
            refused(conn, "SELECT sessiontag.ensure_session_tag(%s, %s)", [seed[conv], seed["shared"]], "P0002")
            refused(conn, "SELECT sessiontag.set_analytics_tracking(%s, false)", [seed[conv]], "P0002")
            refused(conn, "SELECT sessiontag.set_analytics_tracking(%s, false, %s)", [seed[conv], bob], "P0002")
            refused(conn, "SELECT sessiontag.record_trace(%s, 'tx', 'sx', 'chat', conversation_id => %s)",
                    [alice, seed[conv]], "P0002", "conversation_id")
            refused(conn, "SELECT sessiontag.ingest_traces(%s)",
                    [Jsonb([dict(span, user_id=str(alice), conversation_id=str(seed[conv]))])], "P0002",
                    "spans[0].conversation_id")
        # Tags for Bob, or with Bob's private model: NULL (generate_session_tag never raises).
        assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [bob, seed["shared"]]).fetchone()[0] \
            is None
        assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)",
                            [alice, seed["bob_model"]]).fetchone()[0] is None
        assert rows(conn, "SELECT * FROM sessiontag.generate_session_tags(%s, %s, 3)", [bob, seed["shared"]]) == []
        # Bob's private model does not exist for Alice.
        refused(conn, "SELECT sessiontag.create_conversation(%s, %s)", [alice, seed["bob_model"]], "23503")
        refused(conn, "SELECT sessiontag.ensure_session_tag(%s, %s)", [seed["alice_untagged"], seed["bob_model"]],
                "P0002")
        refused(conn, "SELECT sessiontag.record_trace(%s, 'tx', 'sx', 'chat', model_id => %s)",
                [alice, seed["bob_model"]], "P0002", "model_id")
        refused(conn, "SELECT sessiontag.ingest_traces(%s)",
                [Jsonb([dict(span, user_id=str(alice), model_id=str(seed["bob_model"]))])], "P0002",
                "spans[0].model_id")
    assert bob_state(admin, seed) == before and counts(admin) == before_counts


def test_user_does_its_own_work(env, admin, seed):
    alice = seed["alice"]
    with env.login("alice", alice) as conn:
        conv, tag, counter = conn.execute("SELECT id, session_id, session_counter FROM"
                                          " sessiontag.create_conversation(%s, %s)", [alice, seed["alice_model"]]
                                          ).fetchone()
        assert counter == 1 and tag.endswith("_001")
        bare = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [alice]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [bare, seed["shared"]]).fetchone()[0] \
            .endswith("_002")
        assert conn.execute("SELECT counter FROM sessiontag.generate_session_tag(%s, %s)",
                            [alice, seed["shared"]]).fetchone()[0] == 3
        conn.execute("INSERT INTO sessiontag.conversations (user_id, session_id, title) VALUES (%s, 'manual', 't')",
                     [alice])
        assert conn.execute("SELECT sessiontag.start_trace(%s, 'own', 'a', 'chat', conversation_id => %s)",
                            [alice, conv]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.end_trace(%s, 'own', 'a')", [alice]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.ingest_traces(%s)", [Jsonb([dict(
            user_id=str(alice), trace_id="own", span_id="b", span_name="tool", conversation_id=str(bare))])]
                            ).fetchone()[0] == 1
        assert conn.execute("SELECT sessiontag.set_analytics_tracking(%s, false)", [bare]).fetchone()[0] is False
        assert conn.execute("UPDATE sessiontag.conversations SET title = 'renamed' WHERE id = %s",
                            [conv]).rowcount == 1
        assert [r[0] for r in rows(conn, "SELECT session_tag FROM sessiontag.get_trace(%s, 'own')", [alice])] == \
            [tag, conn.execute("SELECT session_id FROM sessiontag.conversations WHERE id = %s", [bare]).fetchone()[0]]


def test_user_without_the_setting_sees_and_writes_nothing(env, admin, seed):
    alice = seed["alice"]
    before = counts(admin)
    with env.login("alice") as conn:
        assert rows(conn, "SELECT * FROM sessiontag.conversations") == []
        assert rows(conn, "SELECT * FROM sessiontag.llm_traces") == []
        assert {r[0] for r in rows(conn, "SELECT owner_id FROM sessiontag.llm_models")} == {None}  # shared only
        assert rows(conn, "SELECT * FROM sessiontag.list_traces()") == []
        assert rows(conn, "SELECT * FROM sessiontag.list_sessions()") == []
        assert rows(conn, "SELECT * FROM sessiontag.compare_models()") == []
        for call in WRITE_CALLS[2:]:
            # set_analytics_tracking is SECURITY INVOKER: row-level security hides the conversation.
            refused(conn, fill(call, seed, "alice"),
                    sqlstate="P0002" if "set_analytics_tracking" in call else "42501")
        refused(conn, "INSERT INTO sessiontag.conversations (user_id) VALUES (%s)", [alice],
                match="sessiontag.user_id is not set")
        # Transaction-local setting (the pooled way): in effect inside, gone after commit.
        with conn.transaction():
            conn.execute("SELECT set_config('sessiontag.user_id', %s, true)", [str(alice)])
            assert len(rows(conn, "SELECT * FROM sessiontag.list_traces()")) == 1
        assert rows(conn, "SELECT * FROM sessiontag.list_traces()") == []
    assert counts(admin) == before


def test_a_setting_that_is_not_a_uuid_is_named_in_the_error(env, admin, seed):
    before = counts(admin)
    with env.login("alice") as conn:
        conn.execute("SELECT set_config('sessiontag.user_id', 'garbage', false)")
        message = refused(conn, "SELECT sessiontag.record_trace(%s, 't', 's', 'chat')", [seed["alice"]],
                          sqlstate="22P02", match="sessiontag.user_id must be a user uuid")
        assert "garbage" in message
    assert counts(admin) == before


def test_a_role_set_with_set_role_is_scoped_inside_definer_functions(env, admin, seed):
    """The outer role decides, not current_user (the owner inside a SECURITY DEFINER function)."""
    alice, bob = seed["alice"], seed["bob"]
    before = bob_state(admin, seed)
    with psycopg.connect(env.admin) as conn:  # the superuser, switching to Alice's role for one transaction
        conn.execute(f"SET LOCAL ROLE {env.roles['alice'][0]}")
        conn.execute("SELECT set_config('sessiontag.user_id', %s, true)", [str(alice)])
        refused(conn, "SELECT sessiontag.record_trace(%s, 'tx', 'sx', 'chat')", [bob])
    with psycopg.connect(env.admin, autocommit=True) as conn:
        conn.execute(f"SET ROLE {env.roles['alice'][0]}")
        conn.execute("SET sessiontag.user_id = %s" % f"'{alice}'")
        assert conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [bob, seed["shared"]]).fetchone()[0] \
            is None
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT counter FROM sessiontag.generate_session_tag(%s, %s)",
                            [bob, seed["shared"]]).fetchone()[0] == 2
    assert bob_state(admin, seed)["conversations"] == before["conversations"]


# -- sessiontag_reader and sessiontag_app ----------------------------------------------
def test_reader_runs_the_cli_read_commands_and_verify(env, seed):
    from tests.test_migrations import _one_line_error, sessiontag_cli

    dsn = env.admin.replace("user=postgres", f"user={env.roles['reader'][0]}")
    listed = sessiontag_cli("--dsn", dsn, "sessions", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    verify = sessiontag_cli("--dsn", dsn, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok") and "comparing the schema only" in verify.stderr
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "migrations"))
    assert "(public._yoyo_migration): permission denied for table _yoyo_migration" in error


def test_reader_reads_everything_and_writes_nothing(env, admin, seed):
    before = counts(admin)
    with env.login("reader", seed["alice"]) as conn:  # the setting does not narrow a reader
        users = {r[0] for r in rows(conn, "SELECT user_id FROM sessiontag.list_traces(page_size => 1000)")}
        assert {seed["alice"], seed["bob"]} <= users
        assert len(rows(conn, "SELECT * FROM sessiontag.get_trace(%s, 'tb')", [seed["bob"]])) == 2
        assert rows(conn, "SELECT user_id FROM sessiontag.session_summary(%s, %s)",
                    [seed["bob_tag"], seed["bob"]]) == [(seed["bob"],)]
        assert conn.execute("SELECT count(*) FROM sessiontag.conversations WHERE user_id = %s",
                            [seed["bob"]]).fetchone()[0] == 3
        for call in WRITE_CALLS:
            refused(conn, fill(call, seed))
        for table in TABLES:
            refused(conn, f"DELETE FROM sessiontag.{table}")
        refused(conn, "INSERT INTO sessiontag.conversations (user_id) VALUES (%s)", [seed["bob"]])
        refused(conn, "UPDATE sessiontag.conversations SET title = 'x'")
        refused(conn, "SELECT * FROM sessiontag.session_counters")
    assert counts(admin) == before


def test_app_acts_for_any_user_but_never_writes_counters_short_ids_or_tags_directly(env, admin, seed):
    bob = seed["bob"]
    with env.login("app", seed["alice"]) as conn:  # the setting does not narrow the app either
        model = conn.execute("SELECT sessiontag.register_model('Claude', 'anthropic', %s)",
                             [f"claude-{bob}"]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.set_model_tracking(%s, true)", [model]).fetchone()[0] is True
        conv, tag = conn.execute("SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)",
                                 [bob, model]).fetchone()
        assert tag.endswith("_001")
        assert conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [seed["bob_untagged"], model]
                            ).fetchone()[0].endswith("_002")
        assert conn.execute("SELECT sessiontag.record_trace(%s, 'app', 'a', 'chat', conversation_id => %s)",
                            [bob, conv]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.end_trace(%s, 'tb', 'running')", [bob]).fetchone()[0]
        assert conn.execute("SELECT sessiontag.ingest_traces(%s)", [Jsonb([dict(
            user_id=str(bob), trace_id="app", span_id="b", span_name="tool", conversation_id=str(conv))])]
                            ).fetchone()[0] == 1
        assert conn.execute("SELECT sessiontag.set_analytics_tracking(%s, false)", [conv]).fetchone()[0] is False
        assert {r[0] for r in rows(conn, "SELECT user_id FROM sessiontag.list_sessions(page_size => 1000)")} >= {
            bob, seed["alice"]}
        refused(conn, "UPDATE sessiontag.conversations SET session_id = 'x' WHERE id = %s", [seed["bob_untagged"]])
        refused(conn, "UPDATE sessiontag.conversations SET session_counter = 7 WHERE id = %s", [conv])
        refused(conn, "INSERT INTO sessiontag.conversations (user_id, session_counter) VALUES (%s, 1)", [bob])
        refused(conn, "UPDATE sessiontag.llm_models SET short_id = 'abcdef' WHERE id = %s", [model])
        refused(conn, "INSERT INTO sessiontag.llm_models (name, model_key, short_id) VALUES ('n', 'k', 'abcdef')")
        refused(conn, "INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name, session_tag)"
                      " VALUES (%s, 't', 's', 'n', %s)", [bob, tag])
        refused(conn, "UPDATE sessiontag.llm_traces SET session_tag = 'x'")
        refused(conn, "SELECT * FROM sessiontag.session_counters")
        refused(conn, "SELECT sessiontag._lock_numbers(%s, %s)", [bob, model])
        refused(conn, "SELECT sessiontag._reserve_numbers(%s, %s, 1)", [bob, model])
        refused(conn, "SELECT sessiontag._next_free_short_id(%s)", [model])
        refused(conn, "SELECT sessiontag._record_span(true, %s, 't', 's', 'n', 'llm_call', NULL, NULL, NULL, NULL,"
                      " NULL, 'forged', NULL, NULL, now(), 'success', NULL, NULL, NULL, NULL, NULL, now(), NULL)",
                [bob])
        refused(conn, "DELETE FROM sessiontag.conversations")


# -- a hostile search_path -------------------------------------------------------------
EVIL = """
CREATE SCHEMA {schema};
CREATE FUNCTION {schema}.boom() RETURNS text LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'look-alike function called'; END $$;
CREATE FUNCTION {schema}.lower(text) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.upper(text) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT {schema}.boom()::timestamptz $$;
CREATE FUNCTION {schema}.format(text) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.format(text, text) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.format(text, bigint) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.lpad(text, integer, text) RETURNS text LANGUAGE sql AS $$ SELECT '666' $$;
CREATE FUNCTION {schema}.replace(text, text, text) RETURNS text LANGUAGE sql AS $$ SELECT 'ffffffffffff' $$;
CREATE FUNCTION {schema}.left(text, integer) RETURNS text LANGUAGE sql AS $$ SELECT 'ffffff' $$;
CREATE FUNCTION {schema}.length(text) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
CREATE FUNCTION {schema}.btrim(text) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION {schema}.concat_ws(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION {schema}.gen_random_uuid() RETURNS uuid LANGUAGE sql
    AS $$ SELECT '00000000-0000-0000-0000-000000000000'::uuid $$;
CREATE FUNCTION {schema}.current_setting(text, boolean) RETURNS text LANGUAGE sql AS $$ SELECT '{bob}' $$;
CREATE FUNCTION {schema}.current_setting(text) RETURNS text LANGUAGE sql AS $$ SELECT 'none' $$;
CREATE FUNCTION {schema}.pg_has_role(name, name, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE FUNCTION {schema}.pg_has_role(text, text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE FUNCTION {schema}.nullif(text, text) RETURNS text LANGUAGE sql AS $$ SELECT '{bob}' $$;
CREATE FUNCTION {schema}.jsonb_typeof(jsonb) RETURNS text LANGUAGE sql AS $$ SELECT 'object' $$;
CREATE FUNCTION {schema}.regexp_match(text, text) RETURNS text[] LANGUAGE sql AS $$ SELECT NULL::text[] $$;
CREATE FUNCTION {schema}.encode(bytea, text) RETURNS text LANGUAGE sql AS $$ SELECT {schema}.boom() $$;
CREATE FUNCTION {schema}.strpos(text, text) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION {schema}.hashtext(text) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION {schema}.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
CREATE OPERATOR {schema}.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = {schema}.uuid_eq);
CREATE FUNCTION {schema}.text_eq(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.text_eq);
CREATE FUNCTION {schema}.text_ne(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR {schema}.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.text_ne);
CREATE FUNCTION {schema}.uuid_ne(uuid, uuid) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR {schema}.<> (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = {schema}.uuid_ne);
CREATE TEMP TABLE conversations (id int);
CREATE TEMP TABLE llm_models (id int);
CREATE TEMP TABLE pg_roles (rolname name, rolsuper boolean, rolbypassrls boolean);
"""


def _scenario(conn, user, model, bob) -> list:
    """The main API, end to end; returns what a caller sees (without random ids)."""
    out = []
    conv, tag, counter = conn.execute("SELECT id, session_id, session_counter FROM"
                                      " sessiontag.create_conversation(%s, %s, 'Hi')", [user, model]).fetchone()
    out.append((tag, counter))
    bare = conn.execute("SELECT id FROM sessiontag.create_conversation(%s)", [user]).fetchone()[0]
    out.append(conn.execute("SELECT sessiontag.ensure_session_tag(%s, %s)", [bare, model]).fetchone()[0])
    out.append(conn.execute("SELECT session_id, counter FROM sessiontag.generate_session_tag(%s, %s)",
                            [user, model]).fetchone())
    conn.execute("SELECT sessiontag.record_trace(%s, 'hs', 'root', 'Chat', conversation_id => %s,"
                 " model_id => %s, start_time => %s, end_time => %s, input_tokens => 5, cost_usd => 0.5)",
                 [user, conv, model, T0, T0 + timedelta(seconds=2)])
    conn.execute("SELECT sessiontag.start_trace(%s, 'hs', 'child', 'tool', parent_span_id => 'root',"
                 " conversation_id => %s, start_time => %s)", [user, conv, T0 + timedelta(seconds=1)])
    conn.execute("SELECT sessiontag.end_trace(%s, 'hs', 'child', end_time => %s)", [user, T0 + timedelta(seconds=1)])
    out.append(conn.execute("SELECT sessiontag.ingest_traces(%s)", [Jsonb([
        dict(user_id=str(user), trace_id="hs2", span_id="a", span_name="Chat", conversation_id=str(bare),
             start_time=str(T0), end_time=str(T0 + timedelta(seconds=3))),
        dict(user_id=str(user), trace_id="hs2", span_id="b", span_name="tool", parent_span_id="a",
             start_time=str(T0 + timedelta(seconds=1)), status="running")])]).fetchone()[0])
    listed = rows(conn, "SELECT trace_id, span_id, session_tag, model_name, status, duration_ms, cursor"
                        " FROM sessiontag.list_traces(user_id => %s, search => 'CHAT')", [user])
    out.append(sorted(r[:2] + r[2:-1] for r in listed))
    first = rows(conn, "SELECT span_id, cursor FROM sessiontag.list_traces(user_id => %s, trace_id => 'hs',"
                       " page_size => 1)", [user])
    out.append([first[0][0]] + rows(conn, "SELECT span_id FROM sessiontag.list_traces(user_id => %s,"
                                          " trace_id => 'hs', after => %s)", [user, first[0][1]]))
    out.append(rows(conn, "SELECT span_id, depth, session_tag FROM sessiontag.get_trace(%s, 'hs')", [user]))
    out.append(conn.execute("SELECT sessiontag.session_badge(%s, %s)", [tag, user]).fetchone()[0])
    out.append(rows(conn, "SELECT session_id, badge, counter, trace_count, input_tokens, cost_usd"
                          " FROM sessiontag.list_sessions(user_id => %s)", [user]))
    out.append(rows(conn, "SELECT sessions, traces, cost_usd FROM sessiontag.compare_models(user_id => %s)", [user]))
    out.append(conn.execute("SELECT sessiontag.generate_session_tag(%s, %s)", [bob, model]).fetchone()[0]
               is None)
    return out


@pytest.mark.parametrize("kind", ["alice", "app"])
def test_a_hostile_search_path_changes_nothing(env, admin, kind):
    model = admin.execute("SELECT sessiontag.register_model('Hostile', NULL, %s)",
                          [f"hostile-{uuid.uuid4()}"]).fetchone()[0]
    results = []
    for hostile in (False, True):
        user, bob = uuid.uuid4(), uuid.uuid4()
        with env.login(kind, user) as conn:
            if hostile:
                schema = f"evil_{uuid.uuid4().hex[:8]}"
                conn.execute(EVIL.format(schema=schema, bob=bob))
                conn.execute(f"SET search_path = {schema}, public, pg_catalog, pg_temp")
                with pytest.raises(psycopg.Error, match="look-alike"):  # the look-alikes are live for the caller
                    conn.execute("SELECT lower('X')")
            results.append(_scenario(conn, user, model, bob))
    plain, hostile = results
    short = admin.execute("SELECT short_id FROM sessiontag.llm_models WHERE id = %s", [model]).fetchone()[0]
    assert plain[0][0] == f"chat_model_{short}_001"
    assert hostile[0][0] == f"chat_model_{short}_001"
    assert hostile[-1] is (kind == "alice")  # Alice's scope holds; the app is unrestricted
    assert hostile[:-1] == plain[:-1]


# -- bad input -------------------------------------------------------------------------
U = "'6f1c2b9e-0000-4000-8000-000000000001'::uuid"
GOOD_SPAN = '{"user_id": "6f1c2b9e-0000-4000-8000-000000000001", "trace_id": "t", "span_id": "s", "span_name": "n"}'
BAD_INPUT = [
    # (call, SQLSTATE, text the message contains)
    ("sessiontag.generate_session_tag('not-a-uuid', {m})", "22P02", "uuid"),
    ("sessiontag.generate_session_tags({u}, {m}, -1)", "22023", "n must be between"),
    ("sessiontag.generate_session_tags({u}, {m}, 100001)", "22023", "n must be between"),
    ("sessiontag.generate_session_tags({u}, {m}, NULL)", "22023", "n must be between"),
    ("sessiontag.generate_session_tags({u}, {m}, 'ten')", "22P02", "integer"),
    ("sessiontag.create_conversation(NULL)", "22004", "user_id"),
    ("sessiontag.create_conversation('123')", "22P02", "uuid"),
    ("sessiontag.create_conversation({u}, title => repeat('x', 1001))", "22001", "title"),
    ("sessiontag.create_conversation({u}, external_id => '')", "22023", "external_id"),
    ("sessiontag.create_conversation({u}, session_id => repeat('x', 201))", "22023", "session_id"),
    ("sessiontag.create_conversation({u}, analytics_enabled => NULL)", "22004", "analytics_enabled"),
    ("sessiontag.create_conversation({u}, analytics_enabled => 'maybe')", "22P02", "boolean"),
    ("sessiontag.create_conversation({u}, model_id => gen_random_uuid())", "23503", "model_id"),
    ("sessiontag.create_conversation({u}, session_id => 'chat_model_abcdef_999')", "22023", "session_id"),
    ("sessiontag.create_conversation({u}, title => convert_from('\\x6100'::bytea, 'UTF8'))", "22021", "0x00"),
    ("sessiontag.ensure_session_tag(NULL)", "22004", "conversation_id"),
    ("sessiontag.ensure_session_tag(gen_random_uuid())", "P0002", "conversation_id"),
    ("sessiontag.ensure_session_tag({b}, gen_random_uuid())", "P0002", "model_id"),
    ("sessiontag.set_analytics_tracking({c}, NULL)", "22004", "enabled"),
    ("sessiontag.register_model(NULL)", "22004", "name"),
    ("sessiontag.register_model(repeat('x', 201))", "22001", "name"),
    ("sessiontag.register_model('n', provider => repeat('x', 201))", "22001", "provider"),
    ("sessiontag.register_model('n', model_key => ' ')", "22023", "model_key"),
    ("sessiontag.set_model_tracking(gen_random_uuid(), true)", "P0002", "model_id"),
    ("sessiontag.set_model_tracking({m}, NULL)", "22004", "tracked"),
    ("sessiontag.record_trace(NULL, 't', 's', 'n')", "22004", "user_id"),
    ("sessiontag.record_trace({u}, 't''; DROP TABLE sessiontag.llm_traces; --', 's', 'n')", "22023", "trace_id"),
    ("sessiontag.record_trace({u}, 't', repeat('s', 129), 'n')", "22001", "span_id"),
    ("sessiontag.record_trace({u}, 't', 's', '')", "22023", "span_name"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', status => 'done'' OR ''1''=''1')", "22023", "status"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', input_tokens => -1)", "22023", "input_tokens"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', input_tokens => '3000000000')", "22003", "integer"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', cost_usd => 1e12)", "22003", "cost_usd"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', metadata => '[1]')", "22023", "metadata"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', metadata => '{{\"a\": ')", "22P02", "json"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', input_data => '{{\"a\": \"\\u0000\"}}')", "22P05", "Unicode"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', start_time => 'infinity')", "22008", "start_time"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', start_time => now(), end_time => now() - interval '1 s')",
     "22023", "end_time"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', conversation_id => gen_random_uuid())", "P0002", "conversation_id"),
    ("sessiontag.record_trace({u}, 't', 's', 'n', conversation_id => {c}, session_tag => 'x''--')", "22023",
     "session_tag"),
    ("sessiontag.record_trace({u}, E'a\\tb', 's', 'n')", "22023", "trace_id"),
    ("sessiontag.start_trace({u}, 't', 's', 'n', parent_span_id => 's')", "22023", "parent_span_id"),
    ("sessiontag.start_trace({u}, E't\\n', 's', 'n')", "22023", "trace_id"),
    ("sessiontag.end_trace({u}, 'nope', 'nope')", "P0002", "not found"),
    ("sessiontag.end_trace({u}, 't', 's', status => 'running')", "22023", "status"),
    ("sessiontag.ingest_traces(NULL)", "22004", "spans"),
    ("sessiontag.ingest_traces('{{}}')", "22023", "spans must be a JSON array"),
    ("sessiontag.ingest_traces('[{{')", "22P02", "json"),
    ("sessiontag.ingest_traces('[1]')", "22023", "spans[0]"),
    ("sessiontag.ingest_traces('[{{\"user_id\": \"nope\", \"trace_id\": \"t\", \"span_id\": \"s\","
     " \"span_name\": \"n\"}}]')", "22P02", "spans[0].user_id"),
    ("sessiontag.ingest_traces('[" + GOOD_SPAN.replace("{", "{{").replace("}", "}}")
     + ", {{\"bogus\": 1}}]')", "22023", "spans[1].bogus"),
    ("sessiontag.ingest_traces('[" + GOOD_SPAN.replace("{", "{{").replace("}", "}}").replace('"s"', '"s2"')
     + ", " + GOOD_SPAN.replace("{", "{{").replace("}", "}}").replace('"n"}}', '"n", "input_tokens": "many"}}')
     + "]')", "22P02", "spans[1].input_tokens"),
    ("sessiontag.ingest_traces('[" + GOOD_SPAN.replace("{", "{{").replace("}", "}}").replace('"n"}}',
     '"n", "duration_ms": 5}}') + "]')", "22023", "spans[0].duration_ms"),
    ("sessiontag.ingest_traces('[" + GOOD_SPAN.replace("{", "{{").replace("}", "}}").replace('"n"}}',
     '"\\u0000"}}') + "]')", "22P05", "Unicode"),
    ("sessiontag.ingest_traces('[" + GOOD_SPAN.replace("{", "{{").replace("}", "}}").replace('"n"}}',
     '"x'' || (SELECT 1) || ''", "status": "ok"}}') + "]')", "22023", "spans[0].status"),
    ("sessiontag.list_traces(page_size => 0)", "22023", "page_size"),
    ("sessiontag.list_traces(after => '''; DROP TABLE sessiontag.llm_traces; --')", "22023", "after"),
    ("sessiontag.list_traces(status => 'success'' OR ''1''=''1')", "22023", "status"),
    ("sessiontag.list_traces(since => now(), until => now() - interval '1 day')", "22023", "since"),
    ("sessiontag.list_traces(search => '')", "22023", "search"),
    ("sessiontag.list_traces(since => 'yesterday-ish')", "22007", "timestamp"),
    ("sessiontag.get_trace(NULL, 't')", "22004", "user_id"),
    ("sessiontag.get_trace({u}, NULL)", "22004", "trace_id"),
    ("sessiontag.session_summary(NULL)", "22004", "session_id"),
    ("sessiontag.list_sessions(after => 'abc')", "22023", "after"),
    ("sessiontag.list_sessions(page_size => 1001)", "22023", "page_size"),
    ("sessiontag.compare_models(model_ids => '{{nope}}')", "22P02", "uuid"),
]


@pytest.fixture(scope="module")
def bad_input_refs(env):
    with psycopg.connect(env.admin, autocommit=True) as conn:
        model = conn.execute("SELECT sessiontag.register_model('Bad', NULL, 'bad-input')").fetchone()[0]
        conv = conn.execute(f"SELECT id FROM sessiontag.create_conversation({U}, %s)", [model]).fetchone()[0]
        bare = conn.execute(f"SELECT id FROM sessiontag.create_conversation({U})").fetchone()[0]
        conn.execute(f"SELECT sessiontag.start_trace({U}, 't', 's', 'n')")
    return dict(m=f"'{model}'::uuid", c=f"'{conv}'::uuid", b=f"'{bare}'::uuid", u=U)


def test_the_bad_input_table_is_large_enough():
    assert len(BAD_INPUT) >= 30
    assert len({c[0].split("(")[0] for c in BAD_INPUT}) >= 15  # across the whole API


@pytest.mark.parametrize("call, sqlstate, named", BAD_INPUT, ids=[f"{i:02d}" for i in range(len(BAD_INPUT))])
def test_bad_input_gets_a_clear_error_and_stores_nothing(env, admin, bad_input_refs, call, sqlstate, named):
    before = counts(admin)
    with env.login("app") as conn:
        refused(conn, "SELECT * FROM " + call.format(**bad_input_refs), sqlstate=sqlstate, match=named)
    assert counts(admin) == before
