"""How much memory the machine has free: for the size checks made before anything large is allocated."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable, else physical memory), or None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
