"""Activation capture: what every parent sub-block sees and produces, stored once for BLD.

The parent runs once over the library's training tokens (and a held-out slice of the
validation split). Tokens are cut into shards of ``shard_tokens``; a shard goes through
the model one layer at a time and, per layer, one safetensors file stores

- ``hidden``:   the residual stream entering the layer (what attention receives),
- ``attn_out``: what the parent's attention sub-block adds to it,
- ``ffn_out``:  what the parent's FFN sub-block adds after that,

each ``(sequences, seq_len, hidden)`` in ``activation_dtype``. The FFN's input is
``hidden + attn_out`` and the whole layer's delta ``attn_out + ffn_out``. Capturing a
shard holds one shard of one layer (plus the running residual) in memory, never a whole
model's activations. Shards are independent jobs, run by the library's executor.

Layout (under ``activations/<key>/``, ``key`` a hash of everything that changes the
numbers, so a changed config never reads stale activations)::

    meta.json                          the capture settings and the shard plan
    layer_007/train_00003.safetensors  one layer of one shard
    shards/train_00003.json            written last: the shard is complete (file sizes)
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puzzle_core.config import stable_hash, unstructure
from puzzle_core.dtypes import torch_dtype
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Job, LayerRunner
from puzzle_core.layout import activations_dir
from puzzle_core.rundir import RunDir, atomic_path, atomic_write_json

TENSORS = ("hidden", "attn_out", "ffn_out")
Split = Literal["train", "heldout"]
CORPUS_SPLITS: dict[str, str] = {"train": "train", "heldout": "validation"}


class ActivationWarning(UserWarning):
    """A stored activation file was damaged and is being captured again."""


@attrs.frozen
class CaptureSettings:
    """Everything that determines the captured numbers (its hash names the folder)."""

    parent: Any  # the run's parent section, unstructured
    data: Any  # the run's data section, unstructured
    seed: int
    seq_len: int
    train_tokens: int
    heldout_tokens: int
    shard_tokens: int
    dtype: str

    @property
    def key(self) -> str:
        return stable_hash(unstructure(self))

    @property
    def shard_sequences(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)

    @classmethod
    def from_config(cls, config) -> "CaptureSettings":
        section = config.library
        return cls(
            parent=unstructure(config.parent),
            data=unstructure(config.data),
            seed=config.seed,
            seq_len=section.seq_len or config.data.seq_len,
            train_tokens=section.tokens,
            heldout_tokens=section.heldout_tokens,
            shard_tokens=section.shard_tokens,
            dtype=section.activation_dtype,
        )


@attrs.frozen(eq=False)
class Shard:
    """One shard of token sequences and where its activations go."""

    split: Split
    index: int
    input_ids: Any  # (sequences, seq_len) LongTensor

    @property
    def name(self) -> str:
        return f"{self.split}_{self.index:05d}"

    @property
    def sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


class ActivationStore:
    """The captured activations of one run and capture config."""

    def __init__(self, run_dir: RunDir, settings: CaptureSettings, num_layers: int):
        self.run_dir = run_dir
        self.settings = settings
        self.num_layers = num_layers
        self.root = activations_dir(run_dir, settings.key)
        self.shards: list[Shard] = []

    # ------------------------------------------------------------------ planning

    def plan(self, corpus) -> list[Shard]:
        """Cut the training and held-out tokens into shards (deterministic in the run seed)."""
        settings = self.settings
        shards: list[Shard] = []
        for split, tokens in (("train", settings.train_tokens), ("heldout", settings.heldout_tokens)):
            if tokens <= 0:
                continue
            sequences = math.ceil(tokens / settings.seq_len)
            if split == "heldout":  # one pass at most: repeated held-out sequences would only add weight
                sequences = min(sequences, corpus.num_sequences(CORPUS_SPLITS[split], settings.seq_len))
            batches = corpus.batches(
                CORPUS_SPLITS[split],
                settings.seq_len,
                settings.shard_sequences,
                max_tokens=sequences * settings.seq_len,
                seed=settings.seed + (0 if split == "train" else 1),
            )
            shards += [Shard(split, index, ids.contiguous()) for index, ids in enumerate(batches)]
        self.shards = shards
        return shards

    def jobs(self) -> list[Job]:
        """One capture job per shard; its cost is its token count."""
        return [Job(id=f"capture/{s.name}", cost=float(s.tokens), payload=s) for s in self.shards]

    def write_meta(self, hidden_size: int) -> None:
        meta = {
            "key": self.settings.key,
            "settings": unstructure(self.settings),
            "num_layers": self.num_layers,
            "hidden_size": hidden_size,
            "tensors": list(TENSORS),
            "shards": [{"name": s.name, "split": s.split, "sequences": s.sequences} for s in self.shards],
        }
        path = self.root / "meta.json"
        if not path.is_file() or json.loads(path.read_text()) != meta:
            atomic_write_json(path, meta)

    # ------------------------------------------------------------------ files

    def layer_file(self, layer: int, shard: Shard) -> Path:
        return self.root / f"layer_{layer:03d}" / f"{shard.name}.safetensors"

    def _record_file(self, shard: Shard) -> Path:
        return self.root / "shards" / f"{shard.name}.json"

    def is_complete(self, shard: Shard) -> bool:
        """Whether every layer file of ``shard`` is there with the size recorded when it was written."""
        record_path = self._record_file(shard)
        if not record_path.is_file():
            return False
        try:
            record = json.loads(record_path.read_text())
            sizes = record["bytes"]
            if record["key"] != self.settings.key or len(sizes) != self.num_layers:
                return False
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            sizes = None
        damaged = sizes is None or any(
            not self.layer_file(i, shard).is_file() or self.layer_file(i, shard).stat().st_size != size
            for i, size in enumerate(sizes)
        )
        if damaged:
            warnings.warn(
                f"Activation shard {shard.name} in {self.root} is damaged (missing or truncated files); "
                f"capturing it again.",
                ActivationWarning,
                stacklevel=2,
            )
            record_path.unlink(missing_ok=True)
        return not damaged

    def load(self, layer: int, shard: Shard) -> dict[str, torch.Tensor]:
        path = self.layer_file(layer, shard)
        try:
            return load_file(path)
        except (OSError, SafetensorError) as exc:
            raise UserError(
                f"Activation file {path} cannot be read ({exc}). Delete {self.root} and re-run with --resume "
                f"to capture the activations again."
            ) from None

    def split_shards(self, split: Split) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def remove_others(self) -> None:
        """Delete activations captured under other configs (the driver calls this once all jobs ended)."""
        for folder in activations_dir(self.run_dir).glob("*"):
            if folder.is_dir() and folder != self.root:
                shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(activations_dir(self.run_dir), ignore_errors=True)

    # ------------------------------------------------------------------ capture

    @torch.inference_mode()
    def capture(self, runner: LayerRunner, shard: Shard, batch_size: int, device: torch.device) -> None:
        """Run the parent (on ``device``) over ``shard`` one layer at a time, writing one file per layer."""
        if self.is_complete(shard):
            return
        dtype = torch_dtype(self.settings.dtype)
        chunks = [ids.to(device) for ids in shard.input_ids.split(batch_size)]
        hidden = [runner.embed(ids) for ids in chunks]
        contexts = {}

        def context(h):
            key = tuple(h.shape)
            if key not in contexts:
                contexts[key] = runner.context(h)
            return contexts[key]

        sizes = []
        for layer in range(self.num_layers):
            attention, ffn = runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn")
            attn_out = [attention(h, context(h)) for h in hidden]
            mid = [h + a for h, a in zip(hidden, attn_out)]
            ffn_out = [ffn(m, context(m)) for m in mid]
            tensors = {
                "hidden": torch.cat(hidden),
                "attn_out": torch.cat(attn_out),
                "ffn_out": torch.cat(ffn_out),
            }
            path = self.layer_file(layer, shard)
            with atomic_path(path) as tmp:
                save_file({k: v.to(dtype).cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            sizes.append(path.stat().st_size)
            hidden = [m + f for m, f in zip(mid, ffn_out)]
        atomic_write_json(self._record_file(shard), {"key": self.settings.key, "bytes": sizes})

    # ------------------------------------------------------------------ reading for training

    def calibration(self, layer: int, tokens: int) -> dict[str, torch.Tensor] | None:
        """The first ``tokens`` training tokens of ``layer`` as float32 ``(tokens, hidden)`` tensors."""
        if tokens <= 0:
            return None
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
        taken = 0
        for shard in self.split_shards("train"):
            data = self.load(layer, shard)
            for name in TENSORS:
                parts[name].append(data[name].reshape(-1, data[name].shape[-1]))
            taken += shard.tokens
            if taken >= tokens:
                break
        return {name: torch.cat(chunks)[:tokens].float() for name, chunks in parts.items()}

    def batches(
        self, layer: int, split: Split, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` sequences of ``layer``'s tensors (float32), shard by shard.

        With a ``generator`` the shard order and the sequences within each shard are
        shuffled by it (training); without one the order is fixed (evaluation).
        """
        shards = self.split_shards(split)
        if generator is not None:
            shards = [shards[i] for i in torch.randperm(len(shards), generator=generator).tolist()]
        for shard in shards:
            data = {name: tensor.float() for name, tensor in self.load(layer, shard).items()}  # once per shard
            count = data["hidden"].shape[0]
            order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
            for start in range(0, count, batch_size):
                rows = order[start : start + batch_size]
                yield {name: data[name][rows] for name in TENSORS}

    def steps(self, split: Split, batch_size: int) -> int:
        """How many batches :meth:`batches` yields for ``split``."""
        return sum(math.ceil(s.sequences / batch_size) for s in self.split_shards(split))

    def tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.split_shards(split))
