"""Peak FLOP/s of known accelerators: the one table MFU is measured against.

The trainer (`cartlab.train.device.peak_flops`, recorded with each run), the analysis
(`cartlab.analysis.accounting.mfu`'s default, the paper's RTX 3090) and the benchmarks
(`benchmarks/bench_train.py` on a GPU) all read it. Figures are vendor datasheet dense bf16
tensor-core throughput, without sparsity. Imports nothing, so any layer may read it.
"""
from __future__ import annotations

PEAK_FLOPS = {
    "NVIDIA GeForce RTX 3050": 35.0e12,
    "NVIDIA GeForce RTX 3090": 71.0e12,  # the paper's Stage-2 GPU (section 4.6)
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA A10G": 125.0e12,
    "NVIDIA A100": 312.0e12,
    "NVIDIA H100": 989.0e12,  # SXM
    "NVIDIA H200": 989.0e12,  # the same dense bf16 rate as the H100 SXM (more, faster memory)
    "NVIDIA L4": 121.0e12,
}
"""device name (as torch.cuda.get_device_name reports it, or a prefix of it) -> dense bf16 FLOP/s."""

RTX3090_BF16_PEAK_FLOPS = PEAK_FLOPS["NVIDIA GeForce RTX 3090"]
"""The paper's MFU denominator (section 4.6, Table 4)."""


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a known device (longest matching table key), else None."""
    matches = [k for k in PEAK_FLOPS if k.lower() in device_name.lower() or device_name.lower() in k.lower()]
    return PEAK_FLOPS[max(matches, key=len)] if matches and device_name else None
