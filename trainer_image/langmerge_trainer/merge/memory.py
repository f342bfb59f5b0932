"""Measuring the peak resident memory of a piece of work, in-process.

Linux keeps a resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) that writing ``5`` to
``/proc/self/clear_refs`` resets to the current size; the growth of the mark over a block is the block's peak extra
memory. Elsewhere (or where ``clear_refs`` is not writable) the measurement is unavailable and reported as ``None``.
Freed heap that the allocator kept could be reused without growing the resident set and hide a peak, so the
measurement first hands free heap pages back to the kernel (glibc ``malloc_trim``) where it can.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def current_rss() -> int | None:
    return _status_kib("VmRSS")


def peak_rss() -> int | None:
    return _status_kib("VmHWM")


def release_free_memory() -> bool:
    """Return the allocator's free heap pages to the kernel (glibc ``malloc_trim(0)``); False where unavailable."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.growth``: peak resident bytes above the level at entry (or None)."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.peak: int | None = None
        self._valid = False

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self._valid = reset_peak_rss()
        self.start = current_rss()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.peak = peak_rss()

    @property
    def growth(self) -> int | None:
        if not self._valid or self.start is None or self.peak is None:
            return None
        return max(0, self.peak - self.start)
