"""A minimal progress bar on stderr, drawn only on a terminal (no dependency on tqdm)."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """``bar(stage, done, total)`` redraws one line; silent when stderr is not a TTY."""

    def __init__(self, stream=None, enabled: bool | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.width = width
        self._last = 0.0
        self._open = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.05:  # redraw at most 20 times a second
            return
        self._last = now
        filled = int(self.width * done / total)
        self.stream.write(f"\r{stage:<8} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        self._open = done < total
        if not self._open:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
