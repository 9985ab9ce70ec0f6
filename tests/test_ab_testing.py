"""A/B testing: every interval against scipy/statsmodels, the verdicts' calibration by
simulation, feedback (replacement, row-level security, bad input) and the CLI."""

from __future__ import annotations

import json
import math
import uuid
from contextlib import nullcontext
from decimal import Decimal

import numpy as np
import psycopg
import pytest
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from sessiontag import Client
from tests.test_migrations import _one_line_error, sessiontag_cli

TOL = 1e-6


def close(a, b, tol=TOL):
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


# -- references ------------------------------------------------------------------------
def ref_wilson(x, n, conf=0.95):
    return proportion_confint(x, n, alpha=1 - conf, method="wilson")


def ref_newcombe(x1, n1, x2, n2, conf=0.95):
    return confint_proportions_2indep(x1, n1, x2, n2, method="newcomb", compare="diff", alpha=1 - conf)


def ref_t_interval(sample, conf=0.95):
    sample = np.asarray(sample, float)
    return stats.t.interval(conf, len(sample) - 1, loc=sample.mean(), scale=stats.sem(sample))


def ref_welch(a, b, conf=0.95):
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(conf)
    return np.mean(a) - np.mean(b), ci.low, ci.high


def ref_median_interval(sample, conf=0.95):
    ci = stats.quantile_test(sample, q=float(np.median(sample)), p=0.5).confidence_interval(conf)
    return float(np.median(sample)), ci.low, ci.high


def ref_median_se(sample):
    """Price and Bonett (2002), as written in docs/ab-testing.md, from scipy's binomial
    and normal distributions."""
    y = np.sort(np.asarray(sample, float))
    n = len(y)
    c = max(1, round(n / 2 - math.sqrt(n)))
    z = stats.norm.ppf(1 - stats.binom.cdf(c - 1, n, 0.5))
    return (y[n - c] - y[c - 1]) / (2 * z)


def ref_median_diff(a, b, conf=0.95):
    diff = float(np.median(a) - np.median(b))
    half = stats.norm.ppf(1 - (1 - conf) / 2) * math.hypot(ref_median_se(a), ref_median_se(b))
    return diff, diff - half, diff + half


def one(conn, query, *params):
    return conn.execute(query, params).fetchone()


# -- the numerics, one by one ----------------------------------------------------------
def test_distribution_helpers_match_scipy(conn):
    for p, df in [(0.975, 1), (0.975, 2), (0.975, 3.7), (0.995, 5), (0.95, 10), (0.975, 29.31), (0.025, 58.4),
                  (0.9, 120), (0.975, 1234.5), (0.975, 25000), (0.6, 7)]:
        assert close(one(conn, "SELECT sessiontag._t_quantile(%s, %s)", p, df)[0], stats.t.ppf(p, df)), (p, df)
    for p in [1e-10, 0.001, 0.02425, 0.2, 0.5, 0.8, 0.975, 0.999999]:
        assert close(one(conn, "SELECT sessiontag._norm_quantile(%s)", p)[0], stats.norm.ppf(p)), p
    for k, n in [(0, 5), (2, 10), (5, 20), (49, 100), (480, 1000), (7400, 15000), (15, 15)]:
        assert close(one(conn, "SELECT sessiontag._binom_cdf(%s, %s)", k, n)[0], stats.binom.cdf(k, n, 0.5)), (k, n)
    for t, df in [(-3.2, 2.5), (0.0, 4), (1.7, 13), (2.2, 800)]:
        assert close(one(conn, "SELECT sessiontag._t_cdf(%s, %s)", t, df)[0], stats.t.cdf(t, df)), (t, df)


@pytest.mark.parametrize("x, n, conf", [(0, 10, 0.95), (3, 40, 0.95), (40, 40, 0.95), (17, 250, 0.9),
                                        (500, 1000, 0.99), (1, 1, 0.95)])
