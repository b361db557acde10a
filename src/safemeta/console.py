"""What a command tells the user while it runs.

Every line goes to stderr (in the workflow: the job's log). With an echo stream (`--echo-fd N`;
the workflow's rules pass the terminal Snakemake runs in as file descriptor 3) the lines a
watching user needs also go there: warnings, each result line, and progress lines at most one
per `every` seconds, the first after `every` seconds, so a short job shows only its result and
a long one shows where it is (iteration, reward, worst cost - d, time left) while it runs.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO


class Console:
    def __init__(self, echo_fd: int | None = None, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._echo: TextIO | None = None
        if echo_fd is not None:
            try:
                self._echo = os.fdopen(echo_fd, "w", buffering=1, closefd=False)
            except OSError as exc:
                raise ValueError(f"--echo-fd {echo_fd} is not an open file descriptor ({exc.strerror}); the "
                                 f"workflow opens it with `3>&2`") from None
        self.every, self._clock = float(every), clock
        self._last = clock()

    def _write(self, line: str, echo: bool) -> None:
        print(line, file=sys.stderr, flush=True)
        if echo and self._echo is not None:
            try:
                self._echo.write(line + "\n")
            except OSError:       # the terminal went away (Snakemake stopped): the log still has it
                self._echo = None

    def log(self, line: str) -> None:
        """A line for the log only."""
        self._write(line, echo=False)

    def say(self, line: str) -> None:
        """A line for the log and the echo stream (results, warnings)."""
        self._write(line, echo=True)

    def progress(self, line: str) -> None:
        """A progress line: to the log always, to the echo stream at most once per `every` seconds."""
        now = self._clock()
        due = now - self._last >= self.every
        if due:
            self._last = now
        self._write(line, echo=due)
