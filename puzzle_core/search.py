"""Stage 2b search: choose one block per layer under cost constraints.

The pieces every solver shares live here:

- :class:`Objective`: a dot-path (``metrics.kl``) or a weighted sum of them
  (``metrics.kl + 0.5*metrics.lm_loss``), minimised or maximised;
- :class:`Constraint`: a bound on a model total, ``stats.memory_mib<=80000``,
  ``stats.runtime_ms>=10``, ``10<=stats.runtime_ms<=50``, or a throughput / speedup
  target (``throughput>=6000 tokens/s``, ``speedup>=1.5``) that becomes a runtime budget;
- :class:`LayerRule`: per-layer restrictions (allowed / forbidden variants, keep the
  attention, keep the parent block) for given layers;
- :class:`SearchProblem`: the validated problem a :class:`~puzzle_core.interfaces.Solver`
  solves (:func:`build_problem` makes one from a library);
- :class:`Solution`: what a solver returns, in the JSON shape ``puzzle search --json``
  prints and ``solutions/<name>.json`` holds.

Totals are whole-model totals: when the library comes with fixed costs (embedding, LM
head), they are added to the sum over layers, so budgets are written for the whole model
and the fixed part is subtracted before solving. The parent block of a layer is the
first variant listed for it.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from typing import Any, Literal, Mapping, Sequence

import attrs
import numpy as np

from puzzle_core.blocks import BlockSpec
from puzzle_core.config import CONVERTER
from puzzle_core.errors import PluginError, UserError, suggest
from puzzle_core.library import BlockLibrary, layer_key

RUNTIME = "stats.runtime_ms"
THROUGHPUT = "throughput"
SPEEDUP = "speedup"
TARGETS = {THROUGHPUT: ("tokens/s", "tok/s"), SPEEDUP: ("x",)}  # pseudo-paths and the units they accept

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PATH = r"[A-Za-z_][\w-]*(?:\.[\w-]+)*"


class InfeasibleError(UserError):
    """No choice of blocks meets every constraint."""


class SearchWarning(UserWarning):
    """A search finished, but with less than was asked (fewer diverse solutions, a gap)."""


def readable(value: float) -> str:
    """A number for messages: thousands separated when large, six significant digits otherwise."""
    return f"{value:,.0f}" if abs(value) >= 1e6 else f"{value:.6g}"


def format_number(value: float) -> str:
    """Shortest text that reads back as ``value`` (integers without a decimal point)."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# ---------------------------------------------------------------- objective


@attrs.frozen
class Objective:
    """A weighted sum of per-variant values, summed over layers."""

    terms: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """``metrics.kl``, ``metrics.kl + 0.5*metrics.lm_loss``, ``-1*metrics.acc``..."""
        term = re.compile(rf"\s*([-+])?\s*(?:({_NUMBER})\s*\*\s*)?({_PATH})\s*")
        terms: list[tuple[str, float]] = []
        position = 0
        text = str(text)
        while position < len(text) or not terms:
            match = term.match(text, position)
            if match is None or (terms and not match.group(1)) or match.end() == position:
                raise UserError(
                    f"Objective {text!r} is not a dot-path or a weighted sum of dot-paths. Write e.g. "
                    f"'metrics.kl' or 'metrics.kl + 0.5*metrics.lm_loss'."
                )
            sign = -1.0 if match.group(1) == "-" else 1.0
            weight = sign * (float(match.group(2)) if match.group(2) else 1.0)
            terms.append((match.group(3), weight))
            position = match.end()
        paths = [p for p, _ in terms]
        if len(set(paths)) != len(paths):
            raise UserError(f"Objective {text!r} names a dot-path twice; combine its weights into one term.")
        return cls(tuple(terms))

    @property
    def paths(self) -> list[str]:
        """The dot-paths the objective reads."""
        return [path for path, _ in self.terms]

    def __str__(self) -> str:
        parts = []
        for index, (path, weight) in enumerate(self.terms):
            sign = "-" if weight < 0 else "+"
            magnitude = abs(weight)
            body = path if magnitude == 1 else f"{format_number(magnitude)}*{path}"
            parts.append(("-" if sign == "-" else "") + body if index == 0 else f" {sign} {body}")
        return "".join(parts)


