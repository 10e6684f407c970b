"""``puzzle model``: inspect a parent, check its family, and assemble + export a child from a list of blocks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from puzzle_core.commands import overrides_option
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
@click.option("--cost-model", default=None, help="Also predict runtime, memory and throughput with this cost model.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Take the scenario and cost model from this run config.")
@overrides_option
@click.option("--largest-batch", is_flag=True, help="Also the largest batch that fits the cost model's GPU, and its "
              "throughput.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def model_info(parent: str, variants: str | None, dtype: str, architecture: str | None, cost_model: str | None,
               config_path: str | None, overrides: tuple[str, ...], largest_batch: bool, as_json: bool) -> None:
    """Layers, parameters and the variants offered per layer of PARENT (alias, HF folder or .gguf).

    A folder with only a config.json (no weights) is read as an architecture: parameters
    are counted from the config, and with --cost-model (or --config) the model is priced
    in the scenario (--set scenario.batch_size=64 --set scenario.tensor_parallel=4 ...).
    """
    costing = _costing_choice(cost_model, config_path, overrides)
    family, shape, params, source = _shape_and_params(parent, dtype, architecture)
    provider = _provider(family, variants)
    spaces = [provider.variants(shape, i) for i in range(shape.num_layers)]
    layers = [
        {"block": shape.blocks[i].id, "attention": [a.id for a in space.attention], "ffn": [f.id for f in space.ffn]}
        for i, space in enumerate(spaces)
    ]
    costs = _predict(family, shape, costing, largest_batch) if costing else None
    if as_json:
        summary = {"source": source, "family": shape.family, "params": params,
                   **{k: getattr(shape, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "intermediate_size",
                                                    "vocab_size", "tie_word_embeddings")},
                   "layers": layers, **({"costs": costs} if costs else {})}
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{parent}: {shape.family} model from {source}")
    click.echo(
        f"  {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads / "
        f"{shape.num_key_value_heads} KV heads (head dim {shape.head_dim}), FFN {shape.intermediate_size}, "
        f"vocab {shape.vocab_size}, {'tied' if shape.tie_word_embeddings else 'separate'} embeddings"
    )
    click.echo(f"  {params:,} parameters ({params / 1e6:.1f}M), "
               + ("counted from the config" if source.endswith("(config only)") else dtype))
    click.echo(f"  variants ({provider.__class__.__name__}, init: {provider.init_method}):")
    for first, last, row in _layer_groups(layers):
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        click.echo(f"  {span} (now {row['block']}):")
        click.echo(f"    attention: {' '.join(row['attention'])}")
        click.echo(f"    ffn:       {' '.join(row['ffn'])}")
    combos = sum(len(s.attention) * len(s.ffn) for s in spaces)
    click.echo(f"  {combos} blocks in all ({combos // max(1, shape.num_layers)} per layer)")
    if costs:
        _print_costs(costs)


def _shape_and_params(parent: str, dtype: str, architecture: str | None):
    """``(family, shape, parameters, source)``: from the weights, or from the config alone when the folder has no
    weight files at all."""
    from puzzle_core.config import structure
    from puzzle_core.parents import PICKLE_SUFFIXES, read_config, resolve_parent
    from puzzle_core.registry import get_registries
    from puzzle_core.schema import ParentSection

    section = structure({"source": parent, "dtype": dtype, "architecture": architecture}, ParentSection)
    family, path = resolve_parent(section, get_registries())
    weights = (*PICKLE_SUFFIXES, ".safetensors", ".gguf")  # pickles present: refused as ever, never read
    if path.is_dir() and not any(p.suffix.lower() in weights for p in path.iterdir()):
        from puzzle_core.roofline import model_params

        shape = family.shape(read_config(path))
        return family, shape, model_params(shape), f"{path} (config only)"
    family, loaded = _load(parent, dtype, architecture)
    return family, loaded.shape, parameter_count(loaded.model), loaded.source


def _costing_choice(cost_model: str | None, config_path: str | None, overrides: tuple[str, ...]):
    """``(cost model choice, scenario)`` from --config, --cost-model and --set; ``None`` when no cost model is named."""
    from puzzle_core.choices import CostModelChoice
    from puzzle_core.config import apply_overrides, structure, unstructure
    from puzzle_core.schema import Scenario, load_config

    if config_path is not None:
        config = load_config(config_path)
        data = {"scenario": unstructure(config.scenario), "costs": {"model": unstructure(config.costs.model)}}
    else:
        data = {"scenario": unstructure(Scenario()), "costs": {"model": None}}
    if cost_model is not None:
        data["costs"]["model"] = cost_model
    source = "--set"
    data = apply_overrides(data, overrides, source)
    if data["costs"]["model"] is None:
        if overrides:
            raise UserError("--set prices the model in a scenario, which needs a cost model: add --cost-model NAME "
                            "(see `puzzle plugins`) or --config RUN_CONFIG.")
        return None
    return structure(data["costs"]["model"], CostModelChoice, source, "$.costs.model"), \
        structure(data["scenario"], Scenario, source, "$.scenario")


def _predict(family, shape, costing, largest_batch: bool) -> dict:
    """Per-layer and total costs of the model in the scenario (JSON-ready)."""
    from puzzle_core.config import unstructure
    from puzzle_core.costing import largest_batch as fit_batch
    from puzzle_core.costing import model_costs
    from puzzle_core.registry import get_registries

    choice, scenario = costing
    model = get_registries().record(choice).create(choice.options)
    problems = model.check_scenario(scenario)
    if problems:
        raise UserError(f"Cost model '{choice.name}' cannot price this scenario: {'; '.join(problems)}")
    costs = model_costs(model, shape, scenario, family)
    result = {
        "cost_model": choice.name,
        "scenario": unstructure(scenario),
        "fixed": costs.fixed,
        "layers": [{"block": block_id, **costs.blocks[block_id]} for block_id in costs.layers],
        "total": costs.summary(),
    }
    if largest_batch:
        best = fit_batch(model, shape, scenario, family)
        result["largest_batch"] = {"batch_size": best.scenario.batch_size if best else 0,
                                   **(best.summary() if best else {})}
    return result


def _print_costs(costs: dict) -> None:
    s, total = costs["scenario"], costs["total"]
    num_gpus = s["gpus"] or s["tensor_parallel"]
    gpus = f", TP {s['tensor_parallel']} on {num_gpus} GPU(s)" if num_gpus > 1 else ""
    click.echo(f"  cost model {costs['cost_model']}: batch {s['batch_size']}, {s['prefill_len']} in / "
               f"{s['decode_len']} out, {s['dtype']} (KV {s['kv_dtype']}){gpus}")
    rows = [{k: row[k] for k in ("block", "runtime_ms", "memory_mib")} for row in costs["layers"]]
    for first, last, row in _layer_groups(rows):
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        click.echo(f"    {span:14s} {row['block']:24s} {row['runtime_ms']:10.3f} ms {row['memory_mib']:10.1f} MiB each")
    click.echo(f"    {'fixed':14s} {'embedding, norm, head':24s} {costs['fixed']['runtime_ms']:10.3f} ms "
               f"{costs['fixed']['memory_mib']:10.1f} MiB")
    fits = "" if total["fits"] is None else (" (fits)" if total["fits"] else f" (does NOT fit {total['capacity_mib']:.0f} MiB)")
    click.echo(f"  predicted: {total['runtime_ms'] / 1e3:.3f} s per batch (prefill {total['prefill_ms']:.1f} ms, "
               f"decode {total['decode_ms']:.1f} ms), {total['tokens_per_s']:,.0f} tokens/s "
               f"({total['tokens_per_s_per_gpu']:,.0f} per GPU)")
    click.echo(f"  memory per GPU: {total['memory_mib'] / 1024:.2f} GiB = weights {total['weights_mib'] / 1024:.2f} + "
               f"KV cache {total['kv_cache_mib'] / 1024:.2f}{fits}")
    best = costs.get("largest_batch")
    if best is not None:
        if best["batch_size"]:
            click.echo(f"  largest batch that fits: {best['batch_size']} -> {best['tokens_per_s']:,.0f} tokens/s "
                       f"({best['tokens_per_s_per_gpu']:,.0f} per GPU), {best['memory_mib'] / 1024:.2f} GiB per GPU")
        else:
            click.echo("  largest batch that fits: none (not even batch 1)")


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
