"""`sessiontag serve`: the OTLP/HTTP receiver (sessiontag.server) on the command line."""

from __future__ import annotations

import click

from ..errors import SessiontagError
from .app import USER_ID, State, cli, pass_state


@cli.command("serve", short_help="Receive OpenTelemetry spans over OTLP/HTTP.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --token or --tokens-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=4318, show_default=True,
              help="Port (4318 is OTLP/HTTP's; 0 picks a free one).")
@click.option("--token", "tokens", multiple=True, metavar="T[:USER_ID]",
              help="A bearer token clients must send; with :USER_ID its spans are that user's only. Repeatable.")
@click.option("--tokens-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Tokens, one T or T:USER_ID a line (# comments).")
@click.option("--default-user", type=USER_ID, metavar="USER_ID",
              help="The user of spans that name none (user.id, enduser.id, ...) and come without a user-bound token.")
@click.option("--max-body", type=click.IntRange(1, 1024), default=64, show_default=True, metavar="MIB",
              help="Largest request body, compressed or inflated, in MiB (413 past it).")
@click.option("--pool-size", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Database connections at most.")
@pass_state
def serve_cmd(state: State, host: str, port: int, tokens: tuple[str, ...], tokens_file: str | None,
              default_user, max_body: int, pool_size: int) -> None:
    """Receive spans from any OpenTelemetry SDK or Collector over OTLP/HTTP
    (POST /v1/traces, protobuf or JSON, gzip or not) and store them tagged by session.
    GET /healthz answers 200 when the database is reachable and migrated.
    SIGTERM finishes the requests in flight, then exits."""
    try:
        from ..server import ServerConfig, TokenError, load_tokens, run
        from ..server.app import MIB, configure_logging, listen, loopback_only
    except ImportError as exc:
        raise SessiontagError(f"serve needs the 'serve' extra ({exc.name} is missing): "
                              "pip install 'sessiontag[serve]'") from None
    try:
        token_list = load_tokens(tokens, tokens_file)
    except TokenError as exc:
        raise SessiontagError(str(exc)) from None
    if not token_list and not loopback_only(host):
        raise SessiontagError(f"--host {host} is reachable from other machines: give --token or --tokens-file")
    config = ServerConfig(dsn=state.dsn, host=host, port=port, tokens=token_list, default_user_id=default_user,
                          max_body=max_body * MIB, pool_size=pool_size)
    sock = listen(host, port)
    configure_logging()
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    click.echo(f"sessiontag serve: listening on http://{shown}:{bound[1]}/v1/traces"
               f" ({len(token_list)} token{'s' if len(token_list) != 1 else ''}"
               f"{', none needed on loopback' if not token_list else ''}); GET /healthz; stop with SIGTERM or Ctrl-C",
               err=True)
    run(config, sock)
