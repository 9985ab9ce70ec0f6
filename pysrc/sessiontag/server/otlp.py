"""OTLP on the wire: an ExportTraceServiceRequest in (protobuf or JSON) as OTLP/JSON
text for ingest_otlp_partial, and the answers out in the request's encoding.

Protobuf is not read with google.protobuf.json_format: it writes trace and span ids
(bytes) as base64, while OTLP/JSON ids are hex. The walker below writes OTLP/JSON
itself, and only what the SQL mapping reads (resource and scope, and per span its ids,
name, kind, times, attributes and status): events and links would cost every request
and nothing reads them.
"""

from __future__ import annotations

import base64
import json
import math
import zlib

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class BadRequest(Exception):
    """A body that cannot be decoded (HTTP 400)."""


class TooLarge(Exception):
    """A body over the cap, compressed or inflated (HTTP 413)."""


def media_type(content_type: str | None) -> str | None:
    """PROTOBUF or JSON for a Content-Type header (parameters such as charset ignored), else None."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind if kind in (PROTOBUF, JSON) else None


class Inflater:
    """Feeds the chunks of a body in, keeping both its raw and its inflated size under
    the cap: a framework's limit counts the compressed bytes only, and a few kilobytes
    of gzip can inflate to gigabytes."""

    def __init__(self, gzipped: bool, cap: int):
        self._cap = cap
        self._raw = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._cap:
            raise TooLarge(f"the inflated body is over the {self._cap} byte limit")
        self._parts.append(data)

    def feed(self, chunk: bytes) -> None:
        self._raw += len(chunk)
        if self._raw > self._cap:
            raise TooLarge(f"the body is over the {self._cap} byte limit")
        if self._zlib is None:
            self._keep(chunk)
            return
        try:
            # Inflate at most one byte past the cap, so a bomb stops here.
            self._keep(self._zlib.decompress(chunk, self._cap - self._size + 1))
            while self._zlib.unconsumed_tail:
                self._keep(self._zlib.decompress(self._zlib.unconsumed_tail, self._cap - self._size + 1))
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid gzip: {exc}") from None

    def body(self) -> bytes:
        if self._zlib is not None:
            try:
                self._keep(self._zlib.flush())
            except zlib.error as exc:
                raise BadRequest(f"the body is not valid gzip: {exc}") from None
            if not self._zlib.eof:
                raise BadRequest("the body is not valid gzip: it ends early")
        return b"".join(self._parts)


def _any_value(value) -> dict:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return {"stringValue": value.string_value}
    if kind == "int_value":
        return {"intValue": str(value.int_value)}  # int64 is a JSON string in OTLP/JSON
    if kind == "bool_value":
        return {"boolValue": value.bool_value}
    if kind == "double_value":
        number = value.double_value
        # JSON has no NaN or Infinity: protobuf's JSON mapping writes them as strings.
        return {"doubleValue": number if math.isfinite(number) else str(number).replace("inf", "Infinity")
                .replace("nan", "NaN")}
    if kind == "array_value":
        return {"arrayValue": {"values": [_any_value(v) for v in value.array_value.values]}}
    if kind == "kvlist_value":
        return {"kvlistValue": {"values": _attributes(value.kvlist_value.values)}}
    if kind == "bytes_value":
        return {"bytesValue": base64.b64encode(value.bytes_value).decode()}
    return {}


def _attributes(attributes) -> list[dict]:
    out = []
    for kv in attributes:
        value = kv.value
        # The common case inline: a call per attribute is most of the walk's time.
        out.append({"key": kv.key, "value": {"stringValue": value.string_value}
                    if value.WhichOneof("value") == "string_value" else _any_value(value)})
    return out


def _span(span) -> dict:
    out = {"traceId": span.trace_id.hex(), "spanId": span.span_id.hex(), "parentSpanId": span.parent_span_id.hex(),
           "name": span.name, "kind": span.kind, "startTimeUnixNano": str(span.start_time_unix_nano),
           "attributes": _attributes(span.attributes),
           "status": {"code": span.status.code, "message": span.status.message}}
    if span.end_time_unix_nano:
        out["endTimeUnixNano"] = str(span.end_time_unix_nano)
    return out


def protobuf_to_json(body: bytes) -> tuple[str, int]:
    """An ExportTraceServiceRequest in protobuf as OTLP/JSON text, and its span count."""
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise BadRequest(f"the body is not a protobuf ExportTraceServiceRequest: {exc}") from None
    count = 0
    resource_spans = []
    for rs in request.resource_spans:
        scope_spans = []
        for ss in rs.scope_spans:
            spans = [_span(s) for s in ss.spans]
            count += len(spans)
            scope_spans.append({"scope": {"name": ss.scope.name, "version": ss.scope.version}, "spans": spans})
        resource_spans.append({"resource": {"attributes": _attributes(rs.resource.attributes)},
                               "scopeSpans": scope_spans})
    # ensure_ascii keeps lone surrogates escaped; PostgreSQL refuses them either way.
    return json.dumps({"resourceSpans": resource_spans}, separators=(",", ":")), count


def json_request(body: bytes) -> str:
    """An OTLP/JSON body, checked to be a JSON object, as text: passed on as it came,
    since the SQL mapping reads OTLP/JSON and names the place of any other problem."""
    try:
        text = body.decode("utf-8")
        request = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("the body is not an ExportTraceServiceRequest: not a JSON object")
    return text


def export_response(kind: str, rejected: int = 0, message: str = "") -> bytes:
    """An ExportTraceServiceResponse; with partial_success when spans were refused."""
    if kind == JSON:
        if not rejected:
            return b"{}"
        return json.dumps({"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}}).encode()
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return response.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# google.rpc.Code values the receiver answers with.
INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL = 3, 16, 8, 14, 13


def status(kind: str, code: int, message: str) -> bytes:
    """A google.rpc.Status, the body of every OTLP error answer. Written by hand (two
    fields) rather than pulling in googleapis-common-protos for it."""
    if kind == JSON:
        return json.dumps({"code": code, "message": message}).encode()
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
