"""The root `sessiontag` group and what its command modules share: the connection
state, option types and helpers, and `main`, which maps every error to one line on
stderr and an exit status."""

from __future__ import annotations

import io
import os
import shlex
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from uuid import UUID

import click
import psycopg
from click.core import ParameterSource
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .. import views
from ..client import Client
from ..connection import connect, resolve_dsn
from ..errors import DatabaseError, SessiontagError
from ..output import FORMATS, render
from ..types import Model


class State:
    def __init__(self, dsn: str | None):
        self._dsn_option = dsn
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = resolve_dsn(self._dsn_option, notice=lambda text: click.echo(text, err=True))
        return self._dsn

    def client(self, autocommit: bool = True) -> Client:
        return Client(connect(self.dsn, autocommit=autocommit))


pass_state = click.make_pass_decorator(State)


class UserIdParam(click.ParamType):
    """A user id: the whole UUID (tables show only its first 8 characters)."""

    name = "uuid"

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, UUID) else UUID(value.strip())
        except ValueError:
            self.fail(f"{value!r} is not a valid UUID: give the whole user id (tables show its first 8 "
                      "characters, --format json all of it)", param, ctx)


USER_ID = UserIdParam()


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                        help="How to print rows.")(f)


def emit(rows, fmt: str, columns: list[str] | None = None) -> None:
    click.echo(render(rows, fmt, columns))


def progress_option(f):
    return click.option("--progress/--no-progress", "show_progress", default=None,
                        help="Progress on stderr: a bar on a terminal, else a line per batch (default: on a"
                             " terminal).")(f)


@contextmanager
def progress(total: int, label: str, noun: str, show: bool | None):
    """Progress of long work on stderr: a bar on a terminal; elsewhere, with --progress, one
    line per step ('label: 3000 of 9000 noun'); nothing with --no-progress. Yields
    advance(n), to call after each step with how many items it did."""
    show = sys.stderr.isatty() if show is None else show
    on_terminal = show and sys.stderr.isatty()
    done = 0
    with click.progressbar(length=max(total, 1), label=label,
                           file=sys.stderr if on_terminal else io.StringIO()) as bar:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)
            if show and not on_terminal:
                click.echo(f"{label}: {done} of {total} {noun}", err=True)

        yield advance


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dsn", metavar="DSN", help="PostgreSQL connection string (default: $DATABASE_URL, else the local server).")
@click.version_option(package_name="sessiontag")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None) -> None:
    """Tag, store, search and compare LLM chat traces by session."""
    ctx.obj = State(dsn)


# -- models (by name, key or id: models, sessions, traces and compare take them) ----
def find_models(client: Client, model: str, owner: UUID | None = None) -> list[Model]:
    """The registered models MODEL names: the one with that id, or with that model_key
    (the owner's own, else a shared one), else every one with that display name."""
    models = client.list_models(owner)
    try:
        model_id = UUID(model)
    except ValueError:
        model_id = client.model_id(model, owner)
    if model_id is not None:
        return [m for m in models if m.id == model_id]
    return [m for m in models if m.name == model]


def _no_model(model: str, also: str = "") -> str:
    return f"no model with name, key or id {model!r}{also} ('sessiontag models list' shows the models)"


def resolve_model(client: Client, model: str, owner: UUID | None = None) -> Model:
    """The one registered model MODEL names (a name, model_key or id); an error otherwise."""
    found = find_models(client, model, owner)
    if not found:
        raise SessiontagError(_no_model(model))
    if len(found) > 1:
        raise SessiontagError(f"{len(found)} models are named {model!r}; give its key or id")
    return found[0]


