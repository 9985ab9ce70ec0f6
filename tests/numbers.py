"""The session numbers a (user, model) has handed out, read as the numbering reads them:
the greater of its counter's last_value (numbers handed out without a conversation, or
kept from deleted ones) and the highest number on its conversations."""

from __future__ import annotations

LAST_NUMBERS = """
    SELECT c.user_id, c.model_id, greatest(c.last_value, coalesce(max(v.session_counter), 0)) AS last
    FROM sessiontag.session_counters c
    LEFT JOIN sessiontag.conversations v ON v.user_id = c.user_id AND v.llm_model_id = c.model_id
    GROUP BY c.user_id, c.model_id, c.last_value
"""


def last_numbers(conn) -> dict[tuple, int]:
    """{(user_id, model_id): the last number handed out} for every key that has numbered."""
    return {(user, model): last for user, model, last in conn.execute(LAST_NUMBERS).fetchall()}


def last_number(conn, user, model=None) -> int | None:
    """The last number handed out to user (with model, or the user's only model); None when none."""
    found = [last for (u, m), last in last_numbers(conn).items() if u == user and model in (None, m)]
    assert len(found) <= 1, f"user {user} numbers with several models: give the model"
    return found[0] if found else None


def numbers_total(conn) -> int:
    """The sum of every key's last number: changes whenever any number is taken."""
    return sum(last_numbers(conn).values())
