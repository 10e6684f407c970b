"""lm-eval task templates for the tasks made from our own data (YAML, package data).

Each ``<task>.yaml`` is a :class:`string.Template`: ``${data_file}`` becomes the absolute
path of the JSONL the evaluator writes for that run (lm-eval needs absolute paths),
``${cache_dir}`` the ``datasets`` library's Arrow cache, and ``${lm_eval_tasks}`` the
installed lm-eval's task folder (for ``include:``).
"""
