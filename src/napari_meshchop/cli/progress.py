"""The terminal's view of long work: one renderer for every command's events.

A command hands its job generator to :func:`drive`: ``Progress`` events move a bar on
stderr, ``Notice`` events and the kinds the command names in ``lines`` print a line, the
rest pass silently. :class:`StopOnCtrlC` is the stop flag of every stoppable command.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from tqdm import tqdm

from napari_meshchop.events import Notice, Progress, run

T = TypeVar("T")
Lines = dict[type, Callable[[Any], "str | None"]]


def say(text: str) -> None:
    """A line on stderr that does not break a progress bar."""
    tqdm.write(text, file=sys.stderr)


class Console:
    """Shows events: ``Progress`` on a bar (``outer`` events of that type on a second bar
    above it), ``Notice`` and the kinds in ``lines`` as lines. ``quiet`` drops the bars,
    not the lines."""

    def __init__(self, quiet: bool = False, lines: Lines | None = None,
                 outer: type | None = None, width: int = 28):
        self.quiet, self.lines, self.outer, self.width = quiet, lines or {}, outer, width
        self.bars: list[tqdm] = []
        if not quiet:
            for position in range(2 if outer else 1):
                self.bars.append(tqdm(total=1, file=sys.stderr, leave=False, position=position,
                                      dynamic_ncols=True,
                                      bar_format="{desc} {bar} {n_fmt}/{total_fmt} "
                                      "[{elapsed}<{remaining}]{postfix}"))

    def __call__(self, event: Any) -> None:
        for kind, line in self.lines.items():
            if isinstance(event, kind):
                text = line(event)
                if text is not None:
                    say(text)
                return
        if isinstance(event, Notice):
            say(f"meshchop: {event.message}")
        elif self.bars and self.outer is not None and isinstance(event, self.outer):
            self._show(self.bars[0], event)
            self.bars[1].reset(total=1)  # the next unit: its own steps and rate
        elif self.bars and isinstance(event, Progress):
            self._show(self.bars[-1], event)

    def _show(self, bar: tqdm, event: Progress) -> None:
        bar.total, bar.n = max(event.total, 1), event.done
        bar.set_description_str(f"{event.stage}: {event.message}"[:self.width]
                                .ljust(self.width))
        loss = getattr(event, "loss", None)  # training steps
        bar.set_postfix_str("" if loss is None else f"loss={loss:.4f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in reversed(self.bars):
            bar.close()


def drive(job: Generator[Any, None, T], quiet: bool = False, lines: Lines | None = None,
          outer: type | None = None) -> T:
    """Run ``job`` to its end on the terminal (see :class:`Console`); return its result."""
    console = Console(quiet, lines, outer)
    try:
        return run(job, console)
    finally:
        console.close()


class StopOnCtrlC(threading.Event):
    """A stop flag that the first Ctrl-C sets (the job ends cleanly after its step); a
    second Ctrl-C aborts. Use it as a context manager: the previous handler comes back."""

    def __init__(self):
        super().__init__()
        self._previous = None

    def __enter__(self) -> StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_interrupt(self, signum, frame):
        if self.is_set():
            raise KeyboardInterrupt
        self.set()
        say("meshchop: stopping after this step (Ctrl-C again to abort)")
