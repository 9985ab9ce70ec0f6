"""Typed rows returned by sessiontag.Client (field names are the SQL API's column names),
and the Span handle of Client.trace and Recorder.span."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Model:
    id: UUID
    owner_id: UUID | None
    name: str
    provider: str | None
    model_key: str
    tracked: bool
    created_at: datetime
    short_id: str


@dataclass(frozen=True)
class SessionTag:
    session_id: str
    experiment_name: str
    counter: int
    model_id: UUID
    model_name: str

    @property
    def badge(self) -> str:
        """'[GPT-4o #007]', as sessiontag.session_badge shows it."""
        return f"[{self.experiment_name} #{self.counter:03d}]"


@dataclass(frozen=True)
class Conversation:
    id: UUID
    user_id: UUID
    external_id: str | None
    title: str | None
    llm_model_id: UUID | None
    session_id: str | None
    experiment_name: str | None
    analytics_enabled: bool
    created_at: datetime
    session_counter: int | None


@dataclass
class Span:
    """A span being recorded by ``Client.trace`` or ``Recorder.span``: the block sets its
    outcome (usage, output, status), which is recorded when the block ends.

    ``id`` is the row id (``Client.trace`` only); None when the conversation has analytics
    tracking off, in which case nothing is recorded.
    """

    user_id: UUID | str
    trace_id: str
    span_id: str
    span_name: str
    conversation_id: UUID | str | None = None
    id: UUID | None = None
    status: str | None = None
    output_data: Any = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | float | None = None
    error_message: str | None = None

    def set_usage(self, input_tokens: int | None = None, output_tokens: int | None = None,
                  cost_usd: Decimal | float | None = None) -> None:
        """Token counts and cost of the call; arguments left as None keep their value."""
        if input_tokens is not None:
            self.input_tokens = input_tokens
        if output_tokens is not None:
            self.output_tokens = output_tokens
        if cost_usd is not None:
            self.cost_usd = cost_usd

    def set_output(self, output_data: Any) -> None:
        """What the call produced (any JSON value)."""
        self.output_data = output_data

    def set_status(self, status: str, error_message: str | None = None) -> None:
        """success, error or cancelled; by default success, or error when the block raises."""
        self.status = status
        if error_message is not None:
            self.error_message = error_message


@dataclass(frozen=True)
class _TraceColumns:
    """The columns of a span that list_traces and get_trace both return."""
    id: UUID
    user_id: UUID
    session_tag: str | None
    trace_id: str
    span_id: str
    parent_span_id: str | None
    conversation_id: UUID | None
    message_id: str | None
    span_name: str
    operation_type: str
    model_id: UUID | None
    model_name: str | None
    model_provider: str | None
    status: str
    start_time: datetime
    end_time: datetime | None
    duration_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: Decimal | None
    error_message: str | None
    input_data: Any
    output_data: Any
    metadata: Any
    created_at: datetime


@dataclass(frozen=True)
class TraceRow(_TraceColumns):
    """A span as list_traces returns it, with the list's cursor."""
    cursor: str


@dataclass(frozen=True)
class TraceSpan(_TraceColumns):
    """A span as get_trace returns it, with its depth in the tree (0 for roots)."""
    depth: int


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    badge: str
    user_id: UUID
    conversation_id: UUID
    model_id: UUID | None
    model_name: str | None
    counter: int | None
    trace_count: int
    error_count: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    p50_ms: float | None
    p95_ms: float | None
    first_at: datetime
    last_at: datetime
    cursor: str
    feedback_count: int = 0
    feedback: dict[str, Any] | None = None  # name -> {"count": rows, "mean": mean value or None}


@dataclass(frozen=True)
class ModelComparison:
    model_id: UUID
    model_name: str
    provider: str | None
    sessions: int
    traces: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    cost_per_session: Decimal


@dataclass(frozen=True)
class Feedback:
    """A feedback row as list_feedback returns it, with its session's tag and the cursor."""
    id: UUID
    user_id: UUID
    session_id: str | None
    conversation_id: UUID | None
    trace_id: str | None
    span_id: str | None
    name: str
    value: Decimal | None
    label: str | None
    comment: str | None
    source: str
    created_at: datetime
    updated_at: datetime
    cursor: str


@dataclass(frozen=True)
class MetricComparison:
    """One model and metric of compare_metrics: the value with its interval and, against
    the baseline, the difference model - baseline with its interval and the verdict."""
    model_id: UUID
    model_name: str
    metric: str
    sessions: int
    value: float | None
    low: float | None
    high: float | None
    diff: float | None
    diff_low: float | None
    diff_high: float | None
    verdict: str | None


@dataclass(frozen=True)
class Distribution:
    """One table as sessiontag.distribute() left it on Citus."""
    table_name: str
    distribution: str
    changed: bool
