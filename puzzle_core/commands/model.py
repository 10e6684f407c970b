"""``puzzle model``: inspect a parent, check its family, and assemble + export a child from a list of blocks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from puzzle_core.errors import UserError
from puzzle_core.interfaces import parameter_count


@click.group("model")
def model_group() -> None:
    """Inspect parents and build children by hand."""


def _load(parent: str, dtype: str, architecture: str | None):
    from puzzle_core.config import structure
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries
    from puzzle_core.schema import ParentSection

    section = structure({"source": parent, "dtype": dtype, "architecture": architecture}, ParentSection)
    return load_parent(section, get_registries())


def _provider(family, variants: str | None):
    from puzzle_core.registry import get_registries

    return get_registries().block_variants.get(variants or family.default_variants).create()


def _layer_groups(rows: list) -> list[tuple[int, int, object]]:
    """Consecutive equal rows folded into ``(first, last, row)``."""
    groups: list[tuple[int, int, object]] = []
    for index, row in enumerate(rows):
        if groups and groups[-1][2] == row:
            groups[-1] = (groups[-1][0], index, row)
        else:
            groups.append((index, index, row))
    return groups


@model_group.command("info")
@click.argument("parent")
@click.option("--variants", default=None, help="Block-variant provider (default: the architecture's own).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "float32", "bfloat16"]), default="fp32", show_default=True)
@click.option("--architecture", default=None, help="Architecture plugin to use instead of detecting it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def model_info(parent: str, variants: str | None, dtype: str, architecture: str | None, as_json: bool) -> None:
    """Layers, parameters and the variants offered per layer of PARENT (alias, HF folder or .gguf)."""
    family, loaded = _load(parent, dtype, architecture)
    shape = loaded.shape
    provider = _provider(family, variants)
    spaces = [provider.variants(shape, i) for i in range(shape.num_layers)]
    params = parameter_count(loaded.model)
    layers = [
        {"block": shape.blocks[i].id, "attention": [a.id for a in space.attention], "ffn": [f.id for f in space.ffn]}
        for i, space in enumerate(spaces)
    ]
    if as_json:
        summary = {"source": loaded.source, "family": shape.family, "params": params,
                   **{k: getattr(shape, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "intermediate_size",
                                                    "vocab_size", "tie_word_embeddings")},
                   "layers": layers}
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{parent}: {shape.family} model from {loaded.source}")
    click.echo(
        f"  {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads / "
        f"{shape.num_key_value_heads} KV heads (head dim {shape.head_dim}), FFN {shape.intermediate_size}, "
        f"vocab {shape.vocab_size}, {'tied' if shape.tie_word_embeddings else 'separate'} embeddings"
    )
    click.echo(f"  {params:,} parameters ({params / 1e6:.1f}M), {dtype}")
    click.echo(f"  variants ({provider.__class__.__name__}, init: {provider.init_method}):")
    for first, last, row in _layer_groups(layers):
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        click.echo(f"  {span} (now {row['block']}):")
        click.echo(f"    attention: {' '.join(row['attention'])}")
        click.echo(f"    ffn:       {' '.join(row['ffn'])}")
    combos = sum(len(s.attention) * len(s.ffn) for s in spaces)
    click.echo(f"  {combos} blocks in all ({combos // max(1, shape.num_layers)} per layer)")


@model_group.command("check")
@click.argument("parent")
@click.option("--architecture", default=None, help="Architecture plugin to check instead of the detected one.")
@click.option("--keep", "keep", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to keep the exported children in (default: a temporary folder).")
@click.option("--no-isolated", "no_isolated", is_flag=True, help="Skip the reload in a Python without puzzle.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def model_check(parent: str, architecture: str | None, keep: Path | None, no_isolated: bool, as_json: bool) -> None:
    """Check that PARENT's architecture builds faithful children: the all-parent child equals the parent, one child
    per variant kind runs, generates, has exact parameter counts, exports and reloads (also without puzzle).

    Prints a pass/fail table with the reason for each failure; exit code 1 when a check fails.
    """
    from puzzle_core.conformance import check_family
    from puzzle_core.guarded import describe

    family, loaded = _load(parent, "fp32", architecture)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    if not as_json:
        click.echo(f"Checking {describe(family.entry)} on {loaded.source} ({loaded.shape.num_layers} layers)...",
                   err=True)
    report = check_family(family, loaded, keep, isolated=not no_isolated, family_name=family.entry.name)
    if as_json:
        click.echo(json.dumps({**report.to_json(), "distribution": family.entry.distribution}, indent=2))
    else:
        click.echo(report.table())
    if not report.passed:
        raise SystemExit(1)


def read_block_ids(path: Path, num_layers: int) -> list[str]:
    """Block ids per layer from a solution JSON (``chosen``), a ``layer_N`` mapping or a list."""
    from puzzle_core.library import layer_key

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"Blocks file {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"Blocks file {path} is not valid JSON ({exc}).") from None
    if isinstance(data, dict) and "chosen" in data:
        data = data["chosen"]
    if isinstance(data, dict):
        missing = [layer_key(i) for i in range(num_layers) if layer_key(i) not in data]
        if missing or len(data) != num_layers:
            raise UserError(
                f"Blocks file {path} must name one block for each of the parent's {num_layers} layers "
                f"(layer_0 ... layer_{num_layers - 1}); missing: {missing or 'none'}, given: {len(data)}."
            )
        data = [data[layer_key(i)] for i in range(num_layers)]
    if not isinstance(data, list) or len(data) != num_layers or not all(isinstance(b, str) for b in data):
        raise UserError(
            f"Blocks file {path} must hold {num_layers} block ids: a solution JSON with \"chosen\", a mapping "
            f"{{\"layer_0\": \"attn_g3+ffn_768\", ...}} or a list of ids."
        )
    return data


@model_group.command("assemble")
@click.argument("parent")
@click.option("--blocks", "blocks_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Solution JSON ('chosen': {layer_N: block id}), a layer_N mapping, or a list of block ids.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exported child (replaced if it exists).")
@click.option("--library", "library", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="A run's library/ folder: trained sub-block weights (else initialised from the parent).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "float32", "bfloat16"]), default="fp32", show_default=True)
@click.option("--architecture", default=None, help="Architecture plugin to use instead of detecting it.")
def model_assemble(parent: str, blocks_file: Path, out_dir: Path, library: Path | None, dtype: str,
                   architecture: str | None) -> None:
    """Build the child of PARENT with the blocks in --blocks and export it to --out (DeciLM layout)."""
    from puzzle_core.blocks import BlockSpec

    family, loaded = _load(parent, dtype, architecture)
    block_ids = read_block_ids(blocks_file, loaded.shape.num_layers)
    blocks = [BlockSpec.parse(b) for b in block_ids]
    sublayers = _library_sublayers(library, blocks) if library is not None else None
    child = family.build_child(loaded, blocks, sublayers)
    family.export(child, out_dir)
    before = parameter_count(loaded.model)
    after = parameter_count(child.model)
    source = f"library {library}" if library else "initialised from the parent"
    click.echo(f"Wrote {out_dir}: {after:,} parameters ({after / before:.1%} of the parent), sub-blocks {source}.")


def _library_sublayers(library: Path, blocks):
    """Trained sub-block weights of a run's block library."""
    from puzzle_core.rundir import RunDir

    if not library.is_dir():
        raise UserError(f"Library folder {library} does not exist; pass RUN_DIR/library of a run whose library stage finished.")
    try:
        from puzzle_core.bld import load_sublayers
    except ImportError:
        raise UserError("This installation cannot read trained block libraries yet; leave out --library.") from None
    return load_sublayers(RunDir(library.parent), blocks)


commands = [model_group]
