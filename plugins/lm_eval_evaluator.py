"""The ``lm_eval`` evaluator: lm-evaluation-harness on a model object, fully offline.

Built-in tasks (YAML templates in :mod:`puzzle_plugins.lm_eval_tasks`):

- ``mmlu_heldout``: MMLU on the "eval" half of its subjects (the half that ``half_mmlu``
  block scoring never sees), answer texts scored by log-likelihood: ``acc``, ``acc_norm``;
- ``heldout_perplexity``: word / byte perplexity and bits per byte of the run corpus's
  test split (rolling log-likelihood over each document).

Their data is written as JSONL next to the rendered YAML in the evaluation cache, since
lm-eval wants absolute ``data_files``. Any other task is named by a YAML file path or by
a task name found under ``include_path``; lm-eval's own catalogue is only indexed when
``include_defaults`` is set (indexing costs seconds, and its datasets need a hub).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.resources
import json
import logging
import os
import string
from pathlib import Path
from typing import Any, Iterator

import attrs

from puzzle_core.api import EvalContext, Evaluator, EvaluatorPlugin, LoadedModel, UserError, atomic_write, hookimpl
from puzzle_core.tasks import load_mmlu, sample_per_subject

BUILTIN_TASKS = ("mmlu_heldout", "heldout_perplexity")
BOOTSTRAP_ITERS = 100  # only perplexities are bootstrapped (accuracy errors are closed-form); 100 is plenty


@attrs.frozen
class LmEvalOptions:
    tasks: list[str] = attrs.Factory(lambda: list(BUILTIN_TASKS))  # built-in names, include_path names, YAML paths
    include_path: list[str] = attrs.Factory(list)  # folders (or YAML files) of extra task definitions
    include_defaults: bool = False  # also index lm-eval's own task catalogue
    limit: dict[str, int] = attrs.Factory(lambda: {"mmlu_heldout": 200, "heldout_perplexity": 16})
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    num_fewshot: int | None = None
    max_length: int | None = None  # context window (default: the model's)
    mmlu_seed: int = 0  # picks MMLU's subject halves; keep equal to the half_mmlu scorer's seed
    mmlu_file: str | None = None  # questions as {"question", "choices", "answer", "subject"} lines (default: MMLU)


class LmEvalEvaluator(Evaluator):
    """Runs the configured lm-eval tasks and returns ``{"<task>.<metric>": value}``."""

    def __init__(self, options: LmEvalOptions):
        self.options = options

    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        import torch

        with _offline_quiet():
            from lm_eval import simple_evaluate
            from lm_eval.tasks import TaskManager

            include_dir = self._write_builtin_tasks(context)
            include = [include_dir, *self._user_include_paths()]
            manager = TaskManager(include_path=[str(p) for p in include], include_defaults=self.options.include_defaults)
            specs = [self._resolve(name, manager) for name in self.options.tasks]
            lm = _harness_model(model, self.options)
            was_training = model.model.training
            results: dict[str, float] = {}
            try:
                for name, spec in zip(self.options.tasks, specs):
                    limit = None if name in BUILTIN_TASKS else self.options.limit.get(name)
                    with torch.no_grad():
                        output = simple_evaluate(
                            model=lm,
                            tasks=[spec],
                            num_fewshot=self.options.num_fewshot,
                            limit=limit,
                            task_manager=manager,
                            bootstrap_iters=BOOTSTRAP_ITERS,
                            log_samples=False,
                            random_seed=context.seed,
                            numpy_random_seed=context.seed,
                            torch_random_seed=context.seed,
                            fewshot_random_seed=context.seed,
                        )
                    results.update(flatten_results(output))
            finally:
                model.model.train(was_training)
        return results

    def _user_include_paths(self) -> list[Path]:
        paths = []
        for entry in self.options.include_path:
            path = Path(entry).expanduser()
            if not path.exists():
                raise UserError(
                    f"lm_eval include_path '{entry}' does not exist. Give folders or YAML files of lm-eval task "
                    f"definitions (their data_files must be absolute paths)."
                )
            paths.append(path.resolve())
        for name in self.options.tasks:
            if name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
                paths.append(Path(name).expanduser().resolve().parent)  # so its `include:` files resolve
        return paths

    def _resolve(self, name: str, manager) -> str:
        if name in BUILTIN_TASKS or name in manager.all_tasks:
            return name
        if name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser()
            if path.is_file():
                return str(path.resolve())
            raise UserError(f"lm_eval task file '{name}' does not exist. Check the path in evaluation.evaluators.")
        known = sorted(set(BUILTIN_TASKS) | set(manager.all_subtasks))
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        hint = "" if self.options.include_defaults else (
            " lm-eval's own catalogue is not indexed: set include_defaults: true to use it (its datasets must "
            "then be available offline), or copy the task's YAML next to local data and add it to include_path."
        )
        raise UserError(f"Unknown lm_eval task '{name}'. Known tasks: {shown}.{hint}")

    def _write_builtin_tasks(self, context: EvalContext) -> Path:
        """Render the built-in tasks that were asked for, with their data, into a content-addressed folder."""
        data: dict[str, list[dict]] = {}
        if "mmlu_heldout" in self.options.tasks:
            questions = load_mmlu(half="eval", seed=self.options.mmlu_seed, path=self.options.mmlu_file)
            limit = self.options.limit.get("mmlu_heldout")
            data["mmlu_heldout"] = [q.to_json() for q in sample_per_subject(questions, limit, seed=context.seed)]
        if "heldout_perplexity" in self.options.tasks:
            documents = context.require_corpus("lm_eval (heldout_perplexity)").documents("test")
            limit = self.options.limit.get("heldout_perplexity")
            data["heldout_perplexity"] = [{"text": text} for text in documents[:limit]]
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
        folder = context.cache_dir / "lm_eval_tasks" / digest
        for task, rows in data.items():
            data_file = folder / f"{task}.jsonl"
            task_file = folder / f"{task}.yaml"
            if task_file.is_file():
                continue
            atomic_write(data_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            atomic_write(task_file, render_template(task, data_file))
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def render_template(task: str, data_file: Path) -> str:
    """The YAML of built-in ``task`` reading ``data_file`` (the datasets cache goes next to it)."""
    template = importlib.resources.files("puzzle_plugins.lm_eval_tasks").joinpath(f"{task}.yaml").read_text()
    data_file = Path(data_file).resolve()
    return string.Template(template).substitute(
        data_file=json.dumps(str(data_file)), cache_dir=json.dumps(str(data_file.parent / "datasets"))
    )


def flatten_results(output: dict[str, Any] | None) -> dict[str, float]:
    """lm-eval's ``results`` as ``{"<task>.<metric>": value}`` (filter appended when not ``none``)."""
    flat: dict[str, float] = {}
    if not output:
        return flat
    for task, metrics in output.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # 'alias', 'N/A' standard errors
            metric, filter_name = key.split(",", 1)
            flat[f"{task}.{metric}" + ("" if filter_name == "none" else f".{filter_name}")] = float(value)
        samples = output.get("n-samples", {}).get(task, {})
        if "effective" in samples:
            flat[f"{task}.samples"] = float(samples["effective"])
    return flat


