"""The `sessiontag` command line.

Connection: --dsn, else DATABASE_URL, else the local server (started on demand).
Every error is one line on stderr and a non-zero exit; SESSIONTAG_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import click
import psycopg
from click.core import ParameterSource
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import catalog, migrate, views
from .client import Client
from .connection import connect, resolve_dsn
from .embedded import LocalServer
from .errors import DatabaseError, SessiontagError
from .output import FORMATS, as_dict, columns_of, render
from .types import Model, ModelComparison, SessionSummary, TraceRow


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dsn", metavar="DSN", help="PostgreSQL connection string (default: $DATABASE_URL, else the local server).")
@click.version_option(package_name="sessiontag")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None) -> None:
    """Tag, store, search and compare LLM chat traces by session."""
    ctx.obj = State(dsn)


# -- local server -------------------------------------------------------------------
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


# -- migrations ---------------------------------------------------------------------
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


# -- models -------------------------------------------------------------------------
MODEL_COLUMNS = ["id", "short_id", "name", "model_key", "provider", "owner_id", "tracked", "created_at"]


def emit_models(models, fmt: str) -> None:
    """Models; the table leaves out the long columns (json and csv have them all)."""
    if fmt != "table":
        emit(models, fmt, MODEL_COLUMNS)
        return
    emit([{"short_id": m.short_id, "name": views.clip(m.name, 24), "model_key": views.clip(m.model_key, 20),
           "provider": views.clip(m.provider, 12), "owner": str(m.owner_id)[:8] if m.owner_id else "shared",
           "tracked": m.tracked} for m in models], fmt)


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


@cli.group()
def models() -> None:
    """Models whose conversations get session tags."""


@models.command("add")
@click.argument("name")
@click.option("--provider", help="Provider, e.g. openai.")
@click.option("--key", "model_key", help="The provider's model id (default: NAME).")
@click.option("--owner", "owner_id", type=USER_ID, help="Owner user id (default: shared by all users).")
@click.option("--id", "model_uuid", type=click.UUID, help="Model UUID (default: random).")
@format_option
@pass_state
def models_add(state: State, name, provider, model_key, owner_id, model_uuid, fmt) -> None:
    """Register a model (again: returns the existing one)."""
    with state.client() as client:
        model_id = client.register_model(name, provider=provider, model_key=model_key, owner_id=owner_id, id=model_uuid)
        model = next(m for m in client.list_models() if m.id == model_id)
    if model.name != name or provider not in (None, model.provider) or model_uuid not in (None, model.id):
        click.echo(f"note: model key {model.model_key} is already registered (as {model.name!r}, provider "
                   f"{model.provider or '-'}, id {model.id}); its name, provider and id were not changed", err=True)
    emit_models([model], fmt)


@models.command("list")
@click.option("--owner", "owner_id", type=USER_ID, help="Only this user's models and the shared ones.")
@format_option
@pass_state
def models_list(state: State, owner_id, fmt) -> None:
    """List models."""
    with state.client() as client:
        emit_models(client.list_models(owner_id), fmt)


def _tracking_command(tracked: bool):
    @click.argument("model")
    @click.option("--owner", "owner_id", type=USER_ID, help="Owner, when MODEL is one of its own models.")
    @pass_state
    def command(state: State, model: str, owner_id: str | None) -> None:
        with state.client() as client:
            model_id = resolve_model(client, model, owner_id).id
            client.set_model_tracking(model_id, tracked)
        click.echo(f"model {model_id}: {'tracked' if tracked else 'not tracked'}")

    return command


models.command("track", help="Tag new conversations of MODEL (name, key or id).")(_tracking_command(True))
models.command("untrack", help="Stop tagging new conversations of MODEL (name, key or id).")(_tracking_command(False))


# -- sessions -----------------------------------------------------------------------
@cli.group()
def sessions() -> None:
    """Tagged conversations."""


@sessions.command("tracking")
@click.argument("conversation", type=click.UUID)
@click.argument("state_word", metavar="on|off", type=click.Choice(["on", "off"]))
@click.option("--user", "user_id", type=USER_ID, help="Owner of the conversation, when its id is not unique.")
@pass_state
def sessions_tracking(state: State, conversation: str, state_word: str, user_id: str | None) -> None:
    """Record traces of CONVERSATION (on) or not (off)."""
    with state.client() as client:
        enabled = client.set_analytics_tracking(conversation, state_word == "on", user_id)
    click.echo(f"conversation {conversation}: analytics tracking {'on' if enabled else 'off'}")


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


TRACE_COLUMNS = ["when", "session", "trace", "span", "status", "ms"]


def find_trace(client: Client, trace_id: str, user_id) -> tuple:
    """(user_id, trace_id) of a trace given by id or by the start of its id (as `traces
    list` shows it), for one user or the only user that has it."""
    rows = client.list_traces(trace_id=trace_id, user_id=user_id, page_size=1000)
    if not rows:
        prefix = trace_id.rstrip("…").lower()
        if prefix:
            found = client.list_traces(search=prefix, user_id=user_id, page_size=1000)
            if len(found) == 1000:  # more spans match than one page: the newest could mislead
                raise SessiontagError(f"too many spans mention {prefix!r} to tell which trace it starts;"
                                      " give more of the trace id")
            rows = [r for r in found if r.trace_id.lower().startswith(prefix)]
    ids = sorted({r.trace_id for r in rows})
    if not ids:
        raise SessiontagError(f"no trace {trace_id}" + (f" for user {user_id}" if user_id else ""))
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise SessiontagError(f"{trace_id} starts {len(ids)} trace ids ({shown}); give more of it")
    users = {r.user_id for r in rows}
    if len(users) > 1:
        raise SessiontagError(f"trace {ids[0]} exists for {len(users)} users; give --user")
    return users.pop(), ids[0]


@cli.group()
def traces() -> None:
    """Search traces and show span trees."""


@traces.command("list")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's spans.")
@click.option("--tag", "session_tag", help="Only this session tag.")
@click.option("--conversation", "conversation_id", type=click.UUID, help="Only this conversation.")
@click.option("--trace", "trace_id", help="Only the spans of this trace.")
@click.option("--model", "model_name", help="Only spans of this model: a name spans carry, else a"
              " registered model's name, key or id.")
@click.option("--status", type=click.Choice(["running", "success", "error", "cancelled"]))
@click.option("--operation", "operation_type", help="Only this operation type (llm_call, chain, ...).")
@click.option("--since", type=TIME, help="Started at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Started before (ISO time or age).")
@click.option("--search", help="Literal, case-insensitive text in the tag, trace id, span or model name.")
@click.option("--roots", "roots_only", is_flag=True, help="Only root spans (one per trace).")
@click.option("--cursor", "after", help="Continue after this cursor (printed after a full page).")
@click.option("--limit", "page_size", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
@pass_state
def traces_list(state: State, fmt: str, page_size: int, **filters) -> None:
    """List spans, newest first."""
    with state.client() as client:
        def fetch():
            return checked_page(lambda: client.list_traces(page_size=page_size, **filters),
                                filters["since"], filters["until"])

        rows = fetch()
        if not rows and filters["model_name"] and not filters["after"]:
            # No span of the page carries that name: it may be a registered model's key or id.
            found = find_models(client, filters["model_name"])
            if found and found[0].name != filters["model_name"]:
                filters["model_name"] = found[0].name
                rows = fetch()
            elif not found and not client.list_traces(model_name=filters["model_name"], page_size=1):
                raise SessiontagError(_no_model(filters["model_name"], ", and no span carries that model name"))
    if fmt == "table":
        emit([{"when": views.local_time(r.start_time, with_date="short"), "session": r.session_tag or "-",
               "trace": views.clip(r.trace_id, 8), "span": views.clip(r.span_name, 14),
               "status": r.status, "ms": views.ms(r.duration_ms)} for r in rows], fmt, TRACE_COLUMNS)
    else:
        emit(rows, fmt, columns_of(TraceRow))
    users = {r.user_id for r in rows}
    if filters["session_tag"] and filters["user_id"] is None and len(users) > 1:
        click.echo(f"note: {len(users)} users hold tag {filters['session_tag']} (each user numbers their own "
                   "sessions); add --user to see one session", err=True)
    page_hint(rows, page_size, model_name=filters["model_name"])  # the name this page matched


@traces.command("show")
@click.argument("trace_id")
@click.option("--user", "user_id", type=USER_ID, help="The trace's user (needed when several users have this trace id).")
@format_option
@pass_state
def traces_show(state: State, trace_id: str, user_id: str | None, fmt: str) -> None:
    """Show every span of TRACE_ID (or of the one trace whose id starts so) as a tree."""
    with state.client() as client:
        user_id, trace_id = find_trace(client, trace_id, user_id)
        spans = client.get_trace(user_id, trace_id)
        tags = {s.session_tag for s in spans if s.session_tag}
        badge = client.session_badge(next(iter(tags)), spans[0].user_id) if len(tags) == 1 else None
    if fmt != "table":
        emit(spans, fmt)
        return
    root = spans[0]
    click.echo(f"trace {trace_id}")
    click.echo(f"user {root.user_id}")
    click.echo(f"session {', '.join(sorted(tags)) or '-'}" + (f"  {badge}" if badge else ""))
    click.echo(f"started {views.local_time(root.start_time)}")
    click.echo()
    for line in views.span_tree(as_dict(s) for s in spans):
        click.echo(line)


SESSION_COLUMNS = ["session", "badge", "user", "traces", "errors", "cost"]


def _session_cells(s) -> dict:
    return {"session": s.session_id, "badge": views.clip_badge(s.badge, 22), "user": str(s.user_id)[:8],
            "traces": s.trace_count, "errors": s.error_count, "cost": f"${s.cost_usd:.4f}"}


@sessions.command("list")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's sessions.")
@click.option("--model", help="Only sessions of this model (name, key or id).")
@click.option("--since", type=TIME, help="Created at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Created before (ISO time or age).")
@click.option("--cursor", "after", help="Continue after this cursor (printed after a full page).")
@click.option("--limit", "page_size", type=click.IntRange(1, 1000), default=50, show_default=True)
@format_option
@pass_state
def sessions_list(state: State, user_id, model, since, until, after, page_size, fmt) -> None:
    """List tagged sessions with their metrics, newest first."""
    with state.client() as client:
        model_id = resolve_model(client, model).id if model else None
        rows = checked_page(lambda: client.list_sessions(user_id=user_id, model_id=model_id, since=since,
                                                         until=until, after=after, page_size=page_size),
                            since, until)
    if fmt == "table":
        emit([_session_cells(s) for s in rows], fmt, SESSION_COLUMNS)
    else:
        emit(rows, fmt, columns_of(SessionSummary))
    page_hint(rows, page_size)


@sessions.command("show")
@click.argument("tag")
@click.option("--user", "user_id", type=USER_ID, help="The session's user (needed when several users hold this tag).")
@format_option
@pass_state
def sessions_show(state: State, tag: str, user_id: str | None, fmt: str) -> None:
    """Show a session: badge, full tag and metrics (one block per user holding TAG)."""
    with state.client() as client:
        summaries = client.session_summary(tag, user_id)
    if not summaries:
        raise SessiontagError(f"no session {tag}" + (f" for user {user_id}" if user_id else ""))
    if fmt != "table":
        emit(summaries, fmt)
        return
    for i, s in enumerate(summaries):
        pairs = [("badge", s.badge), ("session", s.session_id), ("user", s.user_id),
                 ("conversation", s.conversation_id), ("model", f"{s.model_name} ({s.model_id})" if s.model_id else "-"),
                 ("traces", s.trace_count), ("errors", s.error_count),
                 ("tokens", f"{s.input_tokens} in, {s.output_tokens} out"), ("cost", f"${s.cost_usd:.6f}"),
                 ("latency", f"p50 {views.ms(s.p50_ms)}, p95 {views.ms(s.p95_ms)}"),
                 ("first", views.local_time(s.first_at)), ("last", views.local_time(s.last_at))]
        width = max(len(k) for k, _ in pairs)
        if i:
            click.echo()
        for key, value in pairs:
            click.echo(f"{key:<{width}}  {value}")


COMPARE_COLUMNS = ["model", "sessions", "traces", "errors", "p50", "p95", "tokens", "$/session"]


@cli.command("compare")
@click.option("--user", "user_id", type=USER_ID, help="Only this user's sessions.")
@click.option("--model", "models_", multiple=True, help="Only these models (name, key or id; repeat the option).")
@click.option("--since", type=TIME, help="Sessions created at or after (ISO time or age: 30m, 24h, 7d).")
@click.option("--until", type=TIME, help="Sessions created before (ISO time or age).")
@format_option
@pass_state
def compare_cmd(state: State, user_id, models_, since, until, fmt) -> None:
    """Compare models session by session, side by side."""
    with state.client() as client:
        model_ids = [resolve_model(client, m).id for m in models_] or None
        rows = checked_page(lambda: client.compare_models(user_id=user_id, model_ids=model_ids, since=since,
                                                          until=until), since, until)
    if fmt != "table":
        emit(rows, fmt, columns_of(ModelComparison))
        return
    emit([{"model": views.clip(r.model_name, 18), "sessions": r.sessions, "traces": r.traces,
           "errors": "-" if r.error_rate is None else f"{r.error_rate:.1%}", "p50": views.ms(r.p50_ms),
           "p95": views.ms(r.p95_ms), "tokens": views.count(r.input_tokens + r.output_tokens),
           "$/session": f"${r.cost_per_session:.4f}"} for r in rows], fmt, COMPARE_COLUMNS)
    if rows:
        click.echo()
        chart = [dict(model_name=r.model_name, p50=r.p50_ms, cost=float(r.cost_per_session),
                      errors=r.error_rate) for r in rows]
        for line in views.comparison_chart(chart, [
                ("p50", "p50 latency", views.ms),
                ("cost", "cost per session", lambda v: f"${v:.4f}"),
                ("errors", "error rate", lambda v: "-" if v is None else f"{v:.1%}")]):
            click.echo(line)


# -- ingest -------------------------------------------------------------------------
class Interrupted(SessiontagError):
    """Ctrl-C: the CLI says what was stored and exits with status 130."""


class NotANumber(str):
    """NaN, Infinity or -Infinity: Python's json reads them, but JSON has no such numbers."""


