"""Accelerator specifications the roofline and KV-capacity estimates need, each with its source.

Peak FLOP/s are DENSE 16-bit tensor-core figures: NVIDIA datasheets print the 2:4-sparsity figure first (twice
the dense one, marked with an asterisk), and LLM inference does not use structured sparsity. Memory capacities
are the datasheet's, counted in GiB as HBM and GDDR stacks are; the CUDA runtime shows slightly less (driver
reservation, and ECC on GDDR6 parts), which is one reason a live engine's own block count always beats the
estimate. Link bandwidths are the datasheet's GPU-to-GPU figures, which NVIDIA quotes as the sum of both
directions.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: int
    link_bandwidth: (
        float  # bytes/s GPU to GPU, both directions together; 0 where tensor parallelism is not offered
    )
    source: str


HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            name="A100-80GB-SXM",
            peak_flops=312e12,
            memory_bandwidth=2.039e12,
            memory_bytes=80 * GIB,
            link_bandwidth=600e9,
            source="NVIDIA A100 Tensor Core GPU Datasheet (A100 80GB SXM column): BF16 Tensor Core "
            "312 TFLOPS dense, HBM2e 2,039 GB/s, 80GB, NVLink 600 GB/s",
        ),
        Hardware(
            name="H100-SXM",
            peak_flops=989.4e12,
            memory_bandwidth=3.35e12,
            memory_bytes=80 * GIB,
            link_bandwidth=900e9,
            source="NVIDIA H100 Tensor Core GPU Datasheet (H100 SXM column): BF16 Tensor Core "
            "1,979 TFLOPS with sparsity (989 dense), HBM3 3.35 TB/s, 80GB, NVLink 900 GB/s",
        ),
        Hardware(
            name="H200-SXM",
            peak_flops=989.4e12,
            memory_bandwidth=4.8e12,
            memory_bytes=141 * GIB,
            link_bandwidth=900e9,
            source="NVIDIA H200 Tensor Core GPU Datasheet (H200 SXM column): BF16 Tensor Core "
            "1,979 TFLOPS with sparsity (989 dense), HBM3e 4.8 TB/s, 141GB, NVLink 900 GB/s",
        ),
        Hardware(
            name="L40S",
            peak_flops=362.05e12,
            memory_bandwidth=864e9,
            memory_bytes=48 * GIB,
            link_bandwidth=64e9,
            source="NVIDIA L40S GPU Datasheet: BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity), "
            "GDDR6 864 GB/s, 48GB; no NVLink, PCIe Gen4 x16 64 GB/s bidirectional",
        ),
        Hardware(
            name="A10G",
            peak_flops=70e12,
            memory_bandwidth=600e9,
            memory_bytes=24 * GIB,
            link_bandwidth=64e9,
            source="NVIDIA publishes no A10G datasheet. Amazon EC2 G5 instance documentation: 24 GB GDDR6, "
            "PCIe Gen4; Baseten, 'NVIDIA A10 vs A10G for ML model inference' (2023): 600 GB/s and 70 TFLOPS "
            "dense FP16/BF16 tensor (the A10 datasheet's 125 TFLOPS does not apply to the A10G)",
        ),
        Hardware(
            name="CPU-2core",
            peak_flops=0.40e12,
            memory_bandwidth=26e9,
            memory_bytes=23 * GIB,
            link_bandwidth=0.0,
            source="ROUGH. A generic 2-core x86 server CPU, measured on the project's 2-vCPU Intel Xeon "
            "KVM guest (AVX-512, AMX): numpy float32 2048^3 matmul 0.40 TFLOP/s, 256 MiB copy 26 GB/s "
            "(read+write), 23 GiB RAM. vLLM's CPU backend adds milliseconds of framework overhead per step "
            "that no roofline captures: calibrate online before trusting times on it",
        ),
    )
}

_ALIASES = {
    "a100": "A100-80GB-SXM",
    "a100-80gb": "A100-80GB-SXM",
    "a100-sxm": "A100-80GB-SXM",
    "h100": "H100-SXM",
    "h100-80gb": "H100-SXM",
    "h200": "H200-SXM",
    "l40s": "L40S",
    "a10g": "A10G",
    "cpu": "CPU-2core",
}


def get_hardware(name: str) -> Hardware:
    """A table entry by its name or an alias, case-insensitively (`a100`, `H100`, `h200-sxm`, `cpu`, ...)."""
    key = name.strip().lower()
    canonical = {entry.lower(): entry for entry in HARDWARE}
    found = canonical.get(key) or _ALIASES.get(key)
    if found is None:
        known = ", ".join(sorted(HARDWARE)) + "; aliases: " + ", ".join(sorted(_ALIASES))
        raise ValueError(f"unknown hardware {name!r}; known: {known}")
    return HARDWARE[found]
