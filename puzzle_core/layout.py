"""The run directory's layout: where every artifact lives, and typed records to read and write them.

This module is the one place that names paths inside a run directory; stages, the
report, the CLI and the benchmarks ask it for paths and read artifacts through its
readers, so renaming a field or a file is a change here that the type checker and the
tests see, not a ``KeyError`` at run time. A run directory holds::

    config.yaml                      the config the run was started with
    manifest.json, .lock             the run directory's own bookkeeping (puzzle_core.rundir)
    workers/<stage>.yaml             the config workers re-run a stage with
    activations/<key>/               captured parent activations (a cache, deleted after BLD)
    library/blocks/layer_<i>/        trained sub-blocks: <unit>.safetensors + <unit>.json (BlockRecord)
    library/index.json               LibraryIndex: blocks per layer, parent first, and what trained them
    library/library.json             the merged library view (index + scores + costs)
    scores/shards/layer_<i>.json     ScoreShard: one layer's replace-1-block scores
    scores/scores.json               Scores: every layer's, merged
    costs/costs.json                 CostTable: per-block costs for the scenario
    solutions/index.json             SolutionsIndex; solutions/<name>.json: Solution; frontier.{json,png}
    children/index.json              ChildRecord list; children/<name>/: exported checkpoints
    gkd/index.json                   GKDResult list; gkd/<child>/{final/,log.json,result.json,checkpoints/}
    eval/models/<model>.json         ModelEvaluation; eval/items/<model>/: per-item scores
    eval/results.json                EvalResults: every model's evaluation
    report/                          summary.json (Summary), report.md and the plots

Readers of optional artifacts return ``None`` (or an empty collection) when the stage
that writes them has not run, so a report renders from whatever a run has so far.
Writers are atomic (:func:`~puzzle_core.rundir.atomic_write_json`) and keep the files'
JSON exactly as earlier versions wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs

from puzzle_core.config import CONVERTER, Number, structure
from puzzle_core.errors import ConfigError, UserError
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.search import Solution

# ---------------------------------------------------------------- paths (relative to the run directory)

CONFIG = "config.yaml"
WORKERS = "workers"
ACTIVATIONS = "activations"
LIBRARY_BLOCKS = "library/blocks"
LIBRARY_INDEX = "library/index.json"
LIBRARY_VIEW = "library/library.json"
SCORE_SHARDS = "scores/shards"
SCORES = "scores/scores.json"
COSTS = "costs/costs.json"
SOLUTIONS = "solutions"
SOLUTIONS_INDEX = "solutions/index.json"
CHILDREN = "children"
CHILDREN_INDEX = "children/index.json"
GKD = "gkd"
GKD_INDEX = "gkd/index.json"
EVAL_MODELS = "eval/models"
EVAL_ITEMS = "eval/items"
EVAL_CACHE = "eval/cache"
EVAL_RESULTS = "eval/results.json"
REPORT = "report"
SUMMARY = "report/summary.json"
# inside report/: the page and its plots (the page links them by these names)
REPORT_PAGE = "report.md"
FRONTIER_PLOT = "frontier.png"
LAYER_MAP_PLOT = "layer_map.png"
GKD_PLOT = "gkd.png"


def worker_config(run_dir: RunDir, stage: str) -> Path:
    return run_dir.path(WORKERS, f"{stage}.yaml")


def activations_dir(run_dir: RunDir, key: str | None = None) -> Path:
    """``activations/`` or one capture's ``activations/<key>/``."""
    return run_dir.path(ACTIVATIONS, key) if key else run_dir.path(ACTIVATIONS)


def block_weights(run_dir: RunDir, layer: int, unit: str) -> Path:
    """A trained unit's weights; its :class:`BlockRecord` is the same path with ``.json``."""
    return run_dir.path(LIBRARY_BLOCKS, f"layer_{layer:03d}", f"{unit}.safetensors")