# Numbers are read as Decimal (1e400 is a number PostgreSQL keeps, not a float infinity),
# and only to check them: each span is sent as the JSON text it was given, every digit kept.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=NotANumber)
_SPACE = re.compile(r"[ \t\n\r]*")
_MAYBE_UNSTORABLE = re.compile(r"NaN|Infinity|\\u(0000|[dD][89a-fA-F])")  # cheap test before the walk
_UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL text holds neither NUL nor lone surrogates
_BAD_ELEMENT = re.compile(r"^spans\[(\d+)\](\.|: )(.*)$", re.DOTALL)


def _at(location: str, rest: str, field: bool) -> str:
    """'line 3: cost_usd: ...' (JSON lines), 'spans[3].cost_usd: ...' (array), 'line 3: ...' (no field)."""
    return f"{location}{'.' if field and not location.startswith('line') else ': '}{rest}"


def _unstorable(value, path: str = "") -> tuple[str, str] | None:
    """(where, why) of the first value in VALUE that PostgreSQL cannot store, else None."""
    def bad_text(text: str) -> str | None:
        char = _UNSTORABLE_CHAR.search(text)
        return char and f"holds U+{ord(char.group()):04X}, which PostgreSQL text cannot store"

    if isinstance(value, NotANumber):
        return path, f"{value} is not a number JSON allows"
    if isinstance(value, str):
        return (path, why) if (why := bad_text(value)) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if why := bad_text(key):
                return path, f"a key {why}"
            if problem := _unstorable(item, f"{path}.{key}" if path else key):
                return problem
    if isinstance(value, list):
        for index, item in enumerate(value):
            if problem := _unstorable(item, f"{path}[{index}]"):
                return problem
    return None


