"""Paper-style tables from the runs' metrics.json files (the source of truth): one row per variant, one column per
evaluation, mean +/- std over seeds, as Markdown, LaTeX and CSV.

Figures per evaluation: classification top-1 (last epoch; the best over epochs is the paper's optimistic figure and
goes to the long table), segmentation mIoU (the paper code's per-batch mean and the dataset's) and mAcc, flow AEE
(per-batch mean and pixel mean over pixels with events) and outlier %, all in percent except AEE (pixels).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from evpretrain.config import ConfigError
from evpretrain.files import write_text_atomic

__all__ = [
    "FIGURES",
    "collect_robustness",
    "collect_runs",
    "summarise",
    "window_notes",
    "write_robustness_tables",
    "write_tables",
]

# (metrics.json key, column name, scale, higher is better) per task.
FIGURES: dict[str, list[tuple[str, str, float, bool]]] = {
    "classify": [
        ("top1_last", "top-1", 100.0, True),
        ("top1_best", "top-1 best", 100.0, True),
        ("top5_last", "top-5", 100.0, True),
    ],
    # Dense tasks: the paper code's per-batch means (what its tables report), then the dataset-level figure.
    "segment": [
        ("miou_batch_mean_last", "mIoU batch mean", 100.0, True),
        ("miou_last", "mIoU", 100.0, True),
        ("macc_last", "mAcc", 100.0, True),
    ],
    "flow": [
        ("aee_batch_mean_last", "AEE batch mean", 1.0, False),
        ("outlier_pct_batch_mean_last", "outliers % batch mean", 1.0, False),
        ("aee_pixel_mean_last", "AEE", 1.0, False),
    ],
}


def collect_runs(manifest: Mapping[str, Any], results: Path) -> pd.DataFrame:
    """One row per (variant, evaluation, seed, figure) from ``results/downstream/<folder>/metrics.json``."""
    rows = []
    for variant, entry in manifest.items():
        for evaluation in entry["evaluations"]:
            path = Path(results) / "downstream" / evaluation["folder"] / "metrics.json"
            try:
                metrics = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: missing; the tables need every evaluation of the manifest") from None
            for key, figure, scale, higher in FIGURES[evaluation["task"]]:
                if key not in metrics:
                    raise ConfigError(
                        f"{path}: no {key!r}, expected the metrics of an `evpretrain finetune {evaluation['task']}` run"
                    )
                rows.append(
                    {
                        "variant": variant,
                        "evaluation": evaluation["label"],
                        "seed": evaluation["seed"],
                        "figure": figure,
                        "value": scale * float(metrics[key]),
                        "higher_is_better": higher,
                        # dense samples are fixed windows already; classification says which window it scored
                        "window": metrics.get("eval_window", "") if evaluation["task"] == "classify" else "",
                    }
                )
    return pd.DataFrame(rows)


def collect_robustness(manifest: Mapping[str, Any], results: Path) -> pd.DataFrame:
    """One row per (variant, evaluation, split, corruption, level) with top-1 (a fraction), from the robustness
    tables of the evaluations that the manifest marks ``robustness`` (``<folder>/robustness/robustness.csv``)."""
    columns = ["variant", "evaluation", "split", "corruption", "level", "top1"]
    frames = []
    for variant, entry in manifest.items():
        for evaluation in entry["evaluations"]:
            if not evaluation.get("robustness"):
                continue
            path = Path(results) / "downstream" / evaluation["folder"] / "robustness" / "robustness.csv"
            if not path.exists():
                raise ConfigError(f"{path}: missing; the manifest marks {evaluation['folder']} for robustness")
            table = pd.read_csv(path, keep_default_na=False)
            if "split" not in table:  # a table written before variant stores were scored: one split
                table["split"] = evaluation.get("eval_split", "")
            frames.append(table.assign(variant=variant, evaluation=evaluation["label"])[columns])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _level_label(corruption: str, level: float, split: str = "") -> str:
    if corruption == "none":
        return split  # another evaluation store, clean: N-ImageNet's mode_1, brightness_4, ...
    if corruption == "val_event_noise":
        return "val_event_noise"  # the authors' protocol: the training erase-and-add at evaluation
    if level == 0:
        return "clean"  # shot noise 0 and drop 0 are the same evaluation: one column
    return f"{level:g} Hz shot noise" if corruption == "shot_noise" else f"{100 * level:g}% dropped"


def write_robustness_tables(robustness: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/robustness.{md,csv}``: top-1 (%) per variant (rows) and corruption level (columns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = robustness.assign(
        row=robustness["variant"] + " / " + robustness["evaluation"],
        column=[
            _level_label(c, level, split)
            for c, level, split in zip(robustness["corruption"], robustness["level"], robustness["split"])
        ],
        cell=(100 * robustness["top1"]).map("{:.1f}".format),
    ).drop_duplicates(["row", "column"])
    wide = _ordered_pivot(cells, "row")
    wide.index.name = "variant / evaluation (top-1 %)"
    paths = {"md": out_dir / "robustness.md", "csv": out_dir / "robustness.csv"}
    write_text_atomic(paths["md"], wide.to_markdown(disable_numparse=True) + "\n")
    write_text_atomic(paths["csv"], robustness.to_csv(index=False))
    return paths


def window_notes(runs: pd.DataFrame) -> list[str]:
    """One line per evaluation that records its evaluation window (classification: ``eval_window`` of metrics.json,
    e.g. "40000 events at a random start"), saying which window its column scored."""
    if "window" not in runs:
        return []
    windows = runs[runs["window"] != ""].groupby("evaluation", sort=False)["window"].unique()
    return [f"{label}: evaluated on {', '.join(values)}" for label, values in windows.items()]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (sample, ddof 1; 0 for one seed) and seed count per (variant, evaluation, figure), in the
    manifest's variant order."""
    grouped = runs.groupby(["variant", "evaluation", "figure"], sort=False)["value"]
    summary = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    summary["std"] = summary["std"].fillna(0.0)
    return summary


