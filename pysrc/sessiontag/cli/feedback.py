"""`sessiontag feedback add|list`: scores and labels on sessions, traces and spans."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import click

from .. import views
from ..errors import SessiontagError
from ..output import columns_of
from ..types import Feedback
from .app import USER_ID, State, checked_page, cli, emit, format_option, page_hint, pass_state


@cli.group()
def feedback() -> None:
    """Scores and labels on sessions and traces."""


class NumberParam(click.ParamType):
    """A finite decimal number, kept exactly as written."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = value if isinstance(value, Decimal) else Decimal(value.strip())
        except InvalidOperation:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not number.is_finite():
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _conversation_of(client, tag: str, user_id) -> object:
    """The conversation of session TAG of the user."""
    found = client.session_summary(tag, user_id)
    if not found:
        raise SessiontagError(f"--session: no session {tag} for user {user_id}")
    return found[0].conversation_id


@feedback.command("add")
@click.option("--user", "user_id", type=USER_ID, required=True, help="The user the feedback is from (whole id).")
@click.option("--name", required=True, help="What is scored, e.g. thumbs, rating, judge_correctness.")
@click.option("--value", type=NumberParam(), help="The score: 1/0 for thumbs, 1-5 for a rating, 0-1 for a judge.")
@click.option("--label", help="A label instead of, or beside, the score.")
@click.option("--session", "tag", help="The session (its tag) the feedback is about.")
@click.option("--conversation", "conversation_id", type=click.UUID, help="The conversation (session) by id.")
@click.option("--trace", "trace_id", help="A trace of the user instead (the feedback counts for its session).")
@click.option("--span", "span_id", help="A span of --trace instead.")
@click.option("--comment", help="Free text kept with the feedback.")
@click.option("--source", default="user", show_default=True, help="Who gave it: user, judge, annotator, ...")
@pass_state
def feedback_add(state: State, user_id, name, value, label, tag, conversation_id, trace_id, span_id, comment,
                 source) -> None:
    """Record feedback on a session, trace or span; the same target, name and source again
    replaces it."""
    if tag and conversation_id:
        raise SessiontagError("give --session or --conversation, not both")
    if not (tag or conversation_id or trace_id):
        raise SessiontagError("say what the feedback is about: --session, --conversation or --trace")
    if value is None and label is None:
        raise SessiontagError("give --value, --label or both")
    with state.client() as client:
        if tag:
            conversation_id = _conversation_of(client, tag, user_id)
        feedback_id = client.record_feedback(user_id, name, value=value, label=label,
                                             conversation_id=conversation_id, trace_id=trace_id, span_id=span_id,
                                             comment=comment, source=source)
    click.echo(f"feedback {feedback_id}: {name} = {value if value is not None else label}")


LIST_COLUMNS = ["session", "user", "target", "name", "value", "label", "source", "updated"]


@feedback.command("list")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's feedback.")
@click.option("--session", "tag", help="Only feedback on this session (its tag; with --user when several users hold it).")
@click.option("--conversation", "conversation_id", type=click.UUID, help="Only feedback on this conversation.")
@click.option("--trace", "trace_id", help="Only feedback on this trace or its spans.")
@click.option("--name", help="Only feedback of this name.")
@click.option("--cursor", "after", help="Continue after this cursor (printed after a full page).")
@click.option("--limit", "page_size", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
@pass_state
def feedback_list(state: State, user_id, tag, conversation_id, trace_id, name, after, page_size, fmt) -> None:
    """List feedback, newest first."""
    with state.client() as client:
        rows = checked_page(lambda: client.list_feedback(user_id=user_id, conversation_id=conversation_id,
                                                         session_id=tag, trace_id=trace_id, name=name, after=after,
                                                         page_size=page_size), None, None)
    if fmt == "table":
        emit([{"session": r.session_id or "", "user": str(r.user_id)[:8],
               "target": (f"span {r.trace_id[:12]}/{r.span_id}" if r.span_id else
                          f"trace {r.trace_id[:12]}" if r.trace_id else "session"),
               "name": views.clip(r.name, 20), "value": "" if r.value is None else r.value,
               "label": views.clip(r.label, 16), "source": views.clip(r.source, 10),
               "updated": views.local_time(r.updated_at, "short")} for r in rows], fmt, LIST_COLUMNS)
    else:
        emit(rows, fmt, columns_of(Feedback))
    page_hint(rows, page_size)
