"""The generator's progress line on stderr."""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else at most every 10 s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.started = time.monotonic()
        self.last_shown = -math.inf
        self.interactive = sys.stderr.isatty()

    def line(self, message: str) -> None:
        self._show(message, final=True)

    def rows(self, message: str, done: bool) -> None:
        now = time.monotonic()
        if done or now - self.last_shown >= (0.5 if self.interactive else 10.0):
            self.last_shown = now
            self._show(message, final=done or not self.interactive)

    def _show(self, message: str, final: bool) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.started
            prefix = "\r" if self.interactive else ""
            sys.stderr.write(
                f"{prefix}adrec datagen [{elapsed:7.1f}s] {message}" + ("\n" if final else "")
            )
            sys.stderr.flush()
