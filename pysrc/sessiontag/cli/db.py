"""`sessiontag db start|stop|status|url`: the local PostgreSQL server."""

from __future__ import annotations

import sys

import click

from ..embedded import LocalServer
from .app import cli


@cli.group(short_help="The local PostgreSQL server (used without --dsn).")
def db() -> None:
    """The local PostgreSQL server used when no --dsn or DATABASE_URL is given."""


@db.command("start")
def db_start() -> None:
    """Start the local server (initializing it on first use)."""
    server = LocalServer()
    started = server.start()
    click.echo(f"{'started' if started else 'already running'}: {server.dsn()}")


@db.command("stop")
def db_stop() -> None:
    """Stop the local server."""
    click.echo("stopped" if LocalServer().stop() else "not running")


@db.command("status")
def db_status() -> None:
    """Say whether the local server runs; exit status 3 when it does not."""
    server = LocalServer()
    pid = server.pid()
    if pid is None:
        state = "stopped" if server.initialized() else "not initialized"
        click.echo(f"{state} (data directory {server.data})")
        sys.exit(3)
    click.echo(f"running (pid {pid}, data directory {server.data}): {server.dsn()}")


@db.command("url")
def db_url() -> None:
    """Print the local server's connection URL."""
    click.echo(LocalServer().dsn())