def score_shard(run_dir: RunDir, layer: int) -> Path:
    return run_dir.path(SCORE_SHARDS, f"layer_{layer}.json")


def child_dir(run_dir: RunDir, name: str) -> Path:
    """An assembled child's checkpoint folder."""
    return run_dir.path(CHILDREN, name)


def gkd_dir(run_dir: RunDir, child: str) -> Path:
    """One child's uptraining folder: ``final/``, ``log.json``, ``result.json``, ``checkpoints/``."""
    return run_dir.path(GKD, child)


def gkd_final(run_dir: RunDir, child: str) -> Path:
    return gkd_dir(run_dir, child) / "final"


def gkd_checkpoints(run_dir: RunDir, child: str) -> Path:
    return gkd_dir(run_dir, child) / "checkpoints"


def gkd_log_path(run_dir: RunDir, child: str) -> Path:
    return gkd_dir(run_dir, child) / "log.json"


def gkd_result_path(run_dir: RunDir, child: str) -> Path:
    return gkd_dir(run_dir, child) / "result.json"


def uptrained(child: str) -> str:
    """The evaluation key of a child after GKD (``mip+gkd``); the assembled child's key is its name."""
    return child + "+gkd"


def eval_model_path(run_dir: RunDir, model: str) -> Path:
    return run_dir.path(EVAL_MODELS, f"{model}.json")


def eval_items_dir(run_dir: RunDir, model: str) -> Path:
    """Where a model's per-item scores go (:func:`puzzle_core.evaluation.write_task_items`)."""
    return run_dir.path(EVAL_ITEMS, model)


def report_file(run_dir: RunDir, name: str) -> Path:
    """A file of the report folder (:data:`REPORT_PAGE`, :data:`FRONTIER_PLOT`...)."""
    return run_dir.path(REPORT, name)


def relative(run_dir: RunDir, path: Path) -> str:
    """``path`` as artifacts record it: relative to the run directory."""
    return str(path.relative_to(run_dir.root))


# ---------------------------------------------------------------- helpers


def _load(path: Path) -> Any:
    """The JSON at ``path``, ``None`` when missing; a damaged file is a UserError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc}). Delete it and re-run `puzzle run CONFIG --resume` to rewrite it."
        ) from None


def _structure(data: Any, type_: Any, path: Path) -> Any:
    try:
        return structure(data, type_)
    except ConfigError as exc:
        raise UserError(
            f"{path} is not in the layout this version of puzzle reads ({'; '.join(exc.problems)}). Delete it and "
            f"re-run `puzzle run CONFIG --resume` to rewrite it."
        ) from None


def _read(path: Path, type_: Any) -> Any:
    data = _load(path)
    return None if data is None else _structure(data, type_, path)


# ---------------------------------------------------------------- library (BLD)


@attrs.frozen
class BlockRecord:
    """What a finished BLD job wrote (``library/blocks/layer_<i>/<unit>.json``)."""

    job: str
    layer: int
    attention: str | None
    ffn: str | None
    weights: str  # relative to the run directory
    sha256: str
    settings_hash: str
    seed: int
    steps: int
    tokens: int
    train_loss_initial: float
    train_loss_final: float
    train_loss_min: float
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    loss_curve: list[float]  # mean training loss over equal stretches of the run
    wall_s: float  # this unit's own work: init, held-out evaluations, training steps, saving
    cpu_s: float  # CPU time of this process during that work (all its threads)
    train_s: float  # its training steps alone (forward, loss, backward, optimizer)
    train_cpu_s: float  # CPU time of this process during its training steps (all its threads)
    train_tokens_per_s: float
    peak_memory_mib: float | None  # CPU: the process's peak RSS during the pass; CUDA: peak allocated
    device: str
    threads: int
    pass_wall_s: float = 0.0  # the whole pass this unit shared (all its units, data loading included)
    pass_cpu_s: float = 0.0


@attrs.frozen(kw_only=True)
class LibraryLayer:
    """One layer of the library index: its sub-block variants, its blocks (parent first), the trained units."""

    attention: list[str] = attrs.Factory(list)
    ffn: list[str] = attrs.Factory(list)
    blocks: list[str]
    trained: dict[str, BlockRecord] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class LibraryIndex:
    """``library/index.json``: what the library stage trained, per layer."""

    mode: Literal["coupled", "decoupled"] | None = None
    parent: str | None = None
    num_layers: int | None = None
    seq_len: int | None = None
    train_tokens: int | None = None
    heldout_tokens: int | None = None
    loss: Any = None  # the BLD loss choice, as configured
    activations: str | None = None  # the activation capture's key
    layers: list[LibraryLayer]

    def layer_blocks(self) -> list[list[str]]:
        """Block ids per layer, the parent's first."""
        return [list(layer.blocks) for layer in self.layers]

    def parent_blocks(self) -> list[str]:
        return [layer.blocks[0] for layer in self.layers]


