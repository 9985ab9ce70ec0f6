"""Typed rows returned by sessiontag.Client; field names are the SQL API's column names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
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
