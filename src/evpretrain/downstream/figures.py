"""The figure each downstream run writes: a confusion matrix (classification), true and predicted masks
(segmentation), true and predicted flow in the Middlebury colour wheel (optical flow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from evpretrain.plotting import pyplot, save_figure

FIGURE_NAMES = {"classify": "confusion.png", "segment": "masks.png", "flow": "flow.png"}


def write_task_figure(
    task: str,
    model: nn.Module,
    dataset: Dataset,
    scores: dict[str, Any],
    out_dir: Path,
    *,
    class_names: list[str] | None = None,
    samples: int = 4,
) -> Path:
    """Write ``out_dir/<FIGURE_NAMES[task]>``; dense tasks show the first ``samples`` samples of ``dataset``."""
    plt = pyplot()

    path = Path(out_dir) / FIGURE_NAMES[task]
    if task == "classify":
        figure = _confusion_figure(plt, np.asarray(scores["confusion"], dtype=np.float64), class_names, scores)
    else:
        figure = _dense_figure(plt, task, model, [dataset[i] for i in range(min(samples, len(dataset)))])
    return save_figure(figure, path, dpi=100, bbox_inches="tight")


def _confusion_figure(plt, confusion: np.ndarray, class_names: list[str] | None, scores: dict[str, Any]):
    # Rows normalised to recall, so classes of different sizes compare; the counts stay in metrics.json.
    recall = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(recall))
    figure, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(recall, cmap="viridis", vmin=0, vmax=1)
    if class_names is not None and len(class_names) <= 40:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90)
        ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {100 * scores['top1']:.1f}%")
    figure.colorbar(image, ax=ax, label="fraction of the true class")
    return figure


@torch.no_grad()
def _dense_figure(plt, task: str, model: nn.Module, samples: list[dict[str, torch.Tensor]]):
    from torchvision.utils import flow_to_image

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    voxel = torch.stack([s["voxel"] for s in samples]).to(device)
    out = model(voxel, size=samples[0]["mask" if task == "segment" else "flow"].shape[-2:])  # the targets' size
    model.train(was_training)
    figure, axes = plt.subplots(len(samples), 3, figsize=(9, 3 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        events = sample["voxel"].sum(0).numpy()
        limit = max(float(np.abs(events).max()), 1e-6)
        axes[row, 0].imshow(events, cmap="bwr", vmin=-limit, vmax=limit)
        if task == "segment":
            true = sample["mask"].numpy().astype(np.float64)
            true[true == 255] = np.nan
            classes = out["logits"].shape[1]
            axes[row, 1].imshow(true, cmap="tab20", vmin=0, vmax=max(classes - 1, 1), interpolation="nearest")
            axes[row, 2].imshow(
                out["logits"][row].argmax(0).cpu().numpy(),
                cmap="tab20",
                vmin=0,
                vmax=max(classes - 1, 1),
                interpolation="nearest",
            )
            titles = ("events", "true mask", "predicted mask")
        else:
            true = sample["flow"] * sample["valid"]
            scale = float(true.abs().max()) or 1.0
            # One scale for both panels so that colours compare; flow_to_image normalises by the maximum norm.
            pair = torch.stack([true, out["flow"][row].float().cpu()]).clamp(-4 * scale, 4 * scale)
            images = flow_to_image(pair).permute(0, 2, 3, 1).numpy()
            axes[row, 1].imshow(images[0])
            axes[row, 2].imshow(images[1])
            titles = ("events", "true flow", "predicted flow")
        for ax, title in zip(axes[row], titles):
            ax.set_title(title)
            ax.axis("off")
    return figure
