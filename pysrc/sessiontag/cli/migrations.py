"""`sessiontag migrate`, `rollback`, `migrations` and `verify`: the schema's migrations."""

from __future__ import annotations

import sys

import click

from .. import catalog, migrate
from ..connection import connect
from ..errors import SessiontagError
from .app import State, cli, emit, format_option, pass_state


@cli.command("migrate")
@click.option("--to", "to", metavar="ID", help="Apply up to and including this migration.")
@pass_state
def migrate_cmd(state: State, to: str | None) -> None:
    """Apply pending migrations."""
    applied = migrate.apply(state.dsn, to=to)
    if applied:
        click.echo("\n".join(f"applied {m}" for m in applied))
        return
    ids = [s.id for s in migrate.states(state.dsn) if s.applied]
    if to is not None and ids and ids[-1] != to:
        click.echo(f"nothing to apply: the database is already past {to} (up to {ids[-1]} is applied); "
                   f"'sessiontag rollback --to {to}' goes back to it")
    else:
        click.echo("nothing to apply: up to date")


@cli.command("rollback")
@click.option("--to", "to", metavar="ID", help="Roll back every migration applied after ID (ID stays).")
@click.option("--steps", type=int, metavar="N", help="Roll back the N newest migrations.")
@click.option("--all", "everything", is_flag=True, help="Roll back every migration.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def rollback_cmd(state: State, to: str | None, steps: int | None, everything: bool, yes: bool) -> None:
    """Roll back migrations. Traces are never dropped: data of rolled-back parts is kept
    in schema sessiontag_archive and comes back when the migrations are applied again."""
    plan = migrate.plan_rollback(state.dsn, to=to, steps=steps, everything=everything)
    if not plan:
        click.echo("nothing to roll back")
        return
    click.echo("will roll back: " + ", ".join(plan), err=True)
    if not yes:
        click.confirm("proceed?", abort=True, err=True)
    for m in migrate.rollback(state.dsn, to=to, steps=steps, everything=everything):
        click.echo(f"rolled back {m}")


@cli.command("migrations")
@format_option
@pass_state
def migrations_cmd(state: State, fmt: str) -> None:
    """List migrations, applied and pending."""
    rows = [{"id": s.id, "status": "applied" if s.applied else "pending", "applied_at": s.applied_at}
            for s in migrate.states(state.dsn)]
    emit(rows, fmt)


@cli.command("verify", short_help="Check the database against the expected schema.")
@pass_state
def verify_cmd(state: State) -> None:
    """Check the database against the expected schema; exit status 1 on any drift."""
    try:
        pending = [s.id for s in migrate.states(state.dsn) if not s.applied]
    except migrate.HistoryUnreadable as exc:
        # A read-only role (sessiontag_reader) may still compare the schema itself.
        click.echo(f"note: {exc}; comparing the schema only", err=True)
        pending = []
    if pending:
        click.echo("pending migrations: " + ", ".join(pending))
        raise SessiontagError(f"{len(pending)} migration(s) not applied: run 'sessiontag migrate', then verify")
    with connect(state.dsn) as conn:
        problems = catalog.diff(catalog.expected(), catalog.snapshot(conn))
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"drift: {len(problems)} difference(s) from the expected schema", err=True)
        sys.exit(1)
    click.echo("ok: schema sessiontag matches the expected schema")
