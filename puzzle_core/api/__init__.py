"""The plugin API: everything a puzzle plugin may import, and nothing else.

A plugin module imports from here only (``from puzzle_core.api import SolverPlugin,
Solver, hookimpl``): the names in ``__all__`` are the stable surface, listed with their
documentation in ``docs/api.md``; every other module of ``puzzle_core`` is private and
may change between releases. The built-in plugins keep to this too (checked by the
import-linter contracts in ``pyproject.toml``).

The parts:

- the hook marker (:data:`hookimpl`) and the records each ``puzzle_<kind>`` hook
  returns (``SolverPlugin``, ``CostModelPlugin``...), which name a component of one kind;
- the interfaces those components implement (``Solver``, ``CostModel``...);
- the types they exchange with the pipeline (``ModelShape``, ``BlockSpec``,
  ``Scenario``, ``SearchProblem``, ``Solution``, ``StageContext``, ``ProcessRole``...);
- the errors a plugin raises (``UserError`` for anything the user can fix);
- helpers: atomic writes, the user cache, torch threads and devices, the dtype
  vocabulary, the roofline cost model of a spec sheet, search helpers, timing of
  ``generate`` workloads, the standard variant space of a decoder layer.

Every ``puzzle`` command imports every plugin, and with it this module. Two sub-modules
import transformers and are imported only where a model is built:
:mod:`puzzle_core.api.decoder` (what a model family builds on: the heterogeneous child,
sub-block initialisation, running and exporting children) and
:mod:`puzzle_core.api.testing` (the conformance checks of a model family).
"""

from __future__ import annotations

import pluggy

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec, SubBlockSpec, VariantSpace
from puzzle_core.cache import cache_root
from puzzle_core.choices import CorpusChoice
from puzzle_core.corpus import SplitDocuments, open_corpus, read_splits
from puzzle_core.data import CorpusSplit, CorpusText, Document, TokenizedCorpus, assign_splits, chunk_documents
from puzzle_core.decoder.variants import DecoderVariantOptions, DecoderVariants, InitMethods
from puzzle_core.devices import resolve_device, torch_threads
from puzzle_core.dtypes import DTYPE_BYTES, Dtype, ModelDtype, ScenarioDtype, torch_dtype
from puzzle_core.errors import ConfigError, PluginError, UnknownNameError, UserError, suggest
from puzzle_core.interfaces import (
    Calibration,
    Command,
    Corpus,
    CostModel,
    Costs,
    DistillationLoss,
    EvalContext,
    Evaluator,
    Executor,
    HFConfig,
    Job,
    LayerContext,
    LayerRunner,
    LoadedModel,
    ModelFamily,
    ModelOutputs,
    ModelShape,
    Part,
    ProcessRole,
    Scorer,
    ScoringBatch,
    ScoringData,
    Solver,
    StageContext,
    VariantProvider,
    parameter_count,
)
from puzzle_core.evaluation import TaskItems, write_task_items
from puzzle_core.library import layer_key
from puzzle_core.parents import read_config
from puzzle_core.plugins import PluginWarning, get_plugin_manager, hookimpl, make_plugin_manager, reset_plugin_manager
from puzzle_core.records import (
    ArchitecturePlugin,
    BlockVariantsPlugin,
    CommandPlugin,
    CorpusPlugin,
    CostModelPlugin,
    DistillationLossPlugin,
    EvaluatorPlugin,
    ExecutorPlugin,
    NoOptions,
    PluginRecord,
    ScorerPlugin,
    SolverPlugin,
)
from puzzle_core.registry import Entry, Registries, Registry, build_registries, reset_registries
from puzzle_core.roofline import GPUSpec, RooflineCostModel, RooflineOptions, ffn_size, kv_heads, roofline_cost_model
from puzzle_core.rundir import atomic_dir, atomic_path, atomic_write, atomic_write_json
from puzzle_core.scenario import Scenario
from puzzle_core.scoring import kl_per_token, label_log_probs
from puzzle_core.search import (
    Constraint,
    InfeasibleError,
    Objective,
    SearchProblem,
    SearchWarning,
    Solution,
    can_hold_alone,
    check_diversity_count,
    infeasible_error,
    readable,
    throughput,
)
from puzzle_core.search import Status as SolutionStatus
from puzzle_core.timing import (
    GenerateTiming,
    Spread,
    TimedGenerate,
    device_description,
    generation_config,
    interleaved,
    owns_weights,
    scenario_prompt,
    summarise,
    timed_ms,
)

