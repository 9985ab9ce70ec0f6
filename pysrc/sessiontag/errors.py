"""Errors sessiontag raises to its callers."""

from __future__ import annotations


class SessiontagError(Exception):
    """An error a user can act on; the CLI prints it as one line."""


class DatabaseError(SessiontagError):
    """A PostgreSQL error from a sessiontag function, with its SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate

    @classmethod
    def from_psycopg(cls, exc: Exception) -> "DatabaseError":
        diag = getattr(exc, "diag", None)
        sqlstate = getattr(exc, "sqlstate", None)
        text = str(exc).strip()
        primary = getattr(diag, "message_primary", None) or (text.splitlines()[0] if text else type(exc).__name__)
        return cls(f"{primary} (SQLSTATE {sqlstate})" if sqlstate else primary, sqlstate)
