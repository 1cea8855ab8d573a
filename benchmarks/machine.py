"""Describe the machine a benchmark ran on: CPU model and threads or GPU, library versions, date, load."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata

import torch

__all__ = ["describe_machine", "machine_line"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(device: str) -> dict:
    """Plain-dict description stored next to every result (and printed under every table)."""
    info = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": _version("timm"),
        "minkowskiengine": _version("MinkowskiEngine"),
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    """One line for tables and plots."""
    where = info["gpu"] or f"{info['cpu']}, {info['torch_threads']} threads of {info['cpu_count']} CPUs"
    cuda = f", CUDA {info['cuda']}" if info["gpu"] else ""
    return f"{where}; torch {info['torch']}{cuda}; {info['date_utc']}; load average at start {info['load_average']}"
