"""What each client has used, for `dinofeat status`: requests finished, cancelled, refused and cut off
for stalling, and bytes sent. What it uses now (calls open, workers, uploads in flight) comes from the
scheduler and the image store; this file only keeps the totals and puts the two together."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from dinofeat.v1 import feature_service_pb2 as pb

REMEMBERED_CLIENTS = 1024
"""Totals of this many clients are kept (the least recently seen are forgotten beyond it)."""


@dataclass
class ClientTotals:
    finished: int = 0
    cancelled: int = 0
    refused: int = 0
    stalled: int = 0
    bytes_sent: int = 0


class Usage:
    """Client -> its totals since the server started (the REMEMBERED_CLIENTS most recently seen)."""

    def __init__(self) -> None:
        self._totals: OrderedDict[str, ClientTotals] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, client: str) -> ClientTotals:
        with self._lock:
            totals = self._totals.setdefault(client, ClientTotals())
            self._totals.move_to_end(client)
            while len(self._totals) > REMEMBERED_CLIENTS:
                self._totals.popitem(last=False)
            return totals

    def report(self, calls: dict[str, tuple[int, int, int]], uploads: dict[str, int]) -> list[pb.ClientUse]:
        """One row per client that has a call open or is remembered: `calls` is the scheduler's
        client -> (open, running, waiting), `uploads` the image store's client -> bytes in flight."""
        with self._lock:
            totals = dict(self._totals)
        rows = []
        for client in sorted(set(totals) | set(calls) | set(uploads)):
            done = totals.get(client, ClientTotals())
            open_calls, running, waiting = calls.get(client, (0, 0, 0))
            rows.append(pb.ClientUse(client=client, open_calls=open_calls, running=running, queued=waiting,
                                     upload_bytes=uploads.get(client, 0), finished=done.finished, cancelled=done.cancelled,
                                     refused=done.refused, stalled=done.stalled, bytes_sent=done.bytes_sent))
        return rows