def _structure_objective(value: Any, _type: type) -> Objective:
    if isinstance(value, Objective):
        return value
    if isinstance(value, dict):  # {dot-path: weight}
        if not value:
            raise ValueError("an objective mapping needs at least one {dot-path: weight}")
        value = " + ".join(f"{CONVERTER.structure(w, float)!r}*{p}" for p, w in value.items())
    if not isinstance(value, str):
        raise ValueError(f"expected a dot-path like 'metrics.kl' or a weighted sum, got {value!r}")
    try:
        return Objective.parse(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------- constraints


@attrs.frozen
class Constraint:
    """``min <= total(path) <= max`` (either bound may be absent).

    ``path`` is a dot-path, or ``throughput`` (tokens per second, turned into a runtime
    budget for the scenario) or ``speedup`` (parent runtime over child runtime).
    """

    path: str
    min: float | None = None
    max: float | None = None

    def __attrs_post_init__(self):
        if self.min is None and self.max is None:
            raise UserError(f"Constraint on {self.path} has neither a minimum nor a maximum.")
        for bound in (self.min, self.max):
            if bound is not None and not math.isfinite(bound):
                raise UserError(f"Constraint on {self.path} has a bound of {bound}; bounds must be finite numbers.")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise UserError(
                f"Constraint {self} is empty: its minimum {format_number(self.min)} is above its maximum "
                f"{format_number(self.max)}. Swap the bounds."
            )
        if self.path in TARGETS and any(b is not None and b <= 0 for b in (self.min, self.max)):
            raise UserError(f"Constraint {self}: {self.path} targets must be positive.")

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        """``PATH<=MAX``, ``PATH>=MIN``, ``MIN<=PATH<=MAX`` or ``PATH in (MIN, MAX)``."""
        unit = r"(?:\s*(?P<{}>[A-Za-z/]+))?"
        patterns = [
            rf"(?P<lo>{_NUMBER}){unit.format('u0')}\s*<=?\s*(?P<path>{_PATH})\s*<=?\s*(?P<hi>{_NUMBER}){unit.format('u1')}",
            rf"(?P<path>{_PATH})\s*<=?\s*(?P<hi>{_NUMBER}){unit.format('u1')}",
            rf"(?P<path>{_PATH})\s*>=?\s*(?P<lo>{_NUMBER}){unit.format('u0')}",
            rf"(?P<path>{_PATH})\s*(?:=|\bin\b)\s*[\[(]\s*(?P<lo>{_NUMBER})\s*,\s*(?P<hi>{_NUMBER})\s*[\])]"
            rf"{unit.format('u1')}",
        ]
        text = str(text).strip()
        for pattern in patterns:
            match = re.fullmatch(pattern, text)
            if match is None:
                continue
            groups = match.groupdict()
            path = groups["path"]
            for key in ("u0", "u1"):
                if groups.get(key) and groups[key] not in TARGETS.get(path, ()):
                    allowed = ", ".join(f"'{u}'" for u in TARGETS.get(path, ())) or "none"
                    raise UserError(f"Constraint {text!r}: unit '{groups[key]}' is not understood (allowed: {allowed}).")
            lo = float(groups["lo"]) if groups.get("lo") else None
            hi = float(groups["hi"]) if groups.get("hi") else None
            return cls(path, lo, hi)
        raise UserError(
            f"Constraint {text!r} is not understood. Write 'stats.memory_mib<=80000', 'stats.runtime_ms>=10', "
            f"'10<=stats.runtime_ms<=50', 'stats.runtime_ms in (10, 50)', 'throughput>=6000 tokens/s' or "
            f"'speedup>=1.5'."
        )

    def holds(self, total, tolerance: float = 1e-9):
        """Whether ``total`` (a number or an array of them) is within the bounds, up to a relative ``tolerance``."""
        slack = tolerance * np.maximum(1.0, np.abs(total))
        above_min = True if self.min is None else total >= self.min - slack
        return np.logical_and(above_min, True if self.max is None else total <= self.max + slack)

    def text(self, number=format_number) -> str:
        """The constraint as it is written, with bounds formatted by ``number``."""
        if self.min is not None and self.max is not None:
            return f"{number(self.min)}<={self.path}<={number(self.max)}"
        if self.max is not None:
            return f"{self.path}<={number(self.max)}"
        return f"{self.path}>={number(self.min)}"

    def __str__(self) -> str:
        return self.text()


def _structure_constraint(value: Any, _type: type) -> Constraint:
    if isinstance(value, Constraint):
        return value
    try:
        if isinstance(value, dict) and len(value) == 1:  # {path: max} or {path: [min, max]}
            ((path, bound),) = value.items()
            if isinstance(bound, (list, tuple)) and len(bound) == 2:
                lo, hi = (None if b is None else CONVERTER.structure(b, float) for b in bound)
                return Constraint(str(path), lo, hi)
            return Constraint(str(path), None, CONVERTER.structure(bound, float))
        if isinstance(value, str):
            return Constraint.parse(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    raise ValueError(
        f"expected a constraint like 'stats.memory_mib<=80000' or {{stats.runtime_ms: [10, 50]}}, got {value!r}"
    )


# ---------------------------------------------------------------- per-layer rules


def _non_empty(_instance, attribute, value):
    if not value:
        raise ValueError(f"{attribute.name} must list at least one layer")


@attrs.frozen
class LayerRule:
    """Restrictions on the variants some layers may use.

    ``layers`` are indices, negative ones counted from the end (``[0, -1]``: first and
    last). ``allow`` / ``forbid`` are glob patterns on variant names (``attn_g*+*``).
    ``keep_attention`` / ``keep_ffn`` forbid no-op and linear replacements of that
    sub-block; ``keep_parent`` pins the parent block.
    """

    layers: list[int] = attrs.field(validator=_non_empty)
    allow: list[str] = attrs.Factory(list)
    forbid: list[str] = attrs.Factory(list)
    keep_attention: bool = False
    keep_ffn: bool = False
    keep_parent: bool = False

    def describe(self) -> str:
        parts = [f"allow {self.allow}" if self.allow else "", f"forbid {self.forbid}" if self.forbid else ""]
        parts += [name for name in ("keep_attention", "keep_ffn", "keep_parent") if getattr(self, name)]
        return f"layer rule for layers {self.layers} ({', '.join(p for p in parts if p) or 'no restriction'})"


def _sub_block_kinds(library: BlockLibrary, layer: int, name: str, rule: LayerRule) -> tuple[str, str]:
    """``(attention kind, ffn kind)`` of a variant, from its record or its block id."""
    record = library.layers[layer][name]
    try:
        if isinstance(record.get("attention"), str) and isinstance(record.get("ffn"), str):
            spec = BlockSpec.parse(f"{record['attention']}+{record['ffn']}")
        else:
            spec = BlockSpec.parse(name)
    except UserError:
        raise UserError(
            f"The {rule.describe()} needs to know each variant's sub-blocks, but {layer_key(layer)}.{name} is not "
            f"a block id like 'attn_g3+ffn_768' and has no 'attention'/'ffn' fields. Use allow/forbid patterns "
            f"on variant names instead."
        ) from None
    return spec.attention.kind, spec.ffn.kind


def apply_layer_rules(library: BlockLibrary, rules: Sequence[LayerRule]) -> tuple[tuple[str, ...], ...]:
    """The variants each layer may use after ``rules``; a layer left with none is an error."""
    allowed = [list(library.variants(i)) for i in range(library.num_layers)]
    for rule in rules:
        for raw in rule.layers:
            index = raw + library.num_layers if raw < 0 else raw
            if not 0 <= index < library.num_layers:
                raise UserError(
                    f"The {rule.describe()} names layer {raw}, but the library has {library.num_layers} layers "
                    f"(0..{library.num_layers - 1}, or -1 for the last)."
                )
            names = allowed[index]
            if rule.keep_parent:
                names = [n for n in names if n == library.variants(index)[0]]
            if rule.allow:
                names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in rule.allow)]
            names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in rule.forbid)]
            if rule.keep_attention or rule.keep_ffn:
                kinds = {n: _sub_block_kinds(library, index, n, rule) for n in names}
                names = [
                    n
                    for n in names
                    if not (rule.keep_attention and kinds[n][0] != "attention")
                    and not (rule.keep_ffn and kinds[n][1] != "ffn")
                ]
            if not names:
                raise UserError(
                    f"The {rule.describe()} leaves {layer_key(index)} with no variant to choose (it offers "
                    f"{', '.join(library.variants(index))}). Loosen the rule for that layer."
                )
            allowed[index] = names
    return tuple(tuple(names) for names in allowed)


