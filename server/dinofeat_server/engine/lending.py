"""Work in plan order with spare workers: items ahead go to idle workers, results come out in order.

One mechanism for the tiles of an image (engine/deep.py) and the slices of a volume (service/blocks.py): while
a spare worker is idle, the next item of the plan is lent to it (never the last one left, which this thread
computes, so a one-item plan stays here); this thread computes the others itself. What an item gives is a
sequence of outputs (a tile: its features; a slice: its progress and blocks). Outputs leave in the plan's
order, so the result equals one worker computing every item; progress computed here while lent items are
still ahead shows at once, the rest waits for them. At most `most_ahead` + 2 items' outputs are held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

Output = TypeVar("Output")


def finished_future(value: Output) -> Future[Output]:
    """A future that already holds `value` (outputs this thread computed, queued behind lent ones)."""
    future: Future[Output] = Future()
    future.set_result(value)
    return future


def in_plan_order(count: int, here: Callable[[int], Iterator[Output]], lend: Callable[[int], Future[list[Output]] | None] | None,
                  most_ahead: int, is_progress: Callable[[Output], bool]) -> Iterator[Output]:
    """The outputs of items 0..count-1 in order: `lend(i)` starts item i on an idle worker (None: none is idle, or
    another request waits for one), `here(i)` computes it in this thread. Without `lend`, the plain loop."""
    upcoming: deque[int] = deque(range(count))
    ahead: deque[Future[list[Output]]] = deque()  # outputs of the items before upcoming[0], in order

    def lend_ahead() -> None:
        while lend is not None and len(upcoming) > 1 and len(ahead) <= most_ahead:
            future = lend(upcoming[0])
            if future is None:
                return
            upcoming.popleft()
            ahead.append(future)

    while upcoming or ahead:
        lend_ahead()
        if ahead and (ahead[0].done() or not upcoming or len(ahead) > most_ahead):
            outputs = ahead.popleft().result()  # a lent item's Cancelled or error is raised here
            lend_ahead()  # before handing them on: workers keep computing while they are used
            yield from outputs
            continue
        index = upcoming.popleft()
        if not ahead:
            yield from here(index)
            continue
        held = []
        for output in here(index):
            if is_progress(output):
                yield output
            else:
                held.append(output)
        ahead.append(finished_future(held))
