"""An OpenTelemetry SDK span exporter that stores spans in sessiontag.

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from sessiontag.otel import SessiontagSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(SessiontagSpanExporter("postgresql://app@db/chat")))

Spans that follow the GenAI semantic conventions (user.id, gen_ai.conversation.id,
gen_ai.request.model, gen_ai.usage.*) are tagged by session like any other trace: the
exporter only writes each batch as an OTLP/JSON request and hands it to
sessiontag.ingest_otlp, where the mapping lives. A failed export is logged and reported
to the SDK as a failure; it never raises into the application.

Needs the `otel` extra: pip install 'sessiontag[otel]'.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence
from uuid import UUID

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from .client import Client
from .errors import SessiontagError

log = logging.getLogger("sessiontag.otel")


def _any_value(value: Any) -> dict:
    """A Python attribute value as an OTLP AnyValue."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(attributes) -> list[dict]:
    return [{"key": key, "value": _any_value(value)} for key, value in (attributes or {}).items()]


def _span(span: ReadableSpan) -> dict:
    context = span.get_span_context()
    out = {
        "traceId": format(context.trace_id, "032x"),
        "spanId": format(context.span_id, "016x"),
        "parentSpanId": format(span.parent.span_id, "016x") if span.parent else "",
        "name": span.name,
        "kind": span.kind.value + 1,  # the SDK's enum starts at 0, OTLP's SPAN_KIND_INTERNAL is 1
        "startTimeUnixNano": str(span.start_time),
        "attributes": _attributes(span.attributes),
        "status": {"code": {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}[span.status.status_code],
                   "message": span.status.description or ""},
    }
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    return out


def export_request(spans: Sequence[ReadableSpan]) -> dict:
    """The OTLP/JSON ExportTraceServiceRequest for a batch of finished SDK spans."""
    by_resource: dict[int, tuple[Any, list]] = {}
    for span in spans:
        by_resource.setdefault(id(span.resource), (span.resource, []))[1].append(span)
    return {"resourceSpans": [
        {"resource": {"attributes": _attributes(resource.attributes if resource else {})},
         "scopeSpans": [{"spans": [_span(s) for s in group]}]}
        for resource, group in by_resource.values()]}


class SessiontagSpanExporter(SpanExporter):
    """Exports finished spans to sessiontag.ingest_otlp over one connection.

    dsn: as for the CLI (default: $DATABASE_URL, else the local server).
    default_user_id: the user of spans without a user.id attribute.
    """

    def __init__(self, dsn: str | None = None, default_user_id: UUID | str | None = None):
        self._dsn = dsn
        self._default_user_id = default_user_id
        self._client: Client | None = None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        with self._lock:
            try:
                if self._client is None or self._client.conn.closed:
                    self._client = Client.connect(self._dsn)
                stored = self._client.ingest_otlp(export_request(spans), self._default_user_id)
                log.debug("sessiontag: stored %d of %d spans", stored, len(spans))
                return SpanExportResult.SUCCESS
            except SessiontagError as exc:
                log.warning("sessiontag: %d spans not exported: %s", len(spans), exc)
            except Exception as exc:  # an exporter never raises into the application
                log.warning("sessiontag: %d spans not exported: %s: %s", len(spans), type(exc).__name__, exc)
            if self._client is not None:
                self._client.close()
                self._client = None
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
