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

import json
from pathlib import Path

from puzzle_core.blocks import BlockSpec
from puzzle_core.config import stable_hash
from puzzle_core.library import BlockLibrary, layer_key
from puzzle_core.rundir import RunDir, sha256_file

INDEX = ("library", "index.json")
SCORES = ("scores", "scores.json")
COSTS = ("costs", "costs.json")
VIEW = ("library", "library.json")
VIEW_RECORD = "library_view"  # the view's manifest entry


def _read(run_dir: RunDir, parts: tuple[str, str]) -> dict | None:
    path = run_dir.path(*parts)
    return json.loads(path.read_text()) if path.is_file() else None


def layer_blocks(index: dict) -> list[list[str]]:
    """Block ids per layer from a library index."""
    return [list(layer["blocks"]) for layer in index["layers"]]


def build_library_view(run_dir: RunDir) -> BlockLibrary:
    """The merged library of a run directory (stats and metrics filled where known)."""
    index = _read(run_dir, INDEX)
    if index is None:
        raise FileNotFoundError(run_dir.path(*INDEX))
    scores = (_read(run_dir, SCORES) or {})
    costs = (_read(run_dir, COSTS) or {}).get("layers", {})
    layers = []
    for i, blocks in enumerate(layer_blocks(index)):
        variants = {}
        for block_id in blocks:
            spec = BlockSpec.parse(block_id)
            variants[block_id] = {
                "stats": dict(costs.get(layer_key(i), {}).get(block_id, {})),
                "metrics": dict(scores.get(layer_key(i), {}).get(block_id, {})),
                "attention": spec.attention.id,
                "ffn": spec.ffn.id,
            }
        layers.append(variants)
    return BlockLibrary(layers)


def write_library_view(run_dir: RunDir, driver: bool = True) -> Path:
    """Rewrite ``library/library.json`` from the stage files and (the ``driver`` only) record it in the manifest."""
    path = run_dir.path(*VIEW)
    build_library_view(run_dir).write(path)
    if driver:  # the manifest is the driver's
        sources = {"/".join(parts): run_dir.path(*parts) for parts in (INDEX, SCORES, COSTS)}
        run_dir.mark_done(VIEW_RECORD, stable_hash({k: sha256_file(p) for k, p in sources.items() if p.is_file()}), [path])
    return path
