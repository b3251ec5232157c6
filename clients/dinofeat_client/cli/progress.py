"""Progress of a command as one line: the stage in words, its share done, the time so far and one estimate of the time
left for the whole command; rewritten in place on a terminal, a line every few seconds in a log."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from dinofeat.contract.durations import spoken_duration

STAGE_WORDS = {
    "loading": "loading the model",
    "fitting the feature space": "fitting the feature space",
    "fitting": "fitting the analysis",
    "tiles": "computing deep features",
    "views": "computing deep features",
    "rows": "computing features",
    "training": "training the classifier",
    "segmenting": "segmenting the queries",
    "receiving": "receiving",
    "features": "sending the features",
    "probabilities": "predicting the classes",
    "cached": "reading the cached result",
    "images": "images",
    "slices": "computing the slices",
}
"""What the server's and the client's stage names ("tiles", "rows", ...) mean, as the progress line says it."""
CONTEXT = re.compile(r"^((?:(?:pass|slice|image) \d+/\d+|support|query): )+")
"""The prefixes jobs.py puts before a stage name ("query: slice 2/5: tiles", "pass 1/2: rows"): which part of the
work it is on."""
PLACE = re.compile(r"(?:pass|slice|image) (\d+)/(\d+): ")
"""Where a stage is in a sequence of passes, slices or images: ("2", "5") for "slice 2/5: "."""
BACKGROUND = ("receiving", "features", "images")
"""Stages that run beside or around the others (the client receiving, the server sending the chunks the work makes, a
batch's images): shown only when no other stage is running."""
TERMINAL_TICK_S = 1.0
"""How often the line on a terminal is redrawn when no progress arrives (its time so far moves on)."""


def stage_words(stage: str) -> str:
    """A stage's name in words, with the part of the input it is on: "query: slice 2/5: tiles" -> "computing deep
    features (query, slice 2/5)"."""
    context = CONTEXT.match(stage)
    name = stage[context.end():] if context else stage
    words = STAGE_WORDS.get(name, name)
    if context:
        words += " (" + ", ".join(part.strip() for part in context.group(0).split(":") if part.strip()) + ")"
    return words


@dataclass
class Stage:
    """One stage as heard: when it began, its last count, and how many times it began again (a second pass)."""

    name: str
    began: float
    done: int = 0
    total: int = 0
    passes: int = 1
    heard: float = 0.0

    @property
    def running(self) -> bool:
        return self.total <= 0 or self.done < self.total

    def seconds_left(self, now: float) -> float | None:
        """The time this stage needs still at its rate so far, and as long again for each later slice or image its
        name counts ("slice 2/5: tiles": three more); None before its first unit is done."""
        spent = now - self.began
        if self.total <= 0 or self.done <= 0 or spent <= 0:
            return None
        later = sum(int(total) - int(number) for number, total in PLACE.findall(self.name))
        return spent * (self.total - self.done) / self.done + later * spent * self.total / self.done


class ProgressBars:
    """The progress of one command, told as one line (the class keeps its old name: every command takes it as `bars`).

    Called with (stage, done, total) for each report from the server or the client ("tiles", "rows", "receiving",
    "images", ...). The line names the oldest stage still running in words, with its own count and share (a stage
    that starts counting again is a new pass, "... again", never the same share going back; in a batch each image
    begins its stages afresh under "image k of n"), the transfers running beside it ("receiving 40/212"), the time
    since the command's first report, and one estimate of the time left: the longest of the running stages', each
    with the passes, slices or images its name says are still to come. On a terminal the line is rewritten in place, and redrawn every second when
    no report comes (a deep tile can take minutes); elsewhere (logs, pipes, batch jobs) a line is printed every
    `every_s` seconds while the command runs, so a log shows that it is alive and when it should end."""

    def __init__(self, enabled: bool, terminal: bool = True, every_s: float = 5.0):
        self.enabled = enabled
        self.terminal = terminal
        self.every_s = every_s
        self.stages: dict[str, Stage] = {}
        self.started: float | None = None
        self.last_heard = time.monotonic()  # when the last report came (or the command began)
        self.last_line = 0.0
        self.shown = False  # a line is on the terminal now
        self.lock = threading.RLock()
        self.ticker: threading.Thread | None = None
        self.stopped = threading.Event()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            now = time.monotonic()
            if self.started is None:  # the command's first report: no rate before it (start-up is not work)
                self.started = self.last_heard = self.last_line = now
                ACTIVE.append(self)
                self.start_ticker()
            self.record(stage, done, total, now)
            if self.terminal:
                self.draw(now)
            elif (self.every_s <= 0 or now - self.last_line >= self.every_s) and self.current() is not None:
                self.log(now)

    def record(self, name: str, done: int, total: int, now: float) -> None:
        """Note a report; a count that goes back begins the stage's next pass. A stage (or pass) first heard midway
        began when the report before it came, so that its first units are counted in its rate."""
        began = self.last_heard if done else now
        self.last_heard = now
        stage = self.stages.get(name)
        if stage is None:
            stage = self.stages[name] = Stage(name, began)
        elif done < stage.done or (done == 0 and not stage.running):
            stage.began, stage.passes = began, stage.passes + 1
        stage.done, stage.total, stage.heard = done, total, now

    def current(self) -> Stage | None:
        """The stage to name: the oldest one running that is not a background stage, else the oldest one running,
        else (between stages) the one heard last."""
        running = [s for s in self.stages.values() if s.running]
        foreground = [s for s in running if s.name not in BACKGROUND]
        if foreground or running:
            return min(foreground or running, key=lambda s: s.began)
        return max(self.stages.values(), key=lambda s: s.heard, default=None)

    def seconds_left(self, now: float) -> float | None:
        """One estimate for the whole command: the longest time left of the stages running now (Stage.seconds_left)."""
        estimates = [left for s in self.stages.values() if s.running and (left := s.seconds_left(now)) is not None]
        return max(estimates) if estimates else None

    def line(self, now: float) -> str:
        """The progress line: stage in words, its count and share, the time so far and the time left."""
        stage = self.current()
        images = self.stages.get("images")
        in_batch = images is not None and images.total > 1 and stage is not images and images.running
        parts = []
        if stage is not None:
            again = "" if in_batch else " again" if stage.passes == 2 else f", pass {stage.passes}" if stage.passes > 2 else ""
            words = stage_words(stage.name) + again
            if stage.total > 1:
                words += f" {stage.done}/{stage.total} ({100 * stage.done // stage.total} %)"
            parts.append(words)
        parts += [f"{stage_words(s.name)} {s.done}/{s.total}" for s in self.stages.values()  # transfers beside the work
                  if s.running and s.name in BACKGROUND and s.name != "images" and s is not stage and s.total > 1]
        parts.append(f"{spoken_duration(now - (self.started or now))} so far")
        left = self.seconds_left(now)
        if left is not None:
            parts.append(f"about {spoken_duration(left)} left")
        if in_batch:
            parts.insert(0, f"image {min(images.done + 1, images.total)} of {images.total}")
        return "dinofeat: " + ", ".join(parts)

    def draw(self, now: float) -> None:
        """Rewrite the terminal's progress line in place (cut to the terminal's width)."""
        width = shutil.get_terminal_size((100, 24)).columns - 1
        sys.stderr.write("\r" + self.line(now)[:width] + "\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def log(self, now: float) -> None:
        """Print the progress line for a log (no carriage return)."""
        self.last_line = now
        print(self.line(now), file=sys.stderr, flush=True)

    def start_ticker(self) -> None:
        """Redraw (terminal) or log the line on time while the command runs, also when no report comes."""
        tick = TERMINAL_TICK_S if self.terminal else self.every_s
        if tick <= 0:
            return
        self.stopped.clear()
        self.ticker = threading.Thread(target=self.tick, args=(tick,), name="dinofeat-progress", daemon=True)
        self.ticker.start()

    def tick(self, every_s: float) -> None:
        while not self.stopped.wait(every_s):
            with self.lock:
                if self.stopped.is_set() or self.current() is None:
                    continue
                now = time.monotonic()
                if self.terminal:
                    self.draw(now)
                elif now - self.last_line >= self.every_s:
                    self.log(now)

    def clear(self) -> None:
        """Take the terminal's line away (before another message is printed, or at the end)."""
        with self.lock:
            if self.shown:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
                self.shown = False

    def close(self) -> None:
        """End the progress of this command: stop redrawing and clear the line; a later report starts afresh."""
        self.stopped.set()
        if self.ticker is not None and self.ticker is not threading.current_thread():
            self.ticker.join(timeout=2)
        self.ticker = None
        self.clear()
        if self in ACTIVE:
            ACTIVE.remove(self)
        with self.lock:
            self.stages.clear()
            self.started = None


ACTIVE: list[ProgressBars] = []
"""The command's progress line, which `say` clears before printing its message."""


def progress_seconds() -> float:
    """Seconds between progress lines when stderr is not a terminal: $DINOFEAT_PROGRESS_SECONDS, default 5."""
    value = os.environ.get("DINOFEAT_PROGRESS_SECONDS", "5")
    try:
        return max(float(value), 0.0)
    except ValueError:
        print(f"dinofeat: DINOFEAT_PROGRESS_SECONDS is {value!r}, not a number of seconds; using 5.", file=sys.stderr)
        return 5.0


def say(message: str) -> None:
    """A line for the user on stderr: retries, and notices from the server (e.g. a long computation's estimate)."""
    tell(message, sys.stderr)


def tell(message: str, stream=None) -> None:
    """Print a line (on stdout unless `stream` says otherwise) while a command's progress may be on the terminal: the
    progress line is cleared first, and redrawn at its next report or tick, so the two never share a line."""
    with contextlib.ExitStack() as held:
        for bars in list(ACTIVE):
            held.enter_context(bars.lock)
            bars.clear()
        print(message, file=stream or sys.stdout, flush=True)
