"""Global knowledge distillation (GKD): uptraining an assembled child against its parent.

Puzzle's stage 3. Every layer of a child was trained alone (BLD); GKD trains them
together so the child's *whole* forward pass matches the parent's. The objective is a
weighted sum of distillation-loss plugins (paper default: cosine on every layer's
hidden states + KL on the logits; LM loss is available but was found to hurt).

One training run is :func:`distill`: full fine-tuning or LoRA (peft, merged back into
plain ``Linear`` weights at the end), AdamW with linear warmup + cosine decay, gradient
accumulation, optional bf16 autocast, and resumable checkpoints (weights, optimizer,
step, RNG and the curves so far, all as safetensors + JSON) so that a killed run resumes
and ends with the same weights as an uninterrupted one. When ``torch.distributed`` is
initialised (a run under ``torchrun``) micro-batches are dealt round-robin to the ranks
and the student is wrapped in DDP (``gkd.sharding: ddp``), or both student and teacher
are sharded with FSDP2 (``fsdp``: :func:`shard`): each rank then holds 1/N of every
weight, gradient and optimizer state, writes its own shard of each checkpoint
(safetensors, no pickles), and rank 0 gathers the trained child at the end.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from puzzle_core.config import CONVERTER
from puzzle_core.devices import resolve_device
from puzzle_core.errors import UserError
from puzzle_core.interfaces import DistillationLoss, LoadedModel, ModelFamily
from puzzle_core.layout import GKDLog, TrainPoint, ValidationPoint
from puzzle_core.rundir import atomic_path, atomic_write_json
from puzzle_core.schema import GKDSection

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "state.json"  # written last: a checkpoint folder without it is incomplete


# ---------------------------------------------------------------- distributed seam


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``."""
    if _distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity in a single process)."""
    if not _distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def join_process_group(local_rank: int = 0) -> None:
    """Join the launcher's process group unless an executor already did: NCCL on GPUs, gloo on CPUs."""
    if _distributed():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")


# ---------------------------------------------------------------- forward + objective


@attrs.frozen
class ForwardOutput:
    """Every layer's output (the residual stream after it; only the last layer's unless kept) and the logits."""

    hidden: list[torch.Tensor]
    logits: torch.Tensor | None


