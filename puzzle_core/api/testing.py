"""Conformance checks of a model family, for its tests (the same checks as ``puzzle model check``).

Imports torch. In a family's test suite::

    from puzzle_core.api.testing import assert_family_conforms

    def test_my_family_conforms(tmp_path):
        assert_family_conforms(MyFamily(), tiny_parent(), tmp_path)

On one parent (keep it tiny and fp32) the checks build the all-parent child (logits and
parameter count equal to the parent's) and one child per variant kind (fewer KV heads,
narrower FFN, linear and no-op attention and FFN, each in layer 0); each must run,
generate (cached steps agreeing with a full forward), have exactly the parameters its
variant leaves of the parent's tensors, export, reload through the family, and reload in
a separate Python that cannot import puzzle or the family's package, with the same
logits, generations and parameter count.
"""

from __future__ import annotations

from pathlib import Path

from puzzle_core.conformance import Cell, ChildCheck, FamilyReport, check_family, expected_sublayer_params, variant_kinds
from puzzle_core.interfaces import LoadedModel, ModelFamily


def assert_family_conforms(family: ModelFamily, parent: LoadedModel, folder: Path | None = None,
                           isolated: bool = True) -> FamilyReport:
    """:func:`check_family`, failing with its table when any check fails; returns the report."""
    report = check_family(family, parent, folder, isolated=isolated)
    assert report.passed, f"the {report.family} family fails its checks on {report.parent}:\n{report.table()}"
    return report


__all__ = [
    "check_family",
    "assert_family_conforms",
    "FamilyReport",
    "ChildCheck",
    "Cell",
    "variant_kinds",
    "expected_sublayer_params",
]