def test_wilson_matches_statsmodels(conn, x, n, conf):
    low, high = one(conn, "SELECT low, high FROM sessiontag._wilson(%s, %s, %s)", x, n, conf)
    ref = ref_wilson(x, n, conf)
    assert close(low, ref[0]) and close(high, ref[1])


@pytest.mark.parametrize("x1, n1, x2, n2, conf", [(3, 40, 7, 35, 0.95), (0, 20, 0, 25, 0.95),
                                                  (20, 20, 12, 30, 0.95), (130, 1000, 95, 1100, 0.99),
                                                  (5, 12, 9, 11, 0.9)])
def test_newcombe_matches_statsmodels(conn, x1, n1, x2, n2, conf):
    diff, low, high = one(conn, "SELECT * FROM sessiontag._newcombe(%s, %s, %s, %s, %s)", x1, n1, x2, n2, conf)
    ref = ref_newcombe(x1, n1, x2, n2, conf)
    assert close(diff, x1 / n1 - x2 / n2) and close(low, ref[0]) and close(high, ref[1])


def test_t_welch_and_median_intervals_match_scipy(conn):
    rng = np.random.default_rng(20260301)
    samples = [rng.lognormal(0, 1, n) for n in (2, 3, 6, 11, 40, 301)] + [rng.normal(5, 2, 25), np.arange(1.0, 13)]
    for conf in (0.95, 0.9):
        for a in samples:
            low, high = one(conn, "SELECT low, high FROM sessiontag._t_interval(%s, %s, %s, %s)",
                            float(np.mean(a)), float(np.var(a, ddof=1)), len(a), conf)
            ref = ref_t_interval(a, conf)
            assert close(low, ref[0]) and close(high, ref[1]), len(a)
            if len(a) >= 6:
                median, low, high = one(conn, "SELECT * FROM sessiontag._median_interval(%s, %s)",
                                        sorted(map(float, a)), conf)
                ref = ref_median_interval(a, conf)
                assert close(median, ref[0]) and close(low, ref[1]) and close(high, ref[2]), len(a)
        for a, b in zip(samples, samples[1:]):
            got = one(conn, "SELECT * FROM sessiontag._welch(%s, %s, %s, %s, %s, %s, %s)",
                      float(np.mean(a)), float(np.var(a, ddof=1)), len(a),
                      float(np.mean(b)), float(np.var(b, ddof=1)), len(b), conf)
            assert all(close(g, r) for g, r in zip(got, ref_welch(a, b, conf))), (len(a), len(b))
            if len(a) >= 2 and len(b) >= 2:
                got = one(conn, "SELECT * FROM sessiontag._median_diff(%s, %s, %s)",
                          sorted(map(float, a)), sorted(map(float, b)), conf)
                assert all(close(g, r) for g, r in zip(got, ref_median_diff(a, b, conf))), (len(a), len(b))


# -- data for compare_metrics -----------------------------------------------------------
T0 = "2026-03-01 00:00:00+00"