def _check_storable(value, text: str, location: str) -> None:
    if _MAYBE_UNSTORABLE.search(text) and (problem := _unstorable(value)):
        path, why = problem
        raise SessiontagError(_at(location, f"{path}: {why}" if path else why, bool(path)))


def _array_elements(text: str, start: int) -> list[tuple]:
    """(value, JSON text, 'spans[i]') of each element of the JSON array opening at START."""
    elements = []
    at = _SPACE.match(text, start + 1).end()
    while not text.startswith("]", at):
        if elements:
            if not text.startswith(",", at):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
            at = _SPACE.match(text, at + 1).end()
        value, end = _DECODER.raw_decode(text, at)
        elements.append((value, text[at:end], f"spans[{len(elements)}]"))
        at = _SPACE.match(text, end).end()
    end = _SPACE.match(text, at + 1).end()
    if end < len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return elements


def read_documents(text: str) -> list[tuple]:
    """(value, JSON text, where) of each span of a JSON array or of JSON lines, or of the
    one JSON document (an OTLP request, or a span) the text is; `where` is "spans[3]" or
    "line 12", for error messages. Values PostgreSQL cannot store are refused here."""
    start = _SPACE.match(text).end()
    try:
        if text.startswith("[", start):
            documents = _array_elements(text, start)
        else:
            # The first value is the whole text (one document, maybe on many lines), or
            # the first line of JSON lines; where it breaks, that is where the text does.
            value, end = _DECODER.raw_decode(text, start)
            if _SPACE.match(text, end).end() == len(text):
                line = text.count("\n", 0, start) + 1
                documents = [(value, text[start:end], f"line {line}")]
            else:
                documents = list(_json_lines(text))
    except json.JSONDecodeError as exc:
        raise SessiontagError(f"line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    for value, span_text, where in documents:
        _check_storable(value, span_text, where)
    return documents


def _json_lines(text: str):
    offset = 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield _DECODER.decode(line), line, f"line {number}"
            except json.JSONDecodeError as exc:  # at its place in the whole text, for the line number
                raise json.JSONDecodeError(exc.msg, text, offset + exc.pos) from None
        offset += len(line) + 1


def _otlp_span_count(doc: dict) -> int:
    """How many spans an OTLP request holds (ingest_otlp judges its shape)."""
    def items(value) -> list:
        return value if isinstance(value, list) else []

    return sum(len(items(scope.get("spans"))) for resource in items(doc.get("resourceSpans"))
               if isinstance(resource, dict) for scope in items(resource.get("scopeSpans")) if isinstance(scope, dict))


def _otlp_request(documents: list[tuple]) -> dict | None:
    """The document, when the text is one OTLP/JSON ExportTraceServiceRequest."""
    value, _, where = documents[0] if len(documents) == 1 else (None, "", "")
    return value if where.startswith("line") and isinstance(value, dict) and "resourceSpans" in value else None


def _stored_line(stored: int, total: int, kind: str = "") -> str:
    skipped = total - stored
    return f"stored {stored} of {total} spans{kind}" + (
        f" ({skipped} skipped: already stored, or of conversations with tracking off)" if skipped > 0 else "")


@cli.command("ingest", short_help="Store spans from a JSON, JSON lines or OTLP file.")
@click.argument("source", metavar="FILE|-", type=click.File("r", encoding="utf-8-sig"))
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Spans per ingest_traces call.")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr: a bar on a terminal, else a line per batch (default: on a terminal).")
@click.option("--default-user", "default_user_id", type=USER_ID,
              help="OTLP only: the user of spans without a user.id attribute.")
