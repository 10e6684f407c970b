"""The quality levers as tables: one markdown table per lever, rendered from the committed results.

Reads ``results/bld_sweep.json``, ``results/bld_stage.json`` (``bld.py --part sweep`` /
``--part stage``), ``results/gkd_speed.json`` (``gkd.py --part speed``),
``results/scoring_tokens.json`` (``scoring.py --compare``), ``results/scoring*.json``
(``scoring.py``) and, when present, ``results/gkd_tokens*.json`` (``gkd_tokens.py``), and the
demo's settings from ``configs/demo.yaml``, and writes the "Quality levers" section of
``benchmarks/README.md`` between its marker comments. Every
number and every comparison in that section comes from those files, so rerun this script
after a benchmark rewrites its JSON; ``--check`` only says whether the section is stale.

    .venv/bin/python benchmarks/levers.py            # rewrite the section
    .venv/bin/python benchmarks/levers.py --check    # exit 1 if the README differs from the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import attrs

from puzzle_core import report
from puzzle_core.config import unstructure
from puzzle_core.errors import UserError
from puzzle_core.schema import GKDSection, PuzzleConfig, load_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
DEMO = HERE.parent / "configs" / "demo.yaml"
START, END = "<!-- levers:start -->", "<!-- levers:end -->"
# each results file and the command that writes it (named when it is missing)
SOURCES = {
    "bld_sweep.json": ".venv/bin/python benchmarks/bld.py --part sweep",
    "bld_stage.json": ".venv/bin/python benchmarks/bld.py --part stage",
    "gkd_speed.json": ".venv/bin/python benchmarks/gkd.py --part speed",
    "scoring_tokens.json": ".venv/bin/python benchmarks/scoring.py --compare RUN_256 RUN_1024 RUN_2048",
    "scoring.json": ".venv/bin/python benchmarks/scoring.py --tokens 256",
    "scoring_2048.json": ".venv/bin/python benchmarks/scoring.py --tokens 2048 --out benchmarks/results/scoring_2048.json",
}
NOT_RUN = (
    "coupled BLD's child after GKD (the `bld` ablation compares coupled and decoupled BLD's children as assembled "
    "only: \"Latest numbers\" above)",
    "per-layer search rules and memory as a search constraint",
    "GKD learning-rate schedules",
)
GKD_TOKENS = ("GKD tokens (`gkd_tokens.py`: the same child uptrained for different `gkd.tokens`, KL and the suite "
              "after)")
GKD_DATA = "a broader distillation data mix than the demo corpus (`python -m benchmarks.gkd_data`: the suite after GKD)"
GKD_QUALITY = ("GKD quality per setting (`gkd.py --part quality`: KL to the parent after the same tokens for bf16, "
               "trainable subsets and LoRA)")


# ------------------------------------------------------------------------------------- inputs


def load(results: Path, name: str) -> dict:
    """One results file, or a UserError that names it and the command that writes it."""
    path = results / name
    command = SOURCES.get(name, ".venv/bin/python benchmarks/scoring.py")
    if not path.is_file():
        raise UserError(f"{path} is missing: the lever tables are rendered from it. Run `{command}` to write it "
                        f"(or restore the committed copy with `git checkout -- benchmarks/results/{name}`), then "
                        f"run benchmarks/levers.py again.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); rerun `{command}` or restore the committed copy.") \
            from error


@attrs.frozen
class Inputs:
    sweep: dict
    stage: dict
    gkd: dict
    scoring_tokens: dict
    engine: list[dict]  # every scoring*.json but scoring_tokens.json
    demo: PuzzleConfig
    gkd_quality: dict | None  # `gkd.py --part quality`'s results (None when it has not run)
    gkd_tokens: list[dict]  # `gkd_tokens.py`'s results, one per child (none when it has not run)
    gkd_data: dict | None  # `gkd_data.py`'s results (None when it has not run)


def read_inputs(results: Path = RESULTS, demo: Path = DEMO) -> Inputs:
    """Every file of ``SOURCES`` (each required), plus any further engine runs (``scoring_before_*.json``)."""
    found = {name: load(results, name) for name in SOURCES}
    engine = [found.get(path.name) or load(results, path.name) for path in sorted(results.glob("scoring*.json"))
              if not path.name.startswith("scoring_tokens")]  # scoring_tokens*.json: `scoring.py --compare`'s
    return Inputs(found["bld_sweep.json"], found["bld_stage.json"], found["gkd_speed.json"],
                  found["scoring_tokens.json"], engine, load_config(demo),
                  load(results, "gkd_quality.json") if (results / "gkd_quality.json").is_file() else None,
                  [load(results, path.name) for path in sorted(results.glob("gkd_tokens*.json"))],
                  load(results, "gkd_data.json") if (results / "gkd_data.json").is_file() else None)


# ------------------------------------------------------------------------------------ helpers


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def tokens(n: int) -> str:
    return f"{n:,}"


def lr(value: float) -> str:
    return f"{value:g}"


def x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def pct(ratio: float) -> str:
    """A ratio as a signed percentage change: 0.8 -> -20%."""
    return f"{(ratio - 1) * 100:+.0f}%"


def loads(machine_or_row: Mapping, key: str = "load_average") -> str:
    return " / ".join(f"{v:.1f}" for v in machine_or_row[key])


def load_range(rows: Iterable[Mapping]) -> str:
    values = [row["load_average_before"][0] for row in rows] + [row["load_average_after"][0] for row in rows]
    return f"{min(values):.1f}-{max(values):.1f}"


def units_of(rows: Iterable[Mapping]) -> list[tuple[int, str]]:
    return sorted({(r["layer"], r["unit"]) for r in rows})


def by_unit(rows: Iterable[Mapping], keep: Callable[[Mapping], bool]) -> dict[tuple[int, str], Mapping]:
    return {(r["layer"], r["unit"]): r for r in rows if keep(r)}


def method_of(setting: str) -> str:
    return setting.partition(" @")[0]


def demo_inits(demo: PuzzleConfig) -> set[str]:
    options = demo.library.variants.options
    return {f"attention={options.attention_init}", f"ffn={options.ffn_init}"}


def caveat(inputs: Inputs) -> str:
    sweep, stage, gkd = inputs.sweep["machine"], inputs.stage["machine"], inputs.gkd["machine"]
    return (f"Measured on a shared machine with {sweep['cpus']} cores (torch {sweep['torch']}, CPU only), "
            f"with other jobs running: the 1/5/15-minute load averages recorded at the last write of each file were "
            f"{loads(sweep)} (BLD sweep), {loads(stage)} (library stage) and {loads(gkd)} (GKD speed); "
            f"the scoring-tokens comparison records no load. Training and throughput figures are per CPU second "
            f"of the process, which such load skews far less than wall time; the wall times of the library stage "
            f"are given with the load around each arm and are not clean. Held-out loss is the BLD loss, the "
            f"normalised MSE of the sub-block's output on {tokens(inputs.sweep['heldout_tokens'])} held-out "
            f"tokens (0 = the parent's output, 1 = as far off as predicting zero).")


# ----------------------------------------------------------------------------------- the levers


def bld_tokens(inputs: Inputs) -> str:
    rows, demo = inputs.sweep["rows"], inputs.demo.library
    base = [r for r in rows if r["sweep"] == "tokens"]
    fit = [r for r in rows if r["sweep"] == "tokens+fit"]
    budgets, fit_budgets = sorted({r["tokens"] for r in base}), sorted({r["tokens"] for r in fit})
    cells = {n: by_unit(base, lambda r, n=n: r["tokens"] == n) for n in budgets}
    fit_cells = {n: by_unit(fit, lambda r, n=n: r["tokens"] == n) for n in fit_budgets}
    first, units = budgets[0], units_of(base)
    base_lr, fit_lr = base[0]["lr"], fit[0]["lr"]
    base_init, fit_init = init_label(rows, base[0]), init_label(rows, fit[0])
    headers = ["layer", "unit", f"before ({base_init})"] + [tokens(n) for n in budgets]
    headers += [f"before ({fit_init})"] + [f"{tokens(n)} ({fit_init}, lr {lr(fit_lr)})" for n in fit_budgets]
    body = []
    for key in units:
        row = [str(key[0]), key[1], f"{cells[first][key]['heldout_before']:.3f}"]
        row += [f"{cells[n][key]['heldout_after']:.3f}" for n in budgets]
        row += [f"{fit_cells[fit_budgets[0]][key]['heldout_before']:.3f}"]
        row += [f"{fit_cells[n][key]['heldout_after']:.3f}" for n in fit_budgets]
        body.append(row)

    def vs_first(column: dict) -> float:
        return median(column[k]["heldout_after"] / cells[first][k]["heldout_after"] for k in units)

    body.append(["", f"median vs {tokens(first)}", ""] + [x(vs_first(cells[n])) for n in budgets] + [""]
                + [x(vs_first(fit_cells[n])) for n in fit_budgets])
    arms = sorted((a for a in inputs.stage["arms"] if a["arm"] == "one_pass_bf16_torchrun"), key=lambda a: a["tokens"])
    cost = ", ".join(f"{a['wall_s']:.0f} s wall / {a['cpu_s']:.0f} s CPU at {tokens(a['tokens'])}" for a in arms)
    mid = demo.tokens if demo.tokens in cells else budgets[1]
    same = [n for n in fit_budgets if n in cells]
    monotone = all(vs_first(cells[a]) > vs_first(cells[b]) for a, b in zip(budgets, budgets[1:]))
    fit_first = median(fit_cells[fit_budgets[0]][k]["heldout_after"] / cells[fit_budgets[0]][k]["heldout_after"]
                       for k in units)
    text = (
        f"Held-out loss after BLD of {len(units)} sampled blocks (layers {', '.join(sorted({str(k[0]) for k in units}, key=int))}) "
        f"by training tokens per block, at lr {lr(base_lr)} from the {base_init} init, and (last columns) at "
        f"lr {lr(fit_lr)} from the {fit_init} init. {'More tokens keep paying' if monotone else 'By tokens'}: the median block's loss is "
        f"{pct(vs_first(cells[mid]))} at {tokens(mid)} and {pct(vs_first(cells[budgets[-1]]))} at "
        f"{tokens(budgets[-1])} against {tokens(first)}. The fitted init with lr {lr(fit_lr)} (two changes at once) "
        f"changes the median block's loss by "
        + " and ".join(f"{pct(median(fit_cells[n][k]['heldout_after'] / cells[n][k]['heldout_after'] for k in units))}"
                       f" at {tokens(n)}" for n in same)
        + f" against the first columns at the same tokens; at {tokens(fit_budgets[0])} tokens that is "
        f"{'more' if fit_first < vs_first(cells[mid]) else 'less'} than {tokens(mid)} tokens buy from the old "
        f"start ({pct(vs_first(cells[mid]))}). Cost: the demo's library stage ({arms[0]['units'] if arms else 'not measured'} blocks, one pass per "
        f"layer, bf16, two torchrun processes) took {cost} (load {load_range(arms)}). The demo takes "
        f"{tokens(demo.tokens)} tokens per block (`library.tokens`); "
        + ("the loss still falls past it." if vs_first(cells[budgets[-1]]) < vs_first(cells[mid]) else
           "the loss does not fall past it.")
    )
    return section("BLD tokens per block", text, table(headers, body))


def init_label(rows: list[dict], row: Mapping) -> str:
    """The init a sweep row used; ``default`` rows are named by the init-sweep methods with the same start."""
    if row["init"] != "default":
        return " / ".join(part.partition("=")[2] for part in row["init"].split(",") if not part.startswith("linear"))
    defaults = by_unit((r for r in rows if r["sweep"] == row["sweep"]), lambda r: r["tokens"] == row["tokens"])
    matching = []
    for method in dict.fromkeys(method_of(r["setting"]) for r in rows if r["sweep"] == "init"):
        starts = by_unit(rows, lambda r, m=method: r["sweep"] == "init" and method_of(r["setting"]) == m)
        if starts and all(abs(r["heldout_before"] - defaults[k]["heldout_before"]) < 1e-9 for k, r in starts.items()):
            matching.append(method.partition("=")[2])
    return " / ".join(matching) if matching else "default of its time"


def bld_lr(inputs: Inputs) -> str:
    rows = [r for r in inputs.sweep["rows"] if r["sweep"] == "lr"]
    rates, units = sorted({r["lr"] for r in rows}), units_of(rows)
    cells = {v: by_unit(rows, lambda r, v=v: r["lr"] == v) for v in rates}
    best = {k: min(rates, key=lambda v: cells[v][k]["heldout_after"]) for k in units}
    body = []
    for key in units:
        body.append([str(key[0]), key[1], f"{cells[rates[0]][key]['heldout_before']:.3f}"]
                    + [(f"**{cells[v][key]['heldout_after']:.3f}**" if best[key] == v
                        else f"{cells[v][key]['heldout_after']:.3f}") for v in rates])
    reference = rates[1] if len(rates) > 1 else rates[0]
    body.append(["", f"median vs lr {lr(reference)}", ""]
                + [x(median(cells[v][k]["heldout_after"] / cells[reference][k]["heldout_after"] for k in units))
                   for v in rates])
    body.append(["", "blocks where best", ""] + [str(sum(best[k] == v for k in units)) for v in rates])
    demo, init = inputs.demo.library.lr, init_label(inputs.sweep["rows"], rows[0])
    top = max(rates, key=lambda v: sum(best[k] == v for k in units))

    def summary(v: float) -> str:
        change = median(cells[v][k]["heldout_after"] / cells[reference][k]["heldout_after"] for k in units)
        return (f"lr {lr(v)} is the best for {sum(best[k] == v for k in units)} of {len(units)} blocks "
                f"({pct(change)} against lr {lr(reference)} for the median block)")

    text = (
        f"Held-out loss after BLD at {tokens(rows[0]['tokens'])} tokens per block by AdamW learning rate (cosine "
        f"schedule, 5% warm-up), from the {init} init; the best per block in bold. Most often the best: "
        f"{summary(top)}"
        + (f"; the demo's lr {lr(demo)} (`library.lr`): {summary(demo)}." if demo in cells and demo != top else
           "; the demo uses it (`library.lr`)." if demo == top else
           f"; the demo's lr {lr(demo)} (`library.lr`) was not swept.")
        + f" Not measured: the same sweep from the demo's init ({' / '.join(sorted(demo_inits(inputs.demo)))}), "
        f"and at other token budgets, where the best rate may differ."
    )
    return section("BLD learning rate", text, table(["layer", "unit", "before"] + [f"lr {lr(v)}" for v in rates], body))


def bld_init(inputs: Inputs) -> str:
    all_rows = inputs.sweep["rows"]
    rows = [r for r in all_rows if r["sweep"] == "init"]
    budgets = sorted({r["tokens"] for r in rows})
    methods = list(dict.fromkeys(method_of(r["setting"]) for r in sorted(rows, key=lambda r: r["setting"])))
    cells = {(m, n): by_unit(rows, lambda r, m=m, n=n: method_of(r["setting"]) == m and r["tokens"] == n)
             for m in methods for n in budgets}
    baseline = {m.partition("=")[0]: m for m in methods
                if m.partition("=")[2] in init_label(all_rows, next(r for r in all_rows if r["sweep"] == "tokens"))}
    demo = demo_inits(inputs.demo)
    last = budgets[-1]
    best = {}
    for part in {m.partition("=")[0] for m in methods}:
        for key in cells[(baseline[part], last)]:
            best[key] = min((m for m in methods if m.startswith(part + "=")),
                            key=lambda m: cells[(m, last)][key]["heldout_after"])
    def vs(method: str, n: int) -> float:
        part = method.partition("=")[0]
        return median(cells[(method, n)][k]["heldout_after"] / cells[(baseline[part], n)][k]["heldout_after"]
                      for k in cells[(method, n)])

    def after(method: str, n: int) -> float:
        return median(r["heldout_after"] for r in cells[(method, n)].values())

    body = []
    for method in sorted(methods, key=lambda m: (m.partition("=")[0], m != baseline[m.partition("=")[0]], m)):
        first = cells[(method, budgets[0])]
        body.append([method.partition("=")[0], method.partition("=")[2] + (" (demo)" if method in demo else ""),
                     str(len(first)), f"{median(r['heldout_before'] for r in first.values()):.3f}"]
                    + [f"{after(method, n):.3f}" for n in budgets] + [x(vs(method, n)) for n in budgets]
                    + [str(sum(best[k] == method for k in first))])
    headers = (["part", "method", "blocks", "before BLD"] + [f"after {tokens(n)}" for n in budgets]
               + [f"vs baseline at {tokens(n)}" for n in budgets] + [f"best at {tokens(last)}"])

    attention = next(m for m in methods if m in demo and m.startswith("attention"))
    starts = median(r["heldout_before"] for r in cells[(attention, budgets[0])].values()) < median(
        r["heldout_before"] for r in cells[(baseline["attention"], budgets[0])].values())
    stays = all(vs(attention, n) < 1 for n in budgets)
    lower = {(True, True): "starts lower and stays lower:", (False, True): "ends lower:",
             (True, False): "starts lower but does not stay lower:", (False, False): "does not end lower:"}[(starts, stays)]
    ffn = next(m for m in methods if m in demo and m.startswith("ffn"))
    text = (
        f"Medians over the sampled blocks (attention: {len(cells[(attention, last)])}, FFN: "
        f"{len(cells[(ffn, last)])}) of the held-out loss before and after BLD at lr {lr(rows[0]['lr'])}, by the "
        f"method that initialises a pruned sub-block from the parent's; \"vs baseline\" is the median per-block "
        f"ratio to the former default of the same part ({' / '.join(b.partition('=')[2] for b in baseline.values())}). "
        f"Grouping the parent's KV heads by similarity and fitting each new head to its group's outputs "
        f"({attention.partition('=')[2]}) {lower} "
        f"{x(vs(attention, budgets[0]))} and {x(vs(attention, last))} the baseline's loss after "
        f"{tokens(budgets[0])} and {tokens(last)} tokens; its median after {tokens(budgets[0])} tokens "
        f"({after(attention, budgets[0]):.3f}) is "
        f"{'below' if after(attention, budgets[0]) < after(baseline['attention'], last) else 'above'} the "
        f"baseline's after {tokens(last)} ({after(baseline['attention'], last):.3f}). For the "
        f"FFN, keeping the channels of the paper's criterion (below) with the down projection re-fitted to the "
        f"parent FFN's output ({ffn.partition('=')[2]}) gives "
        f"{x(vs(ffn, budgets[0]))} / {x(vs(ffn, last))}; choosing channels by their contribution through the "
        f"down projection (the paper's criterion) gives "
        + " / ".join(x(vs("ffn=contribution", n)) for n in budgets)
        + " and by weight norm alone (the fallback without calibration) "
        + " / ".join(x(vs("ffn=weight_norm", n)) for n in budgets)
        + f". The demo uses the defaults, {attention.partition('=')[2]} and {ffn.partition('=')[2]} "
        f"(`library.variants.attention_init` / `ffn_init`). Not measured: `similar_kv` (the same similarity "
        f"grouping, weights averaged), so similarity grouping and fitting are not separated. Linear replacements (`linear=lstsq`) are not in the "
        f"demo's search space (vLLM cannot serve them) and their init was not swept here."
    )
    return section("Initialisation before -> after BLD", text, table(headers, body))


def bf16(inputs: Inputs) -> str:
    rows = inputs.sweep["rows"]
    half = [r for r in rows if r["sweep"] == "precision"]
    n = half[0]["tokens"]
    full = by_unit(rows, lambda r: r["sweep"] == "tokens" and not r["bf16"] and r["tokens"] == n)
    half_cells = by_unit(half, lambda r: True)
    units = units_of(half)
    body, loss, speed = [], [], []
    for key in units:
        f, h = full[key], half_cells[key]
        loss.append(h["heldout_after"] / f["heldout_after"])
        speed.append(h["tokens_per_cpu_s"] / f["tokens_per_cpu_s"])
        body.append([str(key[0]), key[1], f"{f['heldout_after']:.4f}", f"{h['heldout_after']:.4f}",
                     f"{loss[-1] - 1:+.2%}",
                     f"{f['tokens_per_cpu_s']:,.0f}", f"{h['tokens_per_cpu_s']:,.0f}", x(speed[-1])])
    body.append(["", "median", "", "", f"{median(loss) - 1:+.2%}", "", "", x(median(speed))])
    kinds = {kind: median(s for k, s in zip(units, speed) if k[1].startswith(kind)) for kind in ("attn", "ffn")}
    arms = {(a["tokens"], a["arm"]): a for a in inputs.stage["arms"]}
    pairs = [(t, a, a.replace("one_pass", "one_pass_bf16"))
             for t, a in arms if a.startswith("one_pass") and "bf16" not in a]
    stage = "; ".join(
        f"{arms[(t, b)]['cpu_s']:.0f} vs {arms[(t, a)]['cpu_s']:.0f} CPU s ({x(arms[(t, a)]['cpu_s'] / arms[(t, b)]['cpu_s'])}) "
        f"with {'two torchrun processes' if 'torchrun' in a else 'one local process'} at {tokens(t)} tokens"
        for t, a, b in sorted(pairs) if (t, b) in arms)
    gkd = {row["setting"]: row["tokens_per_cpu_s"]["median"] for row in inputs.gkd["rows"]}
    text = (
        f"bfloat16 autocast on CPU against float32, same blocks, {tokens(n)} tokens at lr {lr(half[0]['lr'])} "
        f"(master weights and optimizer in float32). The held-out loss moves by at most "
        f"{max(abs(v - 1) for v in loss):.2%}, and the training steps run at {x(median(speed))} the float32 tokens "
        f"per CPU second for the median block ({x(kinds['ffn'])} for the FFNs, {x(kinds['attn'])} for attention). "
        f"Over the whole library stage, which also "
        f"reads activations, evaluates and saves, bf16 took {stage}. A GKD step runs at "
        f"{x(gkd['bf16'] / gkd['fp32'])} the float32 tokens per CPU second with it (GKD speed, below). The demo uses bf16 autocast for both "
        f"(`library.bf16: {str(inputs.demo.library.bf16).lower()}`, `gkd.bf16: {str(inputs.demo.gkd.bf16).lower()}`)."
    )
    headers = ["layer", "unit", "loss fp32", "loss bf16", "bf16 vs fp32", "tok/CPU-s fp32", "tok/CPU-s bf16", "speed"]
    return section("bf16 autocast", text, table(headers, body))


ARM_NAMES = {
    "one_unit": "one unit per job, local", "one_pass": "one pass per layer, local",
    "one_pass_bf16": "one pass per layer, bf16, local", "one_unit_torchrun": "one unit per job, torchrun x2",
    "one_pass_torchrun": "one pass per layer, torchrun x2",
    "one_pass_bf16_torchrun": "one pass per layer, bf16, torchrun x2",
}


def stage_time(inputs: Inputs) -> str:
    arms = sorted(inputs.stage["arms"], key=lambda a: (a["tokens"], list(ARM_NAMES).index(a["arm"])
                                                       if a["arm"] in ARM_NAMES else len(ARM_NAMES)))
    reference = {a["tokens"]: a for a in arms if a["arm"] == "one_unit"}
    body = []
    for a in arms:
        split, ref = a["cpu_split_s"], reference.get(a["tokens"])
        body.append([tokens(a["tokens"]), ARM_NAMES.get(a["arm"], a["arm"]), f"{a['wall_s']:.0f}", f"{a['cpu_s']:.0f}",
                     x(ref["wall_s"] / a["wall_s"]) if ref else "not measured",
                     f"{a['load_average_before'][0]:.1f} / {a['load_average_after'][0]:.1f}",
                     f"{split['train_steps']:.0f}", f"{split['init_eval_save']:.0f}", f"{split['shared_data']:.0f}",
                     f"{split['outside_passes']:.0f}", f"{a['heldout_loss_after_mean']:.4f}"])
    captures = "; ".join(f"{c['wall_s']:.0f} s wall / {c['cpu_s']:.0f} s CPU at {tokens(c['tokens'])} tokens "
                         f"({c['executor']})" for c in inputs.stage["captures"])
    by = {(a["tokens"], a["arm"]): a for a in arms}
    small = min(reference) if reference else arms[0]["tokens"]

    def ratio(slow: str, fast: str, key: str = "wall_s") -> str:
        if (small, slow) in by and (small, fast) in by:
            return x(by[(small, slow)][key] / by[(small, fast)][key])
        return "not measured"

    executor = inputs.demo.library.executor
    one, unit = by[(small, "one_pass")], by[(small, "one_unit")]
    spread = max(abs(a["heldout_loss_after_mean"] / by[(a["tokens"], "one_unit")]["heldout_loss_after_mean"] - 1)
                 for a in arms if (a["tokens"], "one_unit") in by)
    text = (
        f"The demo's library stage ({arms[0]['units']} trained blocks, activations captured beforehand "
        f"and shared by every arm) per arm: wall and CPU seconds of the whole stage, the wall-time speedup over one "
        f"unit per job run locally, the 1-minute load before / after, where the CPU time went (training steps; "
        f"init, held-out evaluation and saving; data shared by a pass; start-up and the rest) and the mean "
        f"held-out loss after BLD. At {tokens(small)} tokens, training all of a layer's variants in one pass "
        f"over its activations took {one['cpu_s']:.0f} s CPU against {unit['cpu_s']:.0f} s for a job per unit "
        f"locally ({ratio('one_unit', 'one_pass')} faster in wall time; shared data "
        f"{unit['cpu_split_s']['shared_data']:.0f} -> {one['cpu_split_s']['shared_data']:.0f} s, training steps "
        f"{unit['cpu_split_s']['train_steps']:.0f} -> {one['cpu_split_s']['train_steps']:.0f} s); under torchrun "
        f"the same two arms took {by[(small, 'one_unit_torchrun')]['wall_s']:.0f} and "
        f"{by[(small, 'one_pass_torchrun')]['wall_s']:.0f} s wall ({by[(small, 'one_unit_torchrun')]['cpu_s']:.0f} "
        f"and {by[(small, 'one_pass_torchrun')]['cpu_s']:.0f} s CPU): no gain measured there. The local arms are "
        f"one process with the run's {inputs.demo.threads} torch threads (their CPU time counts both); two "
        f"torchrun processes of one thread, a share of the layers each, were {ratio('one_pass', 'one_pass_torchrun')} "
        f"faster in wall time on {by[(small, 'one_pass_torchrun')]['cpu_s']:.0f} s CPU against {one['cpu_s']:.0f}: "
        f"on this "
        f"CPU, splitting the layers between processes pays far better than splitting each step over threads. "
        f"bf16 autocast was a further "
        f"{ratio('one_pass_torchrun', 'one_pass_bf16_torchrun')} faster. The mean held-out loss differs by at most "
        f"{spread:.3%} between arms of the same tokens. Captures of the activations (not part of the times above): "
        f"{captures}. The demo runs `{executor.name}` with {executor.options.nproc} processes of "
        f"{executor.options.threads} thread, one pass per layer, bf16. With 1-minute loads of "
        f"{load_range(arms)} around the arms these wall times are not clean; idle-machine times are not measured."
    )
    headers = ["tokens", "arm", "wall s", "CPU s", "wall speedup", "load", "train CPU s", "init+eval CPU s",
               "data CPU s", "other CPU s", "held-out loss"]
    return section("Library stage time per arm", text, table(headers, body))


def gkd_overlay(section: GKDSection) -> dict:
    """``section``'s GKD setting as the GKD benchmark's overlays write it: the fields it sets away from the defaults."""
    defaults = GKDSection()
    return {field: getattr(section, field) for field in ("bf16", "trainable", "trainable_neighbors", "lora_rank")
            if getattr(section, field) != getattr(defaults, field)}


def gkd_speed(inputs: Inputs) -> str:
    rows = inputs.gkd["rows"]
    rate = {r["setting"]: r["tokens_per_cpu_s"]["median"] for r in rows}
    plain, fp32 = rate["plain training step"], rate["fp32"]
    demo = inputs.demo.gkd
    demo_overlay = gkd_overlay(demo)
    body = []
    for r in rows:
        overlay = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overlay"].items()) or "–"
        is_demo = r["setting"] not in ("teacher forward", "plain training step") and r["overlay"] == demo_overlay
        cpu, wall = r["tokens_per_cpu_s"], r["tokens_per_s"]
        body.append([r["setting"] + (" (demo)" if is_demo else ""), overlay,
                     f"{cpu['median']:.0f} ({cpu['min']:.0f}-{cpu['max']:.0f})", x(cpu["median"] / plain),
                     x(cpu["median"] / fp32) if r["setting"] not in ("teacher forward", "plain training step") else "–",
                     f"{wall['median']:.0f} ({wall['min']:.0f}-{wall['max']:.0f})"])
    settings = inputs.gkd["settings"]
    fastest = max((r for r in rows if r["setting"] not in ("teacher forward", "plain training step")),
                  key=lambda r: r["tokens_per_cpu_s"]["median"])
    demo_rate = next(r for r in rows if r["overlay"] == demo_overlay and r["setting"] != "plain training step")
    demo_rate = demo_rate["tokens_per_cpu_s"]["median"]
    swing = max(r["tokens_per_s"]["max"] / r["tokens_per_s"]["min"] for r in rows)
    text = (
        f"One GKD optimizer step as the stage runs it (teacher forward, student forward, cosine + KL, backward, "
        f"clipping, AdamW) on the demo's 1.6x child, batches of {settings['batch_size']} x {settings['seq_len']} "
        f"tokens, {settings['threads']} thread, median (range) of {settings['repeats']} interleaved rounds; next to "
        f"the teacher's forward alone and a plain training step of the child (LM loss, no teacher). In fp32 a GKD "
        f"step runs at {x(fp32 / plain)} the plain step's tokens per CPU second; the teacher's forward accounts "
        f"for {(1 / rate['teacher forward']) / (1 / fp32 - 1 / plain):.0%} of the extra CPU time per token. bf16 autocast lifts it to {x(rate['bf16'] / plain)} of the plain step; training only the changed "
        f"layers or LoRA adds speed ({fastest['setting']} is the fastest at {x(fastest['tokens_per_cpu_s']['median'] / plain)}) "
        + ("and their effect on the child's quality is the next table's. "
           if inputs.gkd_quality else "but their effect on the child's quality is not measured. ")
        + f"The demo's GKD setting is {', '.join(f'{k}={json.dumps(v)}' for k, v in demo_overlay.items()) or 'fp32'} "
        f"(`gkd.trainable: {demo.trainable}`, `gkd.lora_rank: {demo.lora_rank}`) with `gkd.children: {demo.children}`: "
        f"{tokens(demo.tokens)} tokens at {demo_rate:.0f} tokens per CPU second is about "
        f"{demo.tokens / demo_rate / 60:.0f} CPU-minutes, projected from this table's single-thread rate (not "
        f"timed as a stage here). "
        f"The wall-clock rates (last column) swing by up to {swing:.1f}x between rounds with the machine's load "
        f"({' / '.join(f'{v:.1f}' for v in inputs.gkd['machine']['load_average'])} at the end) and are shown "
        f"only for completeness."
    )
    headers = ["setting", "overlay (`gkd.`)", "tokens / CPU-s", "vs plain step", "vs fp32 GKD", "tokens / s wall"]
    return section("GKD speed per setting", text, table(headers, body))


def gkd_quality(inputs: Inputs) -> str:
    data = inputs.gkd_quality
    if data is None:
        return ""
    rows, settings = data["rows"], data["settings"]
    demo_overlay = gkd_overlay(inputs.demo.gkd)
    is_demo = {r["setting"]: r["overlay"] == demo_overlay for r in rows}
    reference = next((r for r in rows if is_demo[r["setting"]]), rows[0])

    def drop_per_cpu_minute(r: Mapping) -> float:
        return (r["kl_before"] - r["kl_after"]) / (r["cpu_s"] / 60)

    body = [[r["setting"] + (" (demo)" if is_demo[r["setting"]] else ""),
             ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overlay"].items()) or "–",
             f"{r['kl_before']:.3f}", f"{r['kl_after']:.3f}", f"{(r['kl_after'] / reference['kl_after'] - 1):+.1%}",
             f"{r['tokens'] / r['cpu_s']:.0f}", f"{r['cpu_s'] / 60:.1f}", f"{r['wall_s'] / 60:.1f}",
             f"{drop_per_cpu_minute(r):.4f}"] for r in rows]
    best = min(rows, key=lambda r: r["kl_after"])
    efficient = max(rows, key=drop_per_cpu_minute)
    rate = {r["setting"]: r["tokens"] / r["cpu_s"] for r in rows}
    level = [f"{r['setting']} ({x(rate[r['setting']] / rate[reference['setting']])} its tokens per CPU second)"
             for r in rows if r is not reference and abs(r["kl_after"] / reference["kl_after"] - 1) <= 0.01]
    text = (
        f"The same child uptrained from the same weights for {tokens(rows[0]['tokens'])} tokens per setting: the "
        f"`{settings['config'] or 'default'}` GKD section (learning rate, batch, schedule, losses, distillation "
        f"text), each setting overlaying precision, what trains and LoRA (`results/gkd_quality.json`; the blocks of "
        f"`{settings['library']}`, {settings['threads']} threads). KL is the stage's validation KL on "
        f"{tokens(settings['validation_tokens'])} validation tokens of the distillation text, before and after; "
        f"\"vs demo\" compares the KL after with the demo's setting's; the last column is the KL it removed per "
        f"CPU-minute. Lowest KL after: {best['setting']} ({best['kl_after']:.3f}); the most KL per CPU-minute: "
        f"{efficient['setting']} ({drop_per_cpu_minute(efficient):.4f} against {drop_per_cpu_minute(reference):.4f} "
        f"for the demo's setting). Within 1% of the demo's setting's KL after: "
        f"{', '.join(level) or 'none'}. One run per setting (load {loads(data['machine'])} at the end); the suite was "
        f"not run on these children."
    )
    headers = ["setting", "overlay (`gkd.`)", "KL before", "KL after", "vs demo", "tokens / CPU-s", "CPU min",
               "wall min", "KL drop / CPU-min"]
    return section("GKD quality per setting", text, table(headers, body))


def scoring_tokens(inputs: Inputs) -> str:
    data = inputs.scoring_tokens
    runs = sorted(data["runs"], key=lambda r: r["tokens"])
    engine = {e["tokens"]: e for e in inputs.engine if e.get("label") == "after"}
    before = {e["tokens"]: e for e in inputs.engine if e.get("label", "").startswith("before")}
    layers = len(runs[-1]["chosen"])
    body = []
    for r in runs:
        e = engine.get(r["tokens"])
        body.append([tokens(r["tokens"]) + (" (reference)" if r["run_dir"] == data["reference"] else ""),
                     " / ".join(f"{r[k]['spearman']:.3f}" for k in ("all", "FFN no-op", "attention no-op")),
                     f"{r['all']['median_relative_deviation']:.1%}", f"{r['all']['max_relative_deviation']:.0%}",
                     f"{len(r['layers_differing_from_reference'])} of {layers}", f"{r['reference_objective']:.3f}",
                     f"{r['child']['kl_to_parent']:.3f}", f"{r['child']['test_lm_loss']:.3f}",
                     f"{e['projected_library']['cpu_s'] / 60:.1f} ({e['sampled']['fraction_of_floor']:.2f})"
                     if e else "not measured"])
    reference = runs[-1]
    best = min(runs, key=lambda r: r["child"]["kl_to_parent"])
    worse = best["reference_objective"] / reference["reference_objective"]
    demo = inputs.demo.scoring.tokens
    chosen = next((r for r in runs if r["tokens"] == demo), None)
    engine_text = "; ".join(
        f"at {tokens(t)} tokens {before[t]['sampled']['fraction_of_floor']:.2f} -> "
        f"{engine[t]['sampled']['fraction_of_floor']:.2f} of the compute floor, "
        f"{before[t]['projected_library']['cpu_s'] / 60:.1f} -> {engine[t]['projected_library']['cpu_s'] / 60:.1f} "
        f"CPU-minutes for the demo's {engine[t]['projected_library']['blocks']} blocks "
        f"(load {loads(engine[t]['machine'])})" for t in sorted(engine) if t in before)
    text = (
        f"How many validation tokens replace-1-block scoring needs: every block's KL score at fewer tokens "
        f"against the {tokens(reference['tokens'])}-token reference (Spearman rank correlation over all replaced "
        f"blocks / FFN no-ops / attention no-ops, median and largest relative deviation), the MIP's choice at "
        f"{data['speedup']}x from each score table (layers that differ from the reference's choice, and the sum of "
        f"the reference's scores over the chosen blocks, the objective it minimises), and, as the independent "
        f"check, each chosen child's measured KL to the parent and test LM loss on {tokens(data['kl_tokens'])} "
        f"test tokens, assembled from the library without GKD. The scores rank the blocks almost alike "
        f"(Spearman {runs[0]['all']['spearman']:.3f} at {tokens(runs[0]['tokens'])}), but there single scores deviate by "
        f"up to {runs[0]['all']['max_relative_deviation']:.0%} and the choice changes in "
        f"{len(runs[0]['layers_differing_from_reference'])} layers. "
        + ("More tokens did not buy a better child: the " if best is not reference else "The ")
        + f"lowest measured KL is the {tokens(best['tokens'])}-token child's ({best['child']['kl_to_parent']:.3f}, "
        f"reference {reference['child']['kl_to_parent']:.3f}), although the reference's own scores rate its choice "
        f"{abs(worse - 1):.0%} {'worse' if worse > 1 else 'better'} than their own "
        f"({best['reference_objective']:.3f} vs {reference['reference_objective']:.3f}): the sum of single-block scores is "
        f"an imperfect proxy for the child's KL, and one child per setting cannot say how much of this is noise. "
        + (f"The demo scores on {tokens(demo)} tokens (`scoring.tokens`). " if chosen else
           f"The demo scores on {tokens(demo)} tokens (`scoring.tokens`), not among these runs. ")
        + f"Last column: the engine's projected CPU-minutes for the demo library (fraction of its compute floor "
        f"on the sampled blocks), 1 thread; the engine before -> after its rewrite (`scoring.py`): {engine_text}. "
        f"The token comparison itself records no machine load."
    )
    headers = ["tokens", "Spearman (all / FFN no-op / attn no-op)", "median dev", "max dev", "MIP choice differs",
               "reference score of choice", "child KL", "child LM loss", "scoring CPU-min (of floor)"]
    return section("Scoring tokens vs reference", text, table(headers, body))


def gkd_budget_table(found: Mapping, demo: GKDSection) -> str:
    """One child's runs: a paragraph on the child and its longest GKD curve, then the table."""
    rows, child = found["rows"], found["child"]
    first, longest = rows[0], rows[-1]
    body = [["as assembled", "–", "–", f"{first['validation'][0]['kl']:.3f}", f"{first['kl_to_parent_before_gkd']:.3f}",
             report.percent_interval(first["accuracy_preserved_before_gkd"]),
             report.percent_interval(first["accuracy_preserved_chance_adjusted_before_gkd"]), "–"]]
    for row in rows:
        versus = row["vs_fewest_tokens"]
        is_demo = (row["tokens"], row["lr"]) == (demo.tokens, demo.lr)
        body.append([tokens(row["tokens"]) + (" (demo)" if is_demo else ""), lr(row["lr"]),
                     f"{row['train_seconds'] / 60:.1f} ({row['tokens_per_second']:.0f} tokens/s)",
                     f"{row['validation'][-1]['kl']:.3f}", f"{row['kl_to_parent_after_gkd']:.3f}",
                     report.percent_interval(row["accuracy_preserved"]),
                     report.percent_interval(row["accuracy_preserved_chance_adjusted"]),
                     "0" if row is first else
                     "–" if versus is None else report.percent_interval(versus["difference"], signed=True)])
    curve = longest["validation"]
    marks = [point for point in curve if point["tokens"] and point["tokens"] & (point["tokens"] - 1) == 0]
    measured = sorted({round(row["measured_speedup"], 2) for row in rows})
    text = (
        f"**The {child['params'] / 1e6:.1f}M child** ({first['predicted_speedup']:.2f}x predicted, "
        f"{' and '.join(f'{m:.2f}x' for m in measured)} measured by the runs' evaluations; tasks above chance: "
        f"{', '.join(found['tasks_above_chance'])}). Along the {tokens(longest['tokens'])}-token run at lr "
        f"{lr(longest['lr'])} the validation KL went {curve[0]['kl']:.3f} at the start, "
        + ", ".join(f"{point['kl']:.3f} at {tokens(point['tokens'])}" for point in marks)
        + (f" and {curve[-1]['kl']:.3f} at the end" if curve[-1] not in marks else "") + "."
    )
    headers = ["GKD tokens", "lr", "GKD minutes", "validation KL", "KL to parent", "accuracy preserved (95% CI)",
               "chance-adjusted (95% CI)", "vs the first row, points (95% CI)"]
    return text + "\n\n" + table(headers, body)


