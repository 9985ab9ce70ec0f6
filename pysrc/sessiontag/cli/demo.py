"""`sessiontag demo`: loads the demo workload (which is sessiontag.demo, not this module)."""

from __future__ import annotations

import click

from .app import State, cli, pass_state


@cli.command("demo", short_help="Load a realistic demo workload.")
@click.option("--seed", type=int, help="Random seed, for a repeatable workload.")
@click.option("--users", type=click.IntRange(1, 1000), default=5, show_default=True)
@pass_state
def demo_cmd(state: State, seed: int | None, users: int) -> None:
    """Load a realistic multi-user, multi-model workload through the SQL API."""
    from .. import demo  # sessiontag.demo, the workload (`.demo` would be this module)

    with state.client() as client:
        result = demo.run(client, seed, users)
    click.echo(f"loaded {result.sessions} sessions of {result.users} users with {result.traces} traces "
               f"({result.spans} spans) and {result.feedback} thumbs across {len(demo.MODELS)} models")
    click.echo("next:  sessiontag sessions list\n       sessiontag compare --baseline gpt-4o --feedback thumbs")
    if result.example:
        tag, user_id = result.example
        click.echo(f"       sessiontag traces list --tag {tag} --user {user_id}")
