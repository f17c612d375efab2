"""Progress on stderr, drawn only on a terminal: ``ProgressBar`` for per-layer pass progress
(``transform(progress=...)``, the CLI), ``progress(batches, desc)`` for calibration batches
(tqdm when installed, else a plain bar)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar


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


T = TypeVar("T")


def progress(batches: Iterable[T], desc: str) -> Iterator[T]:
    """Yield ``batches``, drawing a bar on stderr when it is a TTY (tqdm if installed)."""
    if not _isatty():
        yield from batches
        return
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        from tqdm import tqdm
    except ImportError:
        yield from _simple_bar(batches, desc, total)
        return
    yield from tqdm(batches, desc=desc, total=total, file=sys.stderr, leave=False, unit="batch")


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _simple_bar(batches: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    width = 30
    done = 0
    try:
        for batch in batches:
            yield batch
            done += 1
            if total:
                filled = width * done // total
                sys.stderr.write(f"\r{desc}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            else:
                sys.stderr.write(f"\r{desc}: {done} batches")
            sys.stderr.flush()
    finally:
        if done:
            sys.stderr.write("\r" + " " * (len(desc) + width + 30) + "\r")
            sys.stderr.flush()
