"""Search and analytics: keyset pagination, filters, literal search, span trees, metrics."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from statistics import quantiles

import psycopg
import pytest

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def register(conn, name, key):
    return conn.execute("SELECT sessiontag.register_model(%s, 'prov', %s)", [name, key]).fetchone()[0]


def insert_span(conn, **span) -> dict:
    span.setdefault("span_name", "chat")
    span.setdefault("start_time", T0)
    cols = ", ".join(span)
    conn.execute(f"INSERT INTO sessiontag.llm_traces ({cols}) VALUES ({', '.join(['%s'] * len(span))})",
                 list(span.values()))
    return span


@pytest.fixture
def workload(conn):
    """3 users x 2 models, tagged conversations, 2-level span trees, many equal start times."""
    rng = random.Random(7)
    models = [register(conn, "GPT-4o", "gpt-4o"), register(conn, "Claude", "claude")]
    spans = []
    for u in range(3):
        user = uuid.UUID(int=u + 1)
        for c in range(4):
            model = models[c % 2]
            conv, tag = conn.execute("SELECT id, session_id FROM sessiontag.create_conversation(%s, %s)",
                                     [user, model]).fetchone()
            for t in range(3):
                trace = f"trace-{u}-{c}-{t}"
                start = T0 + timedelta(seconds=rng.randrange(4))  # many ties
                root = insert_span(conn, user_id=user, trace_id=trace, span_id="root", span_name="chat turn",
                                   operation_type="chain", conversation_id=conv, session_tag=tag,
                                   model_name=None, start_time=start, end_time=start + timedelta(seconds=3),
                                   status="success")
                spans.append(root)
                for k in range(2):
                    status = "error" if rng.random() < 0.2 else "success"
                    spans.append(insert_span(
                        conn, user_id=user, trace_id=trace, span_id=f"llm{k}", parent_span_id="root",
                        span_name="completion", operation_type="llm_call", conversation_id=conv, session_tag=tag,
                        model_name="GPT-4o" if model == models[0] else "Claude", model_id=model,
                        start_time=start, end_time=start + timedelta(milliseconds=rng.randrange(100, 3000)),
                        status=status, input_tokens=rng.randrange(10, 500), output_tokens=rng.randrange(10, 500),
                        cost_usd=Decimal(rng.randrange(1, 1000)) / 10000))
    return {"models": models, "spans": spans}


def all_pages(conn, page_size=7, after=None, **filters) -> list[tuple]:
    rows = []
    while True:
        args = {**filters, "page_size": page_size, "after": after}
        named = ", ".join(f"{k} => %({k})s" for k in args)
        page = conn.execute(f"SELECT user_id, trace_id, span_id, start_time, cursor FROM sessiontag.list_traces({named})",
                            args).fetchall()
        rows += [r[:4] for r in page]
        if len(page) < page_size:
            return rows
        after = page[-1][4]


def expected(spans, pred=lambda s: True) -> list[tuple]:
    return [(s["user_id"], s["trace_id"], s["span_id"], s["start_time"]) for s in spans if pred(s)]


def test_pagination_covers_every_row_once_newest_first_despite_ties(conn, workload):
    rows = all_pages(conn)
    assert len(rows) == len(workload["spans"]) == len(set(rows))
    assert sorted(rows) == sorted(expected(workload["spans"]))
    times = [r[3] for r in rows]
    assert times == sorted(times, reverse=True)


def test_pagination_is_stable_when_newer_rows_arrive(conn, workload):
    first = conn.execute("SELECT span_id, trace_id, cursor FROM sessiontag.list_traces(page_size => 10)").fetchall()
    insert_span(conn, user_id=uuid.UUID(int=1), trace_id="late", span_id="x", start_time=T0 + timedelta(days=1))
    rest = all_pages(conn, after=first[-1][2])
    assert ("late" not in {r[1] for r in rest})
    assert len(first) + len(rest) == len(workload["spans"])


@pytest.mark.parametrize("filters, pred", [
    ({"user_id": uuid.UUID(int=2)}, lambda s: s["user_id"] == uuid.UUID(int=2)),
    ({"trace_id": "trace-1-2-0"}, lambda s: s["trace_id"] == "trace-1-2-0"),
    ({"model_name": "Claude"}, lambda s: s.get("model_name") == "Claude"),
    ({"status": "error"}, lambda s: s["status"] == "error"),
    ({"operation_type": "chain"}, lambda s: s["operation_type"] == "chain"),
    ({"roots_only": True}, lambda s: s.get("parent_span_id") is None),
    ({"since": T0 + timedelta(seconds=2)}, lambda s: s["start_time"] >= T0 + timedelta(seconds=2)),
    ({"until": T0 + timedelta(seconds=1)}, lambda s: s["start_time"] < T0 + timedelta(seconds=1)),
    ({"user_id": uuid.UUID(int=3), "status": "success", "roots_only": False, "operation_type": "llm_call"},
     lambda s: s["user_id"] == uuid.UUID(int=3) and s["status"] == "success" and s["operation_type"] == "llm_call"),
])
def test_each_filter(conn, workload, filters, pred):
    want = expected(workload["spans"], pred)
    assert want, "the filter must select something"
    assert sorted(all_pages(conn, **filters)) == sorted(want)


def test_session_tag_and_conversation_filters(conn, workload):
    some = workload["spans"][7]
    assert sorted(all_pages(conn, session_tag=some["session_tag"])) == sorted(
        expected(workload["spans"], lambda s: s["session_tag"] == some["session_tag"]))
    assert sorted(all_pages(conn, conversation_id=some["conversation_id"])) == sorted(
        expected(workload["spans"], lambda s: s["conversation_id"] == some["conversation_id"]))


@pytest.mark.parametrize("term, hits", [
    ("100%", {"a"}), ("%", {"a"}), ("_x", {"b"}), ("o'brien", {"c"}), ('"quoted"', {"d"}),
    ("ÄÖÜ", {"e"}), ("äöü", {"e"}), ("日本", {"f"}), ("SPAN", {"a", "b", "c", "d", "e", "f"}), ("zzz", set()),
])
def test_search_is_literal_and_case_insensitive(conn, term, hits):
    user = uuid.uuid4()
    for sid, name in [("a", "span 100% done"), ("b", "span_x"), ("c", "span o'Brien"), ("d", 'span "quoted"'),
                      ("e", "span äöü"), ("f", "span 日本語")]:
        insert_span(conn, user_id=user, trace_id="t", span_id=sid, span_name=name)
    found = {r[2] for r in all_pages(conn, search=term)}
    assert found == hits


def test_search_matches_tag_trace_id_and_model_name(conn, workload):
    tag = workload["spans"][0]["session_tag"]
    assert {r[1] for r in all_pages(conn, search=tag.upper())} == {
        s["trace_id"] for s in workload["spans"] if s["session_tag"] == tag}
    assert len(all_pages(conn, search="TRACE-2-3")) == 9
    assert len(all_pages(conn, search="claud")) == len([s for s in workload["spans"] if s.get("model_name") == "Claude"])


def test_get_trace_orders_parents_before_children_with_depth(conn):
    user = uuid.uuid4()
    for sid, parent, second in [("c2", "b", 3), ("root", None, 0), ("b", "root", 2), ("a", "root", 1),
                                ("a1", "a", 1), ("orphan", "missing", 5)]:
        insert_span(conn, user_id=user, trace_id="T", span_id=sid, parent_span_id=parent,
                    start_time=T0 + timedelta(seconds=second))
    rows = conn.execute("SELECT span_id, depth FROM sessiontag.get_trace(%s, 'T')", [user]).fetchall()
    assert rows == [("root", 0), ("a", 1), ("a1", 2), ("b", 1), ("c2", 2), ("orphan", 0)]
    # spans whose parents form a cycle are not left out: they come last, as roots
    insert_span(conn, user_id=user, trace_id="T", span_id="x", parent_span_id="y", start_time=T0)
    insert_span(conn, user_id=user, trace_id="T", span_id="y", parent_span_id="x", start_time=T0)
    rows = conn.execute("SELECT span_id, depth FROM sessiontag.get_trace(%s, 'T')", [user]).fetchall()
    assert rows[-2:] == [("x", 0), ("y", 0)] and len(rows) == 8
    assert conn.execute("SELECT count(*) FROM sessiontag.get_trace(%s, 'T')", [uuid.uuid4()]).fetchone()[0] == 0


def test_session_metrics_on_span_trees(conn, workload):
    spans = workload["spans"]
    row = conn.execute("SELECT * FROM sessiontag.list_sessions(page_size => 1000)").fetchall()
    assert len(row) == 12
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    sessions = cur.execute("SELECT * FROM sessiontag.list_sessions(page_size => 1000)").fetchall()
    for s in sessions:
        mine = [x for x in spans if x["session_tag"] == s["session_id"] and x["user_id"] == s["user_id"]]
        assert s["trace_count"] == len({x["trace_id"] for x in mine}) == 3
        assert s["error_count"] == len({x["trace_id"] for x in mine if x["status"] == "error"}), "traces with an error"
        assert s["input_tokens"] == sum(x.get("input_tokens", 0) for x in mine)
        assert s["output_tokens"] == sum(x.get("output_tokens", 0) for x in mine)
        assert s["cost_usd"] == sum(x.get("cost_usd", Decimal(0)) for x in mine)
        llm = sorted((x["end_time"] - x["start_time"]).total_seconds() * 1000 for x in mine
                     if x["operation_type"] == "llm_call")
        assert s["p50_ms"] == pytest.approx(quantiles(llm, n=2, method="inclusive")[0])
        assert s["p95_ms"] == pytest.approx(quantiles(llm, n=20, method="inclusive")[-1])
        assert s["badge"] == f"[{s['model_name']} #{s['counter']:03d}]"
        assert s["first_at"] == min(x["start_time"] for x in mine)
        summary = cur.execute("SELECT * FROM sessiontag.session_summary(%s, %s)",
                              [s["session_id"], s["user_id"]]).fetchone()
        assert summary == s


def test_list_sessions_pages_and_filters(conn, workload):
    seen, after = [], None
    while True:
        page = conn.execute("SELECT session_id, user_id, cursor FROM sessiontag.list_sessions(after => %s, page_size => 5)",
                            [after]).fetchall()
        seen += [(p[0], p[1]) for p in page]
        if len(page) < 5:
            break
        after = page[-1][2]
    assert len(seen) == len(set(seen)) == 12
    one = conn.execute("SELECT count(*) FROM sessiontag.list_sessions(user_id => %s, model_id => %s)",
                       [uuid.UUID(int=1), workload["models"][0]]).fetchone()[0]
    assert one == 2


def test_session_summary_gives_one_row_per_user_holding_the_tag(conn, workload):
    tag = conn.execute("SELECT session_id FROM sessiontag.conversations LIMIT 1").fetchone()[0]
    holders = {r[0] for r in conn.execute("SELECT user_id FROM sessiontag.conversations WHERE session_id = %s", [tag])}
    assert len(holders) == 3
    rows = conn.execute("SELECT user_id FROM sessiontag.session_summary(%s)", [tag]).fetchall()
    assert {r[0] for r in rows} == holders and len(rows) == 3
    assert conn.execute("SELECT count(*) FROM sessiontag.session_summary('no-such-tag')").fetchone()[0] == 0


def test_compare_models(conn, workload):
    spans = workload["spans"]
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = {r["model_name"]: r for r in cur.execute("SELECT * FROM sessiontag.compare_models()")}
    assert set(rows) == {"GPT-4o", "Claude"}
    for name, model in zip(("GPT-4o", "Claude"), workload["models"]):
        mine = [s for s in spans if s.get("model_id") == model or (
            s["operation_type"] == "chain" and any(x.get("model_id") == model and x["trace_id"] == s["trace_id"]
                                                   and x["user_id"] == s["user_id"] for x in spans))]
        traces = {(s["user_id"], s["trace_id"]) for s in mine}
        failed = {(s["user_id"], s["trace_id"]) for s in mine if s["status"] == "error"}
        r = rows[name]
        assert r["sessions"] == 6 and r["traces"] == len(traces) == 18
        assert r["error_rate"] == pytest.approx(len(failed) / len(traces))
        assert r["input_tokens"] == sum(s.get("input_tokens", 0) for s in mine)
        assert r["cost_usd"] == sum(s.get("cost_usd", Decimal(0)) for s in mine)
        assert r["cost_per_session"] == round(r["cost_usd"] / 6, 8)
    one = conn.execute("SELECT count(*) FROM sessiontag.compare_models(model_ids => %s)",
                       [[workload["models"][1]]]).fetchone()[0]
    assert one == 1


@pytest.mark.parametrize("query, argument", [
    ("SELECT * FROM sessiontag.list_traces(page_size => 0)", "page_size"),
    ("SELECT * FROM sessiontag.list_traces(page_size => 1001)", "page_size"),
    ("SELECT * FROM sessiontag.list_traces(after => 'garbage')", "after"),
    ("SELECT * FROM sessiontag.list_traces(after => 'MTIz')", "after"),
    ("SELECT * FROM sessiontag.list_traces(status => 'done')", "status"),
    ("SELECT * FROM sessiontag.list_traces(search => '')", "search"),
    ("SELECT * FROM sessiontag.list_traces(since => now(), until => now() - interval '1 day')", "since"),
    ("SELECT * FROM sessiontag.list_sessions(after => 'x')", "after"),
    ("SELECT * FROM sessiontag.list_sessions(page_size => -1)", "page_size"),
])
def test_bad_search_arguments_are_named(conn, query, argument):
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query)
    assert info.value.sqlstate == "22023"
    assert argument in info.value.diag.message_primary
