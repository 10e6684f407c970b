"""The ``h100`` and ``rtx4090`` cost models: roofline models of two GPUs, from their spec sheets.

The roofline itself (what each kernel of a block costs) is :class:`puzzle_core.api.GPUSpec`
and :func:`puzzle_core.api.roofline_cost_model`, which third-party plugins use the same way.
"""

from __future__ import annotations

from puzzle_core.api import CostModelPlugin, GPUSpec, hookimpl, roofline_cost_model

H100_SXM = GPUSpec(
    name="NVIDIA H100 SXM 80GB",
    memory_gib=80,
    bandwidth_gbs=3350,
    peak_tflops={"fp32": 67.0, "bf16": 989.4, "fp8": 1978.9},
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5; dense, i.e. half the with-sparsity figures; NVLink 900 GB/s "
    "both directions together)",
    interconnect_gbs=450,
)

RTX_4090 = GPUSpec(
    name="NVIDIA GeForce RTX 4090",
    memory_gib=24,
    bandwidth_gbs=1008,
    peak_tflops={"fp32": 82.6, "bf16": 165.2, "fp8": 330.3},
    source="NVIDIA Ada Lovelace architecture whitepaper (dense, FP32 accumulate); no NVLink: PCIe 4.0 x16 between GPUs",
    interconnect_gbs=32,
)


@hookimpl
def puzzle_cost_models() -> list[CostModelPlugin]:
    return [roofline_cost_model("h100", H100_SXM), roofline_cost_model("rtx4090", RTX_4090)]
