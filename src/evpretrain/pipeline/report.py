"""A study's report: its tables and figures, from the metrics.json files (the source of truth)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evpretrain.pipeline.curves import copy_stage_figures, loss_curve_figure, stage_curves
from evpretrain.pipeline.tables import (
    collect_robustness,
    collect_runs,
    summarise,
    window_notes,
    write_robustness_tables,
    write_tables,
)


def write_report(
    manifest: Mapping[str, Any], results: Path, tables_dir: Path, figures_dir: Path | None = None
) -> dict[str, Path]:
    """Write ``tables_dir/ablation.{md,tex,csv}`` and, where the manifest marks evaluations for robustness,
    ``robustness.{md,csv}``; with ``figures_dir``, also ``loss_curves.png``, each stage's figures and
    ``robustness.png`` there. Returns the written paths by name (``md`` is the ablation table)."""
    results = Path(results)
    runs = collect_runs(manifest, results)
    paths = write_tables(summarise(runs), Path(tables_dir), notes=window_notes(runs))
    robustness = collect_robustness(manifest, results)
    if len(robustness):
        paths |= {f"robustness_{k}": v for k, v in write_robustness_tables(robustness, Path(tables_dir)).items()}
    if figures_dir is None:
        return paths
    figures_dir = Path(figures_dir)
    for path in copy_stage_figures(manifest, results, figures_dir):
        paths[path.stem] = path
    paths["loss_curves"] = loss_curve_figure(stage_curves(manifest, results), figures_dir / "loss_curves.png")
    if len(robustness):
        from evpretrain.downstream.robustness import robustness_figure  # torch: only when there is one to draw

        curves = {
            f"{variant} / {label}": rows.to_dict("records")
            for (variant, label), rows in robustness.groupby(["variant", "evaluation"], sort=False)
        }
        paths["robustness"] = robustness_figure(curves, figures_dir / "robustness.png")
    return paths