def read_library_index(run_dir: RunDir, required: bool = False) -> LibraryIndex | None:
    """The library index; ``None`` before the library stage, or a UserError when ``required``."""
    index = _read(run_dir.path(LIBRARY_INDEX), LibraryIndex)
    if index is None and required:
        raise UserError(
            f"{run_dir.root} has no block library yet ({LIBRARY_INDEX}). Run `puzzle run CONFIG --stage library` "
            f"(with --run-dir {run_dir.root})."
        )
    return index


def write_library_index(run_dir: RunDir, index: LibraryIndex) -> Path:
    path = run_dir.path(LIBRARY_INDEX)
    atomic_write_json(path, CONVERTER.unstructure(index))
    return path


# ---------------------------------------------------------------- scores


@attrs.frozen
class ScoreShard:
    """``scores/shards/layer_<i>.json``: one layer's scores, valid while ``key`` matches."""

    key: str
    layer: int
    parent: dict[str, float]  # the parent's own value per scorer
    scores: dict[str, dict[str, float]]  # block id -> scorer -> value


def read_score_shard(run_dir: RunDir, layer: int, key: str) -> ScoreShard | None:
    """The layer's shard if it finished with ``key``; ``None`` when missing, stale or unreadable."""
    try:
        shard = CONVERTER.structure(json.loads(score_shard(run_dir, layer).read_text()), ScoreShard)
    except Exception:
        return None
    return shard if shard.key == key else None


def write_score_shard(run_dir: RunDir, shard: ScoreShard) -> Path:
    path = score_shard(run_dir, shard.layer)
    atomic_write_json(path, CONVERTER.unstructure(shard))
    return path


@attrs.frozen(kw_only=True)
class Scores:
    """``scores/scores.json``: ``{"layer_<i>": {block: {scorer: value}}, "_meta": {...}}`` on disk."""

    layers: dict[str, dict[str, dict[str, float]]]
    meta: dict[str, Any] = attrs.Factory(dict)  # per scorer: description, options, direction, data, parent value


