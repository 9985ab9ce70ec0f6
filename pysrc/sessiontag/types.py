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