class LayerwiseForward(nn.Module):
    """Runs a causal LM through its family's :class:`LayerRunner`, keeping each layer's output.

    Going through the runner (not ``output_hidden_states``) works for any family and any
    child, whatever its layers look like; the model is a registered submodule, so DDP
    and optimizers see its parameters.
    """

    def __init__(self, model: nn.Module, family: ModelFamily, checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing  # recompute each layer in the backward pass
        self.__dict__["runner"] = family.layer_runner(model)  # not a submodule: it only points into model

    def forward(self, input_ids: torch.Tensor, keep_hidden: bool = True, logits: bool = True) -> ForwardOutput:
        """Every layer's output when ``keep_hidden`` (else the last one's); the logits (the LM head's work) only
        when ``logits``."""
        runner = self.runner
        hidden = runner.embed(input_ids)
        context = runner.context(hidden)
        outputs = []
        for index in range(runner.num_layers):
            if self.checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(runner.layer, index, hidden, context, use_reentrant=False)
            else:
                hidden = runner.layer(index, hidden, context)
            if keep_hidden:
                outputs.append(hidden)
        return ForwardOutput(hidden=outputs or [hidden], logits=self.head(hidden) if logits else None)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the last layer's output."""
        return self.runner.head(hidden)


def shard(forward: LayerwiseForward, mesh, bf16: bool) -> None:
    """FSDP2 over ``mesh``: one unit per module a layer runs (norms, attention, MLP), the rest in the root.

    The units are the modules the layer runner calls, so their all-gathers happen where
    they run; the root (the embeddings, final norm and LM head, tied ones together) is
    ``forward`` itself. On GPU with ``bf16`` the parameters are gathered in bfloat16 and
    gradients reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gpu_bf16 = bf16 and mesh.device_type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu_bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    runner = forward.runner
    for index in range(runner.num_layers):
        for part in ("attention", "ffn"):
            for module in runner.sublayer(index, part).children():
                if next(module.parameters(), None) is not None:
                    fully_shard(module, **options)
    fully_shard(forward, **options)


class DistillationObjective:
    """The weighted sum of distillation losses; a hidden-state loss is averaged over layers."""

    def __init__(self, terms: Sequence[tuple[str, float, DistillationLoss]]):
        self.terms = [(name, weight, loss) for name, weight, loss in terms if weight > 0]
        if not self.terms:
            raise UserError(
                "gkd.losses has no term with a weight above 0, so there is nothing to train. "
                "Use the default (cosine + kl) or give at least one loss a positive weight."
            )
        names = [name for name, _, _ in self.terms]
        if len(set(names)) != len(names):
            raise UserError(f"gkd.losses names a loss more than once ({names}); merge their weights into one term.")
        self.needs_hidden = any(loss.target == "hidden" for _, _, loss in self.terms)
        self.needs_logits = any(loss.target == "logits" for _, _, loss in self.terms)

    @classmethod
    def from_config(cls, section: GKDSection, registries) -> "DistillationObjective":
        return cls([(term.name, term.weight, registries.record(term.loss).create(term.loss.options)) for term in section.losses])

    def __call__(self, student: ForwardOutput, teacher: ForwardOutput, labels: torch.Tensor):
        """``(total, {name: unweighted value})``."""
        total = 0.0
        parts: dict[str, torch.Tensor] = {}
        for name, weight, loss in self.terms:
            if loss.target == "hidden":
                value = torch.stack([loss(s, t) for s, t in zip(student.hidden, teacher.hidden)]).mean()
            else:
                value = loss(student.logits, teacher.logits, labels)
            parts[name] = value
            total = total + weight * value.float()
        return total, parts


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = 8) -> tuple[float, int]:
    """Summed KL(teacher || student) over next-token distributions, and the token count.

    ``chunk`` positions at a time, so no full-vocabulary float32 copy of either is made
    (and the temporaries stay in cache).
    """
    vocab = teacher_logits.shape[-1]
    teacher_logits, student_logits = teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab)
    total = 0.0
    for start in range(0, teacher_logits.shape[0], chunk):
        teacher = torch.log_softmax(teacher_logits[start : start + chunk].float(), dim=-1)
        student = torch.log_softmax(student_logits[start : start + chunk].float(), dim=-1)
        total += float((teacher.exp() * (teacher - student)).sum(dtype=torch.float64))
    return total, teacher_logits.shape[0]


# ---------------------------------------------------------------- schedule


def learning_rate(step: int, total_steps: int, section: GKDSection) -> float:
    """Linear warmup then cosine decay to ``lr * min_lr_fraction``; ``step`` counts from 0."""
    warmup = math.ceil(section.warmup_fraction * total_steps)
    if step < warmup:
        return section.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = section.lr * section.min_lr_fraction
    return floor + (section.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- student


def linear_module_names(model: nn.Module, within: Sequence[nn.Module] | None = None) -> list[str]:
    """Every ``nn.Linear`` except the LM head (custom linear blocks included), or only those inside ``within``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = None if within is None else {id(m) for module in within for m in module.modules()}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and not name.endswith("lm_head")
        and (inside is None or id(module) in inside)
    ]


