"""Peak memory of one step: process RSS (and CUDA memory when a GPU is used).

`with PeakMemory() as peak: fold(...)` then `peak.rss_mb` / `peak.cuda_mb`. On Linux the RSS
high-water mark is reset at entry (writing "5" to /proc/self/clear_refs) and read from VmHWM at
exit, so the number belongs to the step alone, not to everything the process did before. Where
that is not available the process-lifetime maximum of `getrusage` is reported and `exact` is
False. Written by hand because psutil and tracemalloc measure other things (current RSS /
Python-heap allocations, not tensor memory high-water marks).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _vm_hwm_mb() -> float | None:
    return _status_mb("VmHWM")


def _rusage_max_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


class PeakMemory:
    """Context manager measuring the peak RSS (MiB) and peak CUDA allocation of its body."""

    def __init__(self) -> None:
        self.rss_mb = float("nan")
        self.start_rss_mb: float | None = None  # RSS when the step began (Linux)
        self.cuda_mb: float | None = None
        self.exact = False

    def __enter__(self) -> PeakMemory:
        self.start_rss_mb = _status_mb("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")
            self.exact = _vm_hwm_mb() is not None
        except OSError:
            self.exact = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _vm_hwm_mb() if self.exact else None
        self.rss_mb = hwm if hwm is not None else _rusage_max_mb()
        if torch.cuda.is_available():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20
