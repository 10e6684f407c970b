"""The ``synthetic`` corpus: pseudo-English stories generated in code from the run seed.

Learnable (a small grammar with Zipf-distributed words) and needs nothing on disk, so
tests and ``configs/tiny.yaml`` run anywhere.
"""

from __future__ import annotations

import random

import attrs

from puzzle_core.api import Corpus, CorpusText, Document


@attrs.frozen
class SyntheticOptions:
    documents: int = attrs.field(default=200, validator=attrs.validators.ge(3))  # stories generated


class SyntheticCorpus(Corpus):
    """``documents`` stories, deterministic in the run seed."""

    def __init__(self, options: SyntheticOptions):
        self.options = options

    def read(self, seed: int) -> CorpusText:
        count = self.options.documents
        return CorpusText("synthetic", {"train": synthetic_documents(seed, count)}, f"synthetic/{seed}/{count}")


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


def synthetic_documents(seed: int, count: int = 200) -> tuple[Document, ...]:
    """``count`` short pseudo-English stories from a small grammar (learnable, deterministic in ``seed``)."""
    rng = random.Random(f"puzzle-synthetic-{seed}")
    documents = []
    for index in range(count):
        paragraphs = [
            " ".join(_sentence(rng) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(3, 8))
        ]
        documents.append(Document(f"Story {index + 1}\n\n" + "\n\n".join(paragraphs), f"synthetic/{index}"))
    return tuple(documents)
