"""Which machine a bit-exact recording was made on, and whether this one is such a machine.

One CPU build of torch gives bit-identical floating-point results only on like machines: its own
kernels follow the CPU capability (AVX2, AVX-512), and MKL's matrix products also follow the
processor (an AVX-512 AMD EPYC, family 25 model 17, gives other low bits than the machines the
first goldens were made on). A recording names the machine fields it was made with; this
machine matches it when every one of them is equal here, and only then is it compared bit for
bit (elsewhere to a tolerance, with a warning).
"""
from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = {"vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model"}


def identity() -> dict[str, str]:
    """This machine: the CPU capability torch dispatches on, and from /proc/cpuinfo (Linux) the
    processor's vendor, family and model (elsewhere the vendor is platform.processor())."""
    import torch

    found = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            name = CPUINFO.get(key.strip())
            if name and name not in found:
                found[name] = value.strip()
            if not line.strip() and len(found) > 1:  # the first processor's block is enough
                break
    else:
        found["cpu_vendor"] = platform.processor()
    return found


def matches(recorded: dict) -> bool:
    """Whether this machine has every field of the recording's machine `recorded`."""
    here = identity()
    return all(here.get(key) == value for key, value in recorded.items())


def describe(recorded: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in recorded.items())
