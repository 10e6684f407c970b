"""An lm-eval model that reads each question once, however many answers it has.

lm-eval's ``HFLM`` scores a multiple-choice question by running ``context + answer`` once
per answer, in batches padded to their longest sequence, and takes a log-softmax over
the whole vocabulary at every position. :class:`SharedContextLM` gives the same
log-likelihoods from less work:

- requests with the same context (the answers of one question) form a *unit*: the
  context (minus its last token) once, then each answer (that last context token and
  the answer's tokens) as its own segment;
- units are packed, longest first, into rows of at most ``batch_tokens`` tokens
  (first fit), so there is no padding; one forward per row, with an attention mask
  that lets every segment see its own unit's context and itself only, and positions
  that restart for each answer where the context ends;
- the LM head and the log-softmax only see the positions that are scored.

A request alone with its context (Winogrande's, whose contexts differ per answer) is a
unit of one plain segment. Each row's mask is ``(length, length)``, so attention costs
grow with ``batch_tokens``; a few hundred tokens keep it small next to the rest of the
model. lm-eval's task, request and metric code is untouched: only
``_loglikelihood_tokens`` is replaced, which ``loglikelihood`` and
``loglikelihood_rolling`` both call. The model must take the Hugging Face causal-LM
keyword arguments ``attention_mask`` (an additive 4-D mask, which transformers' eager
and SDPA attention accept as given), ``position_ids`` and ``logits_to_keep``.
"""

from __future__ import annotations

import sys
from typing import Sequence

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
    """Requests sharing ``prefix``: it is read once, then each request's tokens continue it."""

    prefix: tuple[int, ...]
    rows: tuple[Row, ...]

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(len(row.tokens) for row in self.rows)


def plan_units(requests: Sequence[Request], max_length: int) -> list[Unit]:
    """Group requests by the context they read.

    Each request reads ``(context + continuation)[-(max_length + 1):][:-1]`` and is
    scored on its continuation, exactly as ``HFLM`` truncates it. Within a unit of two
    or more, the prefix is the shared context without its last token, so every request
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
    return units


def pack(units: Sequence[Unit], capacity: int) -> list[list[Unit]]:
    """Units into rows of at most ``capacity`` tokens: longest first, each into the first row with room.

    A unit longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: (-u.size, u.prefix)):
        slot = next((i for i, free in enumerate(room) if unit.size <= free), None)
        if slot is None:
            rows.append([unit])
            room.append(capacity - unit.size)
        else:
            rows[slot].append(unit)
            room[slot] -= unit.size
    return rows


@attrs.frozen
class PackedRow:
    """One forward's input: token ids, positions, the additive attention mask and where each request is scored."""

    ids: torch.Tensor  # (1, length)
    positions: torch.Tensor  # (1, length)
    mask: torch.Tensor  # (1, 1, length, length): 0 where a token may attend, the dtype's minimum elsewhere
    scored: torch.Tensor  # (n,) positions whose next-token predictions are scored, in ``requests`` order
    requests: tuple[Row, ...]


def packed_row(units: Sequence[Unit], dtype: torch.dtype) -> PackedRow:
    """Lay ``units`` out one after another; a context attends causally to itself, an answer to its context and itself."""
    ids, positions, unit_of, segment_of, context, scored, requests = [], [], [], [], [], [], []
    for number, unit in enumerate(units):
        ids += unit.prefix
        positions += range(len(unit.prefix))
        unit_of += [number] * len(unit.prefix)
        segment_of += [number] * len(unit.prefix)  # contexts: segments >= 0; answers: < 0
        context += [True] * len(unit.prefix)
        for row in unit.rows:
            start = len(ids)
            ids += row.tokens
            positions += range(len(unit.prefix), len(unit.prefix) + len(row.tokens))
            unit_of += [number] * len(row.tokens)
            segment_of += [-1 - len(requests)] * len(row.tokens)
            context += [False] * len(row.tokens)
            scored += range(start + len(row.tokens) - row.scored, start + len(row.tokens))
            requests.append(row)
    unit_of, segment_of, context = (torch.tensor(v) for v in (unit_of, segment_of, context))
    length = len(ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (unit_of[:, None] == unit_of[None, :]) & (
        (segment_of[:, None] == segment_of[None, :]) | context[None, :])
    mask = torch.zeros(length, length, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return PackedRow(torch.tensor([ids]), torch.tensor([positions]), mask[None, None], torch.tensor(scored),
                     tuple(requests))


class SharedContextLM(HFLM):
    """``HFLM`` scoring log-likelihood requests from packed rows (see the module doc)."""

    def __init__(self, *args, batch_tokens: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens
        self.label = "log-likelihoods"  # the progress bar's title; the evaluator names the task
        self.tokens_read = 0  # tokens through the model, for cost reports

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = pack(plan_units(requests, self.max_length), self.batch_tokens)
        with tqdm(total=len(requests), desc=self.label, unit="req", file=sys.stderr, dynamic_ncols=True,
                  disable=disable_tqdm or self.rank != 0, leave=False) as bar:
            for units in rows:
                for index, answer in self._score(units):
                    results[index] = answer
                    strings = requests[index][0]
                    if strings is not None:  # rolling windows have none; lm-eval caches those per document
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                bar.update(sum(len(u.rows) for u in units))
        return results

    @torch.no_grad()
    def _score(self, units: list[Unit]) -> list[tuple[int, tuple[float, bool]]]:
        dtype = next(self.model.parameters()).dtype
        row = packed_row(units, dtype if dtype.is_floating_point else torch.float32)
        device = self.device
        logits = self.model(
            input_ids=row.ids.to(device),
            attention_mask=row.mask.to(device),
            position_ids=row.positions.to(device),
            use_cache=False,
            logits_to_keep=row.scored.to(device),
        ).logits[0]
        self.tokens_read += row.ids.shape[1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor([t for request in row.requests for t in request.targets], device=log_probs.device)
        token_ll = log_probs.gather(1, targets[:, None]).squeeze(1)
        hits = log_probs.argmax(dim=-1) == targets
        scored, start = [], 0
        for request in row.requests:
            end = start + request.scored
            scored.append((request.index, (float(token_ll[start:end].sum()), bool(hits[start:end].all()))))
            start = end
        return scored