def gkd_tokens(inputs: Inputs) -> str | None:
    if not inputs.gkd_tokens:
        return None
    demo = inputs.demo.gkd
    text = (
        "Main children of `configs/demo.yaml` runs, each uptrained from the same assembled weights with other "
        "`gkd.tokens` and `gkd.lr` (the demo's other GKD settings, a cosine schedule over each run's own length); "
        "one table per child (`results/gkd_tokens*.json`). Validation KL is the GKD stage's own (its 2,048 "
        "validation tokens); KL to the parent is the evaluation's, on the test split; the last column pairs each "
        "child's suite answers with the first row's, over the tasks where the parent beats chance. The demo "
        f"uptrains {tokens(demo.tokens)} tokens at lr {lr(demo.lr)}."
    )
    tables = "\n\n".join(gkd_budget_table(found, demo) for found in inputs.gkd_tokens)
    return section("GKD tokens and learning rate", text, tables)


def gkd_data(inputs: Inputs) -> str | None:
    found = inputs.gkd_data
    if found is None:
        return None
    rows, child = found["rows"], found["child"]
    tasks = sorted(rows[0]["vs_reference"]["tasks"])
    demo = unstructure(inputs.demo.distillation_corpus)
    body = []
    for row in rows:
        versus = row["vs_reference"]
        body.append([f"`{row['label']}`" + (" (demo)" if row["corpus"] == demo else ""), tokens(row["tokens"]),
                     f"{row['train_seconds'] / 60:.1f}", f"{row['validation'][-1]['kl']:.3f}",
                     f"{row['kl_to_parent_after_gkd']:.3f}", report.percent_interval(row["accuracy_preserved"]),
                     report.percent_interval(row["accuracy_preserved_chance_adjusted"]),
                     "0" if row is rows[0] else report.percent_interval(versus["difference"], signed=True),
                     *("0" if row is rows[0] else f"{versus['tasks'][task]['value'] * 100:+.1f}" for task in tasks)])
    text = (
        f"The {child['params'] / 1e6:.1f}M main child of a `configs/demo.yaml` run, uptrained from the same "
        "assembled weights with the demo's GKD settings on other text (`gkd.corpus`; `results/gkd_data.json`). "
        "Validation KL is on each text's own validation split, so it does not compare across rows; KL to the "
        "parent is the evaluation's, on the demo corpus's test split for every row. The suite columns pair each "
        "child's answers with the first row's over the tasks where the parent beats chance (points); "
        "(demo) marks the text `configs/demo.yaml` distils on."
    )
    headers = ["GKD text", "tokens", "GKD minutes", "validation KL", "KL to parent (demo test)",
               "accuracy preserved (95% CI)", "chance-adjusted (95% CI)", "vs the first row (95% CI)", *tasks]
    return section("Distillation text", text, table(headers, body))


