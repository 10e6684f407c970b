"""The merged block-library JSON of a run (``library/library.json``).

Three stages contribute to it and each keeps its own file, so that one stage's
rewrite never breaks another's checksums:

- ``library/index.json``  (library stage): per layer, the block ids it offers;
- ``scores/scores.json``  (score stage):   ``{"layer_i": {block_id: {metric: value}}}``;
- ``costs/costs.json``    (cost stage):    ``{"scenario": ..., "fixed": {stat: value},
  "layers": {"layer_i": {block_id: {stat: value}}}}``.

:func:`write_library_view` joins whatever exists into the DESIGN.md format. The view has
its own manifest entry (``library_view``), keyed by the checksums of the files it was made
from, so it is checksummed like every artifact without being any one stage's output.
"""

from __future__ import annotations

from pathlib import Path

from puzzle_core import layout
from puzzle_core.blocks import BlockSpec
from puzzle_core.config import stable_hash
from puzzle_core.library import BlockLibrary, layer_key
from puzzle_core.rundir import RunDir, sha256_file

VIEW_RECORD = "library_view"  # the view's manifest entry


def build_library_view(run_dir: RunDir) -> BlockLibrary:
    """The merged library of a run directory (stats and metrics filled where known)."""
    index = layout.read_library_index(run_dir, required=True)
    scores = layout.read_scores(run_dir)
    costs = layout.read_costs(run_dir)
    score_layers = scores.layers if scores is not None else {}
    cost_layers = costs.layers if costs is not None else {}
    layers = []
    for i, blocks in enumerate(index.layer_blocks()):
        variants = {}
        for block_id in blocks:
            spec = BlockSpec.parse(block_id)
            variants[block_id] = {
                "stats": dict(cost_layers.get(layer_key(i), {}).get(block_id, {})),
                "metrics": dict(score_layers.get(layer_key(i), {}).get(block_id, {})),
                "attention": spec.attention.id,
                "ffn": spec.ffn.id,
            }
        layers.append(variants)
    return BlockLibrary(layers)


def write_library_view(run_dir: RunDir, driver: bool = True) -> Path:
    """Rewrite ``library/library.json`` from the stage files and (the ``driver`` only) record it in the manifest."""
    path = run_dir.path(layout.LIBRARY_VIEW)
    build_library_view(run_dir).write(path)
    if driver:  # the manifest is the driver's
        sources = {name: run_dir.path(name) for name in (layout.LIBRARY_INDEX, layout.SCORES, layout.COSTS)}
        run_dir.mark_done(VIEW_RECORD, stable_hash({k: sha256_file(p) for k, p in sources.items() if p.is_file()}), [path])
    return path
