"""Peak memory of this process: over its whole life (`peak_memory_mb`, a training run's figure) or of one code region
above a baseline (`PeakMemory`, the benchmarks').

GPU: the allocator's peak (`torch.cuda.max_memory_allocated`). CPU: the peak resident set size; a region's peak reads
the kernel's high-water mark (`VmHWM`), reset through `/proc/self/clear_refs` so that the transient peak of model
loading before the region is not counted.
"""

import ctypes
import gc
import resource
import sys
from pathlib import Path

import torch

MB = 2**20


def peak_memory_mb() -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` when CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / MB
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def _release_free_heap() -> None:
    gc.collect()
    try:
        # glibc keeps freed small blocks in its arenas; hand them back so the baseline is what is really live.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Measures the peak memory of a region relative to the memory in use when `start_baseline` was called.

    Usage: `meter.start_baseline()` after loading the model, optional set-up, `meter.reset_peak()`, the measured
    region, then `meter.peak_mb()` (peak in the region minus the baseline) and `meter.baseline_mb`.
    """

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        if not self.cuda and not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("CPU peak memory needs Linux /proc (clear_refs, VmHWM); run on Linux or on a GPU")
        self.baseline_mb = 0.0

    def current_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / MB
        return _proc_status_kb("VmRSS") / 1024

    def start_baseline(self) -> None:
        _release_free_heap()
        self.baseline_mb = self.current_mb()

    def reset_peak(self) -> None:
        _release_free_heap()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            # "5" resets the peak RSS (VmHWM) of this process to its current RSS (Linux >= 4.0).
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / MB
        else:
            peak = _proc_status_kb("VmHWM") / 1024
        return peak - self.baseline_mb
