"""Wall time and peak RSS of a phase, for the benches (standard library only, so a bench worker can
import it from any interpreter).

Peak memory is read from /proc (VmHWM, reset to the current RSS through /proc/self/clear_refs) on
Linux; elsewhere ``peak`` stays 0.
"""
from __future__ import annotations

import gc
import time


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (``"VmRSS:"``, ``"VmHWM:"``); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Phase:
    """``with Phase() as p: ...`` then ``p.seconds`` (wall) and ``p.peak`` (peak RSS above the RSS
    at entry, bytes)."""

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.rss0 = proc_status("VmRSS:")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = max(0, proc_status("VmHWM:") - self.rss0)
