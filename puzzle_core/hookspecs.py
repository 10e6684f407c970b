"""Hook specifications: one ``puzzle_<kind>`` hook per kind of thing a plugin can add.

Each hook returns a list of typed records (:mod:`puzzle_core.records`). A plugin module
implements any subset::

    from puzzle_core import hookimpl
    from puzzle_core.records import Solver

    @hookimpl
    def puzzle_solvers():
        return [Solver(name="random", implementation=RandomSolver,
                       options=RandomOptions, description="Random feasible choice")]
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("puzzle")


@hookspec
def puzzle_architectures():
    """Model families.

    Example: ``return [Architecture(name="qwen2", implementation=Qwen2Architecture)]``.
    """


@hookspec
def puzzle_block_variants():
    """Providers of alternative sub-blocks (reduced FFNs, fewer KV heads, no-ops...).

    Example: ``return [BlockVariants(name="llama", implementation=LlamaVariants,
    options=LlamaVariantOptions)]``.
    """


@hookspec
def puzzle_scorers():
    """Replace-1-block quality scores, written to ``metrics.<name>`` in the library.

    Example: ``return [Scorer(name="kl", implementation=KLScorer)]``.
    """


@hookspec
def puzzle_cost_models():
    """Per-block costs (runtime, memory, parameters) for an inference scenario.

    Example: ``return [CostModel(name="a100", implementation=A100Roofline)]``.
    """


@hookspec
def puzzle_solvers():
    """Search algorithms choosing one variant per layer under constraints.

    Example: ``return [Solver(name="mip", implementation=MipSolver, options=MipOptions)]``.
    """


@hookspec
def puzzle_distillation_losses():
    """Losses between student and teacher outputs, used by BLD and GKD.

    Example: ``return [DistillationLoss(name="normalized_mse", implementation=NormalizedMSE)]``.
    """


@hookspec
def puzzle_evaluators():
    """Evaluations of a model (benchmarks, KL to the parent, throughput).

    Example: ``return [Evaluator(name="lm_eval", implementation=LmEval, options=LmEvalOptions)]``.
    """


@hookspec
def puzzle_executors():
    """Ways to run independent jobs (BLD blocks, scoring shards).

    Example: ``return [Executor(name="slurm", implementation=SlurmExecutor, options=SlurmOptions)]``.
    """


@hookspec(historic=True)
def puzzle_addhooks(pluginmanager):
    """Let a plugin add hook specifications of its own.

    Example: ``pluginmanager.add_hookspecs(my_hookspecs_module)``.
    """
