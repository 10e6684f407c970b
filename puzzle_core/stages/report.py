"""Stage ``report``: ``report/report.md``, ``report/summary.json`` and the plots.

See :mod:`puzzle_core.report` for what each number means. The plots are
``frontier.png`` (quality vs throughput: parent, children, baselines, before and after
GKD), ``layer_map.png`` (each child's variants per layer, coloured by relative runtime)
and ``gkd.png`` (training and validation-KL curves; only when GKD ran).
"""

from __future__ import annotations

from pathlib import Path

from puzzle_core import layout
from puzzle_core.config import unstructure
from puzzle_core.report import build_summary, layer_map, plot_frontier, plot_gkd, plot_layer_map, render_markdown
from puzzle_core.rundir import RunDir, atomic_write


def write_report(run_dir: RunDir, scenario: dict, parent_source: str) -> list[Path]:
    """Render everything from the run directory's artifacts; returns the files written."""
    summary = build_summary(run_dir, scenario)
    written = [layout.write_summary(run_dir, summary)]
    plots = {}
    if summary.children or summary.parent.eval:
        written.append(plot_frontier(summary, layout.report_file(run_dir, layout.FRONTIER_PLOT)))
        plots["frontier"] = layout.FRONTIER_PLOT
    if summary.children:
        maps = {c.name: layer_map(run_dir, c.blocks) for c in summary.children}
        written.append(plot_layer_map(maps, layout.report_file(run_dir, layout.LAYER_MAP_PLOT)))
        plots["layer_map"] = layout.LAYER_MAP_PLOT
    curves = {c.name: layout.read_gkd_log(run_dir, c.name) for c in summary.children if c.gkd}
    curves = {name: log for name, log in curves.items() if log is not None}
    if curves:
        written.append(plot_gkd(curves, layout.report_file(run_dir, layout.GKD_PLOT)))
        plots["gkd"] = layout.GKD_PLOT
    markdown = layout.report_file(run_dir, layout.REPORT_PAGE)
    atomic_write(markdown, render_markdown(summary, parent_source, plots))
    written.append(markdown)
    return written


def run(ctx) -> list[Path]:
    if not ctx.role.is_driver:
        return []  # the driver writes the report
    return write_report(ctx.run_dir, unstructure(ctx.config.scenario), ctx.config.parent.source)
