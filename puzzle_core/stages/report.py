"""Stage ``report``: ``report/report.md``, ``report/summary.json`` and the plots.

See :mod:`puzzle_core.report` for what each number means. The plots are
``frontier.png`` (quality vs throughput: parent, children, baselines, before and after
GKD), ``layer_map.png`` (each child's variants per layer, coloured by relative runtime)
and ``gkd.png`` (training and validation-KL curves; only when GKD ran).
"""

from __future__ import annotations

from pathlib import Path

from puzzle_core.config import unstructure
from puzzle_core.report import REPORT_DIR, build_summary, layer_map, plot_frontier, plot_gkd, plot_layer_map, render_markdown
from puzzle_core.rundir import RunDir, atomic_write, atomic_write_json
from puzzle_core.stages.gkd import read_log


def write_report(run_dir: RunDir, scenario: dict, parent_source: str) -> list[Path]:
    """Render everything from the run directory's artifacts; returns the files written."""
    summary = build_summary(run_dir, scenario)
    folder = run_dir.path(REPORT_DIR)
    written = [folder / "summary.json"]
    atomic_write_json(written[0], summary)
    plots = {}
    if summary["children"] or summary["parent"]["eval"]:
        written.append(plot_frontier(summary, folder / "frontier.png"))
        plots["frontier"] = "frontier.png"
    if summary["children"]:
        maps = {c["name"]: layer_map(run_dir, c["blocks"]) for c in summary["children"]}
        written.append(plot_layer_map(maps, folder / "layer_map.png"))
        plots["layer_map"] = "layer_map.png"
    curves = {c["name"]: read_log(run_dir, c["name"]) for c in summary["children"] if c["gkd"]}
    curves = {name: unstructure(log) for name, log in curves.items() if log is not None}
    if curves:
        written.append(plot_gkd(curves, folder / "gkd.png"))
        plots["gkd"] = "gkd.png"
    markdown = folder / "report.md"
    atomic_write(markdown, render_markdown(summary, parent_source, plots))
    written.append(markdown)
    return written


def run(ctx) -> list[Path]:
    if not ctx.role.is_driver:
        return []  # the driver writes the report
    return write_report(ctx.run_dir, unstructure(ctx.config.scenario), ctx.config.parent.source)