def trainable_sublayers(
    family: ModelFamily, student: LoadedModel, parent: LoadedModel, section: GKDSection
) -> list[nn.Module] | None:
    """The sub-block modules ``gkd.trainable`` picks (``None``: every parameter trains).

    ``layers``: every layer's sub-blocks, so the embeddings, final norm and LM head stay
    the parent's (and their gradients are never computed). ``changed``: the sub-blocks
    whose variant differs from the parent's, plus (``trainable_neighbors`` > 0) every
    sub-block of the layers within that many layers of a changed one; layers before the
    first of them run without backward at all.
    """
    if section.trainable == "all":
        return None
    runner = family.layer_runner(student.model)
    child_blocks, parent_blocks = student.shape.blocks, parent.shape.blocks
    if section.trainable == "layers":
        picked = {(i, part) for i in range(runner.num_layers) for part in ("attention", "ffn")}
    else:
        changed = {
            (i, part)
            for i, (child, original) in enumerate(zip(child_blocks, parent_blocks))
            for part in ("attention", "ffn")
            if getattr(child, part).id != getattr(original, part).id
        }
        if not changed:
            raise UserError(
                "gkd.trainable is 'changed', but the child has the parent's every sub-block: nothing would train. "
                "Use gkd.trainable: layers (or all)."
            )
        reach = section.trainable_neighbors
        near = {j for i, _ in changed for j in range(i - reach, i + reach + 1)} if reach else set()
        picked = changed | {(j, part) for j in near if 0 <= j < runner.num_layers for part in ("attention", "ffn")}
    return [runner.sublayer(i, part) for i, part in sorted(picked)]


