"""`sessiontag distribute`: spreads the schema over a Citus cluster (see docs/scaling.md)."""

from __future__ import annotations

import click

from .. import migrate
from .app import State, cli, emit, format_option, pass_state


@cli.command("distribute", short_help="Distribute the tables by user on Citus.")
@click.option("--shard-count", type=click.IntRange(1, 64000),
              help="Shards per distributed table (default: Citus's citus.shard_count, 32).")
@format_option
@pass_state
def distribute_cmd(state: State, shard_count: int | None, fmt: str) -> None:
    """On a database with the citus extension and its worker nodes added: make llm_models a
    reference table and every per-user table a table distributed by user_id, colocated, so
    that each user's rows live on one node. Safe to run again (it changes nothing then),
    on an empty database or one holding data; all or nothing. Run it as the owner of the
    schema (the role that ran the migrations) or a superuser."""
    migrate.require(state.dsn, "0014_citus", "distribute")
    with state.client(autocommit=False) as client:
        rows = client.distribute(shard_count)
        client.conn.commit()
    emit([{"table": r.table_name, "distribution": r.distribution, "changed": "yes" if r.changed else "no"}
          for r in rows], fmt)
