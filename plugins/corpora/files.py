"""The ``files`` corpus: your own text, as files or a saved ``datasets`` folder.

``path`` is one of

- a ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a string field
  ``text_field``, default ``text``, and optionally a string ``source`` that labels it) or a
  ``.parquet`` file (a ``text_field`` column);
- a folder of such files (hidden files are skipped). A folder holding files named
  ``train.*``, ``validation.*``, ``test.*`` gives the splits itself; a split it lacks is
  carved out of ``train``;
- a folder written by ``datasets`` ``save_to_disk`` (read with ``load_from_disk``): a
  ``DatasetDict`` gives its ``train`` / ``validation`` / ``test`` splits, a single
  ``Dataset`` is all training text.

Unsplit text is cut into chunks at paragraph breaks and dealt to the splits by a hash of
each chunk, so neither file order nor the run seed changes the split. A config may give
just the path (``data: {corpus: my_texts/}``); the full form is
``data: {corpus: {name: files, path: my_texts/, text_field: body}}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs

from puzzle_core.api import Corpus, CorpusText, Document, UserError

SPLITS = ("train", "validation", "test")
SUFFIXES = (".txt", ".jsonl", ".parquet")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


@attrs.frozen
class FilesOptions:
    """Where the text is, and which field holds it in JSONL, Parquet and saved datasets."""

    path: str
    text_field: str = "text"


class FilesCorpus(Corpus):
    """Text files, a folder of them, or a saved ``datasets`` folder (see the module docstring)."""

    def __init__(self, options: FilesOptions):
        self.options = options

    def read(self, seed: int) -> CorpusText:
        path = Path(self.options.path).expanduser()
        if not path.exists():
            raise UserError(
                f"Corpus '{self.options.path}' is neither a corpus name nor an existing file or folder. Fix "
                f"data.corpus in the config (relative paths are from the current directory); `puzzle plugins` "
                f"lists the corpus names."
            )
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return CorpusText(str(path), read_saved_dataset(path, self.options.text_field), folder_fingerprint(path))
        return read_files(path, self.options.text_field)


def read_files(path: Path, text_field: str = "text", name: str | None = None) -> CorpusText:
    """The documents of a text file or a folder of them, per split when the folder names its splits."""
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
        splits = {split: _read_documents(fs, path, text_field) for split, fs in named.items() if fs}
    else:
        splits = {"train": _read_documents(files, path, text_field)}
    contents = [(str(f.relative_to(path)) if path.is_dir() else f.name, _file_digest(f)) for f in files]
    return CorpusText(name or str(path), splits, _digest(contents))


def read_saved_dataset(path: Path, text_field: str) -> dict[str, tuple[Document, ...]]:
    """``{split: documents}`` of a ``save_to_disk`` folder: a DatasetDict's splits, or one Dataset as ``train``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for folders it cannot read
        raise UserError(f"Folder '{path}' could not be read with datasets.load_from_disk ({exc}).") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    unknown = sorted(set(parts) - set(SPLITS))
    if unknown or "train" not in parts:
        raise UserError(
            f"Dataset folder '{path}' has the splits {', '.join(sorted(parts))}; a corpus uses train (required), "
            f"validation and test. Save the splits under those names, or save the training text alone."
        )
    splits = {}
    for split, dataset in parts.items():
        if text_field not in dataset.column_names:
            raise UserError(
                f"The {split} split of '{path}' has no column '{text_field}' (columns: "
                f"{', '.join(dataset.column_names)}). Set the corpus's text_field to the column holding the text."
            )
        texts = [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]
        splits[split] = tuple(Document(text, f"{path.name}/{split}/{i}") for i, text in enumerate(texts))
        if not texts:
            raise UserError(f"The {split} split of '{path}' holds no text in column '{text_field}'.")
    return splits


def folder_fingerprint(path: Path) -> str:
    """A digest of every file under ``path`` (names and contents)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([(str(f.relative_to(path)), _file_digest(f)) for f in files])


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"Corpus folder '{path}' holds no files. Add .txt, .jsonl or .parquet files to it.")
    unknown = [f for f in files if f.suffix.lower() not in SUFFIXES]
    if unknown:
        raise UserError(
            f"Corpus file '{unknown[0]}' has an unsupported extension '{unknown[0].suffix}'. Corpora are read from "
            f"{', '.join(SUFFIXES)} files (.jsonl and .parquet with a 'text' field) or from a folder written by "
            f"datasets' save_to_disk; convert or remove it."
        )
    return files


def _read_documents(files: list[Path], root: Path, text_field: str) -> tuple[Document, ...]:
    documents: list[Document] = []
    for file in files:
        label = str(file.relative_to(root)) if root.is_dir() else file.name
        documents.extend(Document(text, source or label) for text, source in _read_file(file, text_field) if text.strip())
    if not documents:
        where = f"'{files[0]}'" if len(files) == 1 else f"the {len(files)} files under '{root}'"
        raise UserError(f"The corpus in {where} is empty: no text was found. Point data.corpus at files with text.")
    return tuple(documents)


def _read_file(path: Path, text_field: str) -> list[tuple[str, str | None]]:
    """``(text, source)`` per document; ``source`` from a JSONL ``source`` field, else ``None`` (the file)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(text, None) for text in _read_parquet(path, text_field)]
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
    return _parse_jsonl(path, text, text_field)


def _parse_jsonl(path: Path, text: str, text_field: str) -> list[tuple[str, str | None]]:
    texts = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): text may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"Line {number} of '{path}' is not valid JSON ({exc.msg}). Each line must be one JSON object."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(
                f"Line {number} of '{path}' has no string field '{text_field}'. Each line must look like "
                f'{{"{text_field}": "..."}} (an optional "source" labels it; other fields are ignored).'
            )
        source = record.get("source")
        texts.append((record[text_field], source if isinstance(source, str) else None))
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise UserError(f"Corpus file '{path}' could not be read as Parquet ({exc}). Check the file.") from None
    if text_field not in table.column_names:
        raise UserError(
            f"Parquet file '{path}' has no '{text_field}' column (columns: {', '.join(table.column_names)}). Set "
            f"the corpus's text_field to the column holding the text."
        )
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"Column '{text_field}' of '{path}' holds {column.type}, not strings. Store the text as strings.")
    return [t for t in column.to_pylist() if t is not None]




def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]
