"""How much memory this process holds now and at most (Linux ``/proc``; ``getrusage`` elsewhere)."""

from __future__ import annotations

import math
import re
from pathlib import Path


def status_kb(field: str, pid: int | str = "self") -> float:
    """A ``/proc/PID/status`` field in kB (NaN where it cannot be read)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def rss_mb() -> float:
    """Resident memory now (``VmRSS``; NaN where there is no ``/proc``)."""
    return status_kb("VmRSS") / 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS: Linux's ``VmHWM`` (``ru_maxrss`` would also carry the parent's
    peak across fork + exec, so a spawned process would report its parent's), else ``ru_maxrss``."""
    import resource

    hwm = status_kb("VmHWM")
    if not math.isnan(hwm):
        return int(hwm * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
