"""``puzzle run``: the whole pipeline, or chosen stages of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from puzzle_core.commands import overrides_option
from puzzle_core.errors import UserError
from puzzle_core.pipeline import STAGE_NAMES


@click.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Default: runs/<config name>.")
@click.option("--resume", is_flag=True, help="Continue a run directory; finished stages are skipped.")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice(STAGE_NAMES),
    help="Run only these stages (repeatable); earlier stages must have run.",
)
@click.option(
    "--reuse",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="Another run directory (repeatable): its stages finished with the same settings are linked in, not rerun.",
)
@overrides_option
def run_command(config_path: str, run_dir: str | None, resume: bool, stages: tuple[str, ...], reuse: tuple[str, ...],
                overrides: tuple[str, ...]) -> None:
    """Run the Puzzle pipeline described by CONFIG (with --set overrides)."""
    import yaml

    from puzzle_core.config import unstructure
    from puzzle_core.pipeline import run_pipeline
    from puzzle_core.schema import load_config

    config = load_config(config_path, overrides)
    config_text = Path(config_path).read_text(encoding="utf-8")
    if overrides or "base" in (yaml.safe_load(config_text) or {}):
        # the run directory keeps the config it ran with, whole: a base named relative to CONFIG would not resolve
        # from there, and tools that read the run directory (puzzle search RUN_DIR, the benchmarks) load that copy
        settings = "".join(f" --set {o}" for o in overrides)
        config_text = f"# {config_path}{settings}, resolved\n" + yaml.safe_dump(unstructure(config), sort_keys=False)
    run_dir = run_dir or str(Path("runs") / Path(config_path).stem)
    fresh = not Path(run_dir).exists()
    try:
        run_pipeline(
            config,
            run_dir,
            stages=list(stages) or None,
            resume=resume,
            config_text=config_text,
            echo=click.echo,
            reuse=reuse,
        )
    except UserError:
        if fresh:
            _remove_if_untouched(Path(run_dir))
        raise
    click.echo(f"Run directory: {run_dir}")


def _remove_if_untouched(run_dir: Path) -> None:
    """Delete a run directory this command made when the failed run left nothing in it but its config copy."""
    from puzzle_core.layout import CONFIG

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {CONFIG}:
        shutil.rmtree(run_dir)


commands = [run_command]
