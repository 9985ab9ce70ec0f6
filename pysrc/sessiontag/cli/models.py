"""`sessiontag models add|list|track|untrack`: models whose conversations get session tags.
(find_models and resolve_model, which other groups use too, are in app.py.)"""

from __future__ import annotations

import click

from .. import views
from .app import USER_ID, State, cli, emit, format_option, pass_state, resolve_model

MODEL_COLUMNS = ["id", "short_id", "name", "model_key", "provider", "owner_id", "tracked", "created_at"]


def emit_models(models, fmt: str) -> None:
    """Models; the table leaves out the long columns (json and csv have them all)."""
    if fmt != "table":
        emit(models, fmt, MODEL_COLUMNS)
        return
    emit([{"short_id": m.short_id, "name": views.clip(m.name, 24), "model_key": views.clip(m.model_key, 20),
           "provider": views.clip(m.provider, 12), "owner": str(m.owner_id)[:8] if m.owner_id else "shared",
           "tracked": m.tracked} for m in models], fmt)


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
            found = resolve_model(client, model, owner_id)
            client.set_model_tracking(found.id, tracked)
        named = ", ".join(str(part) for part in (found.model_key, found.id) if part)
        click.echo(f"model {found.name} ({named}): {'tracked' if tracked else 'not tracked'}")

    return command


models.command("track", help="Tag new conversations of MODEL (name, key or id).")(_tracking_command(True))
models.command("untrack", help="Stop tagging new conversations of MODEL (name, key or id).")(_tracking_command(False))
