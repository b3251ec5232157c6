"""Durations said the way people say them: 12 s, 3 min 5 s, 2 h 10 min."""

from __future__ import annotations


def spoken_duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 2 h 10 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
