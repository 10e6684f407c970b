"""Reading the run's corpus through the corpus plugin ``data.corpus`` names, and splitting it."""

from __future__ import annotations

from typing import Mapping

import attrs

from puzzle_core.choices import CorpusChoice, corpus_choice
from puzzle_core.data import (
    FORMAT_VERSION,
    Document,
    TokenizedCorpus,
    check_fractions,
    digest,
    split_documents,
    tokenize_splits,
)
from puzzle_core.registry import get_registries


def load_corpus(data_section, tokenizer, seed: int = 0, registries=None) -> TokenizedCorpus:
    """The corpus ``data_section.corpus`` names, split, and tokenised with ``tokenizer`` (cached)."""
    documents = read_splits(
        data_section.corpus,
        seed=seed,
        validation_fraction=data_section.validation_fraction,
        test_fraction=data_section.test_fraction,
        registries=registries,
    )
    return tokenize_splits(documents.name, documents.splits, tokenizer, documents.fingerprint)


@attrs.frozen
class SplitDocuments:
    """Documents per split before tokenisation, with a fingerprint of everything that made them."""

    name: str
    splits: Mapping[str, tuple[Document, ...]]
    fingerprint: str


def open_corpus(source, registries=None):
    """The :class:`~puzzle_core.interfaces.Corpus` that ``source`` (a corpus choice, a corpus name or a path) picks."""
    choice = source if isinstance(source, CorpusChoice) else corpus_choice(source)
    return (registries or get_registries()).record(choice).create(choice.options)


def read_splits(
    source, *, seed: int = 0, validation_fraction: float = 0.05, test_fraction: float = 0.05, registries=None
) -> SplitDocuments:
    """Read ``source`` (a corpus choice, a corpus name or a path) and split it into train / validation / test."""
    check_fractions(validation_fraction, test_fraction)
    fractions = {"validation": validation_fraction, "test": test_fraction}
    text = open_corpus(source, registries).read(seed)
    fingerprint = digest([text.fingerprint, fractions, FORMAT_VERSION])
    return SplitDocuments(text.name, split_documents(text, fractions), fingerprint)
