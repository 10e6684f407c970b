"""Stage ``score``: replace-1-block scores of every (layer, block) in the library.

One executor job per layer writes ``scores/shards/layer_<i>.json``; a shard whose key
(library, data and scoring settings, the layer's block list) still matches is kept, so a
resumed or widened run scores only what is missing. The shards are merged into
``scores/scores.json`` (``{"layer_i": {block_id: {scorer: value}}, "_meta": {...}}``)
and the run's library view is rewritten with the scores as ``metrics.<scorer>``.

With ``scoring.sharding: layers`` under torchrun the processes instead split the parent's
layers (:class:`~puzzle_core.scoring_pipeline.PipelineScoringEngine`): each loads only
its own layers (the first also the embeddings, the last the head), every block is scored
by all of them together, and the last writes the shards.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from puzzle_core import layout
from puzzle_core.blocks import BlockSpec, SubBlockSpec
from puzzle_core.config import stable_hash, unstructure
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Job, Part
from puzzle_core.library import layer_key
from puzzle_core.layout import Scores, ScoreShard, read_library_index, read_score_shard, score_shard, write_score_shard
from puzzle_core.library_view import write_library_view
from puzzle_core.scoring import ScoringSession


class LayerScoring:
    """The work of one job: score every block of a layer. Built lazily in whichever process runs it."""

    def __init__(self, ctx, layers: list[list[str]], scorers: dict[str, Any], keys: dict[int, str], parent=None):
        self.ctx = ctx
        self._parent = parent  # None: the run's whole parent, loaded on first use
        self.layers = layers
        self.scorers = scorers
        self.keys = keys
        self.parent_blocks = [BlockSpec.parse(blocks[0]) for blocks in layers]  # the index lists the parent first

    @cached_property
    def parent(self):
        return self._parent if self._parent is not None else self.ctx.parent

    @cached_property
    def runner(self):
        return self.ctx.family.layer_runner(self.parent.model)

    @cached_property
    def session(self) -> ScoringSession:
        ctx = self.ctx
        return ScoringSession(
            self.runner,
            vocab_size=ctx.parent.shape.vocab_size,
            scorers=self.scorers,
            data={name: scorer.data(ctx) for name, scorer in self.scorers.items()},
            max_cache_mib=ctx.config.scoring.max_cache_mib,
            device=next(ctx.parent.model.parameters()).device,
        )

    def sublayer(self, layer: int, part: Part, spec: SubBlockSpec, parent_spec: SubBlockSpec, weights: dict):
        """The module of ``spec``: the parent's own, or a variant with its trained weights."""
        if spec == parent_spec:
            return self.runner.sublayer(layer, part)
        ctx = self.ctx
        module = ctx.family.init_sublayer(self.parent, layer, spec, None, method=ctx.variant_provider.init_method)
        state = weights.get((layer, part))
        if state is not None:
            module.load_state_dict(state)
        elif next(module.parameters(), None) is not None:
            raise UserError(
                f"The block library has no trained weights for {spec.id} at {layer_key(layer)}. Re-run "
                f"`puzzle run CONFIG --stage library` so every block in library/index.json is trained."
            )
        return module.to(dtype=self.dtype).eval()

    @property
    def dtype(self):
        return next(p for p in self.parent.model.parameters() if p.device.type != "meta").dtype

    def block_modules(self, layer: int, block: BlockSpec):
        from puzzle_core.bld import load_sublayers

        blocks = list(self.parent_blocks)
        blocks[layer] = block
        weights = load_sublayers(self.ctx.run_dir, blocks)
        parent = self.parent_blocks[layer]
        return (self.sublayer(layer, "attention", block.attention, parent.attention, weights),
                self.sublayer(layer, "ffn", block.ffn, parent.ffn, weights))

    def __call__(self, job: Job) -> None:
        layer = job.payload
        if read_score_shard(self.ctx.run_dir, layer, self.keys[layer]) is not None:
            return  # done earlier, or by another process
        session = self.session
        scores = {}
        blocks = self.layers[layer]
        with tqdm(blocks, desc=f"scoring {layer_key(layer)}", unit="block", leave=False, dynamic_ncols=True) as bar:
            for block_id in bar:
                bar.set_postfix_str(block_id, refresh=False)
                attention, ffn = self.block_modules(layer, BlockSpec.parse(block_id))
                scores[block_id] = session.score(layer, attention, ffn)
                check_finite(layer, block_id, scores[block_id])
        write_score_shard(self.ctx.run_dir, ScoreShard(self.keys[layer], layer, session.reference(), scores))


