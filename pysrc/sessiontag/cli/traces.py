"""`sessiontag traces list|show`: search traces and show span trees."""

from __future__ import annotations

import click

from .. import views
from ..client import Client
from ..errors import SessiontagError
from ..output import as_dict, columns_of
from ..types import TraceRow
from .app import (TIME, USER_ID, State, _no_model, checked_page, cli, emit, find_models, format_option, page_hint,
                  pass_state)

TRACE_COLUMNS = ["when", "session", "trace", "span", "status", "ms"]


def find_trace(client: Client, trace_id: str, user_id) -> tuple:
    """(user_id, trace_id) of a trace given by id or by the start of its id (as `traces
    list` shows it), for one user or the only user that has it."""
    rows = client.list_traces(trace_id=trace_id, user_id=user_id, page_size=1000)
    if not rows:
        prefix = trace_id.rstrip("…").lower()
        if prefix:
            found = client.list_traces(search=prefix, user_id=user_id, page_size=1000)
            if len(found) == 1000:  # more spans match than one page: the newest could mislead
                raise SessiontagError(f"too many spans mention {prefix!r} to tell which trace it starts;"
                                      " give more of the trace id")
            rows = [r for r in found if r.trace_id.lower().startswith(prefix)]
    ids = sorted({r.trace_id for r in rows})
    if not ids:
        raise SessiontagError(f"no trace {trace_id}" + (f" for user {user_id}" if user_id else ""))
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise SessiontagError(f"{trace_id} starts {len(ids)} trace ids ({shown}); give more of it")
    users = {r.user_id for r in rows}
    if len(users) > 1:
        raise SessiontagError(f"trace {ids[0]} exists for {len(users)} users; give --user")
    return users.pop(), ids[0]


@cli.group()
def traces() -> None:
    """Search traces and show span trees."""


@traces.command("list")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's spans.")
@click.option("--tag", "session_tag", help="Only this session tag.")
@click.option("--conversation", "conversation_id", type=click.UUID, help="Only this conversation.")
@click.option("--trace", "trace_id", help="Only the spans of this trace.")
@click.option("--model", "model_name", help="Only spans of this model: a name spans carry, else a"
              " registered model's name, key or id.")
@click.option("--status", type=click.Choice(["running", "success", "error", "cancelled"]))
@click.option("--operation", "operation_type", help="Only this operation type (llm_call, chain, ...).")
@click.option("--since", type=TIME, help="Started at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Started before (ISO time or age).")
@click.option("--search", help="Literal, case-insensitive text in the tag, trace id, span or model name.")
@click.option("--roots", "roots_only", is_flag=True, help="Only root spans (one per trace).")
@click.option("--cursor", "after", help="Continue after this cursor (printed after a full page).")
@click.option("--limit", "page_size", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
@pass_state
def traces_list(state: State, fmt: str, page_size: int, **filters) -> None:
    """List spans, newest first."""
    with state.client() as client:
        def fetch():
            return checked_page(lambda: client.list_traces(page_size=page_size, **filters),
                                filters["since"], filters["until"])

        rows = fetch()
        if not rows and filters["model_name"] and not filters["after"]:
            # No span of the page carries that name: it may be a registered model's key or id.
            found = find_models(client, filters["model_name"])
            if found and found[0].name != filters["model_name"]:
                filters["model_name"] = found[0].name
                rows = fetch()
            elif not found and not client.list_traces(model_name=filters["model_name"], page_size=1):
                raise SessiontagError(_no_model(filters["model_name"], ", and no span carries that model name"))
    if fmt == "table":
        emit([{"when": views.local_time(r.start_time, with_date="short"), "session": r.session_tag or "-",
               "trace": views.clip(r.trace_id, 8), "span": views.clip(r.span_name, 14),
               "status": r.status, "ms": views.ms(r.duration_ms)} for r in rows], fmt, TRACE_COLUMNS)
    else:
        emit(rows, fmt, columns_of(TraceRow))
    users = {r.user_id for r in rows}
    if filters["session_tag"] and filters["user_id"] is None and len(users) > 1:
        click.echo(f"note: {len(users)} users hold tag {filters['session_tag']} (each user numbers their own "
                   "sessions); add --user to see one session", err=True)
    page_hint(rows, page_size, model_name=filters["model_name"])  # the name this page matched


@traces.command("show")
@click.argument("trace_id")
@click.option("--user", "user_id", type=USER_ID, help="The trace's user (needed when several users have this trace id).")
@format_option
@pass_state
def traces_show(state: State, trace_id: str, user_id: str | None, fmt: str) -> None:
    """Show every span of TRACE_ID (or of the one trace whose id starts so) as a tree."""
    with state.client() as client:
        user_id, trace_id = find_trace(client, trace_id, user_id)
        spans = client.get_trace(user_id, trace_id)
        tags = {s.session_tag for s in spans if s.session_tag}
        badge = client.session_badge(next(iter(tags)), spans[0].user_id) if len(tags) == 1 else None
    if fmt != "table":
        emit(spans, fmt)
        return
    root = spans[0]
    click.echo(f"trace {trace_id}")
    click.echo(f"user {root.user_id}")
    click.echo(f"session {', '.join(sorted(tags)) or '-'}" + (f"  {badge}" if badge else ""))
    click.echo(f"started {views.local_time(root.start_time)}")
    click.echo()
    for line in views.span_tree(as_dict(s) for s in spans):
        click.echo(line)
