"""``puzzle data``: prepare corpora that need it, inspect a corpus."""

from __future__ import annotations

import click

from puzzle_core.schema import DataSection


def _sizes_table(name: str, sizes: dict) -> str:
    lines = [f"Corpus: {name}"]
    for split, row in sizes.items():
        tokens = f" {row['tokens']:>11,} tokens" if "tokens" in row else ""
        lines.append(f"  {split:<10} {row['documents']:>6} chunks {row['characters']:>11,} characters{tokens}")
    return "\n".join(lines)


def _document_sizes(splits) -> dict:
    return {s: {"documents": len(d), "characters": sum(len(x.text) for x in d)} for s, d in splits.items()}


@click.group("data")
def data_group() -> None:
    """Prepare and inspect corpora."""


@data_group.command("prepare")
@click.argument("corpora", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even when the prepared files exist.")
def prepare_command(corpora: tuple[str, ...], force: bool) -> None:
    """Fetch or build what CORPORA need before a run (default: the demo corpus).

    The demo corpus comes from the Debian packages r-cran-janeaustenr, sword-text-web and
    fortunes, fetched with apt-get (no install needed) into the user cache.
    """
    from puzzle_core.corpus import open_corpus, read_splits

    for name in corpora or [DataSection().corpus.name]:
        open_corpus(name).prepare(force=force, echo=lambda m: click.echo(m, err=True))
        documents = read_splits(name)
        click.echo(_sizes_table(documents.name, _document_sizes(documents.splits)))


@data_group.command("info")
@click.argument("corpus", default="demo")
@click.option("--parent", default=None, help="Count tokens with this parent's tokenizer (alias, HF folder, .gguf).")
@click.option("--seed", default=0, show_default=True, help="Seed of a generated corpus.")
def info_command(corpus: str, parent: str | None, seed: int) -> None:
    """Show the splits of CORPUS (a corpus name, or a file/folder): chunks, characters, tokens."""
    from puzzle_core.corpus import read_splits
    from puzzle_core.data import tokenize_splits

    documents = read_splits(corpus, seed=seed)
    if parent is None:
        sizes = _document_sizes(documents.splits)
    else:
        from puzzle_core.parents import load_parent
        from puzzle_core.registry import get_registries
        from puzzle_core.schema import ParentSection

        _, loaded = load_parent(ParentSection(source=parent), get_registries())
        sizes = tokenize_splits(documents.name, documents.splits, loaded.tokenizer, documents.fingerprint).summary()
    click.echo(_sizes_table(documents.name, sizes))


commands = [data_group]
