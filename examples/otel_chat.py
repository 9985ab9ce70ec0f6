"""A chat application instrumented with the OpenTelemetry SDK, exporting over OTLP/HTTP.

Plain OpenTelemetry, no sessiontag code: the endpoint comes from
OTEL_EXPORTER_OTLP_ENDPOINT (and a token, if the receiver wants one, from
OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer <token>"). Sends one conversation of
three turns with GenAI attributes, then prints the user id it used on stdout; exits 1
when the spans could not be exported (the receiver refused them or never answered).

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 python examples/otel_chat.py
"""

import os
import sys
import time
import urllib.request
import uuid

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult


class CheckedExporter(OTLPSpanExporter):
    """The OTLP/HTTP exporter, remembering whether an export failed: the batch processor
    only logs it, and a demo must not say it sent what it did not."""

    failed = False

    def export(self, spans):
        result = super().export(spans)
        if result is not SpanExportResult.SUCCESS:
            self.failed = True
        return result


endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
# The receiver may still be starting (make demo starts it just before).
for _ in range(100):
    try:
        urllib.request.urlopen(f"{endpoint}/healthz", timeout=2)
        break
    except OSError:
        time.sleep(0.1)

user = str(uuid.uuid4())
conversation = f"support-chat-{uuid.uuid4().hex[:6]}"
provider = TracerProvider(resource=Resource.create({"service.name": "chat-api", "user.id": user}))
exporter = CheckedExporter()  # reads OTEL_EXPORTER_OTLP_* itself
provider.add_span_processor(BatchSpanProcessor(exporter))
tracer = provider.get_tracer("chat-api")

for turn, question in enumerate(["How do I reset my password?", "It says the link expired.", "Thanks!"], 1):
    with tracer.start_as_current_span("chat turn", attributes={"session.id": conversation}):
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.usage.input_tokens": 40 * turn, "gen_ai.usage.output_tokens": 90,
                "gen_ai.input.messages": f'[{{"role": "user", "parts": [{{"type": "text", "content": "{question}"}}]}}]'}):
            time.sleep(0.05)  # the model call
flushed = provider.force_flush(30_000)
provider.shutdown()
if not flushed or exporter.failed:
    print(f"could not export the spans of conversation {conversation} to {endpoint}"
          f" ({'the receiver refused them' if exporter.failed else 'no answer in 30 s'})", file=sys.stderr)
    sys.exit(1)
print(f"sent 3 turns of conversation {conversation} as user {user} to {endpoint}", file=sys.stderr)
print(user)
