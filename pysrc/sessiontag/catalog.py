"""The expected shape of schema sessiontag, and how a live database differs from it.

``expected_catalog.json`` is generated from the SQL source (``make catalog``) and
committed, so every schema change shows up as a readable diff; a test fails when it is
out of date. ``sessiontag verify`` compares a live database against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from .resources import query

EXPECTED = Path(__file__).resolve().parent / "expected_catalog.json"

# Section -> the singular noun used in messages.
_NAMED_SECTIONS = {
    "indexes": "index",
    "functions": "function",
    "triggers": "trigger",
    "policies": "policy",
    "types": "type",
}


def snapshot(conn: psycopg.Connection) -> dict:
    """The catalog of schema sessiontag in the database ``conn`` is connected to."""
    return conn.execute(query("catalog")).fetchone()[0]


def expected() -> dict:
    return json.loads(EXPECTED.read_text())


def dumps(catalog: dict) -> str:
    return json.dumps(catalog, indent=2, sort_keys=True) + "\n"


def _changes(a, b) -> str:
    """What differs between two entries, briefly."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" if k != "source_md5" else "body" for k in keys)
    return f"{a!r} -> {b!r}"


def _compare_named(kind: str, want: dict, have: dict, out: list[str], prefix: str = "") -> None:
    for name in sorted(set(want) - set(have)):
        out.append(f"missing {kind} {prefix}{name}")
    for name in sorted(set(have) - set(want)):
        out.append(f"extra {kind} {prefix}{name}")
    for name in sorted(set(want) & set(have)):
        if want[name] != have[name]:
            out.append(f"changed {kind} {prefix}{name}: {_changes(want[name], have[name])}")


def diff(want: dict, have: dict) -> list[str]:
    """One line per difference: missing, extra or changed objects. Empty: no drift."""
    out: list[str] = []
    if want.get("schema") != have.get("schema"):
        out.append(f"changed schema sessiontag: {_changes(want.get('schema'), have.get('schema'))}")
    want_tables, have_tables = want.get("tables", {}), have.get("tables", {})
    for name in sorted(set(want_tables) - set(have_tables)):
        out.append(f"missing table {name}")
    for name in sorted(set(have_tables) - set(want_tables)):
        out.append(f"extra table {name}")
    for name in sorted(set(want_tables) & set(have_tables)):
        w, h = want_tables[name], have_tables[name]
        _compare_named("column", w.get("columns") or {}, h.get("columns") or {}, out, f"{name}.")
        _compare_named("constraint", w.get("constraints") or {}, h.get("constraints") or {}, out, f"{name}.")
        rest_w = {k: v for k, v in w.items() if k not in ("columns", "constraints")}
        rest_h = {k: v for k, v in h.items() if k not in ("columns", "constraints")}
        if rest_w != rest_h:
            out.append(f"changed table {name}: {_changes(rest_w, rest_h)}")
    for section, kind in _NAMED_SECTIONS.items():
        _compare_named(kind, want.get(section, {}), have.get(section, {}), out)
    return out
