"""Printing rows as a table, JSON or CSV (the CLI's --format)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from datetime import datetime
from decimal import Decimal
from typing import Any, Iterable
from uuid import UUID

import tabulate as _tabulate
from tabulate import tabulate


FORMATS = ("table", "json", "csv")


def as_dict(row: Any) -> dict:
    if dataclasses.is_dataclass(row):
        return dataclasses.asdict(row)
    return dict(row)


def columns_of(row_type: type) -> list[str]:
    """The columns of a row type (a dataclass), for output that has a header even when empty."""
    return [field.name for field in dataclasses.fields(row_type)]


def _plain(value: Any) -> Any:
    """A value as JSON and CSV show it."""
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no infinities: strings, as protobuf's JSON writes them
            return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        # A double holds 15 significant digits: the rest is binary noise (1510.7930000000001).
        return float(f"{value:.15g}")
    if isinstance(value, datetime):
        return value.astimezone().isoformat()  # the user's time zone
    return value


def _csv_cell(value: Any) -> Any:
    """A value as CSV shows it: JSON for objects and arrays, blank for NULL."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return _plain(value)


def _cell(value: Any) -> str:
    """A value as a table shows it: local time, no microseconds, blank for NULL."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(rows: Iterable[Any], fmt: str, columns: list[str] | None = None) -> str:
    dicts = [as_dict(r) for r in rows]
    if columns is None:
        columns = list(dicts[0]) if dicts else []
    if fmt == "json":
        return json.dumps([{c: _plain(d.get(c)) for c in columns} for d in dicts], indent=2, ensure_ascii=False)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for d in dicts:
            writer.writerow([_csv_cell(d.get(c)) for c in columns])
        return buffer.getvalue().rstrip("\n")
    if not dicts:
        return "(no rows)"
    # Columns as wide as their widest cell, so tables fit 80 columns; tabulate only has a
    # module-wide setting for that, restored right after.
    padding, _tabulate.MIN_PADDING = _tabulate.MIN_PADDING, 0
    try:
        return tabulate([[_cell(d.get(c)) for c in columns] for d in dicts], headers=columns, tablefmt="simple",
                        disable_numparse=True)
    finally:
        _tabulate.MIN_PADDING = padding
