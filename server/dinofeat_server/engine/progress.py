"""Progress of long engine work: generators yield what they have done and return their result.

Tile loops, view ensembles and feature-space fits are generators: they yield progress (an
`Advance`, or a count of views) between steps, so the service can stream it and cancel between
steps, and `return` their result, which callers take with `result = yield from ...` or, when
nobody listens, with `run_to_end`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

Result = TypeVar("Result")


@dataclass(frozen=True)
class Advance:
    """Work done so far, for progress: `done` of `total` units of `stage` (tiles, views, crops), and
    optionally a sentence for the user (`notice`, e.g. how long a computation is expected to take)."""

    stage: str
    done: int
    total: int
    notice: str = ""


def run_to_end(steps: Generator[Any, None, Result]) -> Result:
    """Run a generator to its end, ignoring its progress, and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def relayed(messages: Generator[Any, None, Result], wrap: Callable[[Any], Any]) -> Generator[Any, None, Result]:
    """Every message of `messages` wrapped by `wrap` (an Advance as a wire message, say); returns what `messages`
    returns."""
    while True:
        try:
            message = next(messages)
        except StopIteration as done:
            return done.value
        yield wrap(message)
