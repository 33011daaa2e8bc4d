"""Where a benchmark ran: CPU, GPU, core count, library versions and the machine's load."""

import argparse
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


def add_machine_args(parser: argparse.ArgumentParser, results: str, dtypes) -> None:
    """The options every benchmark command shares: dtype, device, seed, threads, output folder and machine note.

    Args:
        parser: The command's parser.
        results: The default output folder's stem: `results/<results>_<cpu|gpu>`.
        dtypes: The dtype names the command accepts.
    """
    parser.add_argument("--dtype", default="float32", choices=tuple(dtypes))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default results/{results}_<cpu|gpu>)"
    )
    parser.add_argument("--note", default=None, help="state of the machine, stored in results.json")


def start_benchmark(args: argparse.Namespace) -> dict:
    """Sets the torch threads a command asked for (`--threads`) and returns the machine it runs on, read before any
    run: the load average then is the telling one."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return machine_info(args.device, args.note)
