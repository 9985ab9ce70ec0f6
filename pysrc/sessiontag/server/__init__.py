"""`sessiontag serve`: an OTLP/HTTP receiver any OpenTelemetry SDK or Collector exports to.

POST /v1/traces takes an ExportTraceServiceRequest (protobuf or JSON, gzip or not) and
hands it, as OTLP/JSON, to sessiontag.ingest_otlp_partial, where the attribute mapping
and the per-span checks live; GET /healthz says whether the database is reachable and
migrated. The modules: otlp (decoding and encoding OTLP), auth (bearer tokens), app (the
ASGI application, its connection pool and the server loop).

Needs the `serve` extra: pip install 'sessiontag[serve]'.
"""

from .app import ServerConfig, create_app, run
from .auth import Token, TokenError, load_tokens

__all__ = ["ServerConfig", "Token", "TokenError", "create_app", "load_tokens", "run"]
