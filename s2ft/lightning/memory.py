"""Peak memory of this process: the accelerator's allocator peak on GPU, the peak resident set size on CPU."""

import resource
import sys

import torch


def peak_memory_mb() -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` when CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
