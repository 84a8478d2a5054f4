"""A glibc allocator setting that speeds up forward passes on the CPU."""

import ctypes
import logging
import os
import sys

__all__ = ["allocator_setting", "keep_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations from this size up still get their own mapping. Some glibc releases (2.30
# among them) reject thresholds above 32 MiB, which still covers most activations.
_MMAP_THRESHOLDS_BYTES = (1 << 30, 32 << 20)
# Free memory at the top of the heap that glibc keeps. mallopt takes a C int, and this
# is the largest one.
_TRIM_THRESHOLD_BYTES = 2**31 - 1

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

# The setting that keep_freed_memory made in this process, for the run record, or None.
_applied_setting: str | None = None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory for large tensors instead of mapping fresh pages.

    By default glibc maps each allocation of 32 MiB or more (less before the first free)
    on its own and unmaps it when it is freed, and it returns free memory at the top of
    its heap to the system. A CPU forward pass allocates and frees such activations at
    every layer, and the system zeroes fresh pages for each one. With this setting,
    allocations of the main thread under 1 GiB (32 MiB where glibc rejects 1 GiB) come
    from the heap, and freed memory stays there for the next batch. In ``bench/RESULTS.md`` (2-core Intel Xeon, glibc 2.36), the
    bare forward passes of resnet18 and resnet34 over 128 images of 224 x 224 pixels took
    6.1 s with it and 7.6 s without. Their peak memory grew by about 6 %.

    The setting applies to the whole process until it ends, and to the processes it
    forks, such as DataLoader workers. So the command line makes it for CPU runs, and
    the Python API leaves it to the caller. Nothing changes when the environment
    already sets ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_`` or glibc malloc tunables in ``GLIBC_TUNABLES``.

    Returns:
        Whether the setting was applied: False on systems without glibc, when the
        environment sets the allocator, or when glibc rejects every threshold.
    """
    global _applied_setting
    if sys.platform != "linux" or not _glibc_version().startswith("glibc"):
        return False
    blocking = _environment_settings()
    if blocking:
        logger.debug("%s set in the environment, so the allocator stays as it is", ", ".join(blocking))
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int

    # glibc returns 1 on success and 0 for a value it rejects. Setting the trim threshold
    # alone would freeze the mmap threshold at its start value of 128 KiB, so it is set
    # only after an mmap threshold was accepted.
    for threshold in _MMAP_THRESHOLDS_BYTES:
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            break
    else:
        logger.warning("glibc rejected every mmap threshold, so the allocator keeps its defaults")
        return False
    if mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) != 1:
        logger.warning(
            "glibc rejected the trim threshold %d, so freed memory may go back to the system",
            _TRIM_THRESHOLD_BYTES,
        )
        return False

    _applied_setting = (
        f"glibc keeps freed memory: mmap threshold {threshold} bytes, trim threshold {_TRIM_THRESHOLD_BYTES} bytes"
    )
    logger.debug("glibc now keeps freed memory and maps only allocations of %d bytes or more", threshold)
    return True


def allocator_setting() -> str:
    """Describe how this process's memory allocator is set, for the run record."""
    if _applied_setting is not None:
        return _applied_setting
    blocking = _environment_settings()
    if blocking:
        return "set by the environment: " + ", ".join(blocking)
    return "the C library's defaults"


def _environment_settings() -> list[str]:
    """Return the environment variables that set glibc's allocator."""
    names = [name for name in _USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def _glibc_version() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        # Python built on another C library lacks CS_GNU_LIBC_VERSION.
        return ""
