"""benchmarks/scoring.py --compare: score tables of one config at two token counts, the MIP's choice from each, and
each chosen child's KL measured again."""

from __future__ import annotations

import argparse
import json

import attrs
import pytest
import yaml

from benchmarks import scoring
from puzzle_core import layout
from puzzle_core.config import unstructure
from puzzle_core.pipeline import run_pipeline
from puzzle_core.schema import load_config


@pytest.mark.slow
def test_the_reference_runs_child_measures_what_its_own_evaluation_did(tmp_path, tiny_run):
    config = load_config(tiny_run.path(layout.CONFIG))
    config = attrs.evolve(config, scoring=attrs.evolve(config.scoring, tokens=config.scoring.tokens // 2))
    few = tmp_path / "few"
    run_pipeline(config, few, stages=["library", "score", "cost"], reuse=[tiny_run.root],
                 config_text=yaml.safe_dump(unstructure(config)), echo=lambda _: None)
    kl = next(c for c in config.evaluation.evaluators if c.name == "kl_to_parent").options
    args = argparse.Namespace(compare=[few, tiny_run.root], speedup=config.search.speedup, kl_tokens=kl.tokens,
                              threads=1)

    fewer, reference = scoring.compare(args)["runs"]

    assert (fewer["tokens"], reference["tokens"]) == (config.scoring.tokens, 2 * config.scoring.tokens)
    assert reference["all"]["spearman"] == pytest.approx(1.0) and reference["all"]["max_relative_deviation"] == 0
    assert reference["layers_differing_from_reference"] == []
    assert fewer["all"]["max_relative_deviation"] > 0, "half the tokens score differently"
    # the reference's scores rate its own (optimal) choice at least as well as the other table's choice
    assert fewer["reference_objective"] >= reference["reference_objective"] - 1e-9
    summary = json.loads(tiny_run.path("report", "summary.json").read_text())
    main = next(child for child in summary["children"] if child["main"])
    assert [reference["chosen"][f"layer_{i}"] for i in range(len(main["blocks"]))] == main["blocks"]
    assert reference["child"]["kl_to_parent"] == pytest.approx(main["kl_to_parent_before_gkd"], rel=1e-5)
