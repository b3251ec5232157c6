"""Credential files, read the same way by server and client: access tokens and TLS certificates and keys.

A token file holds one token per line, optionally after a name (`alice 3f9c...`); blank lines and
# comments are ignored. Tokens have at least 16 characters. The server names its clients by these names; a client's own token file may
hold just its token, or the server's line for it."""

from __future__ import annotations

from pathlib import Path

from .errors import DinofeatError

MIN_TOKEN_LENGTH = 16
"""Shortest token accepted: shorter ones (or a name left alone on its line) are guessable, so the file is refused."""


def read_credential(path: str | Path, what: str) -> bytes:
    """The bytes of a certificate or key file, or one sentence saying why they cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DinofeatError(f"cannot read the {what} {path} ({error.strerror}).") from None


def read_named_tokens(path: str | Path) -> dict[str, str | None]:
    """Token -> its name (None when the line gives none) of a token file; an empty or unreadable file,
    or a token shorter than MIN_TOKEN_LENGTH, is an error, not an open door."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DinofeatError(f"cannot read the token file {path} ({error.strerror}).") from None
    except UnicodeDecodeError:
        raise DinofeatError(f"the token file {path} is not text; put one token per line, optionally after a name.") from None
    named: dict[str, str | None] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise DinofeatError(f"line {number} of the token file {path} has {len(fields)} words; "
                                "write a token, or a name and a token, per line.")
        if len(fields[-1]) < MIN_TOKEN_LENGTH:
            raise DinofeatError(f"line {number} of the token file {path} holds a token of {len(fields[-1])} characters, fewer than "
                                f"the {MIN_TOKEN_LENGTH} a token needs; make one with: python -c 'import secrets; print(secrets.token_hex(16))'")
        named[fields[-1]] = fields[0] if len(fields) == 2 else None
    if not named:
        raise DinofeatError(f"the token file {path} holds no token; put one token per line, optionally after a name.")
    return named


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file, in file order (names left out)."""
    return list(read_named_tokens(path))
