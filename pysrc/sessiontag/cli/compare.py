"""`sessiontag compare`: models compared session by session; with --baseline, each metric
with its confidence interval, the difference from the baseline and a verdict."""

from __future__ import annotations

import math
from decimal import Decimal

import click

from .. import views
from ..output import columns_of
from ..types import MetricComparison, ModelComparison
from .app import TIME, USER_ID, State, checked_page, cli, emit, format_option, pass_state, resolve_model

COMPARE_COLUMNS = ["model", "sessions", "traces", "errors", "p50", "p95", "tokens", "$/session"]

# How each metric of compare_metrics is named and printed: label, value format, and the
# format of a difference (signed).
METRICS = {
    "error_rate": ("error rate: share of sessions with an error (lower is better)",
                   lambda v: f"{v:.1%}", lambda v: f"{v:+.1%}"),
    "latency_ms": ("latency: median over sessions of each session's median LLM call (lower is better)",
                   views.ms, lambda v: ("+" if v >= 0 else "-") + views.ms(abs(v))),
    "cost_per_session": ("cost per session: mean (lower is better)",
                         lambda v: f"${v:.4f}", lambda v: f"{'+' if v >= 0 else '-'}${abs(v):.4f}"),
    "feedback": ("feedback {name}: mean over the sessions that have one (higher is better)",
                 lambda v: f"{v:.2f}", lambda v: f"{v:+.2f}"),
}


@cli.command("compare")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's sessions.")
@click.option("--model", "models_", multiple=True, help="Only these models (name, key or id; repeat the option).")
@click.option("--since", type=TIME, help="Sessions created at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Sessions created before (ISO time or age).")
@click.option("--baseline", help="Compare every model with this one (name, key or id): intervals, "
                                 "differences and verdicts.")
@click.option("--feedback", "feedback_name", help="Also compare the mean of this feedback (e.g. thumbs).")
@click.option("--confidence", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True,
              help="Confidence level of the intervals (with --baseline or --feedback).")
@format_option
@pass_state
def compare_cmd(state: State, user_id, models_, since, until, baseline, feedback_name, confidence, fmt) -> None:
    """Compare models session by session, side by side.

    With --baseline (or --feedback), each metric comes with its confidence interval, drawn
    as an error bar, and each model's difference from the baseline with a verdict: better,
    worse, no clear difference, or too few sessions."""
    with state.client() as client:
        model_ids = [resolve_model(client, m).id for m in models_] or None
        if baseline or feedback_name:
            baseline_model = resolve_model(client, baseline) if baseline else None
            rows = checked_page(lambda: client.compare_metrics(
                user_id=user_id, model_ids=model_ids, since=since, until=until,
                baseline_model_id=baseline_model.id if baseline_model else None, feedback_name=feedback_name,
                confidence=Decimal(str(confidence))), since, until)
            _show_metrics(rows, fmt, baseline_model.id if baseline_model else None, feedback_name, confidence)
            return
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


def _interval(fmt, low, high) -> str:
    return (f"[{'-∞' if low is None or low == -math.inf else fmt(low)}, "
            f"{'∞' if high is None or high == math.inf else fmt(high)}]")


def _show_metrics(rows: list[MetricComparison], fmt: str, baseline_id, feedback_name, confidence: float) -> None:
    """One block per metric: a line per model with value, interval and error bar (on a
    scale shared by the block), then the difference from the baseline and the verdict;
    last, each model's verdicts in one sentence."""
    if fmt != "table":
        emit(rows, fmt, columns_of(MetricComparison))
        return
    if not rows:
        click.echo("(no rows)")
        return
    name_width = min(max(len(r.model_name) for r in rows) + (11 if baseline_id else 0), 30)
    level = f"{confidence:.0%}" if round(confidence * 100) == confidence * 100 else f"{confidence:.1%}"
    click.echo(f"{level} confidence intervals; one session counts once"
               + (" (at least 10 sessions per model for a verdict)" if baseline_id else ""))
    for metric, (label, show, signed) in METRICS.items():
        block = [r for r in rows if r.metric == metric]
        if not block:
            continue
        click.echo()
        click.echo(label.format(name=feedback_name))
        ends = [x for r in block for x in (r.low, r.high, r.value) if x is not None and math.isfinite(x)]
        start, end = (min(ends), max(ends)) if ends else (0.0, 0.0)
        for r in block:
            name = r.model_name + (" (baseline)" if r.model_id == baseline_id else "")
            value = "-" if r.value is None else show(r.value)
            interval = "" if r.value is None else _interval(show, r.low, r.high)
            line = (f"  {views.clip(name, name_width):<{name_width}}  n={r.sessions:<5} {value:>8} {interval:<22} "
                    f"{views.error_bar(r.value, r.low, r.high, start, end)}")
            if r.verdict is not None:
                delta = "" if r.diff is None else f"Δ {signed(r.diff)} {_interval(signed, r.diff_low, r.diff_high)}  "
                line += f"  {delta}{r.verdict}"
            click.echo(line.rstrip())
    if baseline_id is not None:
        click.echo()
        for line in verdict_lines(rows, baseline_id, feedback_name):
            click.echo(line)


def verdict_lines(rows: list[MetricComparison], baseline_id, feedback_name) -> list[str]:
    """'Model vs Baseline: better on feedback, worse on cost per session; no clear difference
    on error rate, latency.' for each model compared with the baseline."""
    base = next((r.model_name for r in rows if r.model_id == baseline_id), "the baseline")
    names = {"error_rate": "error rate", "latency_ms": "latency", "cost_per_session": "cost per session",
             "feedback": f"feedback {feedback_name}"}
    lines = []
    for model_id in dict.fromkeys(r.model_id for r in rows if r.verdict is not None):
        mine = [r for r in rows if r.model_id == model_id]
        parts = []
        for verdict in ("better", "worse", "no clear difference", "too few sessions"):
            metrics = [names[r.metric] for r in mine if r.verdict == verdict]
            if metrics:
                parts.append(f"{verdict} {'for' if verdict == 'too few sessions' else 'on'} {', '.join(metrics)}")
        lines.append(f"verdict: {mine[0].model_name} vs {base}: {'; '.join(parts)}")
    return lines
