"""The benchmark suite: the paper's ablations (``puzzle bench``) and performance benchmarks.

See ``benchmarks/README.md``.
"""
