"""An example third-party puzzle plugin.

Installed next to puzzle, it is found through the ``puzzle`` entry-point group (see this
package's ``pyproject.toml``) like the built-in plugins, and adds what each section
below registers.
"""

from __future__ import annotations

from puzzle_core import hookimpl
from puzzle_plugins.roofline import GPUSpec, roofline_cost_model

# ---------------------------------------------------------------- an A100 cost model
# A new GPU for the roofline cost models is its spec sheet and one record.

A100_SXM = GPUSpec(
    name="NVIDIA A100 SXM 80GB",
    memory_gib=80,
    bandwidth_gbs=2039,
    peak_tflops={"fp32": 19.5, "bf16": 312.0},  # no FP8 tensor cores: fp8 scenarios are refused
    source="NVIDIA A100 Tensor Core GPU datasheet (dense)",
)


@hookimpl
def puzzle_cost_models():
    return [roofline_cost_model("a100", A100_SXM)]