def load_experiment(conn, sessions: list[dict]) -> None:
    """Sessions as dicts (user, model, error, latencies in whole ms, costs, score), stored
    as tagged conversations with one llm_call span per latency, in a few statements."""
    ids = [uuid.uuid4() for _ in sessions]
    tags = dict(conn.execute(
        "INSERT INTO sessiontag.conversations (id, user_id, llm_model_id)"
        " SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[]) RETURNING id, session_id",
        [ids, [s["user"] for s in sessions], [s["model"] for s in sessions]]).fetchall())
    rows = [(conv, tags[conv]) for conv in ids]
    spans = {k: [] for k in ("user", "trace", "span", "conv", "tag", "ms", "status", "cost")}
    feedback = {k: [] for k in ("user", "conv", "value")}
    for s, (conv, tag) in zip(sessions, rows):
        for i, (ms, cost) in enumerate(zip(s["latencies"], s["costs"])):
            for key, value in zip(spans, (s["user"], f"{conv}-{i}", "llm", conv, tag, ms,
                                          "error" if s["error"] and i == 0 else "success", cost)):
                spans[key].append(value)
        if s.get("score") is not None:
            for key, value in zip(feedback, (s["user"], conv, s["score"])):
                feedback[key].append(value)
    conn.execute(
        "INSERT INTO sessiontag.llm_traces (user_id, trace_id, span_id, span_name, operation_type, conversation_id,"
        " session_tag, start_time, end_time, status, cost_usd)"
        " SELECT u, t, sp, 'completion', 'llm_call', c, tag, %s::timestamptz,"
        "        %s::timestamptz + ms * interval '1 millisecond', st, cost"
        " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::float8[], %s::text[],"
        "             %s::numeric[]) AS x(u, t, sp, c, tag, ms, st, cost)",
        [T0, T0, spans["user"], spans["trace"], spans["span"], spans["conv"], spans["tag"], spans["ms"],
         spans["status"], spans["cost"]])
    conn.execute(
        "INSERT INTO sessiontag.feedback (user_id, conversation_id, name, value)"
        " SELECT u, c, 'score', v FROM unnest(%s::uuid[], %s::uuid[], %s::numeric[]) AS x(u, c, v)",
        [feedback["user"], feedback["conv"], feedback["value"]])


def simulate(rng, user, model, n, *, error, latency, cost, score):
    """n sessions of one model: error rate, median latency (ms), median span cost and the
    chance of a thumbs up; two LLM calls per session."""
    out = []
    for _ in range(n):
        out.append(dict(user=user, model=model, error=bool(rng.random() < error),
                        latencies=[float(round(v)) for v in rng.lognormal(math.log(latency), 0.5, 2)],
                        costs=[Decimal(f"{v:.8f}") for v in rng.lognormal(math.log(cost), 0.6, 2)],
                        score=int(rng.random() < score) if rng.random() < 0.9 else None))
    return out


def models(conn, *names):
    return [one(conn, "SELECT sessiontag.register_model(%s, 'test', %s)", name, name.lower())[0] for name in names]


def by_metric(rows):
    return {(r.model_id, r.metric): r for r in rows}


def test_compare_metrics_equals_the_references_on_fixed_data(conn):
    base, other, small = models(conn, "Base", "Other", "Small")
    user = uuid.uuid4()
    rng = np.random.default_rng(7)
    sessions = (simulate(rng, user, base, 40, error=0.2, latency=900, cost=0.01, score=0.6)
                + simulate(rng, user, other, 33, error=0.35, latency=1400, cost=0.004, score=0.8)
                + simulate(rng, user, small, 6, error=0.2, latency=900, cost=0.01, score=0.6))
    load_experiment(conn, sessions)
    with nullcontext(Client(conn)) as client:
        rows = client.compare_metrics(baseline_model_id=base, feedback_name="score")
        plain = client.compare_metrics()
    got = by_metric(rows)
    assert {r.metric for r in plain} == {"error_rate", "latency_ms", "cost_per_session"}
    assert all(r.verdict is None and r.diff is None for r in plain)
    assert [r.metric for r in rows][:3] == ["error_rate"] * 3 and rows[0].model_id == base

    def of(model):
        mine = [s for s in sessions if s["model"] == model]
        return dict(errors=sum(s["error"] for s in mine), n=len(mine),
                    latency=[float(np.median(s["latencies"])) for s in mine],
                    cost=[float(sum(s["costs"])) for s in mine],
                    score=[float(s["score"]) for s in mine if s["score"] is not None])

    b = of(base)
    for model in (base, other, small):
        m = of(model)
        r = got[model, "error_rate"]
        assert r.sessions == m["n"] and close(r.value, m["errors"] / m["n"])
        assert close(r.low, ref_wilson(m["errors"], m["n"])[0]) and close(r.high, ref_wilson(m["errors"], m["n"])[1])
        r = got[model, "latency_ms"]
        ref = ref_median_interval(m["latency"])
        assert r.sessions == m["n"] and close(r.value, ref[0]) and close(r.low, ref[1]) and close(r.high, ref[2])
        r = got[model, "cost_per_session"]
        ref = ref_t_interval(m["cost"])
        assert close(r.value, np.mean(m["cost"])) and close(r.low, ref[0]) and close(r.high, ref[1])
        r = got[model, "feedback"]
        ref = ref_t_interval(m["score"])
        assert r.sessions == len(m["score"]) and close(r.value, np.mean(m["score"]))
        assert close(r.low, ref[0]) and close(r.high, ref[1])
        if model == base:
            assert all(got[base, k].verdict is None and got[base, k].diff is None
                       for k in ("error_rate", "latency_ms", "cost_per_session", "feedback"))
            continue
        diffs = {"error_rate": ref_newcombe(m["errors"], m["n"], b["errors"], b["n"]),
                 "latency_ms": ref_median_diff(m["latency"], b["latency"])[1:],
                 "cost_per_session": ref_welch(m["cost"], b["cost"])[1:],
                 "feedback": ref_welch(m["score"], b["score"])[1:]}
        for metric, (low, high) in diffs.items():
            r = got[model, metric]
            assert close(r.diff_low, low) and close(r.diff_high, high), metric
            if model == small:
                assert r.verdict == "too few sessions"
    assert got[other, "cost_per_session"].verdict == "better"
    assert got[other, "latency_ms"].verdict == "worse"