# ---------------------------------------------------------------- solutions


Status = Literal["optimal", "time_limit", "feasible"]


@attrs.frozen
class Solution:
    """One choice of blocks, as a solver found it.

    ``status``: ``optimal`` (proven within the requested gap), ``time_limit`` (stopped by
    the time limit; feasible, ``gap`` is the proven relative gap) or ``feasible`` (a
    heuristic's answer, no optimality proof, ``gap`` is ``None``). ``totals`` are
    whole-model totals, fixed costs included.
    """

    solver: str
    status: Status
    gap: float | None
    objective_value: float
    chosen: dict[str, str]
    totals: dict[str, float]
    solve_seconds: float

    def to_json(self) -> dict:
        """The JSON of ``solutions/<name>.json`` and ``puzzle search --json``."""
        return CONVERTER.unstructure(self)

    @classmethod
    def from_json(cls, data: Any) -> "Solution":
        """A solution read back from :meth:`to_json`'s output."""
        return CONVERTER.structure(data, cls)


# ---------------------------------------------------------------- the problem


@attrs.frozen
class SearchProblem:
    """A validated search problem over a block library.

    ``allowed[i]`` are the variant names layer ``i`` may use (after layer rules);
    ``constraints`` bound whole-model totals (throughput and speedup targets already
    turned into runtime budgets); ``fixed`` holds per-path fixed costs added to every
    total. Solvers use :meth:`values` (``(layers, max variants)`` arrays, NaN where a
    layer has fewer variants) and :meth:`bounds` (bounds on the sum over layers).
    """

    library: BlockLibrary = attrs.field(eq=False, repr=False)
    objective: Objective
    minimize: bool
    constraints: tuple[Constraint, ...]
    allowed: tuple[tuple[str, ...], ...]
    fixed: Mapping[str, float] = attrs.Factory(dict)
    num_solutions: int = 1
    min_diversity: int = 1
    _cache: dict = attrs.field(factory=dict, init=False, eq=False, repr=False)

    @property
    def num_layers(self) -> int:
        """How many layers a solution chooses for."""
        return len(self.allowed)

    @property
    def layer_names(self) -> list[str]:
        """``layer_0``, ``layer_1``...: the keys of :attr:`Solution.chosen`."""
        return [layer_key(i) for i in range(self.num_layers)]

    @property
    def parent(self) -> list[str]:
        """The parent's block in each layer (the first variant listed)."""
        return [self.library.variants(i)[0] for i in range(self.num_layers)]

    @property
    def mask(self) -> np.ndarray:
        """``(layers, max variants)``: True where a layer has a variant at that index."""
        width = max(len(names) for names in self.allowed)
        return np.arange(width)[None, :] < np.array([len(names) for names in self.allowed])[:, None]

    def values(self, path: str, cost: bool = False) -> np.ndarray:
        """Per layer and allowed variant, the number at ``path`` (NaN padding).

        Missing, non-numeric and (for ``cost=True``) negative values are a :class:`UserError`.
        """
        key = (path, cost)
        if key not in self._cache:
            table = np.full(self.mask.shape, np.nan)
            for i, names in enumerate(self.allowed):
                for j, name in enumerate(names):
                    table[i, j] = _number(self.library, i, name, path, cost)
            self._cache[key] = table
        return self._cache[key]

    def scores(self) -> np.ndarray:
        """The objective of each allowed variant (``(layers, max variants)``, NaN padding)."""
        return sum(weight * self.values(path) for path, weight in self.objective.terms)

    def bounds(self, constraint: Constraint) -> tuple[float | None, float | None]:
        """``(min, max)`` on the sum over layers: the constraint's bounds less fixed costs."""
        fixed = self.fixed.get(constraint.path, 0.0)
        return (
            None if constraint.min is None else constraint.min - fixed,
            None if constraint.max is None else constraint.max - fixed,
        )

    def total(self, path: str, names: Sequence[str], cost: bool = True) -> float:
        """Whole-model total of ``path`` for one variant name per layer (fixed costs included)."""
        return self.fixed.get(path, 0.0) + sum(_number(self.library, i, n, path, cost) for i, n in enumerate(names))

    def objective_value(self, names: Sequence[str]) -> float:
        """The objective of one variant name per layer."""
        return sum(w * self.total(p, names, cost=False) for p, w in self.objective.terms)

    def totals(self, names: Sequence[str]) -> dict[str, float]:
        """Totals of every constraint and objective path, and of every stat all chosen variants have."""
        stats = set.intersection(
            *({f"stats.{k}" for k, v in self.library.layers[i][n].get("stats", {}).items() if _is_number(v)}
              for i, n in enumerate(names))
        )
        paths = [c.path for c in self.constraints] + self.objective.paths + sorted(stats)
        return {path: self.total(path, names, cost=False) for path in dict.fromkeys(paths)}

    def names(self, choice: Sequence[int]) -> list[str]:
        """Variant names from per-layer indices into :attr:`allowed`."""
        return [self.allowed[i][j] for i, j in enumerate(choice)]

    def violations(self, names: Sequence[str], tolerance: float = 1e-6) -> list[str]:
        """The constraints ``names`` breaks (beyond a relative ``tolerance``), as text."""
        return [
            f"{c.text(readable)} (total {readable(self.total(c.path, names))})"
            for c in self.constraints
            if not c.holds(self.total(c.path, names), tolerance)
        ]

    def solution(
        self, solver: str, choice: Sequence[int], status: Status, gap: float | None, seconds: float
    ) -> Solution:
        """The :class:`Solution` record of a choice (indices into :attr:`allowed`)."""
        names = self.names(choice)
        return Solution(
            solver=solver,
            status=status,
            gap=gap,
            objective_value=self.objective_value(names),
            chosen=dict(zip(self.layer_names, names)),
            totals=self.totals(names),
            solve_seconds=seconds,
        )

    def with_objective(self, objective: Objective, minimize: bool) -> "SearchProblem":
        """The same constraints with another objective (what ``max_params`` optimises)."""
        return attrs.evolve(self, objective=objective, minimize=minimize)

    def parent_runtime(self) -> float:
        """Whole-model runtime of the parent (fixed costs included)."""
        return self.total(RUNTIME, self.parent)

    def at_speedup(self, speedup: float) -> "SearchProblem":
        """The problem with a runtime budget of parent runtime / ``speedup`` added."""
        if not (speedup > 0 and math.isfinite(speedup)):
            raise UserError(f"Speedup {speedup} is not a positive number.")
        return attrs.evolve(
            self, constraints=self.constraints + (Constraint(RUNTIME, None, self.parent_runtime() / speedup),)
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(library: BlockLibrary, layer: int, name: str, path: str, cost: bool) -> float:
    value = library.get(layer, name, path)
    where = f"{layer_key(layer)}.{name}.{path}"
    if not _is_number(value):
        raise UserError(f"{where} is {value!r}; the search needs a number there. Pick a numeric dot-path.")
    if cost and value < 0:
        raise UserError(
            f"{where} is {value}, a negative cost. Costs must be non-negative; re-run the cost stage or fix the library."
        )
    return float(value)


# ---------------------------------------------------------------- building problems


def generated_tokens(scenario: Mapping[str, Any]) -> int:
    """Tokens one scenario run produces: batch x decode length (prefill length if no decode)."""
    try:
        batch = int(scenario["batch_size"])
        length = int(scenario.get("decode_len") or scenario["prefill_len"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"The scenario {dict(scenario)!r} lacks batch_size and decode_len/prefill_len, which a throughput "
            f"target needs. Re-run the cost stage."
        ) from None
    return batch * length


def throughput(runtime_ms: float, scenario: Mapping[str, Any]) -> float:
    """Generated tokens per second of a model whose scenario run takes ``runtime_ms``."""
    return 1000.0 * generated_tokens(scenario) / runtime_ms if runtime_ms > 0 else math.inf


def _runtime_constraint(target: Constraint, problem: SearchProblem, scenario: Mapping | None) -> Constraint:
    """A throughput or speedup target as a runtime budget (higher throughput: lower runtime)."""
    if target.path == SPEEDUP:
        scale = problem.parent_runtime()
    elif scenario is None:
        raise UserError(
            f"Constraint {target} needs an inference scenario to turn tokens/s into a runtime budget; this library "
            f"has none. Pass a run directory (its costs/costs.json has the scenario), or use 'speedup>=X' or a "
            f"'{RUNTIME}<=...' budget."
        )
    else:
        scale = 1000.0 * generated_tokens(scenario)
    return Constraint(
        RUNTIME,
        None if target.max is None else scale / target.max,
        None if target.min is None else scale / target.min,
    )


def build_problem(
    library: BlockLibrary,
    objective: Objective | str,
    *,
    minimize: bool = True,
    constraints: Sequence[Constraint | str] = (),
    speedup: float | None = None,
    layer_rules: Sequence[LayerRule] = (),
    fixed: Mapping[str, float] | None = None,
    scenario: Mapping[str, Any] | None = None,
    num_solutions: int = 1,
    min_diversity: int = 1,
) -> SearchProblem:
    """A checked :class:`SearchProblem` over ``library``.

    ``fixed`` are per-stat fixed costs (``{"runtime_ms": 3.1}`` or ``{"stats.runtime_ms": 3.1}``);
    ``scenario`` (``batch_size``, ``prefill_len``, ``decode_len``) is needed for throughput targets.
    Every value the objective and constraints read is checked here, so solvers never meet
    a missing or malformed one.
    """
    objective = objective if isinstance(objective, Objective) else Objective.parse(objective)
    parsed = [c if isinstance(c, Constraint) else Constraint.parse(c) for c in constraints]
    if num_solutions < 1:
        raise UserError(f"num_solutions is {num_solutions}; ask for at least one solution.")
    if num_solutions > 1 and not 1 <= min_diversity <= library.num_layers:
        raise UserError(
            f"min_diversity is {min_diversity}; solutions can differ in 1 to {library.num_layers} layers "
            f"(the library has {library.num_layers})."
        )
    fixed_costs = {}
    for key, value in (fixed or {}).items():
        path = key if "." in key else f"stats.{key}"
        if not _is_number(value):
            continue  # notes a cost model keeps next to its numbers
        if not math.isfinite(value) or value < 0:
            raise UserError(f"Fixed cost {path} is {value!r}; fixed costs must be non-negative finite numbers.")
        fixed_costs[path] = float(value)
    problem = SearchProblem(
        library=library,
        objective=objective,
        minimize=minimize,
        constraints=(),
        allowed=apply_layer_rules(library, layer_rules),
        fixed=fixed_costs,
        num_solutions=num_solutions,
        min_diversity=min_diversity,
    )
    resolved = tuple(_runtime_constraint(c, problem, scenario) if c.path in TARGETS else c for c in parsed)
    problem = attrs.evolve(problem, constraints=resolved)
    if speedup is not None:
        problem = problem.at_speedup(speedup)
    known = library.paths()
    for path in objective.paths + [c.path for c in problem.constraints]:
        if path not in known and not library.has_path(path):  # something else than a number: named below
            raise UserError(
                f"No variant in the library has a value at '{path}'.{suggest(path, sorted(known))} The library has: "
                f"{', '.join(sorted(known))}. Scores come from the score stage and stats from the cost stage."
            )
    problem.scores()  # checks every objective value
    for constraint in problem.constraints:
        problem.values(constraint.path, cost=True)
    return problem


# ---------------------------------------------------------------- infeasibility


def reachable(problem: SearchProblem, path: str) -> tuple[float, float]:
    """Smallest and largest whole-model total of ``path`` over every allowed choice."""
    table = problem.values(path, cost=True)
    fixed = problem.fixed.get(path, 0.0)
    return fixed + float(np.nansum(np.nanmin(table, axis=1))), fixed + float(np.nansum(np.nanmax(table, axis=1)))


def can_hold_alone(problem: SearchProblem, constraint: Constraint) -> bool:
    """Whether the range of totals ``constraint.path`` can reach meets the constraint's bounds."""
    low, high = reachable(problem, constraint.path)
    closest = min(max(low, low if constraint.min is None else constraint.min), high)
    return constraint.holds(closest)


def infeasible_error(problem: SearchProblem, solver: str) -> InfeasibleError:
    """The error for an infeasible problem: what each constraint can reach on its own."""
    parts = []
    alone = [can_hold_alone(problem, c) for c in problem.constraints]
    for constraint, possible in zip(problem.constraints, alone):
        low, high = reachable(problem, constraint.path)
        if constraint.min is None:
            reach = f"the smallest achievable total is {readable(low)}"
        elif constraint.max is None:
            reach = f"the largest achievable total is {readable(high)}"
        else:
            reach = f"achievable totals range from {readable(low)} to {readable(high)}"
        parts.append(f"{constraint.text(readable)}: {reach}{'' if possible else ', so it can never hold'}")
    fixed = f" (fixed costs {', '.join(f'{p}={readable(v)}' for p, v in problem.fixed.items())} included)"
    why = (
        "each constraint can hold on its own, but not all together"
        if all(alone)
        else "at least one constraint cannot hold even on its own"
    )
    return InfeasibleError(
        f"No choice of blocks meets every constraint ({solver}): {why}. On its own, "
        + "; ".join(parts)
        + (fixed if problem.fixed else "")
        + ". Relax the budgets (or the layer rules), or add cheaper variants to the library."
    )


def run_solver(solver: Any, problem: SearchProblem, name: str) -> list[Solution]:
    """``solver.solve(problem)``, checked: every solution picks an allowed variant per layer and meets the budgets.

    A solver that breaks this contract is a broken plugin, reported as such.
    """
    solutions = solver.solve(problem)
    if not solutions or not all(isinstance(s, Solution) for s in solutions):
        raise PluginError(f"Solver '{name}' returned {solutions!r}; expected a non-empty list of Solution records.")
    for solution in solutions:
        names = [solution.chosen.get(layer) for layer in problem.layer_names]
        wrong = [
            f"{layer}={chosen!r}" for layer, chosen, allowed in zip(problem.layer_names, names, problem.allowed)
            if chosen not in allowed
        ]
        if wrong or len(solution.chosen) != problem.num_layers:
            raise PluginError(
                f"Solver '{name}' chose variants the problem does not allow ({', '.join(wrong) or 'extra layers'})."
            )
        broken = problem.violations(names)
        if broken:
            raise PluginError(f"Solver '{name}' returned a choice that breaks {'; '.join(broken)}.")
    return solutions


def check_diversity_count(problem: SearchProblem, found: int, solver: str, timed_out: bool = False) -> None:
    """Warn when fewer diverse solutions were found than were asked for."""
    if found < problem.num_solutions:
        why = (
            "the next one was not found within the time limit"
            if timed_out
            else f"no further choice meets the constraints while differing from every earlier one in at least "
            f"{problem.min_diversity} layers"
        )
        warnings.warn(
            f"{solver} found {found} of the {problem.num_solutions} solutions asked for: {why}.",
            SearchWarning,
            stacklevel=3,
        )


CONVERTER.register_structure_hook(Objective, _structure_objective)
CONVERTER.register_unstructure_hook(Objective, str)
CONVERTER.register_structure_hook(Constraint, _structure_constraint)
CONVERTER.register_unstructure_hook(Constraint, str)
