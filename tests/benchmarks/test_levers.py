"""The quality-lever tables in benchmarks/README.md are rendered from the committed results, never typed."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from benchmarks import levers


def section(text: str) -> str:
    start, end = text.index(levers.START) + len(levers.START), text.index(levers.END)
    return text[start:end]


@pytest.fixture(scope="module")
def rendered() -> str:
    return levers.render()


def test_the_readme_section_is_what_the_committed_results_render(rendered):
    assert section(levers.README.read_text()) == "\n" + rendered, (
        "benchmarks/README.md's quality levers section is stale: run .venv/bin/python benchmarks/levers.py")


def test_every_lever_has_a_table_and_the_unmeasured_ones_say_not_run(rendered):
    tokens_measured = any(levers.RESULTS.glob("gkd_tokens*.json"))
    data_measured = (levers.RESULTS / "gkd_data.json").is_file()
    quality_measured = (levers.RESULTS / "gkd_quality.json").is_file()
    titles = ["BLD tokens per block", "BLD learning rate", "Initialisation before -> after BLD", "bf16 autocast",
              "Library stage time per arm", "GKD speed per setting"] + ["GKD quality per setting"] * quality_measured + [
              "GKD tokens and learning rate"] * tokens_measured + [
              "Distillation text"] * data_measured + ["Scoring tokens vs reference"]
    for title, following in zip(titles, titles[1:] + ["Not run yet"]):
        part = rendered[rendered.index(f"### {title}\n"):rendered.index(f"### {following}\n")]
        assert "\n|---|" in part, title
    not_run = rendered[rendered.index("### Not run yet"):]
    for lever in ("coupled BLD", "per-layer search rules", "memory"):
        assert lever in not_run
    assert not_run.count(": not run.") == (len(levers.NOT_RUN) + (not quality_measured) + (not tokens_measured)
                                           + (not data_measured))
    assert (levers.GKD_QUALITY in not_run) != quality_measured
    assert (levers.GKD_TOKENS in not_run) != tokens_measured
    assert (levers.GKD_DATA in not_run) != data_measured


def test_readings_name_the_demo_settings_and_the_recorded_load(rendered):
    demo = yaml.safe_load(levers.DEMO.read_text())  # read without the package's config loader
    assert f"The demo takes {demo['library']['tokens']:,} tokens per block" in rendered
    assert f"The demo scores on {demo['scoring']['tokens']:,} tokens" in rendered
    assert f"`gkd.children: {demo['gkd']['children']}`" in rendered
    sweep = json.loads((levers.RESULTS / "bld_sweep.json").read_text())
    assert " / ".join(f"{v:.1f}" for v in sweep["machine"]["load_average"]) + " (BLD sweep)" in rendered


def test_gkd_quality_rows_are_the_results_with_the_demo_setting_marked(rendered):
    path = levers.RESULTS / "gkd_quality.json"
    if not path.is_file():
        pytest.skip("gkd.py --part quality has not run")
    demo = yaml.safe_load(levers.DEMO.read_text())["gkd"]
    part = rendered[rendered.index("### GKD quality per setting"):rendered.index("### GKD tokens")]
    for row in json.loads(path.read_text())["rows"]:
        line = next(line for line in part.splitlines() if line.startswith(f"| {row['setting']}"))
        marked = all(row["overlay"].get(k, default) == demo.get(k, default)
                     for k, default in (("bf16", False), ("trainable", "all"), ("lora_rank", 0)))
        assert ("(demo)" in line) == marked
        assert f"| {row['kl_before']:.3f} | {row['kl_after']:.3f} |" in line
        kl_per_cpu_minute = (row["kl_before"] - row["kl_after"]) * 60 / row["cpu_s"]
        assert line.rstrip(" |").endswith(f"{kl_per_cpu_minute:.4f}")


def test_lr_table_bolds_each_blocks_lowest_loss(rendered):
    rows = [r for r in json.loads((levers.RESULTS / "bld_sweep.json").read_text())["rows"] if r["sweep"] == "lr"]
    part = rendered[rendered.index("### BLD learning rate"):rendered.index("### Initialisation")]
    for layer, unit in {(r["layer"], r["unit"]) for r in rows}:
        best = min((r for r in rows if (r["layer"], r["unit"]) == (layer, unit)), key=lambda r: r["heldout_after"])
        line = next(line for line in part.splitlines() if line.startswith(f"| {layer} | {unit} |"))
        assert line.count("**") == 2 and f"**{best['heldout_after']:.3f}**" in line


@pytest.mark.parametrize("name", sorted(levers.SOURCES))
def test_a_missing_results_file_fails_clearly_and_writes_nothing(name, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(levers.RESULTS, results, ignore=shutil.ignore_patterns(name, "ablations"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{levers.START}\nold\n{levers.END}\n")
    assert levers.main(["--results", str(results), "--readme", str(readme)]) == 2
    error = capsys.readouterr().err
    assert f"{results / name} is missing" in error and levers.SOURCES[name] in error
    assert readme.read_text().count("\nold\n") == 1


def test_a_stale_section_is_detected_then_rewritten_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nbefore\n\n{levers.START}\nhand-typed numbers\n{levers.END}\n\nafter\n")
    assert levers.main(["--readme", str(readme), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert levers.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "hand-typed" not in text and text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert levers.main(["--readme", str(readme), "--check"]) == 0


def test_a_readme_without_markers_is_a_user_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    assert levers.main(["--readme", str(readme)]) == 2
    assert levers.START in capsys.readouterr().err and readme.read_text() == "# Benchmarks\n"


def test_the_engine_tables_read_engine_runs_only():
    """`scoring.py --compare` writes scoring_tokens*.json next to the engine's scoring*.json; those are not engine runs."""
    engine = levers.read_inputs().engine
    assert engine and all("sampled" in run and "projected_library" in run for run in engine)