def _cell(mean: float, std: float, seeds: int, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def wide_table(summary: pd.DataFrame, figures: list[str] | None = None) -> pd.DataFrame:
    """Variants as rows, "<evaluation> <figure>" as columns, cells "mean ± std"."""
    table = summary if figures is None else summary[summary["figure"].isin(figures)]
    cells = table.assign(
        column=table["evaluation"] + " " + table["figure"],
        cell=[
            _cell(m, s, n, 3 if f.startswith("AEE") else 2)
            for m, s, n, f in zip(table["mean"], table["std"], table["seeds"], table["figure"])
        ],
    )
    return _ordered_pivot(cells, "variant")


def _ordered_pivot(cells: pd.DataFrame, index: str) -> pd.DataFrame:
    """``cells`` pivoted to rows ``index`` and columns ``column`` of ``cell``, both in first-seen order (pivot
    sorts them)."""
    wide = cells.pivot(index=index, columns="column", values="cell")
    return wide.loc[list(dict.fromkeys(cells[index])), list(dict.fromkeys(cells["column"]))]


def write_tables(
    summary: pd.DataFrame,
    out_dir: Path,
    name: str = "ablation",
    figures: list[str] | None = None,
    notes: list[str] = (),
) -> dict[str, Path]:
    """Write ``out_dir/<name>.{md,tex,csv}``: the wide table (md, tex) and the long summary (csv); ``notes``
    (``window_notes``) follow the Markdown table, one line each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    wide = wide_table(summary, figures)
    paths = {"md": out_dir / f"{name}.md", "tex": out_dir / f"{name}.tex", "csv": out_dir / f"{name}.csv"}
    footer = "".join(f"\n{note}\n" for note in notes)
    write_text_atomic(paths["md"], wide.to_markdown(disable_numparse=True) + "\n" + footer)  # keep "1.250"
    write_text_atomic(paths["tex"], _latex(wide, caption=f"{name}: mean $\\pm$ std over seeds") + "\n")
    write_text_atomic(paths["csv"], summary.to_csv(index=False))
    return paths


def _latex(wide: pd.DataFrame, caption: str) -> str:
    """``wide`` as a LaTeX tabular: labels escaped (variant names hold underscores), ± as $\\pm$."""

    def escape(text: str) -> str:
        for char in "&%$#_{}":
            text = text.replace(char, "\\" + char)
        return text

    table = wide.map(lambda cell: escape(cell).replace("±", r"$\pm$") if isinstance(cell, str) else cell)
    table.index = [escape(str(label)) for label in table.index]
    table.index.name = "variant"
    table.columns = [escape(str(label)) for label in table.columns]
    return table.to_latex(escape=False, caption=caption)
