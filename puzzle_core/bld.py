"""Blockwise local distillation (BLD): train every alternative sub-block to imitate the parent's.

A *unit* is what one training run produces: one attention or FFN variant of a layer
(decoupled BLD) or an (attention, FFN) pair trained together (coupled BLD). Its input is
the parent's residual stream entering it and its target what the parent's own
sub-block(s) add to that stream, both read from the captured activations
(:mod:`puzzle_core.activations`). Parent and no-op sub-blocks need no training; they are
listed in the index but have no weights.

A job is a *pass* over one layer's activations that trains several of its units side by
side (all of them by default, ``library.units_per_pass``): each batch is read from disk
and moved to the device once and every unit takes its optimizer step on it, so the
layer's data costs one read however many variants it has. Every unit starts from the
parent (the family's ``init_sublayer``, calibrated on the first training activations),
trains with AdamW and a warmup + cosine schedule over the library's token budget, from a
seed derived from the run seed and the unit's id, on batches in an order derived from
the run seed and the layer: its result does not depend on which process runs it, when,
or which units share its pass. Each unit then writes
``library/blocks/layer_<i>/<unit>.safetensors`` and, last, a JSON :class:`BlockRecord`
holding the weights' sha256: a unit whose record matches its weights and its settings is
finished and never trained again (a resumed pass trains only the rest); a damaged
weights file is reported and trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from puzzle_core.activations import ActivationStore
from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec, VariantSpace
from puzzle_core.config import CONVERTER, stable_hash, unstructure
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Calibration, Job, LoadedModel, ModelFamily, ModelShape, Part
from puzzle_core.library import layer_key
from puzzle_core.layout import BlockRecord, LibraryIndex, LibraryLayer, block_weights, read_library_index, write_library_index
from puzzle_core.rundir import RunDir, atomic_path, atomic_write_json, sha256_file

WEIGHTS_FORMAT = "puzzle-bld-1"
CURVE_POINTS = 20


class BlockWarning(UserWarning):
    """A stored block was damaged and is being trained again."""


class DivergedError(UserError):
    """A BLD job's loss stopped being finite."""


# ---------------------------------------------------------------------------- planning


@attrs.frozen
class Unit:
    """What one BLD job trains: ``attention``, ``ffn`` or both (coupled) variant ids of ``layer``."""

    layer: int
    attention: str | None = None
    ffn: str | None = None

    @property
    def name(self) -> str:
        return "+".join(part for part in (self.attention, self.ffn) if part)

    @property
    def id(self) -> str:
        return f"{layer_key(self.layer)}/{self.name}"

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(p for p, v in (("attention", self.attention), ("ffn", self.ffn)) if v)


@attrs.frozen
class LayerPlan:
    """What a layer offers (ids, parent first) and which units need training."""

    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    blocks: tuple[str, ...]
    units: tuple[Unit, ...]


@attrs.frozen
class LibraryPlan:
    mode: str
    layers: tuple[LayerPlan, ...]

    @property
    def units(self) -> list[Unit]:
        return [unit for layer in self.layers for unit in layer.units]


def _needs_training(spec, parent_spec) -> bool:
    return spec != parent_spec and not spec.no_op


def _parent_first(ids: Iterable[str], parent: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([parent, *ids]))


