"""`sessiontag ingest`: stores spans from a JSON, JSON lines or OTLP/JSON file, and the
reading of that JSON: every value is checked before anything is sent."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import click
from psycopg.types.json import Jsonb

from ..client import Client
from ..errors import DatabaseError, SessiontagError
from .app import USER_ID, Interrupted, State, cli, pass_state, progress, progress_option  # Interrupted is in app.py: main maps it


class NotANumber(str):
    """NaN, Infinity or -Infinity: Python's json reads them, but JSON has no such numbers."""


# Numbers are read as Decimal (1e400 is a number PostgreSQL keeps, not a float infinity),
# and only to check them: each span is sent as the JSON text it was given, every digit kept.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=NotANumber)
_SPACE = re.compile(r"[ \t\n\r]*")
_MAYBE_UNSTORABLE = re.compile(r"NaN|Infinity|\\u(0000|[dD][89a-fA-F])")  # cheap test before the walk
_UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL text holds neither NUL nor lone surrogates
_BAD_ROW = re.compile(r"^row (\d+): (?:(\w+): )?(.*)$", re.DOTALL)  # the COPY path's "row 3: status: ..."
_JSON_FIELDS = ("input_data", "output_data", "metadata")
_NUMBER_MARK = re.compile(r'"\\u0000(\d+)\\u0000"')


def _at(location: str, rest: str, field: bool) -> str:
    """'line 3: cost_usd: ...' (JSON lines), 'spans[3].cost_usd: ...' (array), 'line 3: ...' (no field)."""
    return f"{location}{'.' if field and not location.startswith('line') else ': '}{rest}"


def _unstorable(value, path: str = "") -> tuple[str, str] | None:
    """(where, why) of the first value in VALUE that PostgreSQL cannot store, else None."""
    def bad_text(text: str) -> str | None:
        char = _UNSTORABLE_CHAR.search(text)
        return char and f"holds U+{ord(char.group()):04X}, which PostgreSQL text cannot store"

    if isinstance(value, NotANumber):
        return path, f"{value} is not a number JSON allows"
    if isinstance(value, str):
        return (path, why) if (why := bad_text(value)) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if why := bad_text(key):
                return path, f"a key {why}"
            if problem := _unstorable(item, f"{path}.{key}" if path else key):
                return problem
    if isinstance(value, list):
        for index, item in enumerate(value):
            if problem := _unstorable(item, f"{path}[{index}]"):
                return problem
    return None


def _check_storable(value, text: str, location: str) -> None:
    if _MAYBE_UNSTORABLE.search(text) and (problem := _unstorable(value)):
        path, why = problem
        raise SessiontagError(_at(location, f"{path}: {why}" if path else why, bool(path)))


def _array_elements(text: str, start: int) -> list[tuple]:
    """(value, JSON text, 'spans[i]') of each element of the JSON array opening at START."""
    elements = []
    at = _SPACE.match(text, start + 1).end()
    while not text.startswith("]", at):
        if elements:
            if not text.startswith(",", at):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
            at = _SPACE.match(text, at + 1).end()
        value, end = _DECODER.raw_decode(text, at)
        elements.append((value, text[at:end], f"spans[{len(elements)}]"))
        at = _SPACE.match(text, end).end()
    end = _SPACE.match(text, at + 1).end()
    if end < len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return elements


