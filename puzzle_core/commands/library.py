"""``puzzle library show RUN_DIR``: what the block library of a run holds, layer by layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from puzzle_core.layout import LibraryIndex


def _loss(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:.4f} -> {after:.4f}"


def library_rows(index: LibraryIndex) -> list[list[str]]:
    """One row per offered sub-block (decoupled) or block (coupled) of every layer."""
    rows = []
    coupled = index.mode == "coupled"
    for layer, entry in enumerate(index.layers):
        names = entry.blocks if coupled else [*entry.attention, *entry.ffn]
        parent_block = entry.blocks[0]
        parents = {parent_block} if coupled else set(parent_block.split("+"))
        for name in names:
            record = entry.trained.get(name)
            if record is None:
                parts = name.split("+")
                kind = "parent" if name in parents else "no-op" if all("noop" in p for p in parts) else "parent/no-op"
                rows.append([str(layer), name, kind, "", "", "", ""])
                continue
            rows.append(
                [
                    str(layer),
                    name,
                    "trained",
                    _loss(record.train_loss_initial, record.train_loss_final),
                    _loss(record.heldout_loss_before, record.heldout_loss_after),
                    str(record.tokens),
                    f"{record.wall_s:.1f}",
                ]
            )
    return rows


@click.group("library")
def library_group() -> None:
    """Inspect the block library of a run."""


@library_group.command("show")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def library_show(run_dir: str) -> None:
    """Per layer: every variant, its train and held-out loss before -> after BLD, tokens and wall time."""
    from puzzle_core.bld import read_index

    index = read_index(run_dir)
    header = ["layer", "variant", "status", "train loss", "held-out loss", "tokens", "wall s"]
    rows = library_rows(index)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join
    click.echo(line(h.ljust(w) for h, w in zip(header, widths)))
    click.echo(line("-" * w for w in widths))
    for row in rows:
        click.echo(line(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    records = [r for entry in index.layers for r in entry.trained.values()]
    worse = sum(1 for r in records if (r.heldout_loss_after or 0) > (r.heldout_loss_before or 0))
    click.echo(
        f"\n{index.mode} library of {len(index.layers)} layers: {len(records)} trained "
        f"{'blocks' if index.mode == 'coupled' else 'sub-blocks'}, {sum(r.tokens for r in records)} tokens, "
        f"{sum(r.wall_s for r in records):.1f} s of training"
        + (f"; {worse} ended with a higher held-out loss than their initialisation" if worse else "")
    )


commands = [library_group]
