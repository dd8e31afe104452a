"""Study figures: loss curves of the pre-training stages (the ``log`` rows of their metrics.json), stage figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from evpretrain.files import write_atomic
from evpretrain.plotting import pyplot, save_figure

STAGE_LOSS = {"1": "masked reconstruction loss", "2": "InfoNCE (transition)", "3": "InfoNCE (focus)"}


def stage_curves(manifest: Mapping[str, Any], results: Path) -> dict[str, dict[str, Any]]:
    """Per pre-training node of ``manifest``: ``{"stage", "variants", "steps", "loss"}``, in manifest order.

    ``steps`` and ``loss`` are the node's logged (step, mean loss) rows; ``variants`` are the variants whose chain
    holds the node (shared nodes are trained once). Raises FileNotFoundError naming a node's missing metrics.json.
    """
    curves: dict[str, dict[str, Any]] = {}
    for variant, entry in manifest.items():
        for node in entry.get("nodes", []):
            if node not in curves:
                path = Path(results) / "pretrain" / node / "metrics.json"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: the metrics of pre-training node {node} are missing")
                rows = json.loads(path.read_text()).get("log", [])
                curves[node] = {
                    "stage": node.split("-")[0].removeprefix("stage"),
                    "variants": [],
                    "steps": [row["step"] for row in rows],
                    "loss": [row["loss"] for row in rows],
                }
            curves[node]["variants"].append(variant)
    return curves


def loss_curve_figure(curves: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One panel per stage, one line per node, labelled with the variants that share it; write ``path`` (.png)."""
    plt = pyplot()

    stages = sorted({curve["stage"] for curve in curves.values()})
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for curve in curves.values():
            if curve["stage"] == stage and curve["steps"]:
                ax.plot(curve["steps"], curve["loss"], label=", ".join(curve["variants"]), linewidth=1.2)
        ax.set(title=f"stage {stage}", xlabel="step", ylabel=STAGE_LOSS.get(stage, "loss"))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def copy_stage_figures(manifest: Mapping[str, Any], results: Path, out_dir: Path) -> list[Path]:
    """Copy each pre-training node's figures (stage 1: reconstructions.png) to ``out_dir/<node>-<name>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nodes = dict.fromkeys(node for entry in manifest.values() for node in entry.get("nodes", []))
    copied = []
    for node in nodes:
        for figure in sorted((Path(results) / "pretrain" / node).glob("*.png")):
            with figure.open("rb") as source:
                copied.append(write_atomic(out_dir / f"{node}-{figure.name}", partial(shutil.copyfileobj, source)))
    return copied
