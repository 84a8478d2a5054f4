"""Resident set size (RSS) of the current process, in KiB, on Linux."""

import os
import resource


def peak_rss_kib() -> int:
    """Return the process's peak RSS so far (``ru_maxrss``, which Linux gives in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Return the process's RSS now, from the second field of ``/proc/self/statm``."""
    with open("/proc/self/statm", encoding="ascii") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024
