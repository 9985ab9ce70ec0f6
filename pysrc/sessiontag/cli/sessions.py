"""`sessiontag sessions tracking|list|show`: tagged conversations."""

from __future__ import annotations

import click

from .. import views
from ..errors import SessiontagError
from ..output import columns_of
from ..types import SessionSummary
from .app import TIME, USER_ID, State, checked_page, cli, emit, format_option, page_hint, pass_state, resolve_model


@cli.group()
def sessions() -> None:
    """Tagged conversations."""


@sessions.command("tracking")
@click.argument("conversation", type=click.UUID)
@click.argument("state_word", metavar="on|off", type=click.Choice(["on", "off"]))
@click.option("--user", "user_id", type=USER_ID, help="Owner of the conversation, when its id is not unique.")
@pass_state
def sessions_tracking(state: State, conversation: str, state_word: str, user_id: str | None) -> None:
    """Record traces of CONVERSATION (on) or not (off)."""
    with state.client() as client:
        enabled = client.set_analytics_tracking(conversation, state_word == "on", user_id)
    click.echo(f"conversation {conversation}: analytics tracking {'on' if enabled else 'off'}")


SESSION_COLUMNS = ["session", "badge", "user", "traces", "errors", "cost"]


def _session_cells(s) -> dict:
    return {"session": s.session_id, "badge": views.clip_badge(s.badge, 22), "user": str(s.user_id)[:8],
            "traces": s.trace_count, "errors": s.error_count, "cost": f"${s.cost_usd:.4f}"}


@sessions.command("list")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's sessions.")
@click.option("--model", help="Only sessions of this model (name, key or id).")
@click.option("--since", type=TIME, help="Created at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Created before (ISO time or age).")
@click.option("--cursor", "after", help="Continue after this cursor (printed after a full page).")
@click.option("--limit", "page_size", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
@pass_state
def sessions_list(state: State, user_id, model, since, until, after, page_size, fmt) -> None:
    """List tagged sessions with their metrics, newest first."""
    with state.client() as client:
        model_id = resolve_model(client, model).id if model else None
        rows = checked_page(lambda: client.list_sessions(user_id=user_id, model_id=model_id, since=since,
                                                         until=until, after=after, page_size=page_size),
                            since, until)
    if fmt == "table":
        emit([_session_cells(s) for s in rows], fmt, SESSION_COLUMNS)
    else:
        emit(rows, fmt, columns_of(SessionSummary))
    page_hint(rows, page_size)


@sessions.command("show")
@click.argument("tag")
@click.option("--user", "user_id", type=USER_ID, help="The session's user (needed when several users hold this tag).")
@format_option
@pass_state
def sessions_show(state: State, tag: str, user_id: str | None, fmt: str) -> None:
    """Show a session: badge, full tag and metrics (one block per user holding TAG)."""
    with state.client() as client:
        summaries = client.session_summary(tag, user_id)
    if not summaries:
        raise SessiontagError(f"no session {tag}" + (f" for user {user_id}" if user_id else ""))
    if fmt != "table":
        emit(summaries, fmt)
        return
    for i, s in enumerate(summaries):
        pairs = [("badge", s.badge), ("session", s.session_id), ("user", s.user_id),
                 ("conversation", s.conversation_id), ("model", f"{s.model_name} ({s.model_id})" if s.model_id else "-"),
                 ("traces", s.trace_count), ("errors", s.error_count),
                 ("tokens", f"{s.input_tokens} in, {s.output_tokens} out"), ("cost", f"${s.cost_usd:.6f}"),
                 ("latency", f"p50 {views.ms(s.p50_ms)}, p95 {views.ms(s.p95_ms)}"),
                 ("first", views.local_time(s.first_at)), ("last", views.local_time(s.last_at))]
        width = max(len(k) for k, _ in pairs)
        if i:
            click.echo()
        for key, value in pairs:
            click.echo(f"{key:<{width}}  {value}")
