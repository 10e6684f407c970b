"""Shared machinery for decoder-only model families (published through :mod:`puzzle_core.api` and
:mod:`puzzle_core.api.decoder`).

- ``child_code/``: the self-contained files written next to every child (per-layer block
  configs read by attribute, the heterogeneous decoder); a family's own configuration and
  modeling files import them relatively.
- :mod:`~puzzle_core.decoder.specs`: between block specs and ``block_configs`` entries.
- :mod:`~puzzle_core.decoder.variants`: the standard variant space and init-method names.
- :mod:`~puzzle_core.decoder.code`: a family's child code, loaded in-process as exported.
- :mod:`~puzzle_core.decoder.init`: sub-blocks initialised from the parent.
- :mod:`~puzzle_core.decoder.runner`: running a decoder one sub-block at a time.
- :mod:`~puzzle_core.decoder.checkpoint`: reading and checking exported weights.
- :mod:`~puzzle_core.decoder.family`: :class:`DecoderFamily`, a ``ModelFamily`` built from these.
"""
