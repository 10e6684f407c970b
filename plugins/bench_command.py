"""The ``bench`` command: the paper's ablations, from the ``benchmarks/`` folder of a source checkout.

The suite lives next to the packages in the repository, not inside the installed
distribution, so the command runs the checkout this installation comes from (an
editable install, ``pip install -e .``) and says so when there is none.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click

from puzzle_core.api import Command, CommandPlugin, UserError, hookimpl

SUITE = Path(__file__).resolve().parents[1] / "benchmarks"  # this plugin's checkout, when it is one
MARKERS = ("__init__.py", "runner.py", "budgets.yaml")


def benchmarks_runner(suite: Path = SUITE) -> ModuleType:
    """``benchmarks.runner`` of the checkout, imported as the package ``benchmarks`` from ``suite``."""
    if not all((suite / marker).is_file() for marker in MARKERS):
        raise UserError(
            f"puzzle bench runs the ablations in the benchmarks/ folder of a source checkout, and this installation "
            f"has none ({suite} is missing). Clone the repository and install it with `pip install -e .`."
        )
    loaded = sys.modules.get("benchmarks")
    if loaded is None:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", suite / "__init__.py", submodule_search_locations=[str(suite)]
        )
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = loaded
        spec.loader.exec_module(loaded)
    elif Path(loaded.__file__).resolve().parent != suite.resolve():
        raise UserError(f"Another package called 'benchmarks' ({loaded.__file__}) is already imported; run puzzle bench alone.")
    return importlib.import_module("benchmarks.runner")


@click.command("bench")
@click.argument("ablation", required=False)
@click.option("--budget", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: the tiny config (minutes, CI); full: the SmolLM2 demo config.")
@click.option("--base", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Base config instead of the budget's (configs/tiny.yaml or configs/demo.yaml).")
@click.option("--results-dir", type=click.Path(file_okay=False), default=None,
              help="Where results and run directories go. Default: benchmarks/results/ablations.")
@click.option("--reuse", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="A run directory of the base config (repeatable): its finished stages are reused.")
@click.option("--arm", "arms", multiple=True, help="Run only this arm (repeatable); the others keep earlier results.")
@click.option("--allow-dirty", is_flag=True,
              help="Run from a checkout with uncommitted changes (the results and tables say so).")
@click.option("--list", "list_only", is_flag=True, help="List the ablations and their arms.")
def bench_command(ablation: str | None, budget: str, base: str | None, results_dir: str | None,
                  reuse: tuple[str, ...], arms: tuple[str, ...], allow_dirty: bool, list_only: bool) -> None:
    """Run ABLATION (a name, 'all', or an ablation YAML file): every arm, sharing finished stages.

    Writes RESULTS_DIR/ABLATION.json (ABLATION.small.json for the small budget), a markdown
    table and a PNG plot; rerunning reuses every finished arm. Results record the commit, so
    a checkout with uncommitted changes is refused unless --allow-dirty.
    """
    runner = benchmarks_runner()
    if list_only or ablation is None:
        for name in runner.available():
            definition = runner.load_ablation(name)
            arms_text = ", ".join(arm.name for arm in definition.arms)
            click.echo(f"{name:14s} {definition.title}\n{'':14s} arms: {arms_text}")
        if ablation is None and not list_only:
            raise UserError("Name an ablation to run (listed above), 'all', or an ablation YAML file.")
        return
    names = runner.available() if ablation == "all" else [ablation]
    if arms and len(names) > 1:
        raise UserError("--arm picks arms of one ablation; name the ablation instead of 'all'.")
    for name in names:
        path = runner.run_ablation(
            name,
            budget=budget,
            base=base,
            results_dir=results_dir or runner.DEFAULT_RESULTS,
            arms=list(arms) or None,
            reuse=reuse,
            allow_dirty=allow_dirty,
            echo=lambda message: click.echo(message, err=True),
        )
        click.echo(path.with_suffix(".md").read_text())
        click.echo(f"Results: {path} (+ .md, .png)")


class Bench(Command):
    def click_command(self) -> click.Command:
        return bench_command


@hookimpl
def puzzle_commands() -> list[CommandPlugin]:
    return [CommandPlugin(name="bench", implementation=Bench, description="the paper's ablations (source checkouts)")]
