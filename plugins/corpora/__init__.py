"""The built-in corpora: ``demo`` (Debian texts), ``synthetic`` (generated), ``files`` (your own text) and ``mix``.

Heavy readers (``datasets``, ``pyarrow``, ``rdata``, ``pysword``) are imported when a corpus
reads, not when the plugin registers.
"""

from __future__ import annotations

from puzzle_core.api import CorpusPlugin, NoOptions, hookimpl
from puzzle_plugins.corpora.demo import DemoCorpus
from puzzle_plugins.corpora.files import FilesCorpus, FilesOptions
from puzzle_plugins.corpora.mix import MixCorpus, MixOptions
from puzzle_plugins.corpora.synthetic import SyntheticCorpus, SyntheticOptions


@hookimpl
def puzzle_corpora() -> list[CorpusPlugin]:
    return [
        CorpusPlugin(
            name="demo",
            implementation=DemoCorpus,
            options=NoOptions,
            description="Austen's novels, the World English Bible and fortunes (`puzzle data prepare` fetches them)",
        ),
        CorpusPlugin(
            name="synthetic",
            implementation=SyntheticCorpus,
            options=SyntheticOptions,
            description="pseudo-English stories generated from the run seed (tests, tiny runs)",
        ),
        CorpusPlugin(
            name="files",
            implementation=FilesCorpus,
            options=FilesOptions,
            description="your text: .txt/.jsonl/.parquet files or folders, or a datasets save_to_disk folder",
        ),
        CorpusPlugin(
            name="mix",
            implementation=MixCorpus,
            options=MixOptions,
            description="two or more corpora as one (corpora: [demo, knowledge]), each split by its own rules",
        ),
    ]