def test_compare_metrics_checks_its_arguments(conn):
    with nullcontext(Client(conn)) as client:
        for kwargs, sqlstate, named in [
                (dict(confidence=Decimal("1")), "22023", "confidence"),
                (dict(confidence=Decimal("0")), "22023", "confidence"),
                (dict(feedback_name=""), "22023", "feedback_name"),
                (dict(baseline_model_id=uuid.uuid4()), "P0002", "baseline_model_id")]:
            with pytest.raises(Exception) as caught:
                client.compare_metrics(**kwargs)
            assert caught.value.sqlstate == sqlstate and str(caught.value).startswith(named)
        base, = models(conn, "Lonely")
        rows = client.compare_metrics(baseline_model_id=base)
    assert {(r.metric, r.sessions, r.value, r.verdict) for r in rows} == {
        ("error_rate", 0, None, None), ("latency_ms", 0, None, None), ("cost_per_session", 0, None, None)}


# -- calibration ----------------------------------------------------------------------
EXPERIMENTS = 200
METRICS = ("error_rate", "latency_ms", "cost_per_session", "feedback")


@pytest.mark.slow
def test_verdicts_are_calibrated_by_simulation(conn):
    """200 experiments, each one user with three models of 60 sessions: A (the baseline),
    A' (the same distributions: any verdict is a false alarm) and B (a large true
    difference on every metric). 95% intervals: 2-9% false alarms, B found in >= 95%."""
    a, a2, b = models(conn, "A", "A prime", "B")
    rng = np.random.default_rng(13)
    users = [uuid.uuid4() for _ in range(EXPERIMENTS)]
    same = dict(error=0.3, latency=1000, cost=0.01, score=0.6)
    for chunk in range(0, EXPERIMENTS, 50):
        sessions = []
        for user in users[chunk:chunk + 50]:
            sessions += simulate(rng, user, a, 60, **same) + simulate(rng, user, a2, 60, **same)
            sessions += simulate(rng, user, b, 60, error=0.65, latency=1800, cost=0.02, score=0.9)
        load_experiment(conn, sessions)
    conn.execute("ANALYZE")
    alarms = {m: 0 for m in METRICS}
    found = {m: 0 for m in METRICS}
    for user in users:
        rows = conn.execute("SELECT model_id, metric, verdict FROM sessiontag.compare_metrics(user_id => %s,"
                            " baseline_model_id => %s, feedback_name => 'score')", [user, a]).fetchall()
        for model, metric, verdict in rows:
            if model == a2 and verdict in ("better", "worse"):
                alarms[metric] += 1
            # B is worse on error rate, latency and cost, better on feedback.
            if model == b and verdict == ("better" if metric == "feedback" else "worse"):
                found[metric] += 1
    for metric in METRICS:
        assert 0.02 <= alarms[metric] / EXPERIMENTS <= 0.09, (metric, alarms)
        assert found[metric] / EXPERIMENTS >= 0.95, (metric, found)


