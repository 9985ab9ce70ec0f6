"""Files that ship with sessiontag: the migrations and the SQL source."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    # Installed wheels carry a copy inside the package; a source checkout has it at the top.
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"sessiontag {name}/ directory not found next to {_PACKAGE}")


def migrations_dir() -> Path:
    return _find("migrations")


def sql_dir() -> Path:
    return _find("sql")


def sql_files() -> list[Path]:
    """The SQL source files, in the order that builds the schema."""
    return sorted(sql_dir().glob("[0-9]*.sql"))


def query(name: str) -> str:
    """A named query kept as a .sql file beside the code."""
    return (_PACKAGE / "queries" / f"{name}.sql").read_text()
