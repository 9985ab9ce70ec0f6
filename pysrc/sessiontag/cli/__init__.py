"""The `sessiontag` command line.

Connection: --dsn, else DATABASE_URL, else the local server (started on demand).
Every error is one line on stderr and a non-zero exit; SESSIONTAG_DEBUG=1 shows tracebacks.

The root group, what the commands share and `main` are in app.py; each other module
adds one command group to it when imported, as below.
"""

from __future__ import annotations

from .app import cli, main
from . import backfill, compare, db, demo, distribute, feedback, ingest, migrations, models, serve, sessions, traces  # noqa: F401  (registers the commands)

__all__ = ["cli", "main"]
