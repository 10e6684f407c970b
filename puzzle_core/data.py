"""Text corpora: read, split into train / validation / test, tokenise, batch.

``data.corpus`` in a run config names the source:

- ``demo``: the Debian texts prepared by ``puzzle data prepare`` (:mod:`puzzle_core.demo_data`);
- ``synthetic``: pseudo-English generated in code from the run seed (tests, ``configs/tiny.yaml``);
- a ``.txt`` / ``.jsonl`` (a ``text`` field per line, optionally a ``source`` label) /
  ``.parquet`` (a ``text`` column) file, or a folder of them. A folder holding files named
  ``train.*``, ``validation.*``, ``test.*`` gives the splits explicitly; otherwise the
  text is cut into chunks of about
  :data:`CHUNK_CHARS` characters at paragraph breaks and each chunk goes to a split by a
  hash of its content, so the split does not depend on file order or on the run seed.

Tokenised splits are cached under the user cache (:func:`puzzle_core.cache.cache_root`),
keyed by the source's content and the tokenizer, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import attrs

from puzzle_core.cache import cache_root
from puzzle_core.errors import UserError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
SUFFIXES = (".txt", ".jsonl", ".parquet")
CHUNK_CHARS = 2000
"""Target size of a split unit (and of a document for perplexity): about 500 tokens of English."""
SYNTHETIC_DOCUMENTS = 200
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
        return self.tokens("train")

    @property
    def validation(self):
        return self.tokens("validation")

    @property
    def test(self):
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


def load_corpus(data_section, tokenizer, seed: int = 0) -> TokenizedCorpus:
    """The corpus ``data_section.corpus`` names, tokenised with ``tokenizer`` (cached)."""
    documents = read_splits(
        data_section.corpus,
        seed=seed,
        validation_fraction=data_section.validation_fraction,
        test_fraction=data_section.test_fraction,
    )
    return tokenize_splits(documents.name, documents.splits, tokenizer, documents.fingerprint)


@attrs.frozen
class SplitDocuments:
    """Documents per split before tokenisation, with a fingerprint of everything that made them."""

    name: str
    splits: Mapping[str, tuple[Document, ...]]
    fingerprint: str


def read_splits(
    source: str, *, seed: int = 0, validation_fraction: float = 0.05, test_fraction: float = 0.05
) -> SplitDocuments:
    """Read ``source`` (``demo``, ``synthetic`` or a path) into split documents."""
    _check_fractions(validation_fraction, test_fraction)
    fractions = {"validation": validation_fraction, "test": test_fraction}
    if source == "synthetic":
        documents = synthetic_documents(seed)
        fingerprint = _digest(["synthetic", seed, SYNTHETIC_DOCUMENTS, fractions, FORMAT_VERSION])
        return SplitDocuments("synthetic", assign_splits(documents, fractions, name="synthetic"), fingerprint)
    if source == "demo":
        from puzzle_core.demo_data import demo_corpus_dir

        path = demo_corpus_dir()
        if not all((path / f"{split}.jsonl").is_file() for split in SPLITS):
            raise UserError(
                "The demo corpus is not prepared yet. Run `puzzle data prepare` once (it fetches three small "
                "Debian text packages), or set data.corpus to 'synthetic' or to your own .txt/.jsonl/.parquet files."
            )
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(
                f"Corpus '{source}' is not 'demo', 'synthetic', or an existing file or folder. Fix data.corpus "
                f"in the config (relative paths are from the current directory)."
            )
    files = _corpus_files(path)
    named = {split: [f for f in files if f.stem == split] for split in SPLITS}
    if any(named.values()) and not named["train"]:
        raise UserError(
            f"Folder '{path}' has {' and '.join(f.name for fs in named.values() for f in fs)} but no train.* file. "
            f"Add one (train.txt, train.jsonl or train.parquet), or rename the split files to split automatically."
        )
    if named["train"]:
        others = [f for f in files if f.stem not in SPLITS]
        if others:
            raise UserError(
                f"Folder '{path}' mixes split files (train.*, validation.*, test.*) with other files "
                f"({', '.join(f.name for f in others[:3])}). Put every file in a split file, or remove the "
                f"split-named ones to let the text be split automatically."
            )
        given = {split: chunk_documents(_read_documents(fs, path)) for split, fs in named.items() if fs}
        carved = {s: f for s, f in fractions.items() if s not in given}
        if carved:
            parts = assign_splits(given.pop("train"), carved, name=str(path))
            given.update(parts)
        splits = {split: given[split] for split in SPLITS}
    else:
        splits = assign_splits(_read_documents(files, path), fractions, name=str(path))
    contents = [(str(f.relative_to(path)) if path.is_dir() else f.name, _file_digest(f)) for f in files]
    fingerprint = _digest([contents, fractions, FORMAT_VERSION])
    return SplitDocuments("demo" if source == "demo" else str(path), splits, fingerprint)


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise UserError(
            f"data.validation_fraction ({validation_fraction}) and data.test_fraction ({test_fraction}) must each "
            f"be between 0 and 1 and sum to less than 1."
        )


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"Corpus folder '{path}' holds no files. Add .txt, .jsonl or .parquet files to it.")
    unknown = [f for f in files if f.suffix.lower() not in SUFFIXES]
    if unknown:
        raise UserError(
            f"Corpus file '{unknown[0]}' has an unsupported extension '{unknown[0].suffix}'. Corpora are read from "
            f"{', '.join(SUFFIXES)} files (.jsonl and .parquet with a 'text' field); convert or remove it."
        )
    return files


def _read_documents(files: Sequence[Path], root: Path) -> tuple[Document, ...]:
    documents: list[Document] = []
    for file in files:
        label = str(file.relative_to(root)) if root.is_dir() else file.name
        documents.extend(Document(text, source or label) for text, source in _read_file(file) if text.strip())
    if not documents:
        where = f"'{files[0]}'" if len(files) == 1 else f"the {len(files)} files under '{root}'"
        raise UserError(f"The corpus in {where} is empty: no text was found. Point data.corpus at files with text.")
    return tuple(documents)


def _read_file(path: Path) -> list[tuple[str, str | None]]:
    """``(text, source)`` per document; ``source`` from a JSONL ``source`` field, else ``None`` (the file)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(text, None) for text in _read_parquet(path)]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"Corpus file '{path}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}). Convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 '{path}' > out.txt`, or remove it from the corpus."
        ) from None
    if suffix == ".txt":
        return [(text, None)]
    return _parse_jsonl(path, text)


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, str | None]]:
    texts = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): text may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} of '{path}' is not valid JSON ({exc.msg}). Each line must be one JSON object.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(
                f"Line {number} of '{path}' has no string field 'text'. Each line must look like "
                f'{{"text": "..."}} (an optional "source" labels it; other fields are ignored).'
            )
        source = record.get("source")
        texts.append((record["text"], source if isinstance(source, str) else None))
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise UserError(f"Corpus file '{path}' could not be read as Parquet ({exc}). Check the file.") from None
    if "text" not in table.column_names:
        raise UserError(
            f"Parquet file '{path}' has no 'text' column (columns: {', '.join(table.column_names)}). Rename the "
            f"column holding the text to 'text'."
        )
    column = table.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"Column 'text' of '{path}' holds {column.type}, not strings. Store the text as strings.")
    return [t for t in column.to_pylist() if t is not None]


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
    chunks = {_digest(["chunk", c]): Document(c, d.source) for d in documents for c in chunk_text(d.text, target_chars)}
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
    return _digest([type(tokenizer).__name__, payload, getattr(tokenizer, "eos_token_id", None)])


