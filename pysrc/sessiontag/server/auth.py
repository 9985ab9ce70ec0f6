"""Bearer tokens of `sessiontag serve`: each names the user its spans belong to, or none
(any user, as the spans say). A token bound to a user is enforced by the database
(row-level security under the sessiontag_user role), not here: this module only finds
which token a request holds."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID


class TokenError(ValueError):
    """A token or tokens file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Token:
    secret: str
    user_id: UUID | None = None  # None: any user


def parse_token(text: str, where: str) -> Token:
    """TOKEN (any user) or TOKEN:USER_ID (that user only)."""
    secret, _, user = text.strip().partition(":")
    if not secret or any(c.isspace() for c in secret):
        raise TokenError(f"{where}: a token must be non-empty and hold no whitespace")
    if not user:
        return Token(secret)
    try:
        return Token(secret, UUID(user.strip()))
    except ValueError:
        raise TokenError(f"{where}: {user.strip()!r} is not a user id (TOKEN:USER_ID takes a whole UUID)") from None


def load_tokens(tokens: tuple[str, ...] | list[str] = (), tokens_file: str | Path | None = None) -> list[Token]:
    """The tokens given on the command line and in a file (one TOKEN or TOKEN:USER_ID a
    line; blank lines and lines starting with # are skipped)."""
    found = [parse_token(t, "--token") for t in tokens]
    if tokens_file is not None:
        try:
            lines = Path(tokens_file).read_text().splitlines()
        except OSError as exc:
            raise TokenError(f"cannot read the tokens file {tokens_file}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(parse_token(line, f"{tokens_file}, line {number}"))
    secrets = [t.secret for t in found]
    if len(set(secrets)) != len(secrets):
        raise TokenError("a token is given twice")
    return found


def find_token(tokens: list[Token], authorization: str | None) -> Token | None:
    """The token an Authorization header holds ('Bearer T'), else None. Every token is
    compared, in constant time, so the answer's timing does not tell how much matched."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    given_bytes = given.strip().encode()
    match = None
    for token in tokens:
        if hmac.compare_digest(token.secret.encode(), given_bytes):
            match = token
    return match