# -- feedback ---------------------------------------------------------------------------
@pytest.fixture
def chat(conn):
    """A user with a tagged conversation holding one trace of two spans."""
    model, = models(conn, "GPT-4o")
    user = uuid.uuid4()
    with nullcontext(Client(conn)) as client:
        conv = client.create_conversation(user, model)
        for span in ("root", "llm"):
            client.record_trace(user, "trace-1", span, "chat", conversation_id=conv.id,
                                parent_span_id=None if span == "root" else "root")
    return dict(user=user, conv=conv.id, tag=conv.session_id, model=model)


def test_feedback_is_replaced_per_target_name_and_source_and_shows_in_summaries(conn, chat):
    with nullcontext(Client(conn)) as client:
        u, conv = chat["user"], chat["conv"]
        first = client.record_feedback(u, "thumbs", value=1, conversation_id=conv)
        again = client.record_feedback(u, "thumbs", value=0, conversation_id=conv, comment="changed my mind")
        judge = client.record_feedback(u, "thumbs", value=Decimal("0.5"), conversation_id=conv, source="judge")
        on_trace = client.record_feedback(u, "thumbs", value=1, trace_id="trace-1")
        on_span = client.record_feedback(u, "rating", value=4, trace_id="trace-1", span_id="llm", label="good")
        assert first == again and len({first, judge, on_trace, on_span}) == 4
        rows = client.list_feedback(user_id=u)
        assert len(rows) == 4 and all(r.conversation_id == conv and r.session_id == chat["tag"] for r in rows)
        session = client.session_summary(chat["tag"], u)[0]
        assert session.feedback_count == 4
        assert session.feedback == {"thumbs": {"count": 3, "mean": 0.5}, "rating": {"count": 1, "mean": 4}}
        listed = client.list_sessions(user_id=u)[0]
        assert listed.feedback == session.feedback
        assert client.delete_feedback(u, name="thumbs", trace_id="trace-1") == 1
        assert client.delete_feedback(u, id=judge) == 1 and client.delete_feedback(u, id=judge) == 0
        assert [r.value for r in client.list_feedback(user_id=u, name="thumbs")] == [0]
    # Deleting the conversation deletes its feedback (its spans stay).
    conn.execute("DELETE FROM sessiontag.conversations WHERE id = %s", [conv])
    assert one(conn, "SELECT count(*) FROM sessiontag.feedback")[0] == 0
    assert one(conn, "SELECT count(*) FROM sessiontag.llm_traces")[0] == 2


