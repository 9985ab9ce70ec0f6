"""`sessiontag compare`: models compared session by session."""

from __future__ import annotations

import click

from .. import views
from ..output import columns_of
from ..types import ModelComparison
from .app import TIME, USER_ID, State, checked_page, cli, emit, format_option, pass_state, resolve_model

COMPARE_COLUMNS = ["model", "sessions", "traces", "errors", "p50", "p95", "tokens", "$/session"]


@cli.command("compare")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's sessions.")
@click.option("--model", "models_", multiple=True, help="Only these models (name, key or id; repeat the option).")
@click.option("--since", type=TIME, help="Sessions created at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Sessions created before (ISO time or age).")
@format_option
@pass_state
def compare_cmd(state: State, user_id, models_, since, until, fmt) -> None:
    """Compare models session by session, side by side."""
    with state.client() as client:
        model_ids = [resolve_model(client, m).id for m in models_] or None
        rows = checked_page(lambda: client.compare_models(user_id=user_id, model_ids=model_ids, since=since,
                                                          until=until), since, until)
    if fmt != "table":
        emit(rows, fmt, columns_of(ModelComparison))
        return
    emit([{"model": views.clip(r.model_name, 18), "sessions": r.sessions, "traces": r.traces,
           "errors": "-" if r.error_rate is None else f"{r.error_rate:.1%}", "p50": views.ms(r.p50_ms),
           "p95": views.ms(r.p95_ms), "tokens": views.count(r.input_tokens + r.output_tokens),
           "$/session": f"${r.cost_per_session:.4f}"} for r in rows], fmt, COMPARE_COLUMNS)
    if rows:
        click.echo()
        chart = [dict(model_name=r.model_name, p50=r.p50_ms, cost=float(r.cost_per_session),
                      errors=r.error_rate) for r in rows]
        for line in views.comparison_chart(chart, [
                ("p50", "p50 latency", views.ms),
                ("cost", "cost per session", lambda v: f"${v:.4f}"),
                ("errors", "error rate", lambda v: "-" if v is None else f"{v:.1%}")]):
            click.echo(line)
