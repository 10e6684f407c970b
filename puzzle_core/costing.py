"""A whole model priced from its shape alone: totals, throughput, and the largest batch that fits.

A model's cost under a cost model is its fixed costs (embedding, final norm, LM head)
plus the sum of its blocks' costs, each distinct block priced once. Nothing here needs
weights: ``puzzle model info`` prices a folder holding only a ``config.json``, the
search reports each child's largest batch, and ``benchmarks/cost_fidelity.py`` predicts
the paper's throughput table from configs.

Throughput is generated tokens per second: ``batch_size * decode_len`` tokens per
``runtime_ms``; with several GPUs (``scenario.gpus``) each group of
``scenario.tensor_parallel`` GPUs serves its own batch, so the scenario's throughput is
``gpus / tensor_parallel`` times one group's, and ``tokens_per_s_per_gpu`` divides it
by ``gpus``. Memory figures are per GPU when the cost model splits a model over a
tensor-parallel group (the roofline models do); ``capacity_mib`` is one GPU's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs

from puzzle_core.blocks import BlockSpec
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Costs, CostModel, ModelFamily, ModelShape
from puzzle_core.scenario import Scenario

SUMMED = ("runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "kv_cache_mib", "num_params")


@attrs.frozen
class ModelCosts:
    """The costs of one model (parent or child) in one scenario."""

    scenario: Scenario
    fixed: Costs
    blocks: Mapping[str, Costs]  # by block id, each distinct block once
    layers: tuple[str, ...]  # the block id of every layer
    capacity_mib: float | None = None  # memory of the device the model must fit in, if the cost model knows it

    def total(self, key: str) -> float:
        """Fixed costs plus every layer's cost of ``key``."""
        return float(self.fixed.get(key, 0.0)) + sum(float(self.blocks[b].get(key, 0.0)) for b in self.layers)

    @property
    def runtime_ms(self) -> float:
        return self.total("runtime_ms")

    @property
    def memory_mib(self) -> float:
        return self.total("memory_mib")

    @property
    def kv_cache_mib(self) -> float:
        return self.total("kv_cache_mib")

    @property
    def weights_mib(self) -> float:
        return self.memory_mib - self.kv_cache_mib

    @property
    def fits(self) -> bool | None:
        """Whether weights + KV cache fit the device (``None``: the cost model does not know its memory)."""
        return None if self.capacity_mib is None else self.memory_mib <= self.capacity_mib

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over all of the scenario's GPUs."""
        s = self.scenario
        replicas = s.num_gpus // s.tensor_parallel
        return replicas * s.batch_size * s.decode_len / (self.runtime_ms / 1e3) if self.runtime_ms > 0 else float("inf")

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.scenario.num_gpus

    def summary(self) -> dict:
        """The totals as JSON-ready numbers."""
        return {
            **{key: self.total(key) for key in SUMMED},
            "num_params": int(self.total("num_params")),
            "weights_mib": self.weights_mib,
            "capacity_mib": self.capacity_mib,
            "fits": self.fits,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
        }


def model_costs(
    cost_model: CostModel, shape: ModelShape, scenario: Scenario, family: ModelFamily | None = None,
    blocks: Sequence[BlockSpec] | None = None,
) -> ModelCosts:
    """Price ``blocks`` (default: the shape's own) on top of the shape's fixed costs."""
    blocks = list(shape.blocks if blocks is None else blocks)
    distinct = {b.id: b for b in blocks}
    return ModelCosts(
        scenario=scenario,
        fixed=cost_model.fixed_costs(shape, scenario, family),
        blocks={block_id: cost_model.block_costs(shape, b, scenario, family) for block_id, b in distinct.items()},
        layers=tuple(b.id for b in blocks),
        capacity_mib=cost_model.memory_capacity_mib(scenario),
    )


def largest_batch(
    cost_model: CostModel, shape: ModelShape, scenario: Scenario, family: ModelFamily | None = None,
    blocks: Sequence[BlockSpec] | None = None, limit: int = 4096,
) -> ModelCosts | None:
    """The model's costs at the largest batch (up to ``limit``) whose weights + KV cache fit the device.

    The KV cache grows linearly with the batch while the weights do not, so the batch is
    read off the costs at batch 1 and checked by pricing it. ``None`` when not even batch
    1 fits; a :class:`UserError` when the cost model does not know the device's memory.
    """
    one = model_costs(cost_model, shape, attrs.evolve(scenario, batch_size=1), family, blocks)
    if one.capacity_mib is None:
        raise UserError("This cost model does not know the device's memory, so no batch can be said to fit; pick a "
                        "cost model of a GPU (a roofline model such as h100).")
    if not one.fits:
        return None
    per_sequence = one.kv_cache_mib
    batch = limit if per_sequence <= 0 else max(1, min(limit, int((one.capacity_mib - one.weights_mib) // per_sequence)))
    costs = model_costs(cost_model, shape, attrs.evolve(scenario, batch_size=batch), family, blocks)
    while batch > 1 and not costs.fits:  # rounding: step down until it fits
        batch -= 1
        costs = model_costs(cost_model, shape, attrs.evolve(scenario, batch_size=batch), family, blocks)
    return costs
