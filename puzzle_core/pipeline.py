"""The Puzzle pipeline: stages run in order over one run directory.

library -> score -> cost -> search -> assemble -> gkd -> evaluate -> report

Each stage is a module in :mod:`puzzle_core.stages` with ``run(ctx) -> list[Path]``
returning the files it wrote. A stage's hash covers the config sections it reads and
the hashes of the stages before it; a stage whose outputs are recorded in the manifest
with the same hash and intact checksums is skipped, so ``--resume`` after a crash
redoes nothing that finished. Given other run directories to ``reuse``, a stage that
finished in one of them with the same hash is linked in instead of run (ablations share
one library and score table that way), and a stage that must run first links in their
``caches``: keyed, self-checking work (activations, trained blocks, score shards) that
it then reuses wherever the keys match.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal, Sequence

import attrs
import yaml

from puzzle_core import layout
from puzzle_core.choices import CorpusChoice, PluginChoice
from puzzle_core.config import stable_hash, unstructure
from puzzle_core.data import TokenizedCorpus
from puzzle_core.errors import UserError
from puzzle_core.interfaces import (
    LoadedModel,
    ModelFamily,
    ModelShape,
    ProcessRole,
    ScoringData,
    StageContext,
    VariantProvider,
)
from puzzle_core.rundir import RunDir, atomic_write, link_missing, remove_temp_files
from puzzle_core.schema import PuzzleConfig


@attrs.frozen
class Stage:
    """A pipeline stage: its name, the config sections it reads, and its module.

    ``caches`` are files or folders (relative to the run directory) where the stage keeps
    keyed work that it checks before reusing, so they may be seeded from another run directory.
    """

    name: str
    sections: tuple[str, ...]
    module: str
    description: str
    caches: tuple[str, ...] = ()

    def runner(self) -> Callable[["RunContext"], list[Path]]:
        return importlib.import_module(self.module).run


STAGES: tuple[Stage, ...] = (
    Stage("library", ("parent", "seed", "data", "library"), "puzzle_core.stages.library", "blockwise local distillation",
          caches=(layout.ACTIVATIONS, layout.LIBRARY_BLOCKS)),
    Stage("score", ("scoring",), "puzzle_core.stages.score", "replace-1-block scores", caches=(layout.SCORE_SHARDS,)),
    Stage("cost", ("scenario", "costs"), "puzzle_core.stages.cost", "per-block costs for the scenario"),
    Stage("search", ("search",), "puzzle_core.stages.search", "choosing one block per layer"),
    Stage("assemble", (), "puzzle_core.stages.assemble", "building and exporting the children"),
    Stage("gkd", ("gkd",), "puzzle_core.stages.gkd", "global knowledge distillation"),
    Stage("evaluate", ("evaluation",), "puzzle_core.stages.evaluate", "evaluating parent and children",
          caches=(layout.EVAL_MODELS, layout.EVAL_ITEMS)),  # each model's numbers, reused where fingerprints match
    Stage("report", (), "puzzle_core.stages.report", "report and plots"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_hashes(config: PuzzleConfig, registries=None) -> dict[str, str]:
    """Chained hash per stage: its own sections, the plugins they pick, and everything upstream.

    The plugins enter as ``distribution==version``, so upgrading a plugin redoes the
    stages it produced (and those after them), not the others.
    """
    from puzzle_core.registry import get_registries

    registries = registries or get_registries()
    data = unstructure(config)
    hashes: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        plugins = stage_plugins(config, stage.sections, registries)
        previous = stable_hash(
            {"upstream": previous, "stage": stage.name, "plugins": plugins, **{s: data[s] for s in stage.sections}}
        )
        hashes[stage.name] = previous
    return hashes


def stage_plugins(config: PuzzleConfig, sections: Sequence[str], registries) -> list[str]:
    """``distribution==version`` of every plugin the config ``sections`` pick.

    An architecture or block-variants provider left to detection may be any registered one.
    """
    entries = []
    for section in sections:
        value = getattr(config, section)
        entries += [registries.kind(choice.kind).entry(choice.name) for choice in _choices_in(value)]
        if section == "parent" and config.parent.architecture is None:
            entries += registries.architectures.entries()
        if section == "library" and config.library.variants is None:
            entries += registries.block_variants.entries()
    return sorted({f"{entry.distribution}=={entry.version}" for entry in entries})


def _choices_in(value: object) -> list[PluginChoice]:
    if isinstance(value, PluginChoice):
        return [value]
    if attrs.has(type(value)):
        return [c for field in attrs.fields(type(value)) for c in _choices_in(getattr(value, field.name))]
    if isinstance(value, (list, tuple)):
        return [c for item in value for c in _choices_in(item)]
    return []


def process_role(registries) -> ProcessRole:
    """This process's role, as the first executor that recognises its launcher says; else the driver.

    Workers run the same stage code, so they rebuild the same job lists, but leave the
    lock, the manifest and the clean-up of temp files to the driver. Only executors know
    their launchers (torchrun's environment, a cluster's task ids).
    """
    for entry in registries.executors:
        role = entry.record.create().process_role()
        if role is not None:
            return role
    return ProcessRole()


def _quiet(_message: str) -> None:
    pass


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunContext(StageContext):
    """What every stage gets: the config, the run directory, and lazily loaded shared state."""

    def __init__(self, config: PuzzleConfig, run_dir: RunDir, registries=None, role: ProcessRole | None = None):
        from puzzle_core.registry import get_registries

        self.config = config
        self.run_dir = run_dir
        self.registries = registries or get_registries()
        self.role = role or ProcessRole()
        self.seed = config.seed
        self.stage: str | None = None  # the stage being run, for executors that relaunch it
        self.hashes = stage_hashes(config, self.registries)
        self.outcomes: dict[str, StageOutcome] = {}  # per stage of this call: how it was done

    @cached_property
    def parent(self) -> LoadedModel:
        """The parent (loaded once)."""
        return self.loaded_parent[1]

    @cached_property
    def family(self) -> ModelFamily:
        """The model family of the parent (its config is enough to know it)."""
        return self.parent_architecture[0]

    @cached_property
    def loaded_parent(self) -> tuple[ModelFamily, LoadedModel]:
        from puzzle_core.parents import load_parent

        return load_parent(self.config.parent, self.registries)

    @cached_property
    def parent_architecture(self) -> tuple[ModelFamily, ModelShape]:
        """The parent's family and shape, read from its config alone when it has one (the parent if loaded)."""
        from puzzle_core.parents import parent_shape

        found = None if "loaded_parent" in self.__dict__ else parent_shape(self.config.parent, self.registries)
        return found or (self.loaded_parent[0], self.loaded_parent[1].shape)

    def parent_layers(self, layers: Sequence[int], ends: bool = False) -> LoadedModel:
        """The parent with real weights for ``layers`` (``ends``: and the embeddings and head) at least: the whole
        parent when it is loaded already or when its family cannot load less (:meth:`ModelFamily.load_parent_layers`)."""
        from puzzle_core.parents import load_parent_layers, loads_layers_alone

        if "loaded_parent" in self.__dict__ or not loads_layers_alone(self.family):
            return self.parent
        return load_parent_layers(self.config.parent, self.registries, layers, ends)[1]

    @cached_property
    def tokenizer(self):
        """The parent's tokenizer, without its weights when the family can load it so."""
        return self.parent.tokenizer if "loaded_parent" in self.__dict__ else self.parent_layers(()).tokenizer

    @cached_property
    def variant_provider(self) -> VariantProvider:
        choice = self.config.library.variants
        if choice is None:
            return self.registries.block_variants.get(self.family.default_variants).create()
        return self.registries.record(choice).create(choice.options)

    @cached_property
    def corpus(self) -> TokenizedCorpus:
        """Tokenised train / validation / test splits."""
        from puzzle_core.corpus import load_corpus

        return load_corpus(self.config.data, self.tokenizer, seed=self.config.seed, registries=self.registries)

    def tokenized(self, choice: CorpusChoice) -> TokenizedCorpus:
        """``choice`` split and tokenised like ``data.corpus`` (the run's corpus itself when it is that)."""
        if choice == self.config.data.corpus:
            return self.corpus
        from puzzle_core.corpus import load_corpus

        data = attrs.evolve(self.config.data, corpus=choice)
        return load_corpus(data, self.tokenizer, seed=self.config.seed, registries=self.registries)

    def scoring_data(self) -> ScoringData:
        from puzzle_core.scoring import validation_data

        return validation_data(self)

    def worker_arguments(self) -> list[str]:
        if self.stage is None:
            raise UserError(
                "Workers re-run a pipeline stage, but no stage is running. Call the executor from a stage, or "
                "start the workers yourself (e.g. under torchrun)."
            )
        config_path = layout.worker_config(self.run_dir, self.stage)
        atomic_write(config_path, yaml.safe_dump(unstructure(self.config), sort_keys=False))
        return ["run", str(config_path), "--run-dir", str(self.run_dir.root), "--stage", self.stage, "--resume"]


