"""Wall-clock timing of one call on CPU or GPU, and the median of repeated calls."""

import statistics
import time
from collections.abc import Callable

import torch


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by `fn()`; on CUDA measured with events after synchronising, so queued kernels count."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def median_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of `fn()` after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))
