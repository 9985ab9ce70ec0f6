"""sessiontag.Client: one method per SQL function of schema sessiontag.

The client holds no SQL logic of its own: each method calls the function of the same
name with named arguments and turns the result into typed rows. Arguments left as None
fall back to the function's own defaults.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from .connection import connect, resolve_dsn
from .errors import DatabaseError
from .types import Conversation, Model, SessionTag


class Client:
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    @classmethod
    def connect(cls, dsn: str | None = None) -> "Client":
        """Connect with --dsn semantics: dsn, else DATABASE_URL, else the local server."""
        return cls(connect(resolve_dsn(dsn), autocommit=True))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------
    def _call(self, function: str, args: dict[str, Any], *, row_type=None, table: bool = False,
              required: tuple[str, ...] = ()) -> list:
        """SELECT sessiontag.function(name => value, ...); None values use the defaults,
        except for the required arguments, which are always passed."""
        passed = {k: v for k, v in args.items() if v is not None or k in required}
        named = sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in passed
        )
        call = sql.SQL("sessiontag.{}({})").format(sql.Identifier(function), named)
        query = sql.SQL("SELECT * FROM {}" if table else "SELECT {}").format(call)
        try:
            with self.conn.cursor(row_factory=class_row(row_type) if row_type else psycopg.rows.tuple_row) as cur:
                cur.execute(query, passed)
                return cur.fetchall()
        except psycopg.Error as exc:
            raise DatabaseError.from_psycopg(exc) from None

    def _scalar(self, function: str, args: dict[str, Any], required: tuple[str, ...] = ()):
        return self._call(function, args, required=required)[0][0]

    # -- models ---------------------------------------------------------------------
    def register_model(self, name: str, provider: str | None = None, model_key: str | None = None,
                       owner_id: UUID | str | None = None, id: UUID | str | None = None) -> UUID:
        return self._scalar("register_model", dict(name=name, provider=provider, model_key=model_key,
                                                   owner_id=owner_id, id=id), required=("name",))

    def model_id(self, model_key: str, owner_id: UUID | str | None = None) -> UUID | None:
        return self._scalar("model_id", dict(model_key=model_key, owner_id=owner_id), required=("model_key",))

    def set_model_tracking(self, model_id: UUID | str, tracked: bool) -> bool:
        return self._scalar("set_model_tracking", dict(model_id=model_id, tracked=tracked),
                            required=("model_id", "tracked"))

    def list_models(self, owner_id: UUID | str | None = None) -> list[Model]:
        return self._call("list_models", dict(owner_id=owner_id), row_type=Model, table=True)

    # -- tags and conversations -----------------------------------------------------
    def generate_session_tag(self, user_id: UUID | str | None, model_id: UUID | str | None) -> SessionTag | None:
        rows = self._call("generate_session_tag", dict(user_id=user_id, model_id=model_id), row_type=SessionTag,
                          table=True, required=("user_id", "model_id"))
        return rows[0] if rows and rows[0].session_id is not None else None

    def generate_session_tags(self, user_id: UUID | str, model_id: UUID | str, n: int) -> list[SessionTag]:
        return self._call("generate_session_tags", dict(user_id=user_id, model_id=model_id, n=n), row_type=SessionTag,
                          table=True, required=("user_id", "model_id", "n"))

    def create_conversation(self, user_id: UUID | str, model_id: UUID | str | None = None, title: str | None = None,
                            id: UUID | str | None = None, analytics_enabled: bool | None = None,
                            external_id: str | None = None, session_id: str | None = None) -> Conversation:
        return self._call("create_conversation", dict(user_id=user_id, model_id=model_id, title=title, id=id,
                                                      analytics_enabled=analytics_enabled, external_id=external_id,
                                                      session_id=session_id),
                          row_type=Conversation, table=True, required=("user_id",))[0]

    def ensure_session_tag(self, conversation_id: UUID | str, model_id: UUID | str | None = None,
                           user_id: UUID | str | None = None) -> str | None:
        return self._scalar("ensure_session_tag", dict(conversation_id=conversation_id, model_id=model_id,
                                                       user_id=user_id), required=("conversation_id",))

    def session_badge(self, session_id: str, user_id: UUID | str | None = None) -> str | None:
        return self._scalar("session_badge", dict(session_id=session_id, user_id=user_id), required=("session_id",))

    def set_analytics_tracking(self, conversation_id: UUID | str, enabled: bool,
                               user_id: UUID | str | None = None) -> bool:
        return self._scalar("set_analytics_tracking", dict(conversation_id=conversation_id, enabled=enabled,
                                                           user_id=user_id), required=("conversation_id", "enabled"))
