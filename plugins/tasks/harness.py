"""An lm-eval model that reads each question once, however many answers it has.

lm-eval's ``HFLM`` scores a multiple-choice question by running ``context + answer`` once
per answer, padded to the longest sequence of its batch, and takes a log-softmax over
the whole vocabulary at every position. :class:`SharedContextLM` gives the same
log-likelihoods from less work:

- requests with the same context (the answers of one question) form a *unit*; the
  context minus its last token is run once with the KV cache on, and every answer
  (that last context token, then the answer's tokens) runs on a copy of that cache;
- units are sorted by length and packed into batches of at most ``batch_tokens``
  padded tokens, so a batch pads little and the CPU or GPU gets large matrices;
- the LM head and the log-softmax only see the positions that are scored.

A request alone with its context (Winogrande's, whose contexts differ per answer) is
one plain row. lm-eval's task, request and metric code is untouched: only
``_loglikelihood_tokens`` is replaced, which ``loglikelihood`` and
``loglikelihood_rolling`` both call. The model must take the Hugging Face causal-LM
keyword arguments (``attention_mask``, ``position_ids``, ``cache``, ``use_cache``,
``logits_to_keep``), as every transformers model does.
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence

import attrs
import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


@attrs.frozen
class Row:
    """One request: the tokens it reads after its unit's prefix; the last ``scored`` of them predict ``targets``."""

    index: int  # position in the request list
    tokens: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def scored(self) -> int:
        return len(self.targets)


@attrs.frozen
class Unit:
    """Requests sharing ``prefix``: it is read once, then each row continues it."""

    prefix: tuple[int, ...]
    rows: tuple[Row, ...]

    @property
    def width(self) -> int:
        return max(len(row.tokens) for row in self.rows)


def plan_units(requests: Sequence[Request], max_length: int) -> list[Unit]:
    """Group requests by the context they read; longest first.

    Each request reads ``(context + continuation)[-(max_length + 1):][:-1]`` and is
    scored on its continuation, exactly as ``HFLM`` truncates it. Within a unit of two
    or more, the prefix is the shared context without its last token, so every row
    still starts at the position whose prediction is its first answer token.
    """
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {}
    for index, (_, context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError("lm-eval sent a request with an empty continuation")
        whole = tuple((list(context) + list(continuation))[-(max_length + 1):])
        scored = min(len(continuation), len(whole) - 1)
        groups.setdefault(whole[: len(whole) - scored], []).append((index, whole[:-1], whole[-scored:]))
    units = []
    for context, members in groups.items():
        shared = len(context) - 1 if len(members) > 1 else 0
        rows = tuple(Row(index, reads[shared:], targets) for index, reads, targets in members)
        units.append(Unit(context[:shared], rows))
    return sorted(units, key=lambda u: (-(len(u.prefix) + u.width), -len(u.rows), u.prefix))


def pack(units: Sequence[Unit], batch_tokens: int) -> Iterator[list[Unit]]:
    """Consecutive units in batches whose padded size (prefixes + rows) stays within ``batch_tokens``."""
    batch: list[Unit] = []
    for unit in units:
        candidate = [*batch, unit]
        prefix = max(len(u.prefix) for u in candidate)
        width = max(u.width for u in candidate)
        padded = len(candidate) * prefix + sum(len(u.rows) for u in candidate) * width
        if batch and padded > batch_tokens:
            yield batch
            candidate = [unit]
        batch = candidate
    if batch:
        yield batch


class SharedContextLM(HFLM):
    """``HFLM`` with :func:`plan_units` + :func:`pack` batching for log-likelihood requests."""

    def __init__(self, *args, batch_tokens: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens
        self.label = "log-likelihoods"  # the progress bar's title; the evaluator names the task
        self.tokens_read = 0  # real (unpadded) tokens through the model, for cost reports

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        units = plan_units(requests, self.max_length)
        with tqdm(total=len(requests), desc=self.label, unit="req", file=sys.stderr, dynamic_ncols=True,
                  disable=disable_tqdm or self.rank != 0, leave=False) as bar:
            for batch in pack(units, self.batch_tokens):
                for index, answer in self._score(batch):
                    results[index] = answer
                    strings = requests[index][0]
                    if strings is not None:  # rolling windows have none; lm-eval caches those per document
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                bar.update(sum(len(u.rows) for u in batch))
        return results

    @torch.no_grad()
    def _score(self, units: list[Unit]) -> list[tuple[int, tuple[float, bool]]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.device
        prefix_width = max(len(u.prefix) for u in units)
        rows = [(u, row) for u, unit in enumerate(units) for row in unit.rows]
        width = max(len(row.tokens) for _, row in rows)
        cache = None
        if prefix_width:
            # right padding needs no mask here: a real token never attends to the pads after it
            ids = torch.full((len(units), prefix_width), pad, dtype=torch.long)
            for u, unit in enumerate(units):
                ids[u, : len(unit.prefix)] = torch.tensor(unit.prefix)
            cache = self.model(input_ids=ids.to(device), use_cache=True, logits_to_keep=1).cache
            cache.batch_select_indices(torch.tensor([u for u, _ in rows], device=device))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_width + width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (u, row) in enumerate(rows):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
            mask[r, : len(units[u].prefix)] = 1  # the pads of a shorter prefix are masked out
            mask[r, prefix_width:] = 1
            positions[r] = len(units[u].prefix) + torch.arange(width)
        keep = width - min(len(row.tokens) - row.scored for _, row in rows)  # last columns holding a scored position
        logits = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device) if prefix_width else None,
            position_ids=positions.to(device),
            cache=cache,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        self.tokens_read += sum(len(u.prefix) for u in units) + sum(len(row.tokens) for _, row in rows)
        scored = []
        for r, (_, row) in enumerate(rows):
            end = len(row.tokens) - width + keep  # column after this row's last real token, among the kept ones
            log_probs = torch.log_softmax(logits[r, end - row.scored : end].float(), dim=-1)
            targets = torch.tensor(row.targets, device=log_probs.device)
            greedy = bool((log_probs.argmax(dim=-1) == targets).all())
            scored.append((row.index, (float(log_probs.gather(1, targets[:, None]).sum()), greedy)))
        return scored
