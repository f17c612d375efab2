"""Outputs written whole or not at all: each file goes to a temporary directory beside its final
path and is moved into place only when everything it belongs to succeeded."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class StagedOutputs:
    """The files of one command, each written under a temporary directory beside its final path
    and moved into place by :meth:`commit` only when the whole command succeeded; :meth:`discard`
    (any failure, an interrupt) removes them, so a failed command leaves nothing half-written.

    A file is staged under its final *name* (in the temporary directory), so companions written
    next to it (the ONNX external-data file, which the model refers to by name) move with it."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []   # (temporary directory, final path)

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".fxprune-tmp",
                                    dir=final.resolve().parent))
        self._staged.append((tmp, final))
        return tmp / final.name

    def commit(self) -> None:
        for tmp, final in self._staged:
            for f in sorted(tmp.iterdir()):
                os.replace(f, final.parent / f.name)
        self.discard()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            shutil.rmtree(tmp, ignore_errors=True)
        self._staged.clear()

    def shown(self, text: str) -> str:
        """``text`` with every staged path replaced by the path the user asked for."""
        for tmp, final in self._staged:
            text = text.replace(str(tmp / final.name), str(final))
        return text

    @contextlib.contextmanager
    def transaction(self):
        try:
            yield self
        except Exception as e:   # an error names the user's output path, not the staging one
            if e.args and isinstance(e.args[0], str):
                e.args = (self.shown(e.args[0]), *e.args[1:])
            raise
        finally:
            self.discard()   # after commit() there is nothing left to remove


@contextlib.contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """The path to write ``final`` to; moved into place when the ``with`` block succeeds, removed
    when it fails (an existing ``final`` is then left as it was)."""
    with StagedOutputs().transaction() as staged:
        path = staged.path(final)
        yield path
        staged.commit()
