"""What this machine lends the process."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
