"""Which device a profile was measured on: its name, and the hardware-table entry it denotes."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"{_cpu_name()} ({threads} torch thread{'s' if threads > 1 else ''})"


def match_hardware_name(device_name: str) -> str | None:
    """The hardware-table entry a device name denotes, or None. Only SXM parts are in the table: a PCIe or
    NVL card of the same name has other clocks, bandwidth and links, and gets no prior rather than a wrong
    one."""
    name = device_name.upper()
    if any(variant in name for variant in ("PCIE", "NVL")):
        return None
    for marker, entry in (
        ("H200", "H200-SXM"),
        ("H100", "H100-SXM"),
        ("A100", "A100-80GB-SXM"),
        ("L40S", "L40S"),
        ("A10G", "A10G"),
    ):
        if marker in name:
            return None if entry == "A100-80GB-SXM" and "40GB" in name else entry
    return None


def device_hardware_name(device: str) -> str | None:
    """The hardware-table entry of a torch device: `cpu` for any CPU (the table's entry is a rough generic
    one), the matching GPU entry otherwise."""
    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        return "cpu"
    if torch_device.type == "cuda" and torch.cuda.is_available():
        return match_hardware_name(torch.cuda.get_device_name(torch_device))
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
