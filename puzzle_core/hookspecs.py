"""Hook specifications: one ``puzzle_<kind>`` hook per kind of thing a plugin can add.

Each hook returns a list of typed records (:mod:`puzzle_core.records`). A plugin module
implements any subset::

    from puzzle_core.api import SolverPlugin, hookimpl

    @hookimpl
    def puzzle_solvers() -> list[SolverPlugin]:
        return [SolverPlugin(name="random", implementation=RandomSolver,
                             options=RandomOptions, description="Random feasible choice")]
"""

from __future__ import annotations

import pluggy

from puzzle_core.records import (
    ArchitecturePlugin,
    CommandPlugin,
    CorpusPlugin,
    BlockVariantsPlugin,
    CostModelPlugin,
    DistillationLossPlugin,
    EvaluatorPlugin,
    ExecutorPlugin,
    ScorerPlugin,
    SolverPlugin,
)

hookspec = pluggy.HookspecMarker("puzzle")


@hookspec
def puzzle_architectures() -> list[ArchitecturePlugin]:
    """Model families.

    Example: ``return [ArchitecturePlugin(name="qwen2", implementation=qwen2_family)]`` (the factory of
    ``Qwen2Family`` in ``examples/puzzle-qwen2``; CONTRIBUTING.md walks through it).
    """


@hookspec
def puzzle_block_variants() -> list[BlockVariantsPlugin]:
    """Providers of alternative sub-blocks (reduced FFNs, fewer KV heads, no-ops...).

    Example: ``return [BlockVariantsPlugin(name="llama", implementation=DecoderVariants,
    options=DecoderVariantOptions)]``.
    """


@hookspec
def puzzle_scorers() -> list[ScorerPlugin]:
    """Replace-1-block quality scores, written to ``metrics.<name>`` in the library.

    Example: ``return [ScorerPlugin(name="kl", implementation=KLDivergence)]``.
    """


@hookspec
def puzzle_cost_models() -> list[CostModelPlugin]:
    """Per-block costs (runtime, memory, parameters) for an inference scenario.

    Example: ``return [CostModelPlugin(name="measured", implementation=MeasuredCostModel, options=MeasuredOptions)]``.
    """


@hookspec
def puzzle_solvers() -> list[SolverPlugin]:
    """Search algorithms choosing one variant per layer under constraints.

    Example: ``return [SolverPlugin(name="mip", implementation=MipSolver, options=MipOptions)]``.
    """


@hookspec
def puzzle_distillation_losses() -> list[DistillationLossPlugin]:
    """Losses between student and teacher outputs, used by BLD and GKD.

    Example: ``return [DistillationLossPlugin(name="normalized_mse", implementation=NormalizedMSE)]``.
    """


@hookspec
def puzzle_evaluators() -> list[EvaluatorPlugin]:
    """Evaluations of a model (benchmarks, KL to the parent, throughput).

    Example: ``return [EvaluatorPlugin(name="lm_eval", implementation=LmEvalEvaluator, options=LmEvalOptions)]``.
    """


@hookspec
def puzzle_executors() -> list[ExecutorPlugin]:
    """Ways to run independent jobs (BLD blocks, scoring shards).

    Example: ``return [ExecutorPlugin(name="torchrun", implementation=TorchrunExecutor, options=TorchrunOptions)]``.
    """


@hookspec
def puzzle_corpora() -> list[CorpusPlugin]:
    """Text sources for BLD, scoring and GKD, picked by ``data.corpus``.

    Example: ``return [CorpusPlugin(name="files", implementation=FilesCorpus, options=FilesOptions)]``.
    """


@hookspec
def puzzle_commands() -> list[CommandPlugin]:
    """Sub-commands of the ``puzzle`` command line.

    Example: ``return [CommandPlugin(name="bench", implementation=Bench)]``.
    """


@hookspec(historic=True)
def puzzle_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Let a plugin add hook specifications of its own.

    Example: ``pluginmanager.add_hookspecs(my_hookspecs_module)``.
    """
