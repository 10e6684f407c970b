"""lm-eval task templates of the ``lm_eval`` evaluator (YAML, package data).

Each ``<task>.yaml`` is a :class:`string.Template`: ``${data_file}`` becomes the absolute
path of the JSONL the evaluator writes for that run (lm-eval needs absolute paths), and
``${cache_dir}`` a folder next to it for the ``datasets`` library's Arrow cache.
"""
