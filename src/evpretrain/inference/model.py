"""A checkpoint as a model that embeds or predicts on event windows, batched, on the GPU when there is one.

    from evpretrain.events import read_events
    from evpretrain.inference import load_model

    model = load_model("runs/cls/checkpoint.pt")                    # or a run folder, or a foreign checkpoint
    out = model.embed(read_events("rec.dat"), "ms:50")              # {"embeddings": (N, D), "t_start", "t_end"}
    out = model.predict(read_events("rec.dat"), "events:50000")     # top-k, masks or flow per window

Input: each window's events become the checkpoint's representation (``InferenceSpec.representation``) on the
batch's device: the voxel grid is built on the recording's pixel grid, then resized to the network's input, as the
training data (``evpretrain.downstream.data``, ``evpretrain.pretrain.data``) built it from its store.

Another sensor (``policy``): ``resize`` (the default) feeds the recording's whole view, stretched to the input, as
training fed its own sensor's; ``center_crop`` first crops the recording to the largest centred region with the
aspect ratio of the checkpoint's training sensor (of its input size when the sensor is unknown), so nothing is
stretched and the borders are left out. Events outside the crop are dropped. Dense predictions (masks, flow) come
at the resolution of that view: the recording's sensor, or the crop; flow in its pixels over the window's span.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evpretrain.data.resize import resize_maps
from evpretrain.errors import CheckpointError
from evpretrain.events.representations import EventTensors, histogram_ecdp, voxel_grid
from evpretrain.events.windows import Window, Windower, WindowSpec
from evpretrain.inference.spec import INFERENCE_KEY, InferenceSpec, foreign_spec, read_spec, spec_from_study
from evpretrain.models import build_backbone
from evpretrain.training.checkpoint import CHECKPOINT_NAME, METRICS_NAME, backbone_entries, load_checkpoint

__all__ = ["SENSOR_POLICIES", "InferenceModel", "load_model", "view_box"]

SENSOR_POLICIES = ("resize", "center_crop")


def view_box(sensor_size: tuple[int, int], aspect_of: tuple[int, int], policy: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the region of a ``sensor_size`` (H, W) recording the model sees: all of it for
    ``resize``, the largest centred region with the aspect ratio of ``aspect_of`` (H, W) for ``center_crop``."""
    if policy not in SENSOR_POLICIES:
        raise ValueError(f"resize policy must be one of {SENSOR_POLICIES}, got {policy!r}")
    height, width = sensor_size
    if policy == "resize":
        return 0, 0, height, width
    aspect = aspect_of[1] / aspect_of[0]  # W / H
    crop_w = min(width, int(round(height * aspect)))
    crop_h = min(height, int(round(crop_w / aspect)))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class InferenceModel:
    """A loaded checkpoint: ``spec`` (what it is), ``model`` (eval mode, on ``device``), ``policy`` for recordings
    of another sensor, ``batch_size`` windows per forward pass. ``embed`` works for every checkpoint (its backbone's
    pooled tokens), ``predict`` for fine-tuned ones."""

    def __init__(
        self,
        spec: InferenceSpec,
        model: nn.Module,
        *,
        device: str | torch.device | None = None,
        policy: str = "resize",
        batch_size: int = 16,
        path: str | Path | None = None,
    ):
        if policy not in SENSOR_POLICIES:
            raise ValueError(f"resize policy must be one of {SENSOR_POLICIES}, got {policy!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.spec, self.policy, self.batch_size, self.path = spec, policy, batch_size, path
        if getattr(model, "aux_head", None) is not None:
            model.aux_head = None  # the dense models' auxiliary head only serves training: spare its full-size output
        self.model = model.eval().to(self.device)
        self.backbone = model if spec.task == "embed" else model.backbone
        self.input_size: tuple[int, int] = tuple(self.backbone.img_size)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def view(self, sensor_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a ``sensor_size`` recording that the model sees (module docstring)."""
        return view_box(tuple(sensor_size), self.spec.sensor_size or self.input_size, self.policy)

    def inputs(self, windows: Sequence[np.ndarray], sensor_size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) float32 network input of B windows (``EVENT_DTYPE`` arrays) of a ``sensor_size`` recording,
        on ``device``."""
        rep = self.spec.representation
        top, left, height, width = self.view(sensor_size)
        scaled = rep.resize == "scale_events" or rep.kind == "histogram_ecdp"
        grid = self.input_size if scaled else (height, width)
        t, x, y, p, batch, _ = EventTensors.collate(list(windows), self.device)
        if (top, left, height, width) != (0, 0, *sensor_size):
            keep = (x >= left) & (x < left + width) & (y >= top) & (y < top + height)
            t, x, y, p, batch = t[keep], x[keep] - left, y[keep] - top, p[keep], batch[keep]
        if grid != (height, width):  # floor(x * W_grid / W_view), as the paper's events_reshape
            x, y = x.long() * grid[1] // width, y.long() * grid[0] // height
        events = EventTensors(t, x, y, p, batch, batch_size=len(windows))
        if rep.kind == "voxel_grid":
            maps = voxel_grid(events, rep.num_bins, height=grid[0], width=grid[1])
        else:
            maps = histogram_ecdp(events, height=grid[0], width=grid[1])
        if grid != self.input_size:
            mode = "nearest" if rep.resize == "nearest" else "bilinear"
            maps = resize_maps(maps.flatten(0, 1), self.input_size, mode).view(len(windows), -1, *self.input_size)
        return maps

    @torch.no_grad()
    def embed_batch(
        self, windows: Sequence[np.ndarray], sensor_size: tuple[int, int], tokens: bool = False
    ) -> dict[str, np.ndarray]:
        """``embeddings`` (B, D) float32, the mean of the output tokens (the paper's pooled representation), and
        with ``tokens`` the ``tokens`` (B, L, D) themselves, of B windows."""
        out = self.backbone(self.inputs(windows, sensor_size))
        result = {"embeddings": self.backbone.pool(out).float().cpu().numpy()}
        if tokens:
            result["tokens"] = out.tokens.float().cpu().numpy()
        return result

    @torch.no_grad()
    def predict_batch(
        self, windows: Sequence[np.ndarray], sensor_size: tuple[int, int], top_k: int = 5
    ) -> dict[str, np.ndarray]:
        """A fine-tuned model's output for B windows: ``classify``: ``classes`` (B, k) int64 and ``probs`` (B, k)
        float32, the k most probable classes, best first; ``segment``: ``masks`` (B, h, w) uint8 class ids (int16
        beyond 256 classes); ``flow``: ``flow`` (B, 2, h, w) float32, (dx, dy) in pixels of the view over each
        window's span. (h, w): the view (``view``)."""
        self.require_predictor()
        task = self.spec.task
        x = self.inputs(windows, sensor_size)
        if task == "classify":
            probs = self.model(x).float().softmax(dim=1)
            best = probs.topk(min(top_k, probs.shape[1]), dim=1)
            return {"classes": best.indices.cpu().numpy(), "probs": best.values.cpu().numpy()}
        size = self.view(sensor_size)[2:]
        if task == "segment":
            masks = self.model(x, size=size)["logits"].argmax(dim=1)
            return {"masks": masks.to(torch.int16 if self.spec.num_classes > 256 else torch.uint8).cpu().numpy()}
        return {"flow": self.model(x, size=size)["flow"].float().cpu().numpy()}

    def require_predictor(self) -> None:
        """Raise CheckpointError unless the checkpoint is a fine-tuned model (a pre-training one only embeds)."""
        if self.spec.task == "embed":
            kind = f"pre-training checkpoint (stage {self.spec.stage})" if self.spec.stage else "backbone checkpoint"
            raise CheckpointError(
                self.path or "<model>",
                f"is a {kind}: it embeds, it predicts nothing; use `evpretrain embed`, or predict with a fine-tuned "
                "run (evpretrain finetune ...)",
            )

    def batches(self, windows: Iterable[Window]) -> Iterator[list[Window]]:
        """``windows`` in lists of ``batch_size``."""
        batch: list[Window] = []
        for window in windows:
            batch.append(window)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def embed(
        self,
        events: np.ndarray,
        windows: WindowSpec | str,
        *,
        sensor_size: tuple[int, int] | None = None,
        tokens: bool = False,
    ) -> dict[str, np.ndarray]:
        """Embeddings of ``events`` (an ``EVENT_DTYPE`` array) cut into ``windows`` (``events:N`` or ``ms:T``):
        ``embeddings`` (N, D), ``tokens`` (N, L, D) on request, ``t_start`` and ``t_end`` (N,) int64 microseconds.
        ``sensor_size`` (H, W): the recording's, by default the checkpoint's."""
        sensor_size = self._sensor_size(events, sensor_size)
        return self._run(events, windows, lambda batch: self.embed_batch(batch, sensor_size, tokens))

    def predict(
        self,
        events: np.ndarray,
        windows: WindowSpec | str,
        *,
        sensor_size: tuple[int, int] | None = None,
        top_k: int = 5,
    ) -> dict[str, np.ndarray]:
        """``predict_batch``'s outputs for every window of ``events`` (see ``embed``), stacked, with ``t_start`` and
        ``t_end``; classification adds ``names`` (N, k), the class names."""
        sensor_size = self._sensor_size(events, sensor_size)
        out = self._run(events, windows, lambda batch: self.predict_batch(batch, sensor_size, top_k))
        if "classes" in out:
            out["names"] = np.asarray([[self.class_name(c) for c in row] for row in out["classes"]], dtype=object)
        return out

    def class_name(self, index: int) -> str:
        names = self.spec.class_names
        return names[index] if names is not None else f"class {index}"

    def _run(self, events: np.ndarray, windows: WindowSpec | str, step) -> dict[str, np.ndarray]:
        spec = WindowSpec.parse(windows) if isinstance(windows, str) else windows
        parts: dict[str, list[np.ndarray]] = {"t_start": [], "t_end": []}
        for batch in self.batches(Windower(spec, keep_empty=True, source="<events>").cut([events])):
            for key, value in step([w.events for w in batch]).items():
                parts.setdefault(key, []).append(value)
            parts["t_start"].append(np.array([w.t_start for w in batch], np.int64))
            parts["t_end"].append(np.array([w.t_end for w in batch], np.int64))
        return {key: np.concatenate(value) for key, value in parts.items()}

    def _sensor_size(self, events: np.ndarray, sensor_size: tuple[int, int] | None) -> tuple[int, int]:
        size = sensor_size or self.spec.sensor_size
        if size is None:
            raise ValueError("the checkpoint does not record its sensor size: pass sensor_size=(H, W)")
        if len(events) and (int(events["x"].max()) >= size[1] or int(events["y"].max()) >= size[0]):
            raise ValueError(
                f"events reach x={int(events['x'].max())}, y={int(events['y'].max())}, outside the {size[1]}x{size[0]} "
                "sensor: pass the recording's sensor_size=(H, W)"
            )
        return tuple(size)


def load_model(
    path: str | Path,
    source: str | None = None,
    device: str | torch.device | None = None,
    *,
    policy: str = "resize",
    batch_size: int = 16,
    study: dict[str, Any] | None = None,
    backbone: str | None = None,
    allow_partial: bool = False,
) -> InferenceModel:
    """The checkpoint ``path`` (a ``checkpoint.pt``, or a run folder holding one) ready to embed or predict.

    ``source`` None: a checkpoint of this project, read through its ``inference`` entry; one without it (written
    before checkpoints carried it) needs ``study``, the study config that trained it (``spec_from_study``: its
    backbone and input; a fine-tuning run's task, classes and head from the ``metrics.json`` beside it).
    Otherwise a foreign checkpoint of that importer (``evpretrain.downstream.importers``) with the defaults of
    ``FOREIGN_SPECS`` (``backbone``: another registered backbone of the family, e.g. ``vit_base_patch16``;
    ``allow_partial`` as the importer's). ``device``: default cuda when available, else cpu.
    Raises CheckpointError naming the file for a missing, unreadable or unfitting checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if source is not None:
        from evpretrain.downstream.importers import import_checkpoint

        spec = foreign_spec(source, backbone)
        net = build_backbone(spec.backbone)
        import_checkpoint(path, source, net, allow_partial=allow_partial)
        return InferenceModel(spec, net, device=device, policy=policy, batch_size=batch_size, path=path)
    checkpoint = load_checkpoint(path, required=("model",))
    if INFERENCE_KEY not in checkpoint and study is not None:
        metrics = path.parent / METRICS_NAME
        spec = spec_from_study(study, json.loads(metrics.read_text()) if metrics.is_file() else None)
    else:
        spec = read_spec(checkpoint, path)
    net = build_backbone(spec.backbone)
    try:
        if spec.task == "embed":
            net.load_state_dict(backbone_entries(checkpoint["model"], path))
        else:
            from evpretrain.downstream.run import build_model

            net = build_model(spec.task, spec.mode, net, spec.num_classes, spec.head)
            net.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            path,
            f"its weights do not fit the model its spec describes ({spec.backbone.name}, task {spec.task}): {detail}",
        ) from None
    return InferenceModel(spec, net, device=device, policy=policy, batch_size=batch_size, path=path)