def read_documents(text: str) -> list[tuple]:
    """(value, JSON text, where) of each span of a JSON array or of JSON lines, or of the
    one JSON document (an OTLP request, or a span) the text is; `where` is "spans[3]" or
    "line 12", for error messages. Values PostgreSQL cannot store are refused here."""
    start = _SPACE.match(text).end()
    try:
        if text.startswith("[", start):
            documents = _array_elements(text, start)
        else:
            # The first value is the whole text (one document, maybe on many lines), or
            # the first line of JSON lines; where it breaks, that is where the text does.
            value, end = _DECODER.raw_decode(text, start)
            if _SPACE.match(text, end).end() == len(text):
                line = text.count("\n", 0, start) + 1
                documents = [(value, text[start:end], f"line {line}")]
            else:
                documents = list(_json_lines(text))
    except json.JSONDecodeError as exc:
        raise SessiontagError(f"line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    for value, span_text, where in documents:
        _check_storable(value, span_text, where)
    return documents


def _json_lines(text: str):
    offset = 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield _DECODER.decode(line), line, f"line {number}"
            except json.JSONDecodeError as exc:  # at its place in the whole text, for the line number
                raise json.JSONDecodeError(exc.msg, text, offset + exc.pos) from None
        offset += len(line) + 1


def _otlp_span_count(doc: dict) -> int:
    """How many spans an OTLP request holds (ingest_otlp judges its shape)."""
    def items(value) -> list:
        return value if isinstance(value, list) else []

    return sum(len(items(scope.get("spans"))) for resource in items(doc.get("resourceSpans"))
               if isinstance(resource, dict) for scope in items(resource.get("scopeSpans")) if isinstance(scope, dict))


def _otlp_request(documents: list[tuple]) -> dict | None:
    """The document, when the text is one OTLP/JSON ExportTraceServiceRequest."""
    value, _, where = documents[0] if len(documents) == 1 else (None, "", "")
    return value if where.startswith("line") and isinstance(value, dict) and "resourceSpans" in value else None


def _stored_line(stored: int, total: int, kind: str = "") -> str:
    skipped = total - stored
    return f"stored {stored} of {total} spans{kind}" + (
        f" ({skipped} skipped: already stored, or of conversations with tracking off)" if skipped > 0 else "")


@cli.command("ingest", short_help="Store spans from a JSON, JSON lines or OTLP file.")
@click.argument("source", metavar="FILE|-", type=click.File("r", encoding="utf-8-sig"))
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Spans per batch (one COPY into the staging and one ingest_staged_spans call).")
@progress_option
@click.option("--default-user", "default_user_id", type=USER_ID,
              help="OTLP only: the user of spans without a user.id attribute.")
@pass_state
def ingest_cmd(state: State, source, batch_size: int, show_progress: bool | None, default_user_id) -> None:
    """Store the spans of FILE (- reads standard input): a JSON array, or JSON lines (one
    span per line), keyed by record_trace's parameter names; status running and no
    end_time for a span still open; or an OTLP/JSON ExportTraceServiceRequest (an
    OpenTelemetry export). All or nothing: on bad input nothing is stored and the error
    names the line (or array index, or OTLP path) and the field."""
    try:
        click.echo(_ingest(state, source, batch_size, show_progress, default_user_id))
    except KeyboardInterrupt:
        raise Interrupted("interrupted; nothing was stored") from None


def _ingest(state: State, source, batch_size: int, show_progress: bool | None, default_user_id) -> str:
    """Stores the file in one transaction; returns the summary line."""
    try:
        text = source.read()
    except UnicodeDecodeError as exc:
        raise SessiontagError(f"{source.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise SessiontagError(f"{source.name}: no spans (it is empty)")
    documents = read_documents(text)
    otlp = _otlp_request(documents)
    if otlp is None and default_user_id is not None:
        raise SessiontagError("--default-user applies to OTLP exports only; give each span its user_id")
    with state.client(autocommit=False) as client:  # closed uncommitted on any error: nothing is stored
        if otlp is not None:
            try:
                stored = client.ingest_otlp(documents[0][1], default_user_id)
            except DatabaseError as exc:
                message = str(exc).replace("default_user_id", "--default-user")
                raise SessiontagError(f"{message}; nothing was stored") from None
            summary = _stored_line(stored, _otlp_span_count(otlp), " (OTLP)")
        else:
            summary = _ingest_spans(client, documents, batch_size, show_progress)
        try:
            client.conn.commit()
        except KeyboardInterrupt:
            raise Interrupted("interrupted while committing: the spans may or may not be stored") from None
    return summary


def _exact_json(value) -> Jsonb:
    """VALUE as JSON with every number as it was written (they were read as Decimal)."""
    numbers: list[str] = []

    def mark(number):
        if not isinstance(number, Decimal):
            raise TypeError(f"{type(number).__name__} is not JSON")
        numbers.append(str(number))
        return f"\0{len(numbers) - 1}\0"  # a string no JSON text holds: PostgreSQL text has no NUL

    text = json.dumps(value, default=mark, ensure_ascii=False)
    return Jsonb(_NUMBER_MARK.sub(lambda m: numbers[int(m.group(1))], text) if numbers else text, dumps=str)


def _span(value):
    """A span read from the file, for Client.ingest: its JSON values kept exactly."""
    if not isinstance(value, dict):
        return value  # Client.ingest names it
    return {k: _exact_json(v) if k in _JSON_FIELDS and v is not None else v for k, v in value.items()}


def _ingest_spans(client: Client, documents: list[tuple], batch_size: int, show: bool | None) -> str:
    stored, total = 0, len(documents)
    with progress(total, "ingesting", "spans sent", show) as advance:
        for start in range(0, total, batch_size):
            batch = documents[start:start + batch_size]
            try:
                stored += client.ingest(_span(value) for value, _, _ in batch)
            except DatabaseError as exc:
                match = _BAD_ROW.match(str(exc))
                if match is None:
                    raise SessiontagError(f"{exc}; nothing was stored") from None
                location = batch[int(match.group(1)) - 1][2]
                field, rest = match.group(2), match.group(3)
                raise SessiontagError(f"{_at(location, f'{field}: {rest}' if field else rest, bool(field))}; "
                                      "nothing was stored") from None
            advance(len(batch))
    return _stored_line(stored, total)
