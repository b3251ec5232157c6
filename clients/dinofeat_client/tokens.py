"""Credential files, read the same way by server and client: access tokens (one per line, blank
lines and # comments ignored) and TLS certificates and keys."""

from __future__ import annotations

from pathlib import Path

from .errors import DinofeatError


def read_credential(path: str | Path, what: str) -> bytes:
    """The bytes of a certificate or key file, or one sentence saying why they cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise DinofeatError(f"cannot read the {what} {path} ({error.strerror}).") from None


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a token file; an empty or unreadable file is an error, not an open door."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DinofeatError(f"cannot read the token file {path} ({error.strerror}).") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise DinofeatError(f"the token file {path} holds no token; put one token per line.")
    return tokens
