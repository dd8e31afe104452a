"""Accuracy of a fine-tuned classifier under corrupted events (``downstream.robustness`` in the study config).

Ours: background shot noise at several rates and a fraction of events dropped. Each level re-reads the evaluation
store with the corruption applied to every sample's events (``evpretrain.events.corruption``), each sample's noise a
function of (seed, sample index, kind), so a table is the same for a seed whatever the batch size or worker count,
and the levels of one kind share each sample's random stream (the curves are smoother than independent draws).

The authors' (BIT-Vision/EventPretrain): ``val_event_noise``, their ``--val_event_noise`` (main_finetune_cls.py:51,
e.g. dataset/finetune_cls/ft_n_caltech101_dataset.py:68-69): the training erase-and-add of the run's
``augment`` section applied to every evaluation sample, drawn from (seed, index); and other evaluation stores
scored as they are (``variants``: N-ImageNet's re-recorded mode_* and brightness_* validation sets,
main_finetune_cls.py:109-118,227-231), one row each, named by the store's file name. Their code scores these every
epoch and keeps each one's maximum; here the final classifier is scored once.

Rows: ``split`` (the store's file name without ``.h5``), ``corruption`` (shot_noise, drop, val_event_noise, or none
for a variant store), ``level`` (Hz, a fraction, the upper erase-and-add fraction, 0), ``top1``, ``top5``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from evpretrain.config import ConfigError
from evpretrain.downstream.config import RobustnessConfig, robustness_config, task_config
from evpretrain.downstream.data import DownstreamDataset
from evpretrain.downstream.run import build_model, evaluate, model_settings
from evpretrain.events.corruption import Corruption
from evpretrain.models import backbone_spec, build_backbone
from evpretrain.plotting import pyplot, save_figure
from evpretrain.training.checkpoint import CHECKPOINT_NAME, METRICS_NAME, load_checkpoint, write_json

__all__ = ["corruptions", "evaluate_robustness", "robustness_figure"]


def corruptions(config: RobustnessConfig) -> list[Corruption]:
    """The corruptions of ``config``'s levels: every shot-noise rate, then every drop fraction."""
    return [Corruption("shot_noise", float(level)) for level in config.shot_noise_hz] + [
        Corruption("drop", float(level)) for level in config.drop
    ]


def evaluate_robustness(
    study: Mapping[str, Any],
    run_dir: Path,
    eval_store: Path,
    out: Path,
    *,
    seed: int = 0,
    device: str | None = None,
    variants: Sequence[Path] = (),
) -> list[dict[str, Any]]:
    """Score the classifier of ``run_dir`` (an ``evpretrain finetune classify`` run folder) on ``eval_store`` under
    each corruption, and clean on each store of ``variants``; write ``out/robustness.{csv,md,png}`` and
    ``out/metrics.json``; return the table's rows (see the module docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    try:
        run = json.loads((run_dir / METRICS_NAME).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{run_dir}: no {METRICS_NAME}; expected a finished `evpretrain finetune classify` run folder"
        ) from None
    if run.get("task") != "classify":
        raise ConfigError(f"{run_dir / METRICS_NAME}: task is {run.get('task')!r}; robustness evaluates a classifier")
    config = robustness_config(study)
    spec = backbone_spec(study)
    task = task_config(study, "classify", run["mode"])
    if config.val_event_noise and task.augment.erase_add_fraction[1] == 0:
        raise ConfigError(
            f"downstream.robustness.val_event_noise: scores the training erase-and-add at evaluation, but "
            f"downstream.classify.{run['mode']}.augment.erase_add_fraction is [0, 0]; expected a positive upper bound"
        )
    settings = model_settings("classify", run["mode"], task)
    model = build_model("classify", run["mode"], build_backbone(spec), run["num_classes"], settings)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_NAME, required=("model",))["model"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    def dataset(store: Path) -> DownstreamDataset:
        common = dict(num_bins=spec.in_chans, input_size=tuple(model.backbone.img_size), window=task.window)
        return DownstreamDataset(store, "classify", train=False, augment=task.augment, seed=seed, **common)

    def row(data: DownstreamDataset, kind: str, level: float) -> dict[str, Any]:
        scores = evaluate("classify", model, DataLoader(data, batch_size=config.batch_size), device, run["num_classes"])
        split = Path(data.store_path).name.removesuffix(".h5")
        return {"split": split, "corruption": kind, "level": level, "top1": scores["top1"], "top5": scores["top5"]}

    base = dataset(eval_store)
    rows = [row(base.with_corruption(c), c.kind, c.level) for c in corruptions(config)]
    if config.val_event_noise:
        rows.append(
            row(base.with_corruption(None, event_noise=True), "val_event_noise", task.augment.erase_add_fraction[1])
        )
    rows += [row(dataset(Path(store)), "none", 0.0) for store in variants]
    out.mkdir(parents=True, exist_ok=True)
    _write_tables(rows, out)
    robustness_figure({"": rows}, out / "robustness.png")
    stores = {"eval_store": str(eval_store), "variant_stores": [str(v) for v in variants]}
    write_json({"run": str(run_dir), **stores, "seed": seed, "rows": rows}, out / METRICS_NAME)
    return rows


def _write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    from evpretrain.files import write_text_atomic

    table = pd.DataFrame(rows)
    write_text_atomic(out / "robustness.csv", table.to_csv(index=False))
    shown = table.assign(top1=(100 * table["top1"]).round(2), top5=(100 * table["top5"]).round(2))
    write_text_atomic(out / "robustness.md", shown.to_markdown(index=False) + "\n")


def robustness_figure(curves: Mapping[str, list[dict[str, Any]]], path: Path) -> Path:
    """Top-1 against shot noise and against dropped events, one line per entry of ``curves`` (name -> this
    module's table rows: corruption, level, top1); write ``path`` (.png)."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, kind, label in (
        (axes[0], "shot_noise", "shot noise (events / pixel / s)"),
        (axes[1], "drop", "fraction of events dropped"),
    ):
        for name, rows in curves.items():
            points = [(r["level"], 100 * r["top1"]) for r in rows if r["corruption"] == kind]
            if points:
                ax.plot(*zip(*points), marker="o", label=name or None)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if any(curves):
            ax.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