def plan_library(
    mode: str, shape: ModelShape, spaces: Sequence[VariantSpace], subspace: Sequence[Sequence[str]] | None = None
) -> LibraryPlan:
    """Blocks offered and units trained per layer.

    Decoupled: every offered attention and FFN variant that is neither the parent's nor a
    no-op is a unit (|A| + |F| minus those). Coupled: every (attention, FFN) pair of the
    offered variants, or of ``subspace[i]`` (block or sub-block ids) when given, except
    the pairs made only of parent and no-op sub-blocks (|A| x |F| minus those).
    """
    if len(spaces) != shape.num_layers:
        raise ValueError(f"{len(spaces)} variant spaces for {shape.num_layers} layers")
    layers = []
    for index, space in enumerate(spaces):
        parent = shape.blocks[index]
        offered_attention = {s.id: s for s in space.attention}
        offered_ffn = {s.id: s for s in space.ffn}
        if mode == "coupled" and subspace is not None:
            attention_ids, ffn_ids = _subspace_ids(index, subspace[index], offered_attention, offered_ffn)
        else:
            attention_ids, ffn_ids = list(offered_attention), list(offered_ffn)
        attention = _parent_first(attention_ids, parent.attention.id)
        ffn = _parent_first(ffn_ids, parent.ffn.id)
        a_spec = {**offered_attention, parent.attention.id: parent.attention}
        f_spec = {**offered_ffn, parent.ffn.id: parent.ffn}
        if mode == "decoupled":
            units = [Unit(index, attention=a) for a in attention if _needs_training(a_spec[a], parent.attention)]
            units += [Unit(index, ffn=f) for f in ffn if _needs_training(f_spec[f], parent.ffn)]
        elif mode == "coupled":
            units = [
                Unit(index, attention=a, ffn=f)
                for a in attention
                for f in ffn
                if _needs_training(a_spec[a], parent.attention) or _needs_training(f_spec[f], parent.ffn)
            ]
        else:
            raise UserError(f"library.mode is '{mode}'; use 'decoupled' or 'coupled'.")
        blocks = tuple(f"{a}+{f}" for a in attention for f in ffn)
        layers.append(LayerPlan(attention, ffn, blocks, tuple(units)))
    return LibraryPlan(mode, tuple(layers))


def _subspace_ids(layer: int, ids: Sequence[str], attention: Mapping, ffn: Mapping) -> tuple[list[str], list[str]]:
    """Split a layer's subspace (block ids ``a+f`` or sub-block ids) into attention and FFN ids."""
    chosen_attention, chosen_ffn = [], []
    for text in ids:
        pieces = text.split("+") if "+" in text else [text]
        for piece in pieces:
            if piece.startswith("attn_"):
                AttentionSpec.parse(piece)
                target, offered = chosen_attention, attention
            else:
                FFNSpec.parse(piece)
                target, offered = chosen_ffn, ffn
            if piece not in offered:
                raise UserError(
                    f"The coupled subspace of {layer_key(layer)} names '{piece}', which the variant provider does not "
                    f"offer there (offered: {', '.join([*attention, *ffn])}). Use ids from the decoupled library."
                )
            target.append(piece)
    return chosen_attention, chosen_ffn


def read_solution_subspace(path: str | Path, num_layers: int) -> list[list[str]]:
    """Per layer, the block ids chosen by the solutions in ``path``.

    ``path`` is a search stage's ``solutions/index.json`` (every solution it lists), or one
    solution file (``{"chosen": {"layer_0": "attn_g3+ffn_768", ...}}``).
    """
    path = Path(path)

    def read(file: Path) -> Any:
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(
                f"library.subspace_solutions: {file} cannot be read as JSON ({exc}). Point it at a search stage's "
                f"solutions/index.json or one of its solution files."
            ) from None

    data = read(path)
    if isinstance(data, dict) and "solutions" in data:
        solutions = [read(path.parent / entry["file"]) for entry in data["solutions"]]
    else:
        solutions = [data]
    per_layer: list[list[str]] = [[] for _ in range(num_layers)]
    for solution in solutions:
        chosen = solution.get("chosen") if isinstance(solution, dict) else None
        if not isinstance(chosen, dict) or any(layer_key(i) not in chosen for i in range(num_layers)):
            raise UserError(
                f"library.subspace_solutions: {path} holds a solution without a block for each of the "
                f"{num_layers} layers ('chosen': {{'layer_0': ..., ...}}). Use solutions of a search on this parent."
            )
        for index in range(num_layers):
            per_layer[index].append(chosen[layer_key(index)])
    return per_layer


def resolve_subspace(section, num_layers: int) -> list[list[str]] | None:
    """The coupled subspace the library section asks for, or ``None`` (every pair)."""
    if section.subspace is not None and section.subspace_solutions is not None:
        raise UserError("Give library.subspace or library.subspace_solutions, not both.")
    if section.subspace_solutions is not None:
        subspace = read_solution_subspace(section.subspace_solutions, num_layers)
    else:
        subspace = section.subspace
    if subspace is not None:
        if section.mode != "coupled":
            raise UserError("A library subspace only applies to coupled BLD; set library.mode: coupled, or remove it.")
        if len(subspace) != num_layers:
            raise UserError(
                f"library.subspace has {len(subspace)} entries for a parent of {num_layers} layers; give one list of "
                f"block ids per layer."
            )
    return subspace