# -- search and analytics ---------------------------------------------------------------
class TimeParam(click.ParamType):
    """An ISO 8601 time (local time when it has no offset), or an age like 30m, 24h, 7d."""

    name = "time"
    _units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        text = value.strip()
        if len(text) > 1 and text[-1] in self._units and text[:-1].isdigit():
            try:
                return datetime.now(timezone.utc) - timedelta(**{self._units[text[-1]]: int(text[:-1])})
            except OverflowError:
                self.fail(f"{value!r} reaches before year 1", param, ctx)
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{value!r} is neither an ISO 8601 time nor an age like 30m, 24h or 7d", param, ctx)
        return parsed if parsed.tzinfo else parsed.astimezone()


TIME = TimeParam()


def _without_password(dsn: str) -> str:
    """The connection string less its password, which has no place in printed output."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn
    return make_conninfo(**{k: v for k, v in params.items() if k != "password"}) if "password" in params else dsn


def page_hint(rows: list, limit: int, **used) -> None:
    """After a full page, print the command that shows the next one (on stderr, so the
    output stays parseable): the options given on the command line, --dsn included (less
    any password), with
    the values this page used (an age given to --since as the time it stood for; `used`
    overrides by parameter name), and --cursor."""
    if not rows or len(rows) < limit:
        return
    contexts, ctx = [], click.get_current_context()
    while ctx is not None:
        contexts.insert(0, ctx)
        ctx = ctx.parent
    words = []
    for ctx in contexts:
        words.append(ctx.info_name)
        for param in ctx.command.params:
            if (not isinstance(param, click.Option) or param.name == "after"
                    or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE):
                continue
            value = used.get(param.name, ctx.params[param.name])
            if param.name == "dsn":
                value = _without_password(value)
            words.append(param.opts[0])
            if not param.is_flag:
                words.append(value.isoformat() if isinstance(value, datetime) else str(value))
    click.echo(f"more: {shlex.join(words)} --cursor {rows[-1].cursor}", err=True)


# The SQL argument behind each search option, to name the option in errors.
OPTION_OF_ARGUMENT = {"search": "--search", "session_tag": "--tag", "trace_id": "--trace", "model_name": "--model",
                      "operation_type": "--operation", "page_size": "--limit", "after": "--cursor"}


def checked_page(fetch, since, until):
    """Runs a search call, with errors in the terms of the command's options."""
    if since and until and since > until:
        raise SessiontagError(f"--since ({views.local_time(since)}) is after --until ({views.local_time(until)})")
    try:
        return fetch()
    except DatabaseError as exc:
        message = str(exc)
        if message.startswith("after is not a cursor"):
            raise SessiontagError("--cursor: not a cursor printed by this command") from None
        argument = message.split(" ", 1)[0]
        if argument in OPTION_OF_ARGUMENT:
            raise SessiontagError(f"{OPTION_OF_ARGUMENT[argument]}: {message.split(' ', 1)[1]}") from None
        raise


# -- entry point --------------------------------------------------------------------
# Raised by `ingest` (see ingest.py); defined here because main maps it to status 130.
class Interrupted(SessiontagError):
    """Ctrl-C: the CLI says what was stored and exits with status 130."""


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


# click >= 8.2 raises this for a group called without a command; older ones print the help.
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> None:
    debug = bool(os.environ.get("SESSIONTAG_DEBUG"))
    try:
        result = cli.main(args=argv, prog_name="sessiontag", standalone_mode=False)
    except _NO_ARGS as exc:
        click.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click has ended the ^C line
            _fail("interrupted", 130)
        click.echo("", err=True)  # end the unanswered prompt's line
        _fail("aborted")
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except DatabaseError as exc:
        if exc.sqlstate in ("3F000", "42883", "42P01"):  # no schema, function or table: not migrated
            _fail(f"{exc}; is the database migrated? run 'sessiontag migrate'")
        _fail(str(exc))
    except Interrupted as exc:
        _fail(str(exc), 130)
    except SessiontagError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(str(DatabaseError.from_psycopg(exc)))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # never a traceback for the user
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc} (set SESSIONTAG_DEBUG=1 for details)")
    sys.exit(result if isinstance(result, int) else 0)
