"""Text corpora: split into train / validation / test, tokenise, batch.

``data.corpus`` in a run config names a corpus plugin (``puzzle_corpora``: ``demo``,
``synthetic``, ``files``...) or is a path, read by the ``files`` corpus. A corpus gives
documents (:class:`CorpusText`), per split when it defines them; the core cuts them into
chunks of about :data:`CHUNK_CHARS` characters at paragraph breaks and deals each chunk of
unsplit text to a split by a hash of its content, so the split does not depend on file
order or on the run seed.

Tokenised splits are cached under the user cache (:func:`puzzle_core.cache.cache_root`),
keyed by the source's content and the tokenizer, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import attrs

from puzzle_core.cache import cache_root
from puzzle_core.errors import UserError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
CHUNK_CHARS = 2000
"""Target size of a split unit (and of a document for perplexity): about 500 tokens of English."""
FORMAT_VERSION = 1  # bump when chunking or tokenisation changes, to invalidate caches


@attrs.frozen
class Document:
    """A piece of text and where it came from (``file.txt``, ``austen/emma``...)."""

    text: str
    source: str


@attrs.frozen(eq=False)
class CorpusSplit:
    """One split: its documents and their tokens, concatenated with an end-of-text token after each."""

    documents: tuple[Document, ...]
    tokens: Any  # 1-D torch.LongTensor


@attrs.frozen(eq=False)
class TokenizedCorpus:
    """Tokenised train / validation / test splits of one text source."""

    name: str
    splits: Mapping[str, CorpusSplit]

    @property
    def train(self):
        """The train split's token stream."""
        return self.tokens("train")

    @property
    def validation(self):
        """The validation split's token stream."""
        return self.tokens("validation")

    @property
    def test(self):
        """The test split's token stream."""
        return self.tokens("test")

    def _split(self, split: str) -> CorpusSplit:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return self.splits[split]

    def tokens(self, split: str):
        """The split's token stream, a 1-D ``LongTensor``."""
        return self._split(split).tokens

    def documents(self, split: str) -> tuple[str, ...]:
        """The split's texts, one per chunk (what perplexity tasks roll over)."""
        return tuple(d.text for d in self._split(split).documents)

    def num_sequences(self, split: str, seq_len: int) -> int:
        """How many non-overlapping ``seq_len`` windows the split holds."""
        return len(self.tokens(split)) // seq_len

    def batches(
        self,
        split: str,
        seq_len: int,
        batch_size: int,
        max_tokens: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> Iterator[Any]:
        """Batches ``(batch, seq_len)`` of non-overlapping windows of the split, deterministic in ``seed``.

        ``max_tokens`` (rounded up to whole sequences) caps what is yielded; when it asks
        for more than the split holds, further passes follow, each in a new order. The
        last batch may hold fewer rows. ``None`` gives exactly one pass.
        """
        import torch

        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        stream = self.tokens(split)
        count = len(stream) // seq_len
        if count == 0:
            raise UserError(
                f"The {split} split of corpus '{self.name}' holds {len(stream)} tokens, less than one sequence "
                f"of data.seq_len={seq_len}. Lower data.seq_len or give the corpus more text."
            )
        windows = stream[: count * seq_len].view(count, seq_len)
        wanted = count if max_tokens is None else math.ceil(max_tokens / seq_len)
        generator = torch.Generator().manual_seed(seed)
        order = []
        while len(order) * count < wanted:
            order.append(torch.randperm(count, generator=generator) if shuffle else torch.arange(count))
        indices = torch.cat(order)[:wanted]
        for start in range(0, wanted, batch_size):
            yield windows[indices[start : start + batch_size]]

    def summary(self) -> dict[str, dict[str, int]]:
        """``{split: {"documents", "characters", "tokens"}}``."""
        return {
            name: {
                "documents": len(split.documents),
                "characters": sum(len(d.text) for d in split.documents),
                "tokens": len(split.tokens),
            }
            for name, split in self.splits.items()
        }


# ---------------------------------------------------------------- loading


@attrs.frozen
class CorpusText:
    """What a corpus plugin reads: documents per split, and a fingerprint of the text.

    ``splits`` holds ``train`` and, when the source defines them, ``validation`` and
    ``test``; the splits it lacks are carved out of ``train`` by content hash. The
    ``fingerprint`` must change whenever the text does: tokenised splits are cached by it.
    """

    name: str
    splits: Mapping[str, tuple[Document, ...]]
    fingerprint: str


def split_documents(text: CorpusText, fractions: Mapping[str, float]) -> dict[str, tuple[Document, ...]]:
    """Chunk a corpus's documents and complete its splits: those it lacks are carved out of ``train``."""
    unknown = sorted(set(text.splits) - set(SPLITS))
    if unknown or "train" not in text.splits:
        raise UserError(
            f"Corpus '{text.name}' gave the splits {', '.join(sorted(text.splits)) or '(none)'}; a corpus gives "
            f"train and optionally validation and test."
        )
    if set(text.splits) == {"train"}:
        return assign_splits(text.splits["train"], fractions, name=text.name)
    given = {split: chunk_documents(documents) for split, documents in text.splits.items()}
    carved = {split: fraction for split, fraction in fractions.items() if split not in given}
    if carved:
        given.update(assign_splits(given.pop("train"), carved, name=text.name))
    return {split: given[split] for split in SPLITS}


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise UserError(
            f"data.validation_fraction ({validation_fraction}) and data.test_fraction ({test_fraction}) must each "
            f"be between 0 and 1 and sum to less than 1."
        )


# ---------------------------------------------------------------- splitting


def chunk_text(text: str, target_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` at paragraph breaks into pieces of about ``target_chars`` (longer paragraphs at spaces)."""
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > 2 * target_chars:
            cut = paragraph.rfind(" ", target_chars // 2, target_chars)
            cut = cut if cut > 0 else target_chars
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            pieces.append(paragraph)
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += len(piece) + 2
        if size >= target_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if chunks and size < target_chars // 4:
            chunks[-1] = chunks[-1] + "\n\n" + "\n\n".join(current)
        else:
            chunks.append("\n\n".join(current))
    return chunks


def chunk_documents(documents: Iterable[Document], target_chars: int = CHUNK_CHARS) -> tuple[Document, ...]:
    """Every document cut by :func:`chunk_text`, duplicates dropped, in content-hash order."""
    chunks = {digest(["chunk", c]): Document(c, d.source) for d in documents for c in chunk_text(d.text, target_chars)}
    return tuple(chunks[key] for key in sorted(chunks))


def assign_splits(
    documents: Iterable[Document], fractions: Mapping[str, float], name: str, target_chars: int = CHUNK_CHARS
) -> dict[str, tuple[Document, ...]]:
    """Chunk ``documents`` and deal the chunks to ``train`` and the splits in ``fractions`` by content hash.

    Every split in ``fractions`` gets at least one chunk; the order of chunks within a
    split is their hash order, so neither input order nor file names change anything.
    """
    chunks = chunk_documents(documents, target_chars)
    needed = len(fractions) + 1
    if len(chunks) < needed:
        raise UserError(
            f"Corpus '{name}' is too small to split: it gives {len(chunks)} chunk(s) of about {target_chars} "
            f"characters, and train, validation and test need at least one each. Add text, or give the splits "
            f"explicitly as train.*, validation.*, test.* files in a folder."
        )
    splits: dict[str, tuple[Document, ...]] = {}
    start = 0
    for split, fraction in fractions.items():
        size = min(max(1, round(fraction * len(chunks))), len(chunks) - start - (needed - len(splits) - 1))
        splits[split] = chunks[start : start + size]
        start += size
    splits["train"] = chunks[start:]
    return {split: splits[split] for split in SPLITS if split in splits}


# ---------------------------------------------------------------- tokenising


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary, merges, normalisation, end-of-text id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return digest([type(tokenizer).__name__, payload, getattr(tokenizer, "eos_token_id", None)])


def tokenize_splits(name: str, splits: Mapping[str, Sequence[Document]], tokenizer, fingerprint: str) -> TokenizedCorpus:
    """Token streams of ``splits`` (cached by ``fingerprint`` and the tokenizer)."""
    from safetensors.torch import load_file, save_file

    from puzzle_core.rundir import atomic_path

    key = digest([fingerprint, tokenizer_fingerprint(tokenizer)])
    cache = cache_root() / "corpora" / f"{key}.safetensors"
    if cache.is_file():
        tensors = load_file(cache)
        if set(tensors) == set(splits):
            return TokenizedCorpus(name, {s: CorpusSplit(tuple(splits[s]), tensors[s].long()) for s in splits})
    tensors = {split: _tokenize(documents, tokenizer, f"tokenising {split}") for split, documents in splits.items()}
    with atomic_path(cache) as tmp:
        save_file({s: t.int() for s, t in tensors.items()}, str(tmp), metadata={"name": name, "fingerprint": fingerprint})
    return TokenizedCorpus(name, {s: CorpusSplit(tuple(splits[s]), tensors[s]) for s in splits})


def _tokenize(documents: Sequence[Document], tokenizer, description: str):
    import torch
    from tqdm import tqdm

    eos = getattr(tokenizer, "eos_token_id", None)
    separator = [eos] if eos is not None else []
    ids: list[int] = []
    step = 256
    with tqdm(total=len(documents), desc=description, unit="doc", file=sys.stderr, leave=False,
              disable=len(documents) < 2 * step) as bar:
        for start in range(0, len(documents), step):
            batch = [d.text for d in documents[start : start + step]]
            for row in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                ids.extend(row)
                ids.extend(separator)
            bar.update(len(batch))
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- hashing


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]
