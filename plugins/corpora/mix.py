"""The ``mix`` corpus: several corpora as one, each split by its own rules.

``data: {corpus: {name: mix, corpora: [demo, knowledge]}}`` trains, validates and tests on
the union of the parts' splits. A part that defines its splits (the demo's held-out novel)
keeps them; the others are carved by content hash with this corpus's fractions, as
``data`` would carve them alone. Each part's share of the mix is its share of the text:
``puzzle data info`` prints the sizes.
"""

from __future__ import annotations

from typing import Callable

import attrs

from puzzle_core.api import Corpus, CorpusChoice, CorpusText, UserError, open_corpus, read_splits
from puzzle_plugins.corpora.files import SPLITS


def _two_or_more(_instance, _attribute, value: list) -> None:
    if len(value) < 2:
        raise ValueError(f"a mix needs two or more corpora, got {len(value)}")


@attrs.frozen
class MixOptions:
    corpora: list[CorpusChoice] = attrs.field(validator=_two_or_more)  # names, paths or {name: ..., <options>}
    validation_fraction: float = 0.05  # of a part that does not give its splits itself
    test_fraction: float = 0.05


class MixCorpus(Corpus):
    """The union of ``corpora``, split per part."""

    def __init__(self, options: MixOptions):
        self.options = options

    def read(self, seed: int) -> CorpusText:
        parts = [
            read_splits(choice, seed=seed, validation_fraction=self.options.validation_fraction,
                        test_fraction=self.options.test_fraction)
            for choice in self.options.corpora
        ]
        names = [part.name for part in parts]
        if len(set(names)) < len(names):
            raise UserError(f"The mix names the same corpus twice ({', '.join(names)}); list each corpus once.")
        splits = {split: tuple(d for part in parts for d in part.splits[split]) for split in SPLITS}
        return CorpusText("+".join(names), splits, "+".join(part.fingerprint for part in parts))

    def prepare(self, force: bool = False, echo: Callable[[str], None] = print) -> None:
        for choice in self.options.corpora:
            open_corpus(choice).prepare(force=force, echo=echo)