@pass_state
def ingest_cmd(state: State, source, batch_size: int, progress: bool | None, default_user_id) -> None:
    """Store the spans of FILE (- reads standard input): a JSON array, or JSON lines (one
    span per line), keyed by record_trace's parameter names; status running and no
    end_time for a span still open; or an OTLP/JSON ExportTraceServiceRequest (an
    OpenTelemetry export). All or nothing: on bad input nothing is stored and the error
    names the line (or array index, or OTLP path) and the field."""
    try:
        click.echo(_ingest(state, source, batch_size, progress, default_user_id))
    except KeyboardInterrupt:
        raise Interrupted("interrupted; nothing was stored") from None


def _ingest(state: State, source, batch_size: int, progress: bool | None, default_user_id) -> str:
    """Stores the file in one transaction; returns the summary line."""
    try:
        text = source.read()
    except UnicodeDecodeError as exc:
        raise SessiontagError(f"{source.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise SessiontagError(f"{source.name}: no spans (it is empty)")
    documents = read_documents(text)
    otlp = _otlp_request(documents)
    if otlp is None and default_user_id is not None:
        raise SessiontagError("--default-user applies to OTLP exports only; give each span its user_id")
    with state.client(autocommit=False) as client:  # closed uncommitted on any error: nothing is stored
        if otlp is not None:
            try:
                stored = client.ingest_otlp(documents[0][1], default_user_id)
            except DatabaseError as exc:
                message = str(exc).replace("default_user_id", "--default-user")
                raise SessiontagError(f"{message}; nothing was stored") from None
            summary = _stored_line(stored, _otlp_span_count(otlp), " (OTLP)")
        else:
            summary = _ingest_spans(client, documents, batch_size,
                                    sys.stderr.isatty() if progress is None else progress)
        try:
            client.conn.commit()
        except KeyboardInterrupt:
            raise Interrupted("interrupted while committing: the spans may or may not be stored") from None
    return summary


def _ingest_spans(client: Client, documents: list[tuple], batch_size: int, show: bool) -> str:
    bar_file = sys.stderr if show and sys.stderr.isatty() else io.StringIO()  # else a line per batch
    stored, total = 0, len(documents)
    with click.progressbar(length=total, label="ingesting", file=bar_file) as bar:
        for start in range(0, total, batch_size):
            batch = documents[start:start + batch_size]
            try:
                stored += client.ingest("[" + ",".join(span_text for _, span_text, _ in batch) + "]")
            except DatabaseError as exc:
                match = _BAD_ELEMENT.match(str(exc))
                if match is None:
                    raise SessiontagError(f"{exc}; nothing was stored") from None
                location = batch[int(match.group(1))][2]
                raise SessiontagError(f"{_at(location, match.group(3), match.group(2) == '.')}; nothing was stored") \
                    from None
            bar.update(len(batch))
            if show and bar_file is not sys.stderr:
                click.echo(f"ingesting: {start + len(batch)} of {total} spans sent", err=True)
    return _stored_line(stored, total)


# -- demo ---------------------------------------------------------------------------
@cli.command("demo", short_help="Load a realistic demo workload.")
@click.option("--seed", type=int, help="Random seed, for a repeatable workload.")
@click.option("--users", type=click.IntRange(1, 1000), default=5, show_default=True)
@pass_state
def demo_cmd(state: State, seed: int | None, users: int) -> None:
    """Load a realistic multi-user, multi-model workload through the SQL API."""
    from . import demo

    with state.client() as client:
        result = demo.run(client, seed, users)
    click.echo(f"loaded {result.sessions} sessions of {result.users} users with {result.traces} traces "
               f"({result.spans} spans) across {len(demo.MODELS)} models")
    click.echo("next:  sessiontag sessions list\n       sessiontag compare")
    if result.example:
        tag, user_id = result.example
        click.echo(f"       sessiontag traces list --tag {tag} --user {user_id}")


# -- entry point --------------------------------------------------------------------
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


if __name__ == "__main__":
    main()