hookspec = pluggy.HookspecMarker("puzzle")
"""The marker for hook specifications a plugin adds in ``puzzle_addhooks``."""


def plugin_registries(*plugins: object) -> Registries:
    """Registries holding only ``plugins`` (modules or objects with ``@hookimpl`` functions), for a plugin's tests.

    ``registries.solvers.get("random")`` is a record (build it with ``.create(options)``),
    ``registries.solvers.entry("random")`` says which plugin registered it. They become the
    process's registries too, so configs resolve plugin names against them. A misspelt
    hook name is an error here.
    """
    manager = make_plugin_manager(load_entry_points=False)
    for index, plugin in enumerate(plugins):
        manager.register_plugin(plugin, getattr(plugin, "__name__", f"plugin{index}"))
    manager.check_pending()
    reset_plugin_manager(manager)
    registries = build_registries(manager)
    reset_registries(registries)
    return registries


__all__ = [
    # hooks and records
    "hookimpl",
    "hookspec",
    "PluginRecord",
    "NoOptions",
    "ArchitecturePlugin",
    "BlockVariantsPlugin",
    "ScorerPlugin",
    "CostModelPlugin",
    "SolverPlugin",
    "DistillationLossPlugin",
    "EvaluatorPlugin",
    "ExecutorPlugin",
    "CorpusPlugin",
    "CommandPlugin",
    # interfaces
    "ModelFamily",
    "LayerRunner",
    "VariantProvider",
    "Scorer",
    "CostModel",
    "Solver",
    "DistillationLoss",
    "Evaluator",
    "Executor",
    "Corpus",
    "Command",
    # shared types
    "ModelShape",
    "BlockSpec",
    "AttentionSpec",
    "FFNSpec",
    "SubBlockSpec",
    "VariantSpace",
    "Part",
    "HFConfig",
    "LoadedModel",
    "Calibration",
    "LayerContext",
    "Scenario",
    "Costs",
    "SearchProblem",
    "Objective",
    "Constraint",
    "Solution",
    "SolutionStatus",
    "ScoringBatch",
    "ScoringData",
    "ModelOutputs",
    "Job",
    "EvalContext",
    "TaskItems",
    "StageContext",
    "ProcessRole",
    "Document",
    "CorpusText",
    "CorpusChoice",
    "SplitDocuments",
    "CorpusSplit",
    "TokenizedCorpus",
    "Dtype",
    "ModelDtype",
    "ScenarioDtype",
    # errors and warnings
    "UserError",
    "ConfigError",
    "PluginError",
    "UnknownNameError",
    "suggest",
    "InfeasibleError",
    "SearchWarning",
    "PluginWarning",
    # helpers
    "write_task_items",
    "atomic_write",
    "atomic_write_json",
    "atomic_path",
    "atomic_dir",
    "cache_root",
    "torch_threads",
    "resolve_device",
    "torch_dtype",
    "DTYPE_BYTES",
    "parameter_count",
    "read_config",
    "layer_key",
    "kv_heads",
    "ffn_size",
    "infeasible_error",
    "can_hold_alone",
    "check_diversity_count",
    "readable",
    "throughput",
    "kl_per_token",
    "label_log_probs",
    "DecoderVariants",
    "DecoderVariantOptions",
    "InitMethods",
    "chunk_documents",
    # timing workloads (cost models that measure, evaluators that time)
    "TimedGenerate",
    "GenerateTiming",
    "Spread",
    "interleaved",
    "owns_weights",
    "timed_ms",
    "generation_config",
    "scenario_prompt",
    "device_description",
    "summarise",
    "assign_splits",
    "open_corpus",
    "read_splits",
    "GPUSpec",
    "RooflineOptions",
    "RooflineCostModel",
    "roofline_cost_model",
    # plugin machinery, for a plugin's tests and for hooks of its own
    "Registries",
    "Registry",
    "Entry",
    "plugin_registries",
    "get_plugin_manager",
]