@pytest.mark.parametrize("kwargs, sqlstate, named", [
    (dict(name="thumbs", value=1), "22023", "conversation_id"),                     # no target
    (dict(name="thumbs", value=Decimal("NaN"), trace_id="trace-1"), "22023", "value"),
    (dict(name="thumbs", value=Decimal("Infinity"), trace_id="trace-1"), "22023", "value"),
    (dict(name="thumbs", trace_id="trace-1"), "22023", "value"),                      # neither value nor label
    (dict(name="thumbs", value=Decimal("1e400"), trace_id="trace-1"), "22003", "value"),  # past a double
    (dict(name="thumbs", value=Decimal("-1.8e308"), trace_id="trace-1"), "22003", "value"),
    (dict(name="thumbs", value=Decimal("1e-400"), trace_id="trace-1"), "22003", "value"),  # a double's 0
    (dict(name="thumbs", value=1, trace_id="no-such-trace"), "P0002", "trace_id"),
    (dict(name="thumbs", value=1, trace_id="trace-1", span_id="nope"), "P0002", "span_id"),
    (dict(name="thumbs", value=1, span_id="llm", conversation_id="CONV"), "22023", "span_id"),
    (dict(name="", value=1, conversation_id="CONV"), "22023", "name"),
    (dict(name="thumbs", value=1, conversation_id="CONV", source=""), "22023", "source"),
    (dict(name="thumbs", value=1, conversation_id="OTHER"), "P0002", "conversation_id"),  # another user's
    (dict(name="thumbs", value=1, trace_id="trace-1", conversation_id="OTHER"), "22023", "conversation_id"),
    (dict(name="x" * 201, value=1, conversation_id="CONV"), "22001", "name"),
])
def test_bad_feedback_gets_a_clear_error_and_stores_nothing(conn, chat, kwargs, sqlstate, named):
    with nullcontext(Client(conn)) as client:
        other = client.create_conversation(uuid.uuid4(), chat["model"]).id
        kwargs = {k: chat["conv"] if v == "CONV" else other if v == "OTHER" else v for k, v in kwargs.items()}
        with pytest.raises(Exception) as caught:
            client.record_feedback(chat["user"], **kwargs)
    assert caught.value.sqlstate == sqlstate, caught.value
    assert str(caught.value).startswith(named), caught.value
    assert one(conn, "SELECT count(*) FROM sessiontag.feedback")[0] == 0


def test_feedback_values_at_the_ends_of_a_double_keep_every_statistic_working(conn, dsn):
    """Values a double holds, however large or small, never make a summary or a comparison
    fail: a mean stays a double, a variance past it gives an infinite interval."""
    base, other = models(conn, "Base", "Other")
    user = uuid.uuid4()
    huge, tiny = Decimal("1.7976931348623157e308"), Decimal("4.9406564584124654e-324")
    sessions = [dict(user=user, model=model, error=False, latencies=[100.0], costs=[Decimal("0.01")], score=score)
                for model, scores in ((base, [huge, -huge] * 6), (other, [tiny, -tiny, tiny] * 4))
                for score in scores]
    load_experiment(conn, sessions)
    with nullcontext(Client(conn)) as client:
        conv = client.create_conversation(user, base)
        for name, value in (("big", huge), ("big2", huge), ("small", tiny)):
            client.record_feedback(user, name, value=value, conversation_id=conv.id)
            client.record_feedback(user, name, value=value, conversation_id=conv.id, source="judge")
        summary = client.session_summary(conv.session_id, user)[0]
        assert summary.feedback["big"]["count"] == 2 and float(summary.feedback["big"]["mean"]) == float(huge)
        assert summary.feedback["small"]["count"] == 2 and 0 <= float(summary.feedback["small"]["mean"]) <= float(tiny)
        assert len(client.list_sessions(user_id=user, page_size=100)) == len(sessions) + 1
        rows = by_metric(client.compare_metrics(baseline_model_id=base, feedback_name="score"))
    fb = rows[(base, "feedback")]
    assert fb.sessions == 12 and fb.value == 0 and (fb.low, fb.high) == (-math.inf, math.inf)
    fb = rows[(other, "feedback")]
    assert fb.sessions == 12 and abs(fb.value) <= float(tiny) and fb.low <= fb.value <= fb.high
    assert (fb.diff_low, fb.diff_high, fb.verdict) == (-math.inf, math.inf, "no clear difference")
    # The extremes of the helpers themselves: differences past a double, tiny variances.
    assert one(conn, "SELECT * FROM sessiontag._welch(%s, 1, 10, %s, 1, 10, 0.95)",
               float(huge), -float(huge)) == (math.inf, math.inf, math.inf)
    low, high = one(conn, "SELECT * FROM sessiontag._t_interval(1e-300, 5e-324, 10, 0.95)")
    assert low <= 1e-300 <= high
    assert one(conn, "SELECT * FROM sessiontag._welch(0, 1e-320, 10, 0, 1e-320, 12, 0.95)")[0] == 0
    # The CLI shows such intervals too.
    table = sessiontag_cli("--dsn", dsn, "compare", "--baseline", "base", "--feedback", "score")
    assert table.returncode == 0 and "Other" in table.stdout, table.stderr
    shown = sessiontag_cli("--dsn", dsn, "compare", "--baseline", "base", "--feedback", "score", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    shown = {(r["model_name"], r["metric"]): r for r in json.loads(shown.stdout)}
    assert len(shown) == 8 and (shown["Base", "feedback"]["low"], shown["Base", "feedback"]["high"]) == (
        "-Infinity", "Infinity")
    assert "[-∞, ∞]" in table.stdout, table.stdout
    # The table refuses what record_feedback refuses, even from its owner.
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO sessiontag.feedback (user_id, conversation_id, name, value)"
                     " VALUES (%s, %s, 'x', 1e400)", [user, conv.id])