def section(title: str, reading: str, markdown: str) -> str:
    return f"### {title}\n\n{reading}\n\n{markdown}\n"


LEVERS = (bld_tokens, bld_lr, bld_init, bf16, stage_time, gkd_speed, gkd_quality, gkd_tokens, gkd_data, scoring_tokens)


def render(results: Path = RESULTS, demo: Path = DEMO) -> str:
    """The whole section between the markers, from the results files and the demo config."""
    inputs = read_inputs(results, demo)
    intro = (
        "<!-- Generated by benchmarks/levers.py from benchmarks/results/*.json and configs/demo.yaml: "
        "edit the script or rerun the benchmarks, not this text. -->\n\n"
        "What each lever buys on the SmolLM2-135M parent, and what `configs/demo.yaml` takes from it. "
        + caveat(inputs) + "\n"
    )
    items = (NOT_RUN + (() if inputs.gkd_quality else (GKD_QUALITY,)) + (() if inputs.gkd_tokens else (GKD_TOKENS,))
             + (() if inputs.gkd_data else (GKD_DATA,)))
    not_run = "### Not run yet\n\n" + "\n".join(f"- {item}: not run." for item in items) + "\n"
    return "\n".join([intro] + [text for lever in LEVERS if (text := lever(inputs))] + [not_run])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark results JSON")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--demo", type=Path, default=DEMO, help="the config whose settings the readings name")
    parser.add_argument("--check", action="store_true", help="only check that the README section is up to date")
    args = parser.parse_args(argv)
    return report.rewrite_section(args.readme, START, END, lambda: render(args.results, args.demo), "quality levers",
                                  "benchmarks/levers.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
