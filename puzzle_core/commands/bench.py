"""``puzzle bench``: run an ablation of the benchmark suite (``benchmarks/`` of a source checkout)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from puzzle_core.errors import UserError

CHECKOUT = Path(__file__).resolve().parents[2]


def _runner():
    """``benchmarks.runner``: the suite lives next to the package in a checkout, not inside it."""
    if not (CHECKOUT / "benchmarks" / "runner.py").is_file():
        raise UserError(
            "puzzle bench runs the ablations in the benchmarks/ folder of a source checkout, which this installation "
            "lacks. Clone the repository and install it with `pip install -e .`."
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    from benchmarks import runner

    return runner


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
@click.option("--list", "list_only", is_flag=True, help="List the ablations and their arms.")
def bench_command(ablation: str | None, budget: str, base: str | None, results_dir: str | None,
                  reuse: tuple[str, ...], arms: tuple[str, ...], list_only: bool) -> None:
    """Run ABLATION (a name, 'all', or an ablation YAML file): every arm, sharing finished stages.

    Writes RESULTS_DIR/ABLATION.json (ABLATION.small.json for the small budget), a markdown
    table and a PNG plot; rerunning reuses every finished arm.
    """
    runner = _runner()
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
            echo=lambda message: click.echo(message, err=True),
        )
        click.echo(path.with_suffix(".md").read_text())
        click.echo(f"Results: {path} (+ .md, .png)")


commands = [bench_command]
