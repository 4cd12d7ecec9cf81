"""Names the machine a comparison ran on, as a user would: CPU model and cores, or GPU model;
library versions beside it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model(cpuinfo: str | None = None) -> tuple[str, bool]:
    """(the CPU's model name, whether it runs under a hypervisor) from /proc/cpuinfo where it
    exists (Linux), else ``platform.processor()``."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    name, virtual = "", False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = " ".join(value.split())
        elif key == "flags" and "hypervisor" in value.split():
            virtual = True
    return name or platform.processor() or platform.machine() or "unknown CPU", virtual


def describe(device: torch.device, workers: int = 1) -> dict[str, str | int]:
    """The machine and software of a comparison: ``label`` (one line for tables) and its parts.
    ``workers``: how many runs trained side by side (each with torch's current thread count)."""
    cpu, virtual = cpu_model()
    cores = os.cpu_count() or 1
    info: dict[str, str | int] = {
        "cpu": cpu, "cores": cores, "virtual_machine": int(virtual),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "device": str(device), "workers": workers,
    }
    try:
        import koala_triton
        info["koala_triton"] = koala_triton.__version__
    except ImportError:  # pragma: no cover - the package is what runs this
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        label = f"{info['gpu']}, torch {torch.__version__}"
    else:
        threads = torch.get_num_threads()
        label = (f"{cores}-core {cpu}{' VM' if virtual else ''}, torch {torch.__version__}, "
                 f"{workers} run{'s' if workers > 1 else ''} at a time x {threads} thread{'s' if threads > 1 else ''}")
    if hasattr(os, "getloadavg"):
        info["load_average_before"] = round(os.getloadavg()[0], 2)
    info["label"] = f"{label}, Python {info['python']}"
    return info
