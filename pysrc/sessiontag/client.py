"""sessiontag.Client: one method per SQL function of schema sessiontag.

The client holds no SQL logic of its own: each method calls the function of the same
name with named arguments and turns the result into typed rows. Arguments left as None
fall back to the function's own defaults.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from contextlib import contextmanager
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Iterator, Mapping
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from .connection import connect, resolve_dsn
from .errors import DatabaseError
from .types import (Conversation, Distribution, Feedback, MetricComparison, Model, ModelComparison, SessionSummary,
                    SessionTag, Span, TraceRow, TraceSpan)


# -- spans: ids, JSON and outcomes, shared with sessiontag.recorder --------------------
def new_trace_id() -> str:
    """A random OpenTelemetry-style trace id (32 hex digits)."""
    return uuid.uuid4().hex


def new_span_id() -> str:
    """A random OpenTelemetry-style span id (16 hex digits)."""
    return secrets.token_hex(8)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)  # a JSON string keeps every digit of a Decimal; PostgreSQL reads it back
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> str:
    """JSON text of a span or a value, with UUIDs, datetimes and Decimals as strings."""
    return json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=False)


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value, dumps=dumps)


def _numeric(value: Decimal | float | int | None) -> Decimal | None:
    """A cost as numeric: a float would be sent as double precision, which no numeric
    parameter takes implicitly."""
    return None if value is None else value if isinstance(value, Decimal) else Decimal(str(value))


# How a span time given as text must begin (ingest_traces' rule, _iso_time_pattern() in
# sql/40_traces.sql): an ISO 8601 date, so no PostgreSQL word ('now', 'epoch', ...) and no
# form whose meaning depends on DateStyle.
_ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# PostgreSQL's context of an error in COPY data: "COPY sessiontag_spans, line 3, column x: ..."
_COPY_CONTEXT = re.compile(r"COPY sessiontag_spans, line (\d+)(?:, column (\w+))?")


def _staging_row(row: int, span: Mapping[str, Any], columns: dict[str, str]) -> list:
    """A span as a staging row. What COPY would silently change is refused here, as
    ingest_traces refuses it: a key that is no column, text given as another type, a time
    not in ISO 8601. The rest is judged by the database."""
    def problem(field: str, what: str) -> DatabaseError:
        return DatabaseError(f"row {row}: {field + ': ' if field else ''}{what} (SQLSTATE 22023)", "22023")

    if not isinstance(span, Mapping):
        raise problem("", f"must be a mapping, got {type(span).__name__}")
    unknown = sorted(k for k in span if k not in columns)
    if unknown:
        raise problem(unknown[0], "is derived from start_time and end_time and cannot be given"
                      if unknown[0] == "duration_ms" else "is not a span field (the fields are record_trace's parameters)")
    values = []
    for name, kind in columns.items():
        value = span.get(name)
        if value is None:
            pass
        elif kind == "text" and not isinstance(value, str):
            raise problem(name, f"must be a string, got {type(value).__name__} {value!r}")
        elif kind == "jsonb" and not isinstance(value, Jsonb):
            try:
                value = Jsonb(dumps(value), dumps=str)
            except (TypeError, ValueError) as exc:
                raise problem(name, f"cannot be stored as JSON: {exc}") from None
        elif kind.startswith("timestamp") and isinstance(value, str) and not _ISO_TIME.match(value):
            raise DatabaseError(f'row {row}: {name}: must be an ISO 8601 time, got "{value}" (SQLSTATE 22007)', "22007")
        elif kind == "numeric" and isinstance(value, float):
            value = _numeric(value)
        values.append(value)
    return values


def _copy_error(exc: psycopg.Error) -> DatabaseError:
    """A COPY path error; bad COPY data is named like the staged rows are ('row 3: x: ...')."""
    error = DatabaseError.from_psycopg(exc)
    context = _COPY_CONTEXT.search(getattr(exc.diag, "context", None) or "")
    if context and not str(error).startswith("row "):
        where = f"row {context.group(1)}: " + (f"{context.group(2)}: " if context.group(2) else "")
        error = DatabaseError(where + str(error), error.sqlstate)
    return error


def outcome(span: Span, exc: BaseException | None) -> tuple[str, str | None]:
    """The status and error message a span ends with: what the block set, else success, or
    error (cancelled for an interruption) with the exception when the block raised."""
    if exc is None:
        return span.status or "success", span.error_message
    interrupted = isinstance(exc, (KeyboardInterrupt, GeneratorExit, asyncio.CancelledError))
    status = span.status if span.status not in (None, "success") else ("cancelled" if interrupted else "error")
    return status, span.error_message or (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class Client:
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    @classmethod
    def connect(cls, dsn: str | None = None) -> "Client":
        """Connect with --dsn semantics: dsn, else DATABASE_URL, else the local server."""
        return cls(connect(resolve_dsn(dsn), autocommit=True))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------
    def _call(self, function: str, args: dict[str, Any], *, row_type=None, table: bool = False,
              required: tuple[str, ...] = ()) -> list:
        """SELECT sessiontag.function(name => value, ...); None values use the defaults,
        except for the required arguments, which are always passed."""
        passed = {k: v for k, v in args.items() if v is not None or k in required}
        named = sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in passed
        )
        call = sql.SQL("sessiontag.{}({})").format(sql.Identifier(function), named)
        query = sql.SQL("SELECT * FROM {}" if table else "SELECT {}").format(call)
        try:
            with self.conn.cursor(row_factory=class_row(row_type) if row_type else psycopg.rows.tuple_row) as cur:
                cur.execute(query, passed)
                return cur.fetchall()
        except psycopg.Error as exc:
            raise DatabaseError.from_psycopg(exc) from None

    def _scalar(self, function: str, args: dict[str, Any], required: tuple[str, ...] = ()):
        return self._call(function, args, required=required)[0][0]

    # -- models ---------------------------------------------------------------------
    def register_model(self, name: str, provider: str | None = None, model_key: str | None = None,
                       owner_id: UUID | str | None = None, id: UUID | str | None = None) -> UUID:
        return self._scalar("register_model", dict(name=name, provider=provider, model_key=model_key,
                                                   owner_id=owner_id, id=id), required=("name",))

    def model_id(self, model_key: str, owner_id: UUID | str | None = None) -> UUID | None:
        return self._scalar("model_id", dict(model_key=model_key, owner_id=owner_id), required=("model_key",))

    def set_model_tracking(self, model_id: UUID | str, tracked: bool) -> bool:
        return self._scalar("set_model_tracking", dict(model_id=model_id, tracked=tracked),
                            required=("model_id", "tracked"))

    def list_models(self, owner_id: UUID | str | None = None) -> list[Model]:
        return self._call("list_models", dict(owner_id=owner_id), row_type=Model, table=True)

    # -- tags and conversations -----------------------------------------------------
    def generate_session_tag(self, user_id: UUID | str | None, model_id: UUID | str | None) -> SessionTag | None:
        rows = self._call("generate_session_tag", dict(user_id=user_id, model_id=model_id), row_type=SessionTag,
                          table=True, required=("user_id", "model_id"))
        return rows[0] if rows and rows[0].session_id is not None else None

    def generate_session_tags(self, user_id: UUID | str, model_id: UUID | str, n: int) -> list[SessionTag]:
        return self._call("generate_session_tags", dict(user_id=user_id, model_id=model_id, n=n), row_type=SessionTag,
                          table=True, required=("user_id", "model_id", "n"))

    def create_conversation(self, user_id: UUID | str, model_id: UUID | str | None = None, title: str | None = None,
                            id: UUID | str | None = None, analytics_enabled: bool | None = None,
                            external_id: str | None = None, session_id: str | None = None) -> Conversation:
        return self._call("create_conversation", dict(user_id=user_id, model_id=model_id, title=title, id=id,
                                                      analytics_enabled=analytics_enabled, external_id=external_id,
                                                      session_id=session_id),
                          row_type=Conversation, table=True, required=("user_id",))[0]

    def ensure_session_tag(self, conversation_id: UUID | str, model_id: UUID | str | None = None,
                           user_id: UUID | str | None = None) -> str | None:
        return self._scalar("ensure_session_tag", dict(conversation_id=conversation_id, model_id=model_id,
                                                       user_id=user_id), required=("conversation_id",))

    def session_badge(self, session_id: str, user_id: UUID | str | None = None) -> str | None:
        return self._scalar("session_badge", dict(session_id=session_id, user_id=user_id), required=("session_id",))

    def count_untagged_conversations(self, user_id: UUID | str | None = None,
                                     model_id: UUID | str | None = None) -> int:
        """How many untagged conversations of tracked models the backfill has left."""
        return self._scalar("count_untagged_conversations", dict(user_id=user_id, model_id=model_id))

    def tag_untagged_conversations(self, user_id: UUID | str | None = None, model_id: UUID | str | None = None,
                                   batch_size: int | None = None) -> int:
        """Numbers one batch of untagged conversations of tracked models; returns how many
        (0: none left). Commit after each call: a batch is one transaction."""
        return self._scalar("tag_untagged_conversations", dict(user_id=user_id, model_id=model_id,
                                                               batch_size=batch_size))

    def distribute(self, shard_count: int | None = None) -> list[Distribution]:
        """On Citus: llm_models a reference table, the per-user tables distributed by
        user_id and colocated (idempotent; see docs/scaling.md). Refuses (0A000) where the
        citus extension is not installed."""
        return self._call("distribute", dict(shard_count=shard_count), row_type=Distribution, table=True)

    def set_analytics_tracking(self, conversation_id: UUID | str, enabled: bool,
                               user_id: UUID | str | None = None) -> bool:
        return self._scalar("set_analytics_tracking", dict(conversation_id=conversation_id, enabled=enabled,
                                                           user_id=user_id), required=("conversation_id", "enabled"))

    # -- traces ---------------------------------------------------------------------
    def start_trace(self, user_id: UUID | str, trace_id: str, span_id: str, span_name: str,
                    operation_type: str | None = None, conversation_id: UUID | str | None = None,
                    parent_span_id: str | None = None, model_id: UUID | str | None = None,
                    model_name: str | None = None, model_provider: str | None = None, session_tag: str | None = None,
                    input_data: Any = None, metadata: Mapping[str, Any] | None = None,
                    start_time: datetime | None = None, message_id: str | None = None) -> UUID | None:
        """Starts a span; returns its row id, None when the conversation has tracking off."""
        return self._scalar("start_trace", dict(
            user_id=user_id, trace_id=trace_id, span_id=span_id, span_name=span_name, operation_type=operation_type,
            conversation_id=conversation_id, parent_span_id=parent_span_id, model_id=model_id, model_name=model_name,
            model_provider=model_provider, session_tag=session_tag, input_data=_jsonb(input_data),
            metadata=_jsonb(metadata), start_time=start_time, message_id=message_id),
            required=("user_id", "trace_id", "span_id", "span_name"))

    def end_trace(self, user_id: UUID | str, trace_id: str, span_id: str, status: str | None = None,
                  output_data: Any = None, input_tokens: int | None = None, output_tokens: int | None = None,
                  cost_usd: Decimal | float | None = None, error_message: str | None = None,
                  end_time: datetime | None = None) -> UUID:
        """Ends a running span; returns its row id (an ended span stays as it was)."""
        return self._scalar("end_trace", dict(
            user_id=user_id, trace_id=trace_id, span_id=span_id, status=status, output_data=_jsonb(output_data),
            input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=_numeric(cost_usd),
            error_message=error_message, end_time=end_time), required=("user_id", "trace_id", "span_id"))

    def record_trace(self, user_id: UUID | str, trace_id: str, span_id: str, span_name: str,
                     operation_type: str | None = None, conversation_id: UUID | str | None = None,
                     parent_span_id: str | None = None, model_id: UUID | str | None = None,
                     model_name: str | None = None, model_provider: str | None = None,
                     session_tag: str | None = None, input_data: Any = None,
                     metadata: Mapping[str, Any] | None = None, start_time: datetime | None = None,
                     status: str | None = None, output_data: Any = None, input_tokens: int | None = None,
                     output_tokens: int | None = None, cost_usd: Decimal | float | None = None,
                     error_message: str | None = None, end_time: datetime | None = None,
                     message_id: str | None = None) -> UUID | None:
        """Records a finished span in one call; returns its row id, None when tracking is off."""
        return self._scalar("record_trace", dict(
            user_id=user_id, trace_id=trace_id, span_id=span_id, span_name=span_name, operation_type=operation_type,
            conversation_id=conversation_id, parent_span_id=parent_span_id, model_id=model_id, model_name=model_name,
            model_provider=model_provider, session_tag=session_tag, input_data=_jsonb(input_data),
            metadata=_jsonb(metadata), start_time=start_time, status=status, output_data=_jsonb(output_data),
            input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=_numeric(cost_usd),
            error_message=error_message, end_time=end_time, message_id=message_id),
            required=("user_id", "trace_id", "span_id", "span_name"))

    def ingest_traces(self, spans: Iterable[Mapping[str, Any]] | str) -> int:
        """Stores a batch of spans with ingest_traces (all or nothing); returns how many
        took effect. spans: mappings keyed by record_trace's parameter names, or the JSON
        text of such an array."""
        payload = Jsonb(spans, dumps=lambda text: text) if isinstance(spans, str) else Jsonb(list(spans), dumps=dumps)
        return self._scalar("ingest_traces", dict(spans=payload), required=("spans",))

    def ingest(self, spans: Iterable[Mapping[str, Any]]) -> int:
        """Stores spans through the COPY path (all or nothing) and returns how many took
        effect: the spans are streamed with COPY into this session's staging table
        (create_span_staging) and moved by ingest_staged_spans, with every rule of
        ingest_traces. spans: mappings keyed by record_trace's parameter names. A bad span
        is named by its row, counted from 1 in the order given ('row 3: status: ...').
        In autocommit it commits the batch; inside the caller's transaction (the connection
        is not in autocommit) it is a savepoint of it, undone whole on an error."""
        try:
            with self.conn.cursor() as cur:
                # (Outside autocommit this opens the caller's transaction, so the block below
                # is a savepoint in it, not a transaction committing on its own.)
                staging = cur.execute("SELECT sessiontag.create_span_staging()::oid").fetchone()[0]
                columns = self._staging_columns(cur, staging)
                names = sql.SQL(", ").join(sql.Identifier(name) for name in columns)
                with self.conn.transaction():
                    with cur.copy(sql.SQL("COPY pg_temp.sessiontag_spans ({}) FROM STDIN").format(names)) as copy:
                        for row, span in enumerate(spans, 1):
                            copy.write_row(_staging_row(row, span, columns))
                    return cur.execute("SELECT sessiontag.ingest_staged_spans()").fetchone()[0]
        except psycopg.Error as exc:
            raise _copy_error(exc) from None

    def _staging_columns(self, cur: psycopg.Cursor, staging: int) -> dict[str, str]:
        """The staging table's columns (record_trace's parameters) and their types, read
        off the table itself once per connection."""
        if getattr(self, "_columns", None) is None:
            self._columns = dict(cur.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", [staging]).fetchall())
        return self._columns

    def ingest_otlp(self, payload: Mapping[str, Any] | str, default_user_id: UUID | str | None = None) -> int:
        """Stores an OTLP/JSON ExportTraceServiceRequest (all or nothing); returns how many
        spans took effect. user.id, gen_ai.conversation.id / session.id and
        gen_ai.request.model name the user, the conversation and the model."""
        doc = Jsonb(payload, dumps=lambda text: text) if isinstance(payload, str) else Jsonb(payload, dumps=dumps)
        return self._scalar("ingest_otlp", dict(payload=doc, default_user_id=default_user_id), required=("payload",))

    @contextmanager
    def trace(self, user_id: UUID | str | None, span_name: str, *, parent: Span | None = None,
              trace_id: str | None = None, span_id: str | None = None, conversation_id: UUID | str | None = None,
              operation_type: str | None = None, model_id: UUID | str | None = None, model_name: str | None = None,
              model_provider: str | None = None, input_data: Any = None, metadata: Mapping[str, Any] | None = None,
              message_id: str | None = None) -> Iterator[Span]:
        """Records the enclosed block as a span: starts it, and ends it when the block ends,
        with the usage and output set on the yielded Span, status success, or error (the
        exception as error_message) when the block raises; the exception is re-raised.

        parent: a Span of an enclosing block; the new span joins its trace and conversation.
        Times are taken here, so the duration is right even inside a transaction.
        """
        span = Span(user_id=user_id if user_id is not None else parent.user_id if parent else None,
                    trace_id=trace_id or (parent.trace_id if parent else new_trace_id()),
                    span_id=span_id or new_span_id(), span_name=span_name,
                    conversation_id=conversation_id or (parent.conversation_id if parent else None))
        span.id = self.start_trace(span.user_id, span.trace_id, span.span_id, span_name,
                                   operation_type=operation_type, conversation_id=span.conversation_id,
                                   parent_span_id=parent.span_id if parent else None, model_id=model_id,
                                   model_name=model_name, model_provider=model_provider, input_data=input_data,
                                   metadata=metadata, start_time=utcnow(), message_id=message_id)
        try:
            yield span
        except BaseException as exc:
            if span.id is not None:
                try:
                    self._end_span(span, exc)
                except Exception as end_exc:  # the caller's exception matters more
                    exc.add_note(f"sessiontag: span {span.span_id} could not be ended: {end_exc}")
            raise
        if span.id is not None:
            self._end_span(span, None)

    def _end_span(self, span: Span, exc: BaseException | None) -> None:
        status, error_message = outcome(span, exc)
        self.end_trace(span.user_id, span.trace_id, span.span_id, status=status, output_data=span.output_data,
                       input_tokens=span.input_tokens, output_tokens=span.output_tokens, cost_usd=span.cost_usd,
                       error_message=error_message, end_time=utcnow())

    # -- search and analytics ---------------------------------------------------------
    def list_traces(self, user_id: UUID | str | None = None, session_tag: str | None = None,
                    conversation_id: UUID | str | None = None, trace_id: str | None = None,
                    model_name: str | None = None, status: str | None = None, operation_type: str | None = None,
                    since: datetime | None = None, until: datetime | None = None, search: str | None = None,
                    roots_only: bool | None = None, after: str | None = None,
                    page_size: int | None = None) -> list[TraceRow]:
        """One page of spans, newest first; pass the last row's cursor as `after` for the next."""
        return self._call("list_traces", dict(
            user_id=user_id, session_tag=session_tag, conversation_id=conversation_id, trace_id=trace_id,
            model_name=model_name, status=status, operation_type=operation_type, since=since, until=until,
            search=search, roots_only=roots_only, after=after, page_size=page_size), row_type=TraceRow, table=True)

    def get_trace(self, user_id: UUID | str, trace_id: str) -> list[TraceSpan]:
        """Every span of one trace, parents before children, with depth."""
        return self._call("get_trace", dict(user_id=user_id, trace_id=trace_id), row_type=TraceSpan, table=True,
                          required=("user_id", "trace_id"))

    def list_sessions(self, user_id: UUID | str | None = None, model_id: UUID | str | None = None,
                      since: datetime | None = None, until: datetime | None = None, after: str | None = None,
                      page_size: int | None = None) -> list[SessionSummary]:
        """One page of tagged conversations with their metrics, newest first."""
        return self._call("list_sessions", dict(user_id=user_id, model_id=model_id, since=since, until=until,
                                                after=after, page_size=page_size), row_type=SessionSummary, table=True)

    def session_summary(self, session_id: str, user_id: UUID | str | None = None) -> list[SessionSummary]:
        """The session with this tag: one row per user holding it (one row with user_id)."""
        return self._call("session_summary", dict(session_id=session_id, user_id=user_id), row_type=SessionSummary,
                          table=True, required=("session_id",))

    def compare_models(self, user_id: UUID | str | None = None, model_ids: list[UUID | str] | None = None,
                       since: datetime | None = None, until: datetime | None = None) -> list[ModelComparison]:
        ids = [UUID(str(m)) for m in model_ids] if model_ids is not None else None
        return self._call("compare_models", dict(user_id=user_id, model_ids=ids, since=since, until=until),
                          row_type=ModelComparison, table=True)

    def compare_metrics(self, user_id: UUID | str | None = None, model_ids: list[UUID | str] | None = None,
                        since: datetime | None = None, until: datetime | None = None,
                        baseline_model_id: UUID | str | None = None, feedback_name: str | None = None,
                        confidence: Decimal | float | None = None) -> list[MetricComparison]:
        """Per model and metric: value and interval; against the baseline, difference and verdict."""
        ids = [UUID(str(m)) for m in model_ids] if model_ids is not None else None
        return self._call("compare_metrics", dict(user_id=user_id, model_ids=ids, since=since, until=until,
                                                  baseline_model_id=baseline_model_id, feedback_name=feedback_name,
                                                  confidence=_numeric(confidence)),
                          row_type=MetricComparison, table=True)

    # -- feedback -------------------------------------------------------------------
    def record_feedback(self, user_id: UUID | str, name: str, value: Decimal | float | int | None = None,
                        label: str | None = None, conversation_id: UUID | str | None = None,
                        trace_id: str | None = None, span_id: str | None = None, comment: str | None = None,
                        source: str | None = None) -> UUID:
        """A score and/or label on a session, trace or span; the same (target, name, source) replaces it."""
        return self._scalar("record_feedback", dict(user_id=user_id, name=name, value=_numeric(value), label=label,
                                                    conversation_id=conversation_id, trace_id=trace_id,
                                                    span_id=span_id, comment=comment, source=source),
                            required=("user_id", "name"))

    def delete_feedback(self, user_id: UUID | str, id: UUID | str | None = None, name: str | None = None,
                        conversation_id: UUID | str | None = None, trace_id: str | None = None,
                        span_id: str | None = None, source: str | None = None) -> int:
        """Deletes one feedback row, by id or by (target, name, source); returns how many (0 or 1)."""
        return self._scalar("delete_feedback", dict(user_id=user_id, id=id, name=name,
                                                    conversation_id=conversation_id, trace_id=trace_id,
                                                    span_id=span_id, source=source), required=("user_id",))

    def list_feedback(self, user_id: UUID | str | None = None, conversation_id: UUID | str | None = None,
                      session_id: str | None = None, trace_id: str | None = None, name: str | None = None,
                      after: str | None = None, page_size: int | None = None) -> list[Feedback]:
        """One page of feedback, newest first."""
        return self._call("list_feedback", dict(user_id=user_id, conversation_id=conversation_id,
                                                session_id=session_id, trace_id=trace_id, name=name, after=after,
                                                page_size=page_size), row_type=Feedback, table=True)
