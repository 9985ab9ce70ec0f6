"""Terminal views of search results: the span tree and the model comparison chart."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Iterable


def local_time(value: datetime | None, with_date: bool | str = True) -> str:
    """In the user's time zone; with_date="short" drops the year, for narrow tables."""
    if value is None:
        return ""
    value = value.astimezone()
    if with_date == "short":
        return value.strftime("%m-%d %H:%M:%S")
    return value.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 10_000 else f"{value:.0f}ms"


def count(value: int | None) -> str:
    """1234 -> '1.2k', for narrow columns."""
    if value is None:
        return "-"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    return f"{value / 1000:.1f}k" if value >= 10_000 else str(value)


def clip(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def clip_badge(badge: str | None, width: int) -> str:
    """A badge cut to width in its model name, never in its number: '[Claude 3.5 Son… #003]'."""
    badge = badge or ""
    if len(badge) <= width or " #" not in badge:
        return clip(badge, width)
    name, number = badge[1:-1].rsplit(" #", 1)
    return f"[{clip(name, max(width - len(number) - 4, 2))} #{number}]"


def _has_next_sibling(spans: list[dict], index: int) -> bool:
    """Does another span at this span's depth follow before the tree climbs above it?"""
    depth = spans[index]["depth"]
    for later in spans[index + 1:]:
        if later["depth"] < depth:
            return False
        if later["depth"] == depth:
            return True
    return False


def span_tree(spans: Iterable[dict]) -> list[str]:
    """Spans in get_trace order (parents first, with depth) drawn as a tree."""
    spans = list(spans)
    lines = []
    open_rails: list[bool] = []  # per depth: does the ancestor at that depth have a sibling to come?
    for i, span in enumerate(spans):
        depth = span["depth"]
        last = not _has_next_sibling(spans, i)
        del open_rails[depth:]
        prefix = "".join("│  " if rail else "   " for rail in open_rails[1:])
        if depth > 0:
            prefix += "└─ " if last else "├─ "
        open_rails.append(not last)
        status = "" if span["status"] == "success" else f" [{span['status']}]"
        usage = ""
        if span.get("input_tokens") is not None or span.get("output_tokens") is not None:
            usage = f" {span.get('input_tokens') or 0}→{span.get('output_tokens') or 0} tok"
        model = f" {span['model_name']}" if span.get("model_name") else ""
        lines.append(f"{prefix}{span['span_name']} ({span['operation_type']}){model} "
                     f"{ms(span.get('duration_ms'))}{usage}{status}")
        if span.get("error_message"):
            rails = "".join("│  " if rail else "   " for rail in open_rails[1:])
            lines.append(f"{rails}   ! {clip(span['error_message'], 70)}")
    return lines


def bar(value: float | None, largest: float | None, width: int = 20) -> str:
    if not value or not largest:
        return ""
    filled = max(1, round(width * value / largest))
    return "█" * filled


def comparison_chart(rows: list[dict], metrics: list[tuple[str, str, Any]], width: int = 24) -> list[str]:
    """For each metric, one bar per model: `label  model  bar  value`."""
    lines = []
    name_width = min(max((len(r["model_name"]) for r in rows), default=5), 18)
    for key, label, fmt in metrics:
        largest = max((r[key] or 0 for r in rows), default=0)
        lines.append(label)
        for r in rows:
            lines.append(f"  {clip(r['model_name'], name_width):<{name_width}}  "
                         f"{bar(float(r[key] or 0), float(largest or 0), width):<{width}}  {fmt(r[key])}")
    return lines


def error_bar(value: float | None, low: float | None, high: float | None, start: float, end: float,
              width: int = 24) -> str:
    """An interval on a shared scale [start, end] as `├──●───┤`: the value at ●, the bounds
    at ├ and ┤; an open bound (no interval, or an infinite one) runs to the edge as ·."""
    if value is None or not end > start or not math.isfinite(value):
        return " " * width

    def at(x: float) -> int:  # halves, so that no difference of doubles overflows
        return min(width - 1, max(0, round((x / 2 - start / 2) / (end / 2 - start / 2) * (width - 1))))

    low = low if low is not None and math.isfinite(low) else None
    high = high if high is not None and math.isfinite(high) else None
    cells = [" "] * width
    left = at(low) if low is not None else 0
    right = at(high) if high is not None else width - 1
    for i in range(left, right + 1):
        cells[i] = "─"
    cells[left] = "├" if low is not None else "·"
    cells[right] = "┤" if high is not None else "·"
    cells[at(value)] = "●"
    return "".join(cells)
