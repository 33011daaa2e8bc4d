"""Where a benchmark ran: CPU, GPU, core count, library versions and the machine's load."""

import os
import platform
from pathlib import Path

import peft
import torch
import transformers


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str, note: str | None = None) -> dict:
    """Describes the machine for a results file.

    Args:
        device: the torch device the benchmark used.
        note: free text on the machine's state (e.g. "machine shared with other jobs"), stored as is.
    """
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if note:
        info["note"] = note
    return info