def read_scores(run_dir: RunDir) -> Scores | None:
    path = run_dir.path(SCORES)
    data = _load(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a mapping of layers; re-run the score stage (`puzzle run CONFIG --resume`).")
    data = dict(data)
    meta = data.pop("_meta", {})
    return Scores(layers=_structure(data, dict[str, dict[str, dict[str, float]]], path), meta=meta)


def write_scores(run_dir: RunDir, scores: Scores) -> Path:
    path = run_dir.path(SCORES)
    atomic_write_json(path, {**scores.layers, "_meta": scores.meta})
    return path


# ---------------------------------------------------------------- costs


@attrs.frozen
class MemoryCheck:
    """Whether the parent and the smallest child fit the device, when the cost model knows its memory."""

    capacity_mib: float
    parent_mib: float
    parent_fits: bool
    smallest_child_mib: float
    smallest_child_fits: bool


@attrs.frozen(kw_only=True)
class CostTable:
    """``costs/costs.json``: the cost model, the scenario, fixed costs and every offered block's costs."""

    cost_model: str | None = None
    options: dict[str, Any] = attrs.Factory(dict)
    scenario: dict[str, Any] = attrs.Factory(dict)
    fixed: dict[str, Number] = attrs.Factory(dict)  # embedding, final norm, LM head
    layers: dict[str, dict[str, dict[str, Number]]] = attrs.Factory(dict)  # layer_<i> -> block -> stat -> value
    memory_check: MemoryCheck | None = None


def read_costs(run_dir: RunDir) -> CostTable | None:
    return _read(run_dir.path(COSTS), CostTable)


def write_costs(run_dir: RunDir, costs: CostTable) -> Path:
    path = run_dir.path(COSTS)
    data = CONVERTER.unstructure(costs)
    if costs.memory_check is None:
        del data["memory_check"]  # absent, as it always was, when the device's memory is unknown
    atomic_write_json(path, data)
    return path


# ---------------------------------------------------------------- solutions


@attrs.frozen
class LargestBatch:
    """The largest batch of the scenario's sequences that fits a GPU's memory, and the speed there
    (``search.largest_batch``); ``batch_size`` 0 when not even one fits."""

    cost_model: str
    batch_size: int
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    memory_mib: float | None = None
    runtime_ms: float | None = None


@attrs.frozen(kw_only=True)
class SolutionEntry:
    """One solution the search stage listed; its :class:`~puzzle_core.search.Solution` is ``solutions/<file>``."""

    name: str
    file: str
    solver: str
    main: bool
    status: str | None = None
    objective_value: float | None = None
    largest_batch: LargestBatch | None = None


@attrs.frozen
class SearchParent:
    """The parent's value of the objective and its totals, for comparison."""

    objective_value: float
    totals: dict[str, Number]
    largest_batch: LargestBatch | None = None


@attrs.frozen
class FrontierFiles:
    json: str
    png: str


@attrs.frozen(kw_only=True)
class SolutionsIndex:
    """``solutions/index.json``: the search's problem and its solutions, main ones first."""

    objective: str | None = None
    minimize: bool = True
    constraints: list[str] = attrs.Factory(list)
    parent: SearchParent | None = None
    solutions: list[SolutionEntry]
    frontier: FrontierFiles | None = None

    def entry(self, name: str) -> SolutionEntry | None:
        return next((e for e in self.solutions if e.name == name), None)


def solution_path(run_dir: RunDir, name: str) -> Path:
    return run_dir.path(SOLUTIONS, f"{name}.json")


def frontier_paths(run_dir: RunDir) -> tuple[Path, Path]:
    """The search's speedup sweep: ``solutions/frontier.json`` and its plot ``frontier.png``."""
    return run_dir.path(SOLUTIONS, "frontier.json"), run_dir.path(SOLUTIONS, "frontier.png")


def read_solutions_index(run_dir: RunDir, required: bool = False) -> SolutionsIndex | None:
    """The search's index (a bare list of entries, as early versions wrote it, reads too)."""
    path = run_dir.path(SOLUTIONS_INDEX)
    data = _load(path)
    if data is None:
        if required:
            raise UserError(f"{path} does not exist. Run the search stage first: `puzzle run CONFIG --stage search`.")
        return None
    return _structure({"solutions": data} if isinstance(data, list) else data, SolutionsIndex, path)


def write_solutions_index(run_dir: RunDir, index: SolutionsIndex) -> Path:
    path = run_dir.path(SOLUTIONS_INDEX)
    data = CONVERTER.unstructure(index)
    for entry in [data["parent"] or {}, *data["solutions"]]:
        if entry.get("largest_batch", ...) is None:
            del entry["largest_batch"]  # absent, as it always was, unless search.largest_batch asks
    atomic_write_json(path, data)
    return path


def read_solution(run_dir: RunDir, entry: SolutionEntry) -> Solution:
    path = run_dir.path(SOLUTIONS, entry.file)
    data = _load(path)
    if data is None:
        raise UserError(f"{path} is listed in {SOLUTIONS_INDEX} but missing. Re-run the search stage.")
    return _structure(data, Solution, path)


def write_solution(run_dir: RunDir, name: str, solution: Solution) -> Path:
    path = solution_path(run_dir, name)
    atomic_write_json(path, solution.to_json())
    return path


# ---------------------------------------------------------------- children


@attrs.frozen
class ChildRecord:
    """One assembled child, as listed in ``children/index.json``."""

    name: str
    solver: str
    blocks: list[str]
    path: str  # relative to the run directory
    params: int
    predicted_speedup: float | None


def read_children(run_dir: RunDir) -> list[ChildRecord]:
    """The assembled children in the order the assemble stage listed them (none before it ran)."""
    path = run_dir.path(CHILDREN_INDEX)
    data = _load(path)
    return [] if data is None else _structure(data["children"], list[ChildRecord], path)


def write_children(run_dir: RunDir, children: list[ChildRecord]) -> Path:
    path = run_dir.path(CHILDREN_INDEX)
    atomic_write_json(path, {"children": CONVERTER.unstructure(children)})
    return path


# ---------------------------------------------------------------- GKD


@attrs.frozen
class TrainPoint:
    """One optimizer step: the mean objective and each weighted term's mean."""

    step: int
    tokens: int
    lr: float
    loss: float
    terms: dict[str, float]


@attrs.frozen
class ValidationPoint:
    """Mean per-token KL(parent || child) on the validation split after ``step`` steps."""

    step: int
    tokens: int
    kl: float


@attrs.define
class GKDLog:
    """The curves of one GKD run (``gkd/<child>/log.json``)."""

    train: list[TrainPoint] = attrs.Factory(list)
    validation: list[ValidationPoint] = attrs.Factory(list)


@attrs.frozen
class GKDResult:
    """What one child's uptraining achieved (``gkd/<child>/result.json``)."""

    child: str
    steps: int
    tokens: int
    kl_before: float
    kl_after: float
    lora_rank: int
    train_seconds: float
    tokens_per_second: float
    fingerprint: str


def read_gkd_results(run_dir: RunDir) -> dict[str, GKDResult]:
    """``{child: result}`` for every child listed in ``gkd/index.json`` (empty before the stage)."""
    path = run_dir.path(GKD_INDEX)
    data = _load(path)
    if data is None:
        return {}
    return {result.child: result for result in _structure(data["children"], list[GKDResult], path)}


def write_gkd_results(run_dir: RunDir, results: list[GKDResult]) -> Path:
    path = run_dir.path(GKD_INDEX)
    atomic_write_json(path, {"children": CONVERTER.unstructure(results)})
    return path


def read_gkd_result(run_dir: RunDir, child: str) -> GKDResult | None:
    return _read(gkd_result_path(run_dir, child), GKDResult)


def write_gkd_result(run_dir: RunDir, result: GKDResult) -> Path:
    path = gkd_result_path(run_dir, result.child)
    atomic_write_json(path, CONVERTER.unstructure(result))
    return path


def read_gkd_log(run_dir: RunDir, child: str) -> GKDLog | None:
    return _read(gkd_log_path(run_dir, child), GKDLog)


def write_gkd_log(run_dir: RunDir, child: str, log: GKDLog) -> Path:
    path = gkd_log_path(run_dir, child)
    atomic_write_json(path, CONVERTER.unstructure(log))
    return path


# ---------------------------------------------------------------- evaluation


@attrs.frozen
class ModelEvaluation:
    """One evaluated model (``eval/models/<model>.json``): which it is, where its weights are, and its numbers."""

    role: Literal["parent", "child"]
    child: str | None
    phase: Literal["assembled", "gkd"] | None
    path: str | None  # relative to the run directory; None for the parent
    params: int
    metrics: dict[str, Number]
    seconds: float  # loading + every evaluator
    fingerprint: str = ""
    reused: dict[str, str] = attrs.Factory(dict)  # evaluator -> model whose numbers it copied (same architecture)


@attrs.frozen
class EvalResults:
    """``eval/results.json``: the evaluators as configured and every model's evaluation."""

    evaluators: list[dict[str, Any]]
    models: dict[str, ModelEvaluation]


def read_model_evaluation(run_dir: RunDir, model: str) -> ModelEvaluation | None:
    """A model's saved evaluation; ``None`` when missing or unreadable (it is then evaluated again)."""
    try:
        return _read(eval_model_path(run_dir, model), ModelEvaluation)
    except UserError:
        return None


def write_model_evaluation(run_dir: RunDir, model: str, evaluation: ModelEvaluation) -> Path:
    path = eval_model_path(run_dir, model)
    atomic_write_json(path, CONVERTER.unstructure(evaluation))
    return path


def read_eval_results(run_dir: RunDir) -> EvalResults | None:
    return _read(run_dir.path(EVAL_RESULTS), EvalResults)


def write_eval_results(run_dir: RunDir, results: EvalResults) -> Path:
    path = run_dir.path(EVAL_RESULTS)
    atomic_write_json(path, CONVERTER.unstructure(results))
    return path


# ---------------------------------------------------------------- report summary


@attrs.frozen
class GKDSummary:
    """A child's uptraining, as the report shows it."""

    steps: int
    tokens: int
    lora_rank: int
    validation_kl_before: float
    validation_kl_after: float
    tokens_per_second: float


@attrs.frozen(kw_only=True)
class ChildSummary:
    """One child in ``report/summary.json``; the unsuffixed numbers are after GKD when it ran."""

    name: str
    solver: str
    main: bool | None
    blocks: list[str]
    params: int
    predicted_speedup: float | None
    measured_speedup: float | None
    throughput_tok_s: float | None
    kl_to_parent: float | None
    kl_to_parent_before_gkd: float | None
    kl_to_parent_after_gkd: float | None
    accuracy_preserved: dict[str, Any] | None  # an interval: value, low, high
    accuracy_preserved_chance_adjusted: dict[str, Any] | None
    accuracy_preserved_before_gkd: dict[str, Any] | None
    accuracy_preserved_chance_adjusted_before_gkd: dict[str, Any] | None
    accuracy: dict[str, Any] | None  # per task and mean: paired comparisons with the parent
    accuracy_before_gkd: dict[str, Any] | None
    eval: dict[str, Number]
    eval_before_gkd: dict[str, Number]
    gkd: GKDSummary | None


@attrs.frozen(kw_only=True)
class ParentSummary:
    params: int | None
    throughput_tok_s: float | None
    accuracy: dict[str, Any]  # per task: metric, items, chance, accuracy interval
    eval: dict[str, Number]


@attrs.frozen(kw_only=True)
class Summary:
    """``report/summary.json``: parent, children (before and after GKD), scenario, and how to read them."""

    parent: ParentSummary
    children: list[ChildSummary]
    scenario: dict[str, Any]
    cost_model: str | None
    accuracy_metrics: list[str]
    notes: dict[str, str]

    def main_child(self) -> ChildSummary | None:
        return next((child for child in self.children if child.main), None)


def read_summary(run_dir: RunDir) -> Summary | None:
    return _read(run_dir.path(SUMMARY), Summary)


def write_summary(run_dir: RunDir, summary: Summary) -> Path:
    path = run_dir.path(SUMMARY)
    atomic_write_json(path, CONVERTER.unstructure(summary))
    return path