StageOutcome = Literal["ran", "skipped", "reused"]


def _donor(rundir: RunDir, donors: list[RunDir], stage: str, digest: str, adopt: bool) -> RunDir | None:
    """The first donor where ``stage`` finished with ``digest``; the driver (``adopt``) also takes it over."""
    for donor in donors:
        if rundir.adopt(donor, stage, digest) if adopt else donor.stage_done(stage, digest):
            return donor
    return None


def run_pipeline(
    config: PuzzleConfig,
    run_dir: str | Path,
    *,
    stages: list[str] | None = None,
    resume: bool = True,
    config_text: str | None = None,
    echo: Callable[[str], None] = print,
    reuse: Sequence[str | Path] = (),
    outcomes: dict[str, StageOutcome] | None = None,
) -> RunContext:
    """Run ``stages`` (default: all) of the pipeline in ``run_dir``.

    ``reuse``: other run directories whose finished stages (same hash) and caches this
    run may take over; see the module docstring. ``outcomes``: a dict to fill with how each
    stage was done as it finishes (the returned context's ``outcomes``), so that a caller
    still knows what ran or was reused when a later stage raises.
    """
    import torch

    from puzzle_core.registry import get_registries
    from puzzle_core.schema import check_config

    unknown = [s for s in stages or [] if s not in STAGE_NAMES]
    if unknown:
        raise UserError(f"Unknown stage(s) {unknown}; stages are: {', '.join(STAGE_NAMES)}.")
    check_config(config)  # plugins that cannot work on this scenario fail now, not after hours of BLD
    wanted = [s for s in STAGES if not stages or s.name in stages]
    rundir = RunDir(run_dir)
    donors = [RunDir(p) for p in reuse if Path(p).resolve() != rundir.root.resolve()]
    role = process_role(get_registries())
    worker = not role.is_driver
    if worker:
        echo = _quiet  # the driver reports progress
    with contextlib.nullcontext() if worker else rundir.lock():
        existing = rundir.manifest()
        if existing and not resume and not stages:
            raise UserError(
                f"Run directory {rundir.root} already holds a run. Pass --resume to continue it "
                f"(finished stages are kept), or choose a new --run-dir."
            )
        if not worker:
            remove_temp_files(rundir.root)
            if config_text is not None:
                atomic_write(rundir.path(layout.CONFIG), config_text)
        seed_everything(config.seed)
        ctx = RunContext(config, rundir, role=role)
        if outcomes is not None:
            ctx.outcomes = outcomes
        for index, stage in enumerate(wanted, start=1):
            digest = ctx.hashes[stage.name]
            label = f"[{index}/{len(wanted)}] {stage.name}: {stage.description}"
            if rundir.stage_done(stage.name, digest):
                echo(f"{label} (done, skipped)")
                ctx.outcomes[stage.name] = "skipped"
                continue
            donor = _donor(rundir, donors, stage.name, digest, adopt=not worker)
            if donor is not None:
                echo(f"{label} (done in {donor.root}, reused)")
                ctx.outcomes[stage.name] = "reused"
                continue
            if not worker:
                for donor in donors:
                    for cache in stage.caches:
                        link_missing(donor.path(cache), rundir.path(cache))
            echo(label)
            started = time.perf_counter()
            seed_everything(config.seed)
            # every stage starts on the configured threads, whatever a plugin's native library did to
            # the process-wide count before (CBC, for one, sets OpenMP's)
            torch.set_num_threads(max(1, config.threads))
            ctx.stage = stage.name
            outputs = stage.runner()(ctx)
            if not worker:
                rundir.mark_done(stage.name, digest, outputs)
            ctx.outcomes[stage.name] = "ran"
            echo(f"    finished in {time.perf_counter() - started:.1f}s")
    return ctx
