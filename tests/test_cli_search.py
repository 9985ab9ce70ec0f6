"""The engineer's CLI over search and analytics: output parsed back, pagination, errors."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from sessiontag import Client
from sessiontag.output import render
from tests.test_migrations import _one_line_error, sessiontag_cli


@pytest.fixture
def demo_dsn(dsn):
    loaded = sessiontag_cli("--dsn", dsn, "demo", "--seed", "11", "--users", "3")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("loaded ")
    return dsn


def cli_json(dsn, *args):
    result = sessiontag_cli("--dsn", dsn, *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_demo_loads_a_realistic_workload(demo_dsn):
    with Client.connect(demo_dsn) as client:
        sessions = client.list_sessions(page_size=1000)
        models = {s.model_name for s in sessions}
        users = {s.user_id for s in sessions}
        spans = client.list_traces(page_size=1000)
    assert len(models) == 3 and len(users) == 3
    assert all(s.trace_count >= 2 for s in sessions), "conversations with several turns"
    assert {s.operation_type for s in spans} >= {"chain", "retrieval", "llm_call"}
    assert any(s.parent_span_id for s in spans) and any(s.status == "error" for s in spans)
    assert all(s.session_tag for s in spans), "every trace carries its session tag"
    with Client.connect(demo_dsn) as client:
        late = client.conn.execute(
            "SELECT count(*) FROM sessiontag.conversations c JOIN sessiontag.llm_traces t"
            " ON t.user_id = c.user_id AND t.conversation_id = c.id WHERE t.start_time < c.created_at").fetchone()[0]
    assert late == 0, "no conversation begins after its first turn"


def test_traces_list_json_and_csv_agree_and_filter_by_tag(demo_dsn):
    tag = cli_json(demo_dsn, "sessions", "list", "--limit", "1")[0]["session_id"]
    rows = cli_json(demo_dsn, "traces", "list", "--tag", tag, "--limit", "1000")
    assert rows and all(r["session_tag"] == tag for r in rows)
    result = sessiontag_cli("--dsn", demo_dsn, "traces", "list", "--tag", tag, "--limit", "1000", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in parsed] == [r["id"] for r in rows]
    assert parsed[0]["start_time"] == rows[0]["start_time"]


def test_traces_list_pages_with_cursor_cover_everything(demo_dsn):
    seen, cursor = [], None
    while True:
        args = ["traces", "list", "--limit", "40"] + (["--cursor", cursor] if cursor else [])
        result = sessiontag_cli("--dsn", demo_dsn, *args, "--format", "json")
        page = json.loads(result.stdout)
        seen += [r["id"] for r in page]
        if len(page) < 40:
            assert "more:" not in result.stderr
            break
        assert result.stderr.startswith("more: ")
        cursor = result.stderr.split("--cursor ")[1].strip()
    with Client.connect(demo_dsn) as client:
        total = client.conn.execute("SELECT count(*) FROM sessiontag.llm_traces").fetchone()[0]
    assert len(seen) == len(set(seen)) == total


def test_tables_fit_80_columns(demo_dsn):
    for args in (["traces", "list"], ["sessions", "list"], ["compare"]):
        result = sessiontag_cli("--dsn", demo_dsn, *args)
        assert result.returncode == 0, result.stderr
        widest = max(len(line) for line in result.stdout.splitlines())
        assert widest <= 80, (args, widest)


def test_traces_show_draws_the_span_tree(demo_dsn):
    root = cli_json(demo_dsn, "traces", "list", "--roots", "--limit", "1")[0]
    result = sessiontag_cli("--dsn", demo_dsn, "traces", "show", root["trace_id"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"trace {root['trace_id']}" and lines[1] == f"user {root['user_id']}"
    assert root["session_tag"] in lines[2]
    assert max(len(line) for line in lines) <= 80
    tree = lines[lines.index("") + 1:]
    assert tree[0].startswith("chat turn (chain)") and tree[-1].lstrip("│ ").startswith("└─ ")
    spans = cli_json(demo_dsn, "traces", "show", root["trace_id"])
    assert spans[0]["depth"] == 0 and {s["depth"] for s in spans[1:]} >= {1}
    assert len(tree) >= len(spans)


def test_sessions_list_show_and_compare(demo_dsn):
    sessions = cli_json(demo_dsn, "sessions", "list", "--limit", "1000")
    s = sessions[0]
    assert s["badge"].startswith("[") and s["trace_count"] >= 2
    shown = cli_json(demo_dsn, "sessions", "show", s["session_id"], "--user", s["user_id"])
    assert shown == [s]
    table = sessiontag_cli("--dsn", demo_dsn, "sessions", "show", s["session_id"], "--user", s["user_id"]).stdout
    assert s["badge"] in table and s["session_id"] in table
    compared = cli_json(demo_dsn, "compare")
    assert {c["model_name"] for c in compared} == {"GPT-4o", "Claude 3.5 Sonnet", "Llama 3.1 70B"}
    assert sum(c["sessions"] for c in compared) == len(sessions)
    chart = sessiontag_cli("--dsn", demo_dsn, "compare", "--model", "gpt-4o", "--model", "llama-3.1-70b").stdout
    assert "█" in chart and "Claude" not in chart and "p50 latency" in chart
    by_model = cli_json(demo_dsn, "sessions", "list", "--model", "gpt-4o", "--limit", "1000")
    assert by_model and all(r["model_name"] == "GPT-4o" for r in by_model)


@pytest.mark.parametrize("args, expected", [
    (["traces", "list", "--since", "yesterday"], "neither an ISO 8601 time"),
    (["traces", "list", "--cursor", "nonsense"], "--cursor: not a cursor printed by this command"),
    (["sessions", "list", "--cursor", "nonsense"], "--cursor: not a cursor printed by this command"),
    (["traces", "list", "--since", "7d", "--until", "30d"], "--since"),
    (["traces", "list", "--since", "99999999d"], "reaches before year 1"),
    (["traces", "show", "no-such-trace"], "no trace no-such-trace"),
    (["sessions", "show", "no-such-tag"], "no session no-such-tag"),
    (["sessions", "list", "--model", "no-such-model"], "no model with name, key or id 'no-such-model'"),
    (["traces", "list", "--model", "no-such-model"], "no model with name, key or id 'no-such-model', and no span"),
    (["compare", "--model", "no-such-model"], "no model with name, key or id 'no-such-model'"),
    (["models", "untrack", "no-such-model"], "no model with name, key or id 'no-such-model'"),
    (["sessions", "list", "--user", "c12de568"], "'c12de568' is not a valid UUID: give the whole user id"),
    (["traces", "list", "--user", "not-a-uuid"], "'--user': 'not-a-uuid' is not a valid UUID"),
    (["sessions", "tracking", "not-a-uuid", "off"], "is not a valid UUID"),
    (["traces", "list", "--limit", "0"], "--limit"),
    (["traces", "list", "--search", ""], "--search: must not be empty"),
    (["compare", "--since", "2026-12-01", "--until", "2026-11-01"], "--since (2026-12-01"),
    (["models", "add", "X", "--owner", "bad"], "'--owner': 'bad' is not a valid UUID"),
    (["models", "add", "X", "--id", "bad"], "'--id': 'bad' is not a valid UUID"),
    (["models", "track", "gpt-4o", "--owner", "bad"], "'--owner': 'bad' is not a valid UUID"),
])
def test_cli_search_errors_are_one_line(dsn, args, expected):
    assert expected in _one_line_error(sessiontag_cli("--dsn", dsn, *args))


def test_next_page_hint_repeats_the_filters(demo_dsn):
    tag = cli_json(demo_dsn, "sessions", "list", "--limit", "1")[0]["session_id"]
    first = sessiontag_cli("--dsn", demo_dsn, "traces", "list", "--tag", tag, "--limit", "2")
    hint = first.stderr.strip().splitlines()[-1]
    assert hint.startswith(f"more: sessiontag --dsn {shlex.quote(demo_dsn)} traces list --tag {tag} --limit 2 "
                           "--cursor "), hint
    from_environment = sessiontag_cli("traces", "list", "--tag", tag, "--limit", "2", env={"DATABASE_URL": demo_dsn})
    assert from_environment.stderr.startswith(f"more: sessiontag traces list --tag {tag} --limit 2 --cursor ")
    with_password = f"{demo_dsn} password=not-printed"  # the test cluster trusts local connections
    hint = sessiontag_cli("--dsn", with_password, "traces", "list", "--tag", tag, "--limit", "2").stderr
    assert "not-printed" not in hint and follow(hint).returncode == 0, hint


def follow(hint: str) -> subprocess.CompletedProcess:
    """Runs the command a `more:` hint prints."""
    words = shlex.split(hint.strip().splitlines()[-1])
    assert words[:2] == ["more:", "sessiontag"], hint
    return sessiontag_cli(*words[2:])


def test_next_page_keeps_the_time_window_of_the_first(demo_dsn):
    first = sessiontag_cli("--dsn", demo_dsn, "sessions", "list", "--since", "3d", "--limit", "2", "--format", "json")
    assert "more:" in first.stderr, first.stderr
    since = shlex.split(first.stderr)[shlex.split(first.stderr).index("--since") + 1]
    assert abs(datetime.fromisoformat(since) - (datetime.now(timezone.utc) - timedelta(days=3))) < timedelta(minutes=1)
    pages = json.loads(first.stdout)
    while "more:" in first.stderr:
        first = follow(first.stderr)
        pages += json.loads(first.stdout)
    assert [s["session_id"] for s in pages] == [s["session_id"] for s in cli_json(
        demo_dsn, "sessions", "list", "--since", since, "--limit", "1000")]


def test_model_is_a_name_key_or_id_everywhere(demo_dsn):
    with Client.connect(demo_dsn) as client:
        llama = next(m for m in client.list_models() if m.model_key == "llama-3.1-70b")
    for given in ("Llama 3.1 70B", "llama-3.1-70b", str(llama.id)):
        sessions = cli_json(demo_dsn, "sessions", "list", "--model", given, "--limit", "1000")
        assert sessions and {s["model_name"] for s in sessions} == {"Llama 3.1 70B"}, given
        compared = cli_json(demo_dsn, "compare", "--model", given)
        assert [c["model_name"] for c in compared] == ["Llama 3.1 70B"], given
    untracked = sessiontag_cli("--dsn", demo_dsn, "models", "untrack", "Llama 3.1 70B")
    assert untracked.stdout.strip() == f"model Llama 3.1 70B (llama-3.1-70b, {llama.id}): not tracked", untracked.stderr
    tracked = sessiontag_cli("--dsn", demo_dsn, "models", "track", str(llama.id))
    assert tracked.stdout.strip() == f"model Llama 3.1 70B (llama-3.1-70b, {llama.id}): tracked", tracked.stderr


def test_next_page_of_a_model_given_by_key_matches_the_same_spans(demo_dsn):
    first = sessiontag_cli("--dsn", demo_dsn, "traces", "list", "--model", "gpt-4o", "--limit", "3", "--format", "json")
    assert "--model GPT-4o" in first.stderr, "the name the first page matched"
    second = follow(first.stderr)
    rows = json.loads(second.stdout)
    assert rows and all(r["model_name"] == "GPT-4o" for r in rows), second.stderr


def test_an_empty_page_in_csv_still_has_its_header(demo_dsn):
    for args, first_column in ((["traces", "list"], "id"), (["sessions", "list"], "session_id"),
                               (["compare"], "model_id")):
        result = sessiontag_cli("--dsn", demo_dsn, *args, "--since", "2999-01-01", "--format", "csv")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0].startswith(f"{first_column},"), (args, result.stdout)


def test_json_and_csv_leave_out_the_noise_of_binary_floats():
    rows = [{"p50_ms": 1510.7930000000001, "error_rate": 0.1 + 0.2, "cost_usd": Decimal("0.10000000")}]
    assert json.loads(render(rows, "json")) == [{"p50_ms": 1510.793, "error_rate": 0.3, "cost_usd": "0.10000000"}]
    assert render(rows, "csv").splitlines()[1] == "1510.793,0.3,0.10000000"


def test_demo_suggests_a_session_it_loaded(dsn):
    with Client.connect(dsn) as client:  # a newer session than any of the demo's, which date back
        model = client.register_model("Other", model_key="other")
        other = client.create_conversation(uuid.uuid4(), model)
    loaded = sessiontag_cli("--dsn", dsn, "demo", "--seed", "5", "--users", "1")
    words = loaded.stdout.split()
    tag, user = words[words.index("--tag") + 1], words[words.index("--user") + 1]
    assert user != str(other.user_id)
    assert cli_json(dsn, "sessions", "show", tag, "--user", user)[0]["model_name"] != "Other"


def test_adding_a_model_under_a_taken_key_says_it_changed_nothing(dsn):
    first = sessiontag_cli("--dsn", dsn, "models", "add", "GPT-4o", "--key", "gpt-4o", "--provider", "openai")
    assert first.returncode == 0 and first.stderr == ""
    again = sessiontag_cli("--dsn", dsn, "models", "add", "GPT-5", "--key", "gpt-4o", "--provider", "other",
                           "--format", "json")
    assert again.returncode == 0
    assert again.stderr.startswith("note: model key gpt-4o is already registered (as 'GPT-4o', provider openai")
    assert again.stderr.strip().endswith("its name, provider and id were not changed")
    assert [(m["name"], m["provider"]) for m in json.loads(again.stdout)] == [("GPT-4o", "openai")]
    same = sessiontag_cli("--dsn", dsn, "models", "add", "GPT-4o", "--key", "gpt-4o")
    assert same.returncode == 0 and same.stderr == ""


def test_an_unmigrated_database_says_to_migrate(empty_dsn):
    message = _one_line_error(sessiontag_cli("--dsn", empty_dsn, "sessions", "list"))
    assert "run 'sessiontag migrate'" in message


def test_no_command_prints_the_help(dsn):
    for args in ([], ["sessions"], ["traces"]):
        result = sessiontag_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("Usage: sessiontag") and "Commands:" in result.stderr.splitlines()
    listing = sessiontag_cli("--help").stdout
    assert "..." not in listing.split("Commands:")[1], "command summaries are not cut"


def test_sessions_list_shows_badges(demo_dsn):
    sessions = cli_json(demo_dsn, "sessions", "list", "--limit", "5")
    table = sessiontag_cli("--dsn", demo_dsn, "sessions", "list", "--limit", "5").stdout
    assert table.splitlines()[0].split()[:3] == ["session", "badge", "user"]
    lines = table.splitlines()
    for s in sessions:
        line = next(line for line in lines if line.startswith(s["session_id"]) and s["user_id"][:8] in line)
        name, number = s["badge"][1:-1].rsplit(" #", 1)
        assert f"[{name[:10]}" in line and f" #{number}]" in line, (s["badge"], line)
    assert any(len(s["badge"]) > 22 for s in cli_json(demo_dsn, "sessions", "list", "--limit", "1000")), \
        "the demo has a badge too long for the column (Claude 3.5 Sonnet)"


def test_csv_writes_json_columns_as_json(demo_dsn):
    rows = cli_json(demo_dsn, "traces", "list", "--limit", "20")
    result = sessiontag_cli("--dsn", demo_dsn, "traces", "list", "--limit", "20", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    for row, expected in zip(parsed, rows):
        for column in ("input_data", "output_data", "metadata"):
            assert (json.loads(row[column]) if row[column] else None) == expected[column]


def test_traces_show_takes_the_id_as_traces_list_shows_it(demo_dsn):
    table = sessiontag_cli("--dsn", demo_dsn, "traces", "list", "--roots", "--limit", "1").stdout
    shown = table.splitlines()[2].split()[3]  # when (2 words), session, trace
    assert shown.endswith("…")
    root = cli_json(demo_dsn, "traces", "list", "--roots", "--limit", "1")[0]
    assert root["trace_id"].startswith(shown.rstrip("…"))
    for given in (shown, shown.rstrip("…"), root["trace_id"]):
        result = sessiontag_cli("--dsn", demo_dsn, "traces", "show", given)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"trace {root['trace_id']}"
    # a prefix that starts two of the demo's (random) trace ids: the longest such, so that few
    # spans mention it and the lookup sees them all
    ids = sorted({r["trace_id"] for r in cli_json(demo_dsn, "traces", "list", "--roots", "--limit", "1000")})
    shared = max((os.path.commonprefix(pair) for pair in zip(ids, ids[1:])), key=len)
    assert shared, "the demo has two trace ids with the same first character"
    error = _one_line_error(sessiontag_cli("--dsn", demo_dsn, "traces", "show", shared))
    starting = sum(i.startswith(shared) for i in ids)
    assert error.startswith(f"error: {shared} starts {starting} trace ids (") and error.endswith("give more of it"), error


def test_traces_list_model_takes_a_name_key_or_id(demo_dsn):
    with Client.connect(demo_dsn) as client:
        model = next(m for m in client.list_models() if m.model_key == "gpt-4o")
    by = {}
    for given in ("GPT-4o", "gpt-4o", str(model.id)):
        by[given] = [r["id"] for r in cli_json(demo_dsn, "traces", "list", "--model", given, "--limit", "1000")]
    assert by["GPT-4o"] and by["GPT-4o"] == by["gpt-4o"] == by[str(model.id)]


def test_traces_list_model_prefers_the_name_spans_carry(demo_dsn):
    """Spans keep the model_name their caller gave (here the key): that name matches first."""
    with Client.connect(demo_dsn) as client:
        model = next(m for m in client.list_models() if m.model_key == "gpt-4o")
        client.record_trace(uuid.uuid4(), "keyed-trace", "s1", "chat", model_id=model.id, model_name="gpt-4o")
    rows = cli_json(demo_dsn, "traces", "list", "--model", "gpt-4o", "--limit", "1000")
    assert [r["trace_id"] for r in rows] == ["keyed-trace"]


def test_traces_show_refuses_a_prefix_too_common_to_resolve(dsn):
    user = uuid.uuid4()
    spans = [{"user_id": str(user), "trace_id": f"abcdef0{i:04d}", "span_id": "s", "span_name": "chat"}
             for i in range(1001)]
    with Client.connect(dsn) as client:
        assert client.ingest(spans) == 1001
    error = _one_line_error(sessiontag_cli("--dsn", dsn, "traces", "show", "abcdef0"))
    assert "too many spans mention 'abcdef0'" in error
    shown = sessiontag_cli("--dsn", dsn, "traces", "show", "abcdef00007")
    assert shown.returncode == 0 and shown.stdout.startswith("trace abcdef00007\n"), shown.stderr