def score_split_parent(ctx, layers: list[list[str]], scorers: dict[str, Any], keys: dict[int, str],
                       pending: list[int]) -> None:
    """Every pending layer scored by all processes together, the parent's layers split among them."""
    import torch.distributed as dist

    from puzzle_core.gkd import join_process_group
    from puzzle_core.scoring_pipeline import PipelineScoringEngine, layer_ranges

    join_process_group(ctx.role.local_rank)
    dist.barrier()  # every process has read which shards are pending before any is written
    rank, size = dist.get_rank(), dist.get_world_size()
    sources = {scorer.data(ctx).key: scorer.data(ctx) for scorer in scorers.values()}
    if len(sources) > 1:
        raise UserError(
            f"scoring.sharding: layers scores every scorer on one data set, but these scorers use {len(sources)} "
            f"({', '.join(sources)}). Score them in separate runs, or use scoring.sharding: jobs."
        )
    own = layer_ranges(len(layers), size)[rank]
    parent = ctx.parent_layers(list(own), ends=True)
    work = LayerScoring(ctx, layers, scorers, keys, parent)
    device = next(p.device for p in parent.model.parameters() if p.device.type != "meta")
    (source,) = sources.values()
    engine = PipelineScoringEngine(work.runner, source.load(), hidden_size=parent.shape.hidden_size,
                                   dtype=work.dtype, keep_log_probs=any(s.needs_parent_log_probs for s in scorers.values()),
                                   references=scorers, device=device)
    for layer in pending:
        scores = {}
        for block_id in tqdm(layers[layer], desc=f"scoring {layer_key(layer)}", unit="block", leave=False,
                             disable=not engine.last, dynamic_ncols=True):
            modules = work.block_modules(layer, BlockSpec.parse(block_id)) if layer in own else (None, None)
            result = engine.score(layer, *modules, scorers)
            if result is not None:
                scores[block_id] = result
                check_finite(layer, block_id, result)
        if engine.last:
            write_score_shard(ctx.run_dir, ScoreShard(keys[layer], layer, engine.reference, scores))
    dist.barrier()  # the shards are written before the driver merges them


def check_finite(layer: int, block_id: str, scores: dict[str, float]) -> None:
    bad = [name for name, value in scores.items() if not math.isfinite(value)]
    if bad:
        raise UserError(
            f"Scoring {block_id} at {layer_key(layer)} gave a non-finite {', '.join(bad)}: its trained weights are "
            f"broken (diverged BLD?). Delete its files under library/blocks/ and re-run `puzzle run CONFIG --resume` "
            f"to retrain and rescore it."
        )


def shard_keys(ctx, layers: list[list[str]]) -> dict[int, str]:
    """What a layer's scores depend on: the trained library, the data, the scorers and the blocks."""
    scoring = unstructure(ctx.config.scoring)
    scoring.pop("executor")  # how jobs run does not change their results
    scoring.pop("sharding")
    common = {"library": ctx.hashes["library"], "scoring": scoring}
    return {i: stable_hash({**common, "layer": i, "blocks": blocks}) for i, blocks in enumerate(layers)}


def run(ctx) -> list[Path]:
    section = ctx.config.scoring
    names = [choice.name for choice in section.scorers]
    if not names:
        raise UserError("scoring.scorers is empty; list at least one scorer, e.g. [kl].")
    if len(set(names)) != len(names):
        raise UserError(f"scoring.scorers names a scorer twice ({names}); list each once.")
    layers = read_library_index(ctx.run_dir, required=True).layer_blocks()
    scorers = {choice.name: ctx.registries.record(choice).create(choice.options) for choice in section.scorers}
    keys = shard_keys(ctx, layers)
    pending = [i for i in range(len(layers)) if read_score_shard(ctx.run_dir, i, keys[i]) is None]
    if pending and section.sharding == "layers" and ctx.role.distributed:
        score_split_parent(ctx, layers, scorers, keys, pending)
    elif pending:
        # a block at layer i runs layers i..N-1 and the head (about one more layer's worth)
        jobs = [Job(id=layer_key(i), cost=len(layers[i]) * (len(layers) - i + 1), payload=i) for i in pending]
        work = LayerScoring(ctx, layers, scorers, keys)
        executor = ctx.registries.record(section.executor).create(section.executor.options)
        executor.run(jobs, work, description="replace-1-block scoring", context=ctx)
    if not ctx.role.is_driver:
        return []  # the driver process merges the shards
    return write_scores(ctx, layers, scorers, keys)


def write_scores(ctx, layers: list[list[str]], scorers: dict[str, Any], keys: dict[int, str]) -> list[Path]:
    """Merge the layer shards into ``scores/scores.json`` and refresh the library view."""
    merged: dict[str, Any] = {}
    shards = []
    parent_scores: dict[str, float] = {}
    for i in range(len(layers)):
        shard = read_score_shard(ctx.run_dir, i, keys[i])
        if shard is None:
            raise UserError(
                f"Scoring shard {score_shard(ctx.run_dir, i)} is missing or stale after scoring; re-run with --resume."
            )
        merged[layer_key(i)] = {block_id: shard.scores[block_id] for block_id in layers[i]}
        parent_scores = parent_scores or shard.parent
        shards.append(score_shard(ctx.run_dir, i))
    choices = {choice.name: choice for choice in ctx.config.scoring.scorers}
    records = {name: ctx.registries.scorers.get(name) for name in scorers}
    meta = {
        "scorers": {
            name: {
                "description": records[name].description,
                "options": unstructure(choices[name].options) if choices[name].options is not None else {},
                "higher_is_better": scorer.higher_is_better,
                "data": scorer.data(ctx).description,
                "parent": parent_scores.get(name),
                **scorer.info(),
            }
            for name, scorer in scorers.items()
        },
        "method": "replace-1-block: each block alone in the otherwise-parent model",
    }
    path = layout.write_scores(ctx.run_dir, Scores(layers=merged, meta=meta))
    write_library_view(ctx.run_dir)
    return [path, *shards]