@pytest.fixture
def user_role(pg_server, dsn):
    """A login role in sessiontag_user, and a connect(user_id) for it."""
    role = f"fb_user_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE sessiontag_user")
    try:
        yield lambda user_id: psycopg.connect(dsn.replace("user=postgres", f"user={role}"), autocommit=True,
                                              options=f"-c sessiontag.user_id={user_id}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_a_user_role_sees_and_writes_only_its_own_feedback(conn, chat, user_role):
    with nullcontext(Client(conn)) as client:
        bob = uuid.uuid4()
        bob_conv = client.create_conversation(bob, chat["model"]).id
        client.record_feedback(bob, "thumbs", value=0, conversation_id=bob_conv)
    with user_role(chat["user"]) as alice:
        with nullcontext(Client(alice)) as client:
            mine = client.record_feedback(chat["user"], "thumbs", value=1, conversation_id=chat["conv"])
            assert [r.id for r in client.list_feedback()] == [mine]
            assert [r[0] for r in alice.execute("SELECT id FROM sessiontag.feedback").fetchall()] == [mine]
            with pytest.raises(Exception) as caught:
                client.record_feedback(bob, "thumbs", value=1, conversation_id=bob_conv)
            assert caught.value.sqlstate == "42501"
            with pytest.raises(Exception) as caught:  # another user's conversation, under one's own id
                client.record_feedback(chat["user"], "thumbs", value=1, conversation_id=bob_conv)
            assert caught.value.sqlstate == "P0002"
            assert client.delete_feedback(chat["user"], name="thumbs", conversation_id=bob_conv) == 0
            with pytest.raises(Exception) as caught:
                client.delete_feedback(bob, name="thumbs", conversation_id=bob_conv)
            assert caught.value.sqlstate == "42501"
            metrics = client.compare_metrics(feedback_name="thumbs")
            assert {r.sessions for r in metrics if r.metric == "feedback"} == {1}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alice.execute("INSERT INTO sessiontag.feedback (user_id, conversation_id, name, value)"
                          " VALUES (%s, %s, 'thumbs', 1)", [chat["user"], chat["conv"]])
    assert one(conn, "SELECT count(*) FROM sessiontag.feedback")[0] == 2


# -- CLI --------------------------------------------------------------------------------
def test_cli_feedback_and_compare_with_a_baseline(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        base, other = models(conn, "GPT-4o", "Llama")
        user = uuid.uuid4()
        rng = np.random.default_rng(3)
        load_experiment(conn, simulate(rng, user, base, 30, error=0.1, latency=800, cost=0.01, score=0.9)
                        + simulate(rng, user, other, 30, error=0.1, latency=800, cost=0.001, score=0.3))
        tag = one(conn, "SELECT session_id FROM sessiontag.conversations WHERE llm_model_id = %s LIMIT 1", base)[0]
    added = sessiontag_cli("--dsn", dsn, "feedback", "add", "--user", str(user), "--session", tag,
                           "--name", "thumbs", "--value", "1", "--comment", "nice")
    assert added.returncode == 0 and added.stdout.startswith("feedback "), added.stderr
    listed = json.loads(sessiontag_cli("--dsn", dsn, "feedback", "list", "--session", tag, "--name", "thumbs",
                                       "--format", "json").stdout)
    assert [(r["name"], r["value"], r["comment"], r["session_id"]) for r in listed] == [("thumbs", "1", "nice", tag)]

    table = sessiontag_cli("--dsn", dsn, "compare", "--baseline", "gpt-4o", "--feedback", "score")
    assert table.returncode == 0, table.stderr
    assert "├" in table.stdout and "┤" in table.stdout and "●" in table.stdout
    assert "verdict: Llama vs GPT-4o: better on cost per session; worse on feedback score" in table.stdout
    rows = json.loads(sessiontag_cli("--dsn", dsn, "compare", "--baseline", "gpt-4o", "--feedback", "score",
                                     "--format", "json").stdout)
    assert len(rows) == 8 and set(rows[0]) == {"model_id", "model_name", "metric", "sessions", "value", "low", "high",
                                               "diff", "diff_low", "diff_high", "verdict"}
    llama = {r["metric"]: r for r in rows if r["model_name"] == "Llama"}
    assert llama["feedback"]["verdict"] == "worse" and llama["feedback"]["diff_high"] < 0
    csv_out = sessiontag_cli("--dsn", dsn, "compare", "--baseline", "gpt-4o", "--format", "csv").stdout.splitlines()
    assert csv_out[0] == "model_id,model_name,metric,sessions,value,low,high,diff,diff_low,diff_high,verdict"
    assert len(csv_out) == 7

    for args, expected in [
            (["feedback", "add", "--user", str(user), "--name", "thumbs", "--value", "1"], "say what the feedback"),
            (["feedback", "add", "--user", str(user), "--trace", "nope", "--name", "thumbs", "--value", "1"],
             "trace_id nope not found"),
            (["feedback", "add", "--user", str(user), "--session", tag, "--name", "t", "--value", "NaN"],
             "not a finite number"),
            (["feedback", "add", "--user", str(user), "--session", tag, "--name", "t", "--value", "1e400"],
             "value must fit a double precision"),
            (["compare", "--baseline", "no-such-model"], "no model with name, key or id"),
            (["compare", "--baseline", "gpt-4o", "--feedback", ""], "feedback_name must not be empty")]:
        assert expected in _one_line_error(sessiontag_cli("--dsn", dsn, *args)), args


# -- migration ----------------------------------------------------------------------------
def test_rolling_back_0012_keeps_feedback_and_applying_again_brings_it_back(empty_dsn):
    from sessiontag import migrate

    migrate.apply(empty_dsn, to="0012_ab_testing")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        model, = models(conn, "GPT-4o")
        user = uuid.uuid4()
        with nullcontext(Client(conn)) as client:
            conv = client.create_conversation(user, model).id
            kept = client.record_feedback(user, "thumbs", value=1, conversation_id=conv, comment="kept")
    assert migrate.rollback(empty_dsn, steps=1) == ["0012_ab_testing"]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert one(conn, "SELECT count(*) FROM sessiontag_archive.feedback")[0] == 1
    migrate.apply(empty_dsn, to="0012_ab_testing")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert one(conn, "SELECT id, comment FROM sessiontag.feedback") == (kept, "kept")
        assert one(conn, "SELECT to_regnamespace('sessiontag_archive')")[0] is None
