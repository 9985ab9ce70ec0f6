"""A non-blocking trace recorder for chat servers.

``Recorder.record(...)`` and ``Recorder.span(...)`` only put a finished span in a bounded
in-memory queue and return at once; a background thread sends the queue in batches through
the COPY path (``Client.ingest``: COPY into the span staging, ``ingest_staged_spans``). A tracing failure never reaches the caller: it is logged
(logger ``sessiontag.recorder``) and the chat goes on.

- Database down or unreachable: the batch is kept and sent again with exponential
  backoff (the COPY path is idempotent, so a batch that was stored just before the
  connection broke is not stored twice). Meanwhile new spans wait in the queue.
- Queue full (``max_queue`` spans waiting, e.g. during a long outage): the new span is
  dropped, counted in ``stats["dropped"]`` and logged; ``record`` returns False. The
  caller is never blocked, and memory stays bounded.
- Bad data (a span the database refuses, e.g. negative tokens): that span is dropped
  and logged with the database's reason naming the field; the rest of its batch is sent.
- Shutdown: ``close()`` (also run at interpreter exit) sends what the queue holds; what
  cannot be sent before its timeout is logged as lost.
"""

from __future__ import annotations

import atexit
import collections
import logging
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping
from uuid import UUID

import psycopg

from .client import Client, new_span_id, new_trace_id, outcome, utcnow
from .connection import connect, resolve_dsn
from .errors import DatabaseError, SessiontagError
from .types import Span

log = logging.getLogger("sessiontag.recorder")

# "row 3: status: ..." -> 3: the span (counted from 1) the COPY path refused.
_BAD_ROW = re.compile(r"^row (\d+): ")


def _bad_data(sqlstate: str | None) -> bool:
    """Errors about the data itself: sending the same span again cannot succeed."""
    return bool(sqlstate) and (sqlstate[:2] in ("22", "23") or sqlstate == "P0002")