def unit_cost(shape: ModelShape, unit: Unit, seq_len: int, tokens: int) -> float:
    """Estimated training FLOPs of a unit (for balancing jobs across workers)."""
    hidden, heads, head_dim = shape.hidden_size, shape.num_attention_heads, shape.head_dim
    per_token = 0.0
    if unit.attention:
        spec = AttentionSpec.parse(unit.attention)
        if spec.replace_with_linear:
            per_token += hidden * hidden
        elif not spec.no_op:
            kv_heads = heads // spec.n_heads_in_group
            projections = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
            per_token += projections + 2 * seq_len * heads * head_dim  # + scores and weighted values
    if unit.ffn:
        spec = FFNSpec.parse(unit.ffn)
        if spec.replace_with_linear:
            per_token += hidden * hidden
        elif not spec.no_op:
            per_token += 3 * hidden * spec.intermediate_size
    return 6.0 * per_token * tokens  # forward + backward, 2 FLOPs per multiply-add


def job_seed(run_seed: int, job_id: str) -> int:
    """A seed that depends only on the run seed and the job."""
    digest = hashlib.sha256(f"{run_seed}/{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


# ---------------------------------------------------------------------------- records


@attrs.frozen
class TrainSettings:
    """Everything besides the unit that changes a trained block (hashed into its record)."""

    activations: str  # the capture key
    mode: str
    loss: Any  # unstructured loss choice
    lr: float
    weight_decay: float
    warmup_fraction: float
    batch_size: int
    calibration_tokens: int
    init_method: str
    seed: int
    bf16: bool = False  # bfloat16 autocast for the forward passes

    def hash_for(self, unit: Unit) -> str:
        return stable_hash({"settings": unstructure(self), "unit": unstructure(unit)})


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def summarize_curve(losses: Sequence[float], points: int = CURVE_POINTS) -> list[float]:
    """Mean loss over ``points`` equal stretches of the run (fewer for short runs)."""
    if not losses:
        return []
    points = min(points, len(losses))
    edges = [round(i * len(losses) / points) for i in range(points + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------------------- modules


class CoupledBlock(nn.Module):
    """An attention and an FFN sub-block trained together; returns the layer's whole delta."""

    def __init__(self, attention: nn.Module, ffn: nn.Module):
        super().__init__()
        self.attention = attention
        self.ffn = ffn

    def forward(self, hidden, context):
        attention = self.attention(hidden, context)
        return attention + self.ffn(hidden + attention, context)


def unit_inputs(unit: Unit, batch: Mapping[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's input and target from a batch of captured activations (float32 on ``device``)."""
    hidden = batch["hidden"].to(device=device, dtype=torch.float32)
    attn_out = batch["attn_out"].to(device=device, dtype=torch.float32)
    if unit.attention and unit.ffn:
        return hidden, attn_out + batch["ffn_out"].to(device=device, dtype=torch.float32)
    if unit.attention:
        return hidden, attn_out
    return hidden + attn_out, batch["ffn_out"].to(device=device, dtype=torch.float32)


def _to_device(value, device):
    """Move the tensors in a layer context (tensors, tuples, dicts, attrs records) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if attrs.has(type(value)):
        fields = [f.name for f in attrs.fields(type(value)) if f.init]
        return attrs.evolve(value, **{name: _to_device(getattr(value, name), device) for name in fields})
    return value


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's RSS high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory since the last reset: CUDA allocations, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- training


@attrs.frozen
class UnitPass:
    """Units of one layer trained side by side in one pass over its activations (one job)."""

    layer: int
    units: tuple[Unit, ...]

    @property
    def id(self) -> str:
        return f"{layer_key(self.layer)}/{'|'.join(unit.name for unit in self.units)}"


def plan_passes(plan: LibraryPlan, units_per_pass: int = 0) -> list[UnitPass]:
    """The plan's units grouped into passes: all of a layer's units (``0``), or at most ``units_per_pass``."""
    passes = []
    for index, layer in enumerate(plan.layers):
        size = units_per_pass or len(layer.units) or 1
        passes += [UnitPass(index, layer.units[i : i + size]) for i in range(0, len(layer.units), size)]
    return passes


class _Clock:
    """Wall and CPU seconds spent inside ``with clock:`` blocks, summed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc):
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]


class _UnitTraining:
    """One unit inside a pass: its module, optimizer, schedule, losses and clocks."""

    def __init__(self, trainer: "BLDTrainer", unit: Unit, calibration, total: int, warmup: int):
        self.unit = unit
        self.seed = job_seed(trainer.settings.seed, unit.id)
        self.clock, self.train_clock = _Clock(), _Clock()
        self.losses: list[float] = []
        self.tokens = 0
        with self.clock:
            torch.manual_seed(self.seed)
            self.module = trainer.build(unit, calibration).to(trainer.device)
            parameters = [p for p in self.module.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(
                parameters, lr=trainer.settings.lr, weight_decay=trainer.settings.weight_decay
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_factor(step, total, warmup)
            )

    def step(self, trainer: "BLDTrainer", inputs: torch.Tensor, target: torch.Tensor, context, total: int) -> None:
        with self.clock, self.train_clock:
            with trainer.autocast():
                output = self.module(inputs, context)
            loss = trainer.loss(output, target)  # losses compute in float32
            value = loss.item()
            if not math.isfinite(value):
                raise DivergedError(
                    f"BLD job {self.unit.id} diverged: its loss is {value} at step {len(self.losses) + 1} of "
                    f"{total} (lr {self.scheduler.get_last_lr()[0]:.3g}). Lower library.lr, or check the parent's "
                    f"activations in {trainer.store.root}."
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.losses.append(value)
            self.tokens += inputs.shape[0] * inputs.shape[1]


class ParentLayers:
    """The parent as BLD jobs see it: ``self(layer)`` has real weights for that layer at least.

    :meth:`whole` wraps a loaded parent. Otherwise ``load(layer)`` loads one layer of it
    (:meth:`ModelFamily.load_parent_layers`), and the last one is kept: a job trains the
    units of one layer, so a worker that gets no capture job holds one parent layer at a
    time, never the whole parent.
    """

    def __init__(self, shape: ModelShape, load: Callable[[int], LoadedModel]):
        self.shape = shape
        self._load = load
        self.current: tuple[int, LoadedModel] | None = None

    @classmethod
    def whole(cls, parent: LoadedModel) -> "ParentLayers":
        layers = cls(parent.shape, lambda _layer: parent)
        layers.current = (-1, parent)
        return layers

    def __call__(self, layer: int) -> LoadedModel:
        if self.current is None or (self.current[0] != layer and self.current[0] != -1):
            self.current = None  # let the previous layer go before loading the next
            self.current = (layer, self._load(layer))
        return self.current[1]

    def any(self) -> LoadedModel:
        """Some loaded view of the parent (for what every layer shares: rotary tables, masks)."""
        return self.current[1] if self.current is not None else self(0)


def _device_of(model: nn.Module) -> torch.device:
    """Where a (possibly partly loaded) model's real weights are."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


class BLDTrainer:
    """Trains and stores the units of a library plan; :meth:`run` is the executor's work function.

    A job is a :class:`UnitPass`: the pass reads each batch of its layer's activations
    once, moves it to the device once, and steps every unit on it. A unit's result
    depends only on the run seed, its id and the settings, never on which other units
    share its pass: each starts from its own seed, the batch order is the layer's (its
    seed comes from the layer alone), and no computation mixes units. So a pass can be
    cut anywhere (``library.units_per_pass``), resumed with fewer units, or split across
    workers, and every block comes out bit-identical.
    """

    def __init__(
        self,
        run_dir: RunDir,
        family: ModelFamily,
        parent: LoadedModel | ParentLayers,
        store: ActivationStore,
        settings: TrainSettings,
        loss,
        device: torch.device,
        capture_missing: Callable[[], None] | None = None,
        progress: bool = True,
    ):
        """``capture_missing`` captures any activation shard not on disk yet: a job calls it first,
        so it never depends on other workers having finished the capture (executors without a
        barrier between job lists, such as job arrays, stay correct). ``progress``: draw per-job
        bars (one process of several does)."""
        if getattr(loss, "target", "hidden") != "hidden":
            raise UserError(
                f"BLD compares sub-block outputs (hidden states), but library.loss compares {loss.target}. Pick a "
                f"hidden-state loss: normalized_mse (default), mse or cosine."
            )
        self.run_dir = run_dir
        self.family = family
        self.parent_layers = parent if isinstance(parent, ParentLayers) else ParentLayers.whole(parent)
        self.shape = self.parent_layers.shape
        self.store = store
        self.settings = settings
        self.loss = loss
        self.device = device
        self.progress = progress
        self.capture_missing = capture_missing
        self._contexts: dict[tuple, Any] = {}

    def autocast(self):
        """bfloat16 autocast for the sub-blocks' forward passes when ``settings.bf16`` (weights stay float32)."""
        if not self.settings.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---- files

    def weights_path(self, unit: Unit) -> Path:
        return block_weights(self.run_dir, unit.layer, unit.name)

    def record_path(self, unit: Unit) -> Path:
        return self.weights_path(unit).with_suffix(".json")

    def jobs(self, plan: LibraryPlan, seq_len: int, units_per_pass: int = 0) -> list[Job]:
        """One job per :class:`UnitPass`; its cost is the sum of its units' training FLOPs."""
        tokens = self.store.tokens("train")
        return [
            Job(group.id, sum(unit_cost(self.shape, u, seq_len, tokens) for u in group.units), group)
            for group in plan_passes(plan, units_per_pass)
        ]

    def finished(self, unit: Unit) -> BlockRecord | None:
        """The unit's record if it finished with these settings and its weights are intact."""
        record_path, weights_path = self.record_path(unit), self.weights_path(unit)
        if not record_path.is_file():
            return None
        try:
            record = CONVERTER.structure(json.loads(record_path.read_text(encoding="utf-8")), BlockRecord)
        except Exception:  # a damaged record in any way: the job simply runs again
            warnings.warn(f"Block record {record_path} is unreadable; training {unit.id} again.", BlockWarning, 2)
            return None
        if record.settings_hash != self.settings.hash_for(unit):
            return None
        if not weights_path.is_file() or sha256_file(weights_path) != record.sha256:
            warnings.warn(
                f"Block file {weights_path} is missing, truncated or corrupt (its sha256 does not match "
                f"{record_path.name}); training {unit.id} again.",
                BlockWarning,
                stacklevel=2,
            )
            return None
        return record

    # ---- one pass

    def run(self, job: Job) -> None:
        """Train the units of ``job.payload`` (a :class:`UnitPass`) that have not finished yet."""
        group: UnitPass = job.payload
        units = [unit for unit in group.units if self.finished(unit) is None]
        if not units:
            return
        if self.capture_missing is not None:
            self.capture_missing()
        layer, settings = group.layer, self.settings
        _reset_peak_memory(self.device)
        pass_clock = _Clock()
        with pass_clock:
            total = self.store.steps("train", settings.batch_size)
            warmup = max(1, round(settings.warmup_fraction * total)) if settings.warmup_fraction > 0 else 0
            calibration = self.store.calibration(layer, settings.calibration_tokens)
            runs = [_UnitTraining(self, unit, calibration, total, warmup) for unit in units]
            del calibration
            heldout_before = self.evaluate(runs)
            for run in runs:
                run.module.train()
            generator = torch.Generator().manual_seed(job_seed(settings.seed, layer_key(layer)))
            label = group.id if len(units) == len(group.units) else f"{layer_key(layer)} ({len(units)} units)"
            bar = tqdm(total=total, desc=label, unit="step", leave=False, dynamic_ncols=True,
                       disable=not self.progress)
            with bar:
                for batch in self.store.batches(layer, "train", settings.batch_size, generator):
                    batch = {name: tensor.to(self.device) for name, tensor in batch.items()}  # once for every unit
                    pairs: dict[tuple[Part, ...], tuple[torch.Tensor, torch.Tensor]] = {}
                    for run in runs:
                        parts = run.unit.parts
                        if parts not in pairs:
                            pairs[parts] = unit_inputs(run.unit, batch, self.device)
                        inputs, target = pairs[parts]
                        run.step(self, inputs, target, self.context(inputs), total)
                    bar.update()
                    if bar.n % 10 == 0:
                        bar.set_postfix(loss=" ".join(f"{run.losses[-1]:.3g}" for run in runs), refresh=False)
            heldout_after = self.evaluate(runs)
        for run, after in zip(runs, heldout_after):
            if after is not None and not math.isfinite(after):
                raise DivergedError(
                    f"BLD job {run.unit.id} diverged: its held-out loss is {after} after {len(run.losses)} steps. "
                    f"Lower library.lr, or check the parent's activations in {self.store.root}."
                )
        peak = peak_memory_mib(self.device)
        for run, before, after in zip(runs, heldout_before, heldout_after):
            with run.clock:
                self.save(run.unit, run.module)
            self._write_record(run, before, after, peak, pass_clock)

    def _write_record(self, run: _UnitTraining, before, after, peak, pass_clock: _Clock) -> None:
        unit, losses = run.unit, run.losses
        tail = losses[-max(1, len(losses) // 10) :]
        record = BlockRecord(
            job=unit.id,
            layer=unit.layer,
            attention=unit.attention,
            ffn=unit.ffn,
            weights=str(self.weights_path(unit).relative_to(self.run_dir.root)),
            sha256=sha256_file(self.weights_path(unit)),
            settings_hash=self.settings.hash_for(unit),
            seed=run.seed,
            steps=len(losses),
            tokens=run.tokens,
            train_loss_initial=losses[0],
            train_loss_final=sum(tail) / len(tail),
            train_loss_min=min(losses),
            heldout_loss_before=before,
            heldout_loss_after=after,
            loss_curve=summarize_curve(losses),
            wall_s=run.clock.wall,
            cpu_s=run.clock.cpu,
            train_s=run.train_clock.wall,
            train_cpu_s=run.train_clock.cpu,
            train_tokens_per_s=run.tokens / run.train_clock.wall if run.train_clock.wall > 0 else 0.0,
            peak_memory_mib=peak,
            device=str(self.device),
            threads=torch.get_num_threads(),
            pass_wall_s=pass_clock.wall,
            pass_cpu_s=pass_clock.cpu,
        )
        atomic_write_json(self.record_path(unit), CONVERTER.unstructure(record))

    def build(self, unit: Unit, calibration: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The unit's module, initialised from the parent with a calibration slice of the activations.

        ``calibration`` is the layer's calibration tensors (:meth:`ActivationStore.calibration`),
        read from the store when not given.
        """
        if calibration is None:
            calibration = self.store.calibration(unit.layer, self.settings.calibration_tokens)
        modules = {}
        for part in unit.parts:
            if calibration is None:
                calib = None
            elif part == "attention":
                calib = Calibration(calibration["hidden"], calibration["attn_out"])
            else:
                calib = Calibration(calibration["hidden"] + calibration["attn_out"], calibration["ffn_out"])
            spec = AttentionSpec.parse(unit.attention) if part == "attention" else FFNSpec.parse(unit.ffn)
            parent = self.parent_layers(unit.layer)
            modules[part] = self.family.init_sublayer(parent, unit.layer, spec, calib, self.settings.init_method)
        if len(modules) == 2:
            return CoupledBlock(modules["attention"], modules["ffn"])
        return next(iter(modules.values()))

    def context(self, inputs: torch.Tensor):
        """The layer context for a batch shape (rotary tables, mask), computed once per shape."""
        key = tuple(inputs.shape)
        if key not in self._contexts:
            model = self.parent_layers.any().model
            probe = torch.zeros(inputs.shape, dtype=inputs.dtype, device=_device_of(model))
            with torch.no_grad():
                self._contexts[key] = _to_device(self.family.layer_runner(model).context(probe), inputs.device)
        return self._contexts[key]

    @torch.no_grad()
    def evaluate(self, runs: Sequence[_UnitTraining]) -> list[float | None]:
        """Each unit's loss on the held-out activations (full precision), token-weighted over batches.

        One pass over the held-out batches serves every unit; ``None`` without held-out data.
        """
        for run in runs:
            run.module.eval()
        totals, weight = [0.0] * len(runs), 0
        for batch in self.store.batches(runs[0].unit.layer, "heldout", self.settings.batch_size):
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            count = batch["hidden"].shape[0] * batch["hidden"].shape[1]
            for index, run in enumerate(runs):
                with run.clock:
                    inputs, target = unit_inputs(run.unit, batch, self.device)
                    totals[index] += self.loss(run.module(inputs, self.context(inputs)), target).item() * count
            weight += count
        return [total / weight if weight else None for total in totals]

    def save(self, unit: Unit, module: nn.Module) -> None:
        if isinstance(module, CoupledBlock):
            parts = {"attention": module.attention, "ffn": module.ffn}
        else:
            parts = {unit.parts[0]: module}
        tensors = {
            f"{part}.{name}": tensor.detach().to("cpu").contiguous().clone()
            for part, sub in parts.items()
            for name, tensor in sub.state_dict().items()
        }
        path = self.weights_path(unit)
        with atomic_path(path) as tmp:
            # one metadata key only: safetensors writes several in a random order, and the bytes must be reproducible
            save_file(tensors, str(tmp), metadata={"format": f"{WEIGHTS_FORMAT} {unit.id}"})


# ---------------------------------------------------------------------------- the library index


def write_index(run_dir: RunDir, plan: LibraryPlan, trainer: BLDTrainer, extra: Mapping[str, Any]) -> Path:
    """``library/index.json``: blocks per layer (parent first) plus every trained unit's record."""
    layers = []
    for layer in plan.layers:
        trained = {}
        for unit in layer.units:
            record = trainer.finished(unit)
            if record is None:
                raise UserError(f"BLD job {unit.id} did not finish; re-run the library stage with --resume.")
            trained[unit.name] = record
        layers.append(LibraryLayer(attention=list(layer.attention), ffn=list(layer.ffn), blocks=list(layer.blocks),
                                   trained=trained))
    return write_library_index(run_dir, LibraryIndex(mode=plan.mode, **extra, layers=layers))


def read_index(run_dir: RunDir | str | Path) -> LibraryIndex:
    """The run's library index; a UserError when the library stage has not finished."""
    return read_library_index(run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir), required=True)


def load_sublayers(
    run_dir: RunDir | str | Path, blocks: Sequence[BlockSpec | str]
) -> dict[tuple[int, Part], dict[str, torch.Tensor]]:
    """Trained sub-block weights for a child with ``blocks`` (one per layer): ``{(layer, part): state_dict}``.

    Parent and no-op sub-blocks have no entry (the family builds them from the parent).
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    index = read_index(run_dir)
    if len(blocks) != len(index.layers):
        raise UserError(f"The library has {len(index.layers)} layers; got {len(blocks)} blocks.")
    sublayers: dict[tuple[int, Part], dict[str, torch.Tensor]] = {}
    for layer, (block, entry) in enumerate(zip(blocks, index.layers)):
        spec = block if isinstance(block, BlockSpec) else BlockSpec.parse(block)
        if spec.id not in entry.blocks:
            raise UserError(
                f"Block {spec.id} is not in the library at {layer_key(layer)} (it offers {', '.join(entry.blocks)})."
            )
        names = [spec.id] if index.mode == "coupled" else [spec.attention.id, spec.ffn.id]
        for name in names:
            record = entry.trained.get(name)
            if record is None:
                continue
            for (part, key), tensor in _read_block(run_dir, record).items():
                sublayers.setdefault((layer, part), {})[key] = tensor
    return sublayers


def _read_block(run_dir: RunDir, record: BlockRecord) -> dict[tuple[str, str], torch.Tensor]:
    path = run_dir.path(record.weights)
    if not path.is_file() or sha256_file(path) != record.sha256:
        raise UserError(
            f"Block file {path} is missing or damaged (sha256 mismatch). Re-run `puzzle run CONFIG --stage library "
            f"--resume`: damaged blocks are trained again."
        )
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise UserError(f"Block file {path} cannot be read ({exc}); re-run the library stage with --resume.") from None
    out = {}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        out[(part, key)] = tensor
    return out