class Student:
    """The child being trained: all of its parameters or those of ``modules``, or LoRA adapters on their linear layers.

    peft injects the adapters into ``model`` in place, so ``model`` is what is run and
    checkpointed either way; :meth:`finish` merges the adapters back into the weights.
    """

    def __init__(self, model: nn.Module, section: GKDSection, modules: Sequence[nn.Module] | None = None):
        self.model = model
        self.peft = None
        if section.lora_rank <= 0:
            for parameter in model.parameters():
                parameter.requires_grad_(modules is None)
            for module in modules or ():
                for parameter in module.parameters():
                    parameter.requires_grad_(True)
            if not any(p.requires_grad for p in model.parameters()):
                raise UserError(
                    f"gkd.trainable '{section.trainable}' leaves the child no parameter to train (its chosen "
                    f"sub-blocks are all no-ops). Use gkd.trainable: layers or all."
                )
            return
        from peft import LoraConfig, get_peft_model

        targets = linear_module_names(model, modules)
        if not targets:
            raise UserError("gkd.lora_rank is set but the child has no linear layers to adapt; set gkd.lora_rank: 0.")
        config = LoraConfig(
            r=section.lora_rank,
            lora_alpha=section.lora_alpha if section.lora_alpha is not None else 2 * section.lora_rank,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
        )
        self.peft = get_peft_model(model, config)  # freezes everything but the adapters

    def finish(self) -> nn.Module:
        """The trained model with any LoRA adapters merged: plain ``nn.Linear`` modules only."""
        if self.peft is None:
            return self.model
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = self.peft.merge_and_unload()
        leftovers = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
        if leftovers:
            raise RuntimeError(f"LoRA layers left after merging: {leftovers[:3]}")
        return merged


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    plain = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_to_tuple(plain["python"]))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state split into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors, plain_state, sharded = {}, {}, []
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = _local(value).detach().cpu().contiguous()
                if _local(value) is not value:
                    sharded.append(f"{index}.{key}")
            else:
                plain_state.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"], "sharded": sharded}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) tensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict] = {int(k): dict(v) for k, v in plain["state"].items()}
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = set(plain.get("sharded", ()))
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            if f"{index}.{key}" in sharded:  # this rank's shard of a DTensor, like its parameter
                from torch.distributed.tensor import DTensor

                like = parameters[int(index)]
                value = DTensor.from_local(value.to(like.device), like.device_mesh, like.placements, run_check=False,
                                           shape=like.shape, stride=like.stride())
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (shared ones once), detached copies on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``directory``."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, log: GKDLog, fingerprint: str) -> Path:
    """Write ``step_<N>/`` (weights, optimizer, RNG as safetensors; the rest as JSON), then drop older ones."""
    from safetensors.torch import save_file

    target = directory / f"{CHECKPOINT_PREFIX}{step:07d}"
    optim_tensors, optim_plain = _optimizer_tensors(optimizer)
    rng_tensors, rng_plain = _rng_state()
    for filename, tensors in (
        ("model.safetensors", trainable_state(model)),
        ("optimizer.safetensors", {**optim_tensors, **rng_tensors}),
    ):
        with atomic_path(target / filename) as tmp:
            save_file(tensors, str(tmp))
    atomic_write_json(
        target / STATE_FILE,
        {
            "step": step,
            "fingerprint": fingerprint,
            "optimizer": optim_plain,
            "rng": rng_plain,
            "log": CONVERTER.unstructure(log),
        },
    )
    for old in directory.glob(CHECKPOINT_PREFIX + "*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> tuple[int, GKDLog]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns ``(step, log)``."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "model.safetensors"))
    parameters = dict(model.named_parameters())
    missing = sorted(set(weights) ^ {n for n, p in parameters.items() if p.requires_grad})
    if missing:
        raise UserError(
            f"Checkpoint {path} does not match the child being trained (e.g. {missing[0]}). "
            f"Delete {path.parent} to start this child's GKD over."
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    extra = load_file(str(path / "optimizer.safetensors"))
    _load_optimizer(optimizer, extra, state["optimizer"])
    _set_rng_state(extra, state["rng"])
    return int(state["step"]), CONVERTER.structure(state["log"], GKDLog)


def save_sharded_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, log: GKDLog,
                            fingerprint: str) -> Path:
    """Every rank writes its shards of ``step_<N>/`` (``*.rank<R>.*``); rank 0 writes the state file last."""
    from safetensors.torch import save_file

    rank, size = world()
    target = directory / f"{CHECKPOINT_PREFIX}{step:07d}"
    optim_tensors, optim_plain = _optimizer_tensors(optimizer)
    rng_tensors, rng_plain = _rng_state()
    weights = {n: _local(p).detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for filename, tensors in ((f"model.rank{rank}.safetensors", weights),
                              (f"optimizer.rank{rank}.safetensors", {**optim_tensors, **rng_tensors})):
        with atomic_path(target / filename) as tmp:
            save_file(tensors, str(tmp))
    atomic_write_json(target / f"state.rank{rank}.json", {"optimizer": optim_plain, "rng": rng_plain})
    barrier()  # every shard is on disk before the state file says the checkpoint is complete
    if rank == 0:
        atomic_write_json(target / STATE_FILE, {"step": step, "fingerprint": fingerprint, "world_size": size,
                                                "sharded": True, "log": CONVERTER.unstructure(log)})
        for old in directory.glob(CHECKPOINT_PREFIX + "*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer) -> tuple[int, GKDLog]:
    """Restore this rank's shards of a checkpoint written by :func:`save_sharded_checkpoint`."""
    from safetensors.torch import load_file

    rank, size = world()
    state = json.loads((path / STATE_FILE).read_text())
    if not state.get("sharded") or state.get("world_size") != size:
        raise UserError(
            f"Checkpoint {path} was written by {state.get('world_size', 1)} process(es) "
            f"({'sharded' if state.get('sharded') else 'not sharded'}); this run has {size} with gkd.sharding fsdp. "
            f"Resume with the same processes and sharding, or delete {path.parent} to start this child over."
        )
    weights = load_file(str(path / f"model.rank{rank}.safetensors"))
    parameters = dict(model.named_parameters())
    if set(weights) != {n for n, p in parameters.items() if p.requires_grad}:
        raise UserError(f"Checkpoint {path} does not match the child being trained. Delete {path.parent} to start "
                        f"this child's GKD over.")
    with torch.no_grad():
        for name, tensor in weights.items():
            _local(parameters[name]).copy_(tensor)
    extra = load_file(str(path / f"optimizer.rank{rank}.safetensors"))
    plain = json.loads((path / f"state.rank{rank}.json").read_text())
    _load_optimizer(optimizer, extra, plain["optimizer"])
    _set_rng_state(extra, plain["rng"])
    return int(state["step"]), CONVERTER.structure(state["log"], GKDLog)


# ---------------------------------------------------------------- training


class GKDDiverged(UserError):
    """The objective or its gradient became NaN/inf."""


@attrs.frozen
class DistillRun:
    """What :func:`distill` needs besides the models: data, where to write, identity."""

    corpus: Any  # puzzle_core.data.TokenizedCorpus: .batches(split, seq_len, batch_size, max_tokens, seed)
    seq_len: int
    seed: int
    checkpoint_dir: Path
    fingerprint: str  # checkpoints with another fingerprint belong to another child or layout
    label: str = "GKD"
    local_rank: int = 0  # this process's GPU among the node's (from the executor's process role)


def _micro_batches(run: DistillRun, section: GKDSection, skip: int) -> Iterator[torch.Tensor]:
    """The training stream of micro-batches (all ranks'), without the first ``skip``."""
    stream = run.corpus.batches("train", run.seq_len, section.batch_size, section.tokens, run.seed)
    for index, batch in enumerate(stream):
        if index >= skip:
            yield batch


def validation_kl(student: LayerwiseForward, teacher: LayerwiseForward, batches, device, autocast,
                  teacher_cache: dict[int, torch.Tensor] | None = None) -> float:
    """Mean per-token KL(teacher || student) over ``batches``, each rank taking every ``size``-th batch.

    With a ``teacher_cache`` (a dict kept between calls on the same batches) the teacher's
    last hidden states are stored on first use, so later validations run only its LM head.
    """
    rank, size = world()
    kl_sum, count = 0.0, 0
    was_training = student.training
    student.eval()
    with torch.no_grad(), autocast():
        # Every rank runs as many forwards as the others (sharded models gather weights together);
        # a rank past the last batch runs the first one again and does not count it.
        for start in range(0, len(batches), size):
            index = start + rank
            ids = batches[index if index < len(batches) else 0].to(device)
            if teacher_cache is None:
                teacher_logits = teacher(ids, keep_hidden=False).logits
            else:
                if index not in teacher_cache:
                    teacher_cache[index] = teacher(ids, keep_hidden=False, logits=False).hidden[-1]
                teacher_logits = teacher.head(teacher_cache[index])
            kl, n = token_kl(teacher_logits, student(ids, keep_hidden=False).logits)
            if index < len(batches):
                kl_sum, count = kl_sum + kl, count + n
    student.train(was_training)
    kl_sum, count = _all_sum([kl_sum, count], device)
    return kl_sum / max(1, count)


def _diverged(run: DistillRun, section: GKDSection, step: int, loss: float, grad_norm: float) -> GKDDiverged:
    last = latest_checkpoint(run.checkpoint_dir)
    kept = f"The last good checkpoint is {last}; " if last else "No checkpoint was written yet; "
    return GKDDiverged(
        f"{run.label} diverged at step {step}: loss {loss}, gradient norm {grad_norm}. {kept}lower gkd.lr "
        f"(now {section.lr}) or set gkd.bf16: false, then rerun with --resume to continue from the last good "
        f"checkpoint."
    )


class _Training:
    """One child's uptraining: the models on the device, the optimizer, the data, one step at a time."""

    def __init__(self, student: LoadedModel, teacher: LoadedModel, family: ModelFamily,
                 objective: DistillationObjective, section: GKDSection, run: DistillRun):
        self.rank, self.size = world()
        self.section, self.run, self.objective, self.family = section, run, objective, family
        self.device = resolve_device(section.device, run.local_rank, "gkd.device")
        self.tokens_per_step = section.batch_size * run.seq_len * section.grad_accum * self.size
        self.total_steps = section.tokens // self.tokens_per_step
        if self.total_steps < 1:
            raise UserError(
                f"gkd.tokens ({section.tokens}) is less than one optimizer step ({section.batch_size} sequences x "
                f"{run.seq_len} tokens x {section.grad_accum} accumulation x {self.size} processes = "
                f"{self.tokens_per_step} tokens). Raise gkd.tokens or lower gkd.batch_size."
            )
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if section.bf16 else nullcontext
        self.fsdp = _distributed() and section.sharding == "fsdp"
        if self.fsdp and section.lora_rank:
            raise UserError("gkd.lora_rank with gkd.sharding: fsdp is not supported; use sharding: ddp for LoRA, or "
                            "full fine-tuning (lora_rank: 0) with fsdp.")
        # Sharding moves each unit to the device as it shards it: the whole model never has to fit there.
        place = (lambda model: model) if self.fsdp else (lambda model: model.to(self.device))
        self.student = Student(place(student.model), section, trainable_sublayers(family, student, teacher, section))
        self.student.model.train()
        self.forward = LayerwiseForward(self.student.model, family, section.activation_checkpointing)
        # Sharding changes a model in place: the caller's teacher (the run's parent) is left as it was.
        teacher_model = copy.deepcopy(teacher.model) if self.fsdp else teacher.model
        self.teacher = LayerwiseForward(place(teacher_model), family).eval()
        self.trained = self.forward
        self.teacher_cache: dict[int, torch.Tensor] | None = {}  # the teacher's last hidden states on validation
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            model = self.student.model  # what it takes to rebuild the trained child whole at the end
            self.whole = (type(model), model.config, next(model.parameters()).dtype,
                          {name: b.detach().cpu().clone() for name, b in model.named_buffers()})
            mesh = init_device_mesh(self.device.type, (self.size,))
            shard(self.forward, mesh, section.bf16)
            shard(self.teacher, mesh, section.bf16)
            self.teacher_cache = None  # the teacher's head runs inside its forward only
        elif _distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.forward, device_ids=ids)
        self.parameters = [p for p in self.student.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=section.lr, weight_decay=section.weight_decay)
        available = run.corpus.num_sequences("validation", run.seq_len) * run.seq_len
        self.validation = list(run.corpus.batches(
            "validation", run.seq_len, section.batch_size, min(section.validation_tokens, available), run.seed
        ))

    def validate(self, forward: LayerwiseForward) -> float:
        """Mean per-token KL(parent || child) on the validation batches, shared among the ranks."""
        kl = validation_kl(forward, self.teacher, self.validation, self.device, self.autocast, self.teacher_cache)
        if self.fsdp:  # no backward follows these forwards: shard what they gathered again
            from torch.distributed.fsdp import FSDPModule

            for module in [*forward.modules(), *self.teacher.modules()]:
                if isinstance(module, FSDPModule):
                    module.reshard()
        return kl

    def step(self, step: int, micro: Iterator[torch.Tensor]) -> TrainPoint | None:
        """One optimizer step over ``grad_accum`` micro-batches per rank; ``None`` when the data ran out."""
        section, objective = self.section, self.objective
        lr = learning_rate(step, self.total_steps, section)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, **{name: 0.0 for name, _, _ in objective.terms}}
        batches = 0
        for k in range(section.grad_accum):
            dealt = [next(micro, None) for _ in range(self.size)]  # round-robin over the ranks
            if dealt[self.rank] is None:
                break
            ids = dealt[self.rank].to(self.device)
            last = k == section.grad_accum - 1
            if self.fsdp:
                self.trained.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch only
            with nullcontext() if last or not _distributed() or self.fsdp else self.trained.no_sync():
                with torch.no_grad(), self.autocast():
                    target = self.teacher(ids, keep_hidden=objective.needs_hidden, logits=objective.needs_logits)
                with self.autocast():
                    output = self.trained(ids, keep_hidden=objective.needs_hidden, logits=objective.needs_logits)
                    loss, parts = objective(output, target, ids)
                (loss / section.grad_accum).backward()
            for name, value in (("loss", loss), *parts.items()):
                sums[name] += float(value.detach())
            batches += 1
        if batches == 0:
            return None
        totals = _all_sum([*sums.values(), batches], self.device)
        means = {name: total / totals[-1] for name, total in zip(sums, totals)}
        grad_norm = 0.0
        if section.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, section.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm)):
            raise _diverged(self.run, section, step + 1, means["loss"], grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = means.pop("loss")
        return TrainPoint(step + 1, (step + 1) * self.tokens_per_step, lr, loss, means)

    def save(self, step: int, log: GKDLog) -> None:
        if self.fsdp:
            save_sharded_checkpoint(self.run.checkpoint_dir, step, self.student.model, self.optimizer, log,
                                    self.run.fingerprint)
            return
        if self.rank == 0:
            save_checkpoint(self.run.checkpoint_dir, step, self.student.model, self.optimizer, log, self.run.fingerprint)
        barrier()

    def load(self, checkpoint: Path) -> tuple[int, GKDLog]:
        load = load_sharded_checkpoint if self.fsdp else load_checkpoint
        return load(checkpoint, self.student.model, self.optimizer)

    def gathered(self) -> nn.Module | None:
        """The sharded child gathered whole on rank 0 (``None`` on the others), as an ordinary model on the CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.forward, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        model_class, config, dtype, buffers = self.whole
        with torch.device("meta"):
            model = model_class(config)
        model = model.to_empty(device="cpu").to(dtype)
        state = {name.removeprefix("model."): tensor for name, tensor in full.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"gathering the sharded child: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if tied:
            model.tie_weights()
        with torch.no_grad():
            for name, buffer in buffers.items():
                model.get_buffer(name).copy_(buffer)
        return model.eval()


def distill(
    student: LoadedModel,
    teacher: LoadedModel,
    family: ModelFamily,
    objective: DistillationObjective,
    section: GKDSection,
    run: DistillRun,
) -> tuple[nn.Module, GKDLog, dict]:
    """Uptrain ``student`` against ``teacher``; resumes from ``run.checkpoint_dir`` when it can.

    Returns the trained model (LoRA merged; with FSDP gathered on rank 0, ``None`` on the others), the curves, and ``{"steps", "tokens",
    "train_seconds"}``. Raises :class:`GKDDiverged` on a NaN/inf loss, leaving the last
    good checkpoint in place. The teacher is moved back to its device afterwards.
    """
    teacher_device = next(teacher.model.parameters()).device
    try:
        return _distill(_Training(student, teacher, family, objective, section, run))
    finally:
        teacher.model.to(teacher_device)


def _distill(training: _Training) -> tuple[nn.Module, GKDLog, dict]:
    section, run = training.section, training.run
    checkpoint = latest_checkpoint(run.checkpoint_dir)
    if checkpoint is not None and json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprint") != run.fingerprint:
        checkpoint = None  # another child or data layout: start over
    if checkpoint is not None:
        step, log = training.load(checkpoint)
    else:
        step, log = 0, GKDLog(validation=[ValidationPoint(0, 0, training.validate(training.forward))])

    every_validation = section.validate_every or section.checkpoint_every
    micro = _micro_batches(run, section, skip=step * section.grad_accum * training.size)
    bar = tqdm(total=training.total_steps, initial=step, desc=run.label, unit="step", file=sys.stderr,
               disable=training.rank != 0, dynamic_ncols=True)
    started, first_step = time.perf_counter(), step
    with bar:
        while step < training.total_steps:
            point = training.step(step, micro)
            if point is None:
                break  # the corpus ran out before the token budget
            step = point.step
            log.train.append(point)
            if step < training.total_steps and step % every_validation == 0:
                log.validation.append(ValidationPoint(step, point.tokens, training.validate(training.forward)))
            if step < training.total_steps and step % section.checkpoint_every == 0:
                training.save(step, log)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{point.loss:.4f}", val_kl=f"{log.validation[-1].kl:.4f}",
                            tok_s=f"{(step - first_step) * training.tokens_per_step / max(elapsed, 1e-9):.0f}")
            bar.update(1)
    seconds = time.perf_counter() - started

    tokens = step * training.tokens_per_step
    if training.fsdp:
        log.validation.append(ValidationPoint(step, tokens, training.validate(training.forward)))
        final = training.gathered()
    else:
        final = training.student.finish().eval()
        log.validation.append(ValidationPoint(step, tokens, training.validate(LayerwiseForward(final, training.family))))
    return final, log, {"steps": step, "tokens": tokens, "train_seconds": seconds}
