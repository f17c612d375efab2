"""A progress bar over calibration batches, on stderr, silent when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

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
