"""The run-directory layout: a tiny run's artifacts read back typed, write back the same bytes, and are all named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from puzzle_core import layout
from puzzle_core.errors import UserError
from puzzle_core.rundir import RunDir


def test_every_file_a_run_writes_lies_under_a_path_the_layout_names(tiny_run):
    named = [value for name, value in vars(layout).items() if name.isupper() and isinstance(value, str)]
    outputs = {path for record in tiny_run.manifest().values() for path in record["outputs"]}
    assert outputs and all(any(path == n or path.startswith(n + "/") for n in named) for path in outputs), outputs
    on_disk = {str(p.relative_to(tiny_run.root)) for p in tiny_run.root.rglob("*") if p.is_file()}
    caches = {p for p in on_disk - outputs if p.startswith(layout.ACTIVATIONS + "/")}
    assert on_disk - outputs - caches <= {layout.CONFIG, "manifest.json"}  # the rest is checksummed output


def _rewritten(relative: str, tmp_path: Path, write) -> str:
    copy = RunDir(tmp_path / "copy")
    write(copy)
    return copy.path(relative).read_text()


ROUND_TRIPS = {
    layout.LIBRARY_INDEX: lambda run: lambda to: layout.write_library_index(to, layout.read_library_index(run)),
    layout.SCORES: lambda run: lambda to: layout.write_scores(to, layout.read_scores(run)),
    layout.COSTS: lambda run: lambda to: layout.write_costs(to, layout.read_costs(run)),
    layout.SOLUTIONS_INDEX: lambda run: lambda to: layout.write_solutions_index(to, layout.read_solutions_index(run)),
    layout.CHILDREN_INDEX: lambda run: lambda to: layout.write_children(to, layout.read_children(run)),
    layout.GKD_INDEX: lambda run: lambda to: layout.write_gkd_results(to, list(layout.read_gkd_results(run).values())),
    layout.EVAL_RESULTS: lambda run: lambda to: layout.write_eval_results(to, layout.read_eval_results(run)),
    layout.SUMMARY: lambda run: lambda to: layout.write_summary(to, layout.read_summary(run)),
}


@pytest.mark.parametrize("relative", ROUND_TRIPS)
def test_each_artifact_reads_typed_and_writes_back_the_same_bytes(tiny_run, tmp_path, relative):
    original = tiny_run.path(relative).read_text()  # byte for byte: a count read back stays an int
    assert _rewritten(relative, tmp_path, ROUND_TRIPS[relative](tiny_run)) == original


def test_the_typed_artifacts_agree_with_each_other(tiny_run):
    solutions = layout.read_solutions_index(tiny_run)
    children = layout.read_children(tiny_run)
    assert [c.name for c in children] == [e.name for e in solutions.solutions] == ["mip", "greedy"]
    for child, entry in zip(children, solutions.solutions):
        solution = layout.read_solution(tiny_run, entry)
        assert child.blocks == [solution.chosen[f"layer_{i}"] for i in range(len(child.blocks))]
        assert tiny_run.path(child.path) == layout.child_dir(tiny_run, child.name)
        assert (layout.child_dir(tiny_run, child.name) / "config.json").is_file()
    index = layout.read_library_index(tiny_run)
    costs, scores = layout.read_costs(tiny_run), layout.read_scores(tiny_run)
    assert index.num_layers == len(index.layers) == len(costs.layers) == len(scores.layers)
    for i, blocks in enumerate(index.layer_blocks()):
        assert set(blocks) == set(costs.layers[f"layer_{i}"]) == set(scores.layers[f"layer_{i}"])
        for record in index.layers[i].trained.values():
            assert tiny_run.path(record.weights).is_file()
    gkd = layout.read_gkd_results(tiny_run)
    assert list(gkd) == ["mip"] and layout.read_gkd_result(tiny_run, "mip") == gkd["mip"]
    log = layout.read_gkd_log(tiny_run, "mip")
    assert log.validation[0].kl == gkd["mip"].kl_before and log.validation[-1].kl == gkd["mip"].kl_after
    models = layout.read_eval_results(tiny_run).models
    assert set(models) == {"parent", "mip", "mip+gkd", "greedy"}
    assert models["mip+gkd"].path == layout.relative(tiny_run, layout.gkd_final(tiny_run, "mip"))
    assert layout.read_model_evaluation(tiny_run, "greedy") == models["greedy"]
    summary = layout.read_summary(tiny_run)
    assert summary.main_child().name == "mip" and summary.main_child().gkd.steps == gkd["mip"].steps
    assert summary.cost_model == costs.cost_model == "h100"
    assert summary.parent.params == models["parent"].params


def test_a_renamed_field_is_a_user_error_naming_the_file(tiny_run, tmp_path):
    copy = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.root, copy.root)
    data = json.loads(copy.path(layout.GKD_INDEX).read_text())
    data["children"][0]["validation_kl"] = data["children"][0].pop("kl_before")
    copy.path(layout.GKD_INDEX).write_text(json.dumps(data))
    with pytest.raises(UserError, match=str(copy.path(layout.GKD_INDEX))) as error:
        layout.read_gkd_results(copy)
    assert "$[0].validation_kl: unknown key" in str(error.value) and "$[0].kl_before: required" in str(error.value)
    copy.path(layout.COSTS).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        layout.read_costs(copy)


def test_optional_artifacts_read_as_absent_before_their_stage(tmp_path):
    empty = RunDir(tmp_path)
    assert layout.read_children(empty) == [] and layout.read_gkd_results(empty) == {}
    assert layout.read_summary(empty) is None and layout.read_costs(empty) is None
    with pytest.raises(UserError, match="--stage library"):
        layout.read_library_index(empty, required=True)