class Recorder:
    """Records spans in the background; never raises and never blocks the caller.

    dsn: as for the CLI (default: $DATABASE_URL, else the local server), resolved in the
    background thread. batch_size: spans per batch. flush_interval: the
    longest a span waits before its batch is sent (seconds). max_queue: spans held at
    most; beyond it new spans are dropped. retry_delay / max_retry_delay: backoff while
    the database is unavailable. close_timeout: how long close() at exit may take.
    """

    def __init__(self, dsn: str | None = None, *, batch_size: int = 500, flush_interval: float = 1.0,
                 max_queue: int = 10_000, retry_delay: float = 0.5, max_retry_delay: float = 30.0,
                 connect_timeout: int = 5, close_timeout: float = 10.0):
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be at least 1")
        self._dsn = dsn
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._queue: collections.deque[dict] = collections.deque()
        self._cond = threading.Condition()
        self._accepted = 0      # spans put in the queue
        self._handled = 0       # of those, spans sent or given up
        self._flush_target = 0  # flush() wants everything up to here sent now
        self._closing = False
        self._deadline: float | None = None  # set by close(): give up after it
        self._dropping = False  # inside a queue-full episode (logged once)
        self._stats = {"recorded": 0, "sent": 0, "dropped": 0, "lost": 0}
        self._conn: psycopg.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="sessiontag-recorder", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # -- the caller's side: never raises, never blocks -------------------------------
    def record(self, **span: Any) -> bool:
        """Queues one span (keys: record_trace's parameter names). start_time and
        end_time default to now, when record is called. Returns False when the span was
        dropped (queue full, or the recorder closed)."""
        try:
            now = utcnow()
            span.setdefault("start_time", now)
            if span.get("status") != "running":
                span.setdefault("end_time", now)
            warning = None
            accepted = False
            with self._cond:
                if self._closing:
                    self._stats["dropped"] += 1
                    warning = f"sessiontag recorder: closed; dropped span {_describe(span)}"
                elif len(self._queue) >= self.max_queue:
                    self._stats["dropped"] += 1
                    if not self._dropping:
                        self._dropping = True
                        warning = (f"sessiontag recorder: queue is full ({len(self._queue)} spans waiting); "
                                   "dropping new spans until it drains")
                else:
                    if self._dropping:
                        self._dropping = False
                        warning = (f"sessiontag recorder: queue drains again; {self._stats['dropped']} spans"
                                   " dropped so far")
                    self._queue.append(span)
                    self._accepted += 1
                    self._stats["recorded"] += 1
                    if len(self._queue) >= self.batch_size:
                        self._cond.notify_all()
                    accepted = True
            if warning:
                log.warning(warning)
            return accepted
        except Exception:  # a tracing failure never reaches the caller
            log.exception("sessiontag recorder: could not queue a span")
            return False

    @contextmanager
    def span(self, user_id: UUID | str | None, span_name: str, *, parent: Span | None = None,
             trace_id: str | None = None, span_id: str | None = None, conversation_id: UUID | str | None = None,
             **fields: Any) -> Iterator[Span]:
        """Records the enclosed block as one finished span, like Client.trace, without
        waiting for the database: set usage and output on the yielded Span; when the
        block raises, the span ends with status error and the exception is re-raised.
        fields: more record_trace parameters (model_id, model_name, input_data, ...)."""
        span = Span(user_id=user_id if user_id is not None else parent.user_id if parent else None,
                    trace_id=trace_id or (parent.trace_id if parent else new_trace_id()),
                    span_id=span_id or new_span_id(), span_name=span_name,
                    conversation_id=conversation_id or (parent.conversation_id if parent else None))
        if parent is not None:
            fields.setdefault("parent_span_id", parent.span_id)
        start = utcnow()
        try:
            yield span
        except BaseException as exc:
            self._record_span(span, start, fields, exc)
            raise
        self._record_span(span, start, fields, None)

    def _record_span(self, span: Span, start, fields: dict, exc: BaseException | None) -> None:
        try:
            status, error_message = outcome(span, exc)
            values = dict(fields, user_id=span.user_id, trace_id=span.trace_id, span_id=span.span_id,
                          span_name=span.span_name, conversation_id=span.conversation_id, start_time=start,
                          end_time=utcnow(), status=status, error_message=error_message,
                          output_data=span.output_data, input_tokens=span.input_tokens,
                          output_tokens=span.output_tokens, cost_usd=span.cost_usd)
            self.record(**{k: v for k, v in values.items() if v is not None})
        except Exception:
            log.exception("sessiontag recorder: could not record span %s", span.span_id)

    @property
    def stats(self) -> dict[str, int]:
        """recorded (queued), sent (stored), dropped (queue full or
        closed), lost (refused as bad data, or unsendable until close gave up)."""
        with self._cond:
            return dict(self._stats, waiting=len(self._queue))

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what was recorded so far now and waits until it is sent (or given up).
        Returns False when timeout (seconds) passed first."""
        with self._cond:
            target = self._accepted
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._handled >= target, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Sends what the queue holds and stops the thread; spans that cannot be sent
        within timeout (default close_timeout) are logged as lost. Idempotent."""
        timeout = self.close_timeout if timeout is None else timeout
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        self.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the background thread -------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or len(self._queue) >= self.batch_size
                                    or self._handled < self._flush_target, self.flush_interval)
                if not self._queue:
                    if self._closing:
                        break
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                self._deliver(batch)
            except Exception:  # never let the thread die: log and go on
                log.exception("sessiontag recorder: lost %d spans", len(batch))
                self._count("lost", len(batch))
            with self._cond:
                self._handled += len(batch)
                self._cond.notify_all()
        self._disconnect()

    def _count(self, key: str, n: int) -> None:
        with self._cond:
            self._stats[key] += n

    def _deliver(self, batch: list[dict]) -> None:
        """Sends one batch; retries while the database is unavailable, drops refused spans."""
        delay = self.retry_delay
        payload = list(batch)
        reason = "not sent before the close timeout"
        while payload:
            if self._past_deadline():
                log.error("sessiontag recorder: closing; lost %d spans: %s", len(payload), reason)
                self._count("lost", len(payload))
                return
            try:
                Client(self._connection()).ingest(payload)
                self._count("sent", len(payload))
                return
            except DatabaseError as exc:
                if _bad_data(exc.sqlstate):
                    match = _BAD_ROW.match(str(exc))
                    if match is None or not 1 <= int(match.group(1)) <= len(payload):
                        log.error("sessiontag recorder: lost %d spans refused by the database: %s", len(payload), exc)
                        self._count("lost", len(payload))
                        return
                    index = int(match.group(1)) - 1
                    log.error("sessiontag recorder: dropped span %s: %s", _describe(payload[index]), exc)
                    self._count("lost", 1)
                    del payload[index]
                    continue
                reason = str(exc)
                self._disconnect()
            except SessiontagError as exc:  # cannot connect, or no database configured
                reason = str(exc)
                self._disconnect()
            if not self._past_deadline():
                log.warning("sessiontag recorder: could not store %d spans, retrying in %.1f s: %s",
                            len(payload), delay, reason)
                self._wait(delay)
                delay = min(delay * 2, self.max_retry_delay)

    def _past_deadline(self) -> bool:
        with self._cond:
            return self._deadline is not None and time.monotonic() >= self._deadline

    def _wait(self, delay: float) -> None:
        """Sleeps before a retry; close() cuts it short, so waiting spans get their last
        tries within its timeout."""
        with self._cond:
            closing = self._closing
            end = time.monotonic() + delay
            if self._deadline is not None:
                end = min(end, self._deadline)
            self._cond.wait_for(lambda: self._closing != closing or time.monotonic() >= end,
                                max(0.0, end - time.monotonic()))

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._disconnect()
            self._conn = connect(resolve_dsn(self._dsn), autocommit=True, connect_timeout=self.connect_timeout)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass
            self._conn = None


def _describe(span: Mapping[str, Any]) -> str:
    return f"(trace_id {span.get('trace_id')!r}, span_id {span.get('span_id')!r})"