def _harness_model(model: LoadedModel, options: LmEvalOptions):
    """An lm-eval ``HFLM`` over the in-memory model and a private copy of its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    # HFLM adds a pad token to a tokenizer that has none: keep the run's tokenizer untouched.
    tokenizer = copy.deepcopy(model.tokenizer)
    wrapped = _hf_compatible(model)
    return HFLM(
        pretrained=wrapped,
        tokenizer=tokenizer,
        backend="causal",
        device=str(wrapped.device),
        batch_size=options.batch_size,
        max_length=options.max_length,
    )


def _hf_compatible(model: LoadedModel):
    """The model itself when it is a ``PreTrainedModel``; otherwise a thin module giving HFLM what it reads."""
    import torch
    from transformers import PreTrainedModel

    if isinstance(model.model, PreTrainedModel):
        return model.model
    config = getattr(model.model, "config", None)
    if config is None:
        raise UserError(
            f"The model from '{model.source}' has no Hugging Face config; lm-eval needs one (model_type, "
            f"max_position_embeddings). Give the model a `config` attribute."
        )

    class HarnessModel(torch.nn.Module):
        """Forwards calls to a causal LM with the Hugging Face call signature."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = config
            self.name_or_path = model.source

        @property
        def device(self):
            return next(self.inner.parameters()).device

        def tie_weights(self):
            """The wrapped model ties its own weights when built."""

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def generate(self, *args, **kwargs):
            return self.inner.generate(*args, **kwargs)

    return HarnessModel(model.model)


@contextlib.contextmanager
def _offline_quiet() -> Iterator[None]:
    """No hub access (all data is local) and only lm-eval's warnings that matter."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@hookimpl
def puzzle_evaluators():
    return [
        EvaluatorPlugin(
            name="lm_eval",
            implementation=LmEvalEvaluator,
            options=LmEvalOptions,
            description="lm-evaluation-harness tasks offline: held-out MMLU half, held-out perplexity, your YAML",
        )
    ]
