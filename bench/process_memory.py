"""Resident set size (RSS) of the current process, in KiB, on Linux, and timed blocks."""

import os
import resource
import time


def peak_rss_kib() -> int:
    """Return the process's peak RSS so far (``ru_maxrss``, which Linux gives in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Return the process's RSS now, from the second field of ``/proc/self/statm``."""
    with open("/proc/self/statm", encoding="ascii") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


class Measurement:
    """Wall time and memory of the block it is entered for.

    Example:
        >>> with Measurement() as measured:
        ...     run()
        >>> np.savez(path, seconds=measured.seconds, **measured.memory())
    """

    def __enter__(self) -> "Measurement":
        self.peak_rss_kib_before = peak_rss_kib()
        self.rss_kib_before = current_rss_kib()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._start
        self.peak_rss_kib = peak_rss_kib()

    def memory(self) -> dict[str, int]:
        """Return the peak RSS after the block, the peak before it and the RSS before it."""
        return {
            "peak_rss_kib": self.peak_rss_kib,
            "peak_rss_kib_before": self.peak_rss_kib_before,
            "rss_kib_before": self.rss_kib_before,
        }