def tokenize_splits(name: str, splits: Mapping[str, Sequence[Document]], tokenizer, fingerprint: str) -> TokenizedCorpus:
    """Token streams of ``splits`` (cached by ``fingerprint`` and the tokenizer)."""
    from safetensors.torch import load_file, save_file

    from puzzle_core.rundir import atomic_path

    key = _digest([fingerprint, tokenizer_fingerprint(tokenizer)])
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


# ---------------------------------------------------------------- synthetic text


_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "a", "every", "this", "that", "one", "no", "some", "her", "his"),
    "adj": ("old", "quiet", "bright", "small", "green", "heavy", "strange", "gentle", "cold", "proud", "narrow",
            "golden", "silent", "broken", "early", "patient", "distant", "simple", "tall", "kind"),
    "noun": ("house", "river", "garden", "letter", "king", "window", "child", "road", "village", "horse", "door",
             "friend", "mountain", "book", "table", "ship", "teacher", "forest", "city", "morning", "stone",
             "bird", "doctor", "song", "lamp", "field", "sister", "bridge", "market", "winter"),
    "verb": ("saw", "found", "carried", "opened", "remembered", "followed", "built", "watched", "lost", "painted",
             "visited", "answered", "crossed", "kept", "wrote", "heard", "closed", "praised", "sold", "named"),
    "intransitive": ("slept", "laughed", "waited", "arrived", "vanished", "smiled", "returned", "wandered"),
    "adv": ("slowly", "again", "quietly", "at last", "together", "carefully", "alone", "once more", "gladly"),
    "prep": ("near", "behind", "across", "beside", "under", "beyond", "toward", "inside"),
    "name": ("Anna", "Thomas", "Mira", "Jonas", "Clara", "Peter", "Elena", "Samuel", "Ruth", "Oliver"),
}


def _zipf(rng: random.Random, words: tuple[str, ...]) -> str:
    return rng.choices(words, weights=[1.0 / (rank + 1) for rank in range(len(words))])[0]


def _noun_phrase(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return _zipf(rng, _WORDS["name"])
    words = [_zipf(rng, _WORDS["det"])]
    if rng.random() < 0.5:
        words.append(_zipf(rng, _WORDS["adj"]))
    words.append(_zipf(rng, _WORDS["noun"]))
    if rng.random() < 0.25:
        words += [_zipf(rng, _WORDS["prep"]), "the", _zipf(rng, _WORDS["noun"])]
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        words = [_noun_phrase(rng), _zipf(rng, _WORDS["intransitive"])]
    else:
        words = [_noun_phrase(rng), _zipf(rng, _WORDS["verb"]), _noun_phrase(rng)]
    if rng.random() < 0.3:
        words.append(_zipf(rng, _WORDS["adv"]))
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        return f'"{text}," said {_zipf(rng, _WORDS["name"])}.'
    return text + "."


def synthetic_documents(seed: int, count: int = SYNTHETIC_DOCUMENTS) -> tuple[Document, ...]:
    """``count`` short pseudo-English stories from a small grammar (learnable, deterministic in ``seed``)."""
    rng = random.Random(f"puzzle-synthetic-{seed}")
    documents = []
    for index in range(count):
        paragraphs = [
            " ".join(_sentence(rng) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(3, 8))
        ]
        documents.append(Document(f"Story {index + 1}\n\n" + "\n\n".join(paragraphs), f"synthetic/{index}"))
    return tuple(documents)


# ---------------------------------------------------------------- hashing


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    from puzzle_core.rundir import sha256_file

    return sha256_file(path)
