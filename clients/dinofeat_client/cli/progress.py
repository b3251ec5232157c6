"""Progress bars and messages of the command line: tqdm bars, or one log line per stage when the output is not a terminal."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from ..durations import spoken_duration


class ProgressBars:
    """Progress of each stage the server reports ("tiles", "views", "training", "images", ...).

    On a terminal: one tqdm bar per stage, with its rate and the time left. Elsewhere (logs, pipes,
    batch jobs): one line per stage on stderr every `every_s` seconds while it runs, with the same
    figures, so a long job's log shows it is alive and when it should end; quick stages print nothing."""

    def __init__(self, enabled: bool, terminal: bool = True, every_s: float = 10.0):
        self.enabled = enabled
        self.terminal = terminal
        self.every_s = every_s
        self.bars: dict[str, tqdm] = {}
        self.started: dict[str, tuple[float, float]] = {}  # stage -> (start, last line)
        self.last_heard = time.monotonic()  # a stage first heard midway began when the message before it came

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        began, self.last_heard = self.last_heard, time.monotonic()
        if not self.terminal:
            self.log_line(stage, done, total, began)
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>13}", unit="", leave=False, dynamic_ncols=True)
            if done:
                bar.start_t -= self.last_heard - began
        bar.total = total
        bar.n = done
        bar.refresh()

    def log_line(self, stage: str, done: int, total: int, began: float) -> None:
        now = time.monotonic()
        start, last = self.started.setdefault(stage, (began if done else now, now))
        if now - last < self.every_s or done == 0:
            return
        self.started[stage] = (start, now)
        rate = done / max(now - start, 1e-9)
        left = f", about {spoken_duration((total - done) / rate)} left" if 0 < done < total else ""
        share = f" ({100 * done // total} %)" if total else ""
        print(f"dinofeat: {stage} {done}/{total}{share}, {rate:.3g}/s{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.started.clear()


def progress_seconds() -> float:
    """Seconds between progress lines when stderr is not a terminal: $DINOFEAT_PROGRESS_SECONDS, default 10."""
    value = os.environ.get("DINOFEAT_PROGRESS_SECONDS", "10")
    try:
        return max(float(value), 0.0)
    except ValueError:
        print(f"dinofeat: DINOFEAT_PROGRESS_SECONDS is {value!r}, not a number of seconds; using 10.", file=sys.stderr)
        return 10.0


def say(message: str) -> None:
    """A line for the user on stderr: retries, and notices from the server (e.g. a long computation's estimate)."""
    print(message, file=sys.stderr, flush=True)
