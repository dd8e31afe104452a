"""The pre-training dataset: one event-store sample in, the network's input and every stage's targets out.

A sample of the store is one short video: its events (``frames[0]`` to ``frames[-1]``), its difference maps and
frames. ``window`` chooses what a training sample spans:

- ``interval`` (the paper's): ONE frame interval, drawn at random each time the sample is read, as the paper's
  ``PretrainEFImageNetDataset`` draws ``frame_index = np.random.randint(0, 10)`` per read (BIT-Vision/EventPretrain,
  dataset/pretrain/pr_ef_imagenet_dataset.py:186). Interval i holds the events with t_i <= t < t_(i+1) (the last one
  closes at t_(i+1)), the frame times being t_n = round(n * 1e6 / frame_rate_hz) microseconds, as both store builders
  render them (the store's ``frame_rate_hz`` attribute).
- ``clip``: the whole video, every interval at once.

Fields (``default_collate`` stacks them into the batch of the pre-training contract):

- ``voxel`` (num_bins, H, W) float32: the 5-bin voxel grid of the window's events, bilinear in time, polarity +/-1
  (``evpretrain.events.representations.voxel_grid``). Not normalised, as in the paper's code (its loaders feed the
  raw ``events_to_voxel_grid`` output through ``evg_augment`` and nothing else).
- ``target_difference`` (1, H, W) float32, when the store holds ``diff_maps``: the window's log-intensity change
  ``log I(t_end) - log I(t_start)`` in nepers: the interval's difference map, or the sum of the clip's.
- ``target_frame`` (1, H, W) float32, about [0, 1], when the store holds ``frames``: the intensity at the window end.
- ``density`` (H, W) float32: the window's events per pixel of the input grid, moved by the same view.
- ``label`` () int64, -1 where the store has no labels; ``index`` () int64, the sample's index in the store.
- ``image`` (3, H_t, W_t) float32 in [0, 1], with ``with_image=True``: the frame at the window end, grey in three
  channels, at ``image_size``; never augmented.

The view (``augment``; the paper's ``evg_augment`` and ``frame_augment``, dataset/augmentation/view_augment.py:65-89):
one draw per read moves the voxel grid, the targets and the density alike: a crop of ``crop_scale`` of the area by
their rule (``evpretrain.data.view.view_crop_box``), a resize to ``input_size``, a horizontal flip (``hflip_p``), and
a time flip (``time_flip_p``): the window played backwards, bins reversed and the grid and difference target negated
(their ``evg_time_flip`` and ``frame_time_flip``); the frame target becomes the intensity at the reversed window's
end (its start). The paper negates the grid only for 5 or 6 bins (view_augment.py:54); ours always does, the grid of
reversed events. Every draw (interval, crop, flips) is a function of (seed, epoch, index): ``set_epoch`` before each
epoch, as with ``DistributedSampler``; the epoch lives in shared memory, so it also reaches persistent workers.

Resizing (``resize``, the voxel grid): ``nearest`` (the paper's EF path: the cropped grid resized with
``F.interpolate``'s nearest, view_augment.py:65,72), ``bilinear`` (ours: averaged, antialiased when shrinking, so a
value stays a per-pixel value) or ``scale_events`` (the paper's N-ImageNet path: event coordinates scaled to the
input size before the grid is built, so values add up, then the crop resized with nearest;
dataset/augmentation/events_augment.py:22-26, dataset/pretrain/pr_n_imagenet_dataset.py:85-89). ``target_resize``,
the targets: ``bicubic`` (the paper's, view_augment.py:84) or ``bilinear``. The density is counted directly on the
input grid, so it stays an exact event count.

Where the dense work runs (``transforms``): ``worker``, each read builds the sample above (the paper's loaders), or
``device``: a read gives what the sample is made of, the window's ``events``, the ``view`` (``pack_view``), ``label``,
``index``, the sensor-sized ``difference`` and target ``frame`` as stored (one frame read alone) and the image's
``image_frame``; ``collate`` packs the events flat (``pack_events``) and ``PretrainBatchViews`` builds the batch above
on the training device, the voxel grids to float32 rounding and every other field with the same operations.

Teacher tokens (stages 2 and 3) are cached once per sample, one image per video. The paper's stage-2/3 loaders crop
and flip the voxel grid and leave the CLIP tokens as they are (pr_ef_imagenet_dataset.py:194,213-221), so under a
crop or a horizontal flip student token (i, j) no longer sees what teacher token (i, j) saw; ``view_tokens`` moves the
tokens with the view instead (``pretrain.data.align_teacher_tokens``). The time flip moves nothing in space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from evpretrain.data.batch_views import (
    apply_views,
    event_density_batch,
    pack_events,
    pack_view,
    time_flip_where,
    unpack_views,
    voxel_grids,
)
from evpretrain.data.resize import as_size, resize_maps
from evpretrain.data.store import EventStore, StoreError, frame_times
from evpretrain.data.view import CropBox, apply_view, view_crop_box
from evpretrain.events.representations import voxel_grid
from evpretrain.pretrain.config import GridResize, PretrainAugment, TargetResize, Transforms, Window

__all__ = [
    "PretrainBatchViews",
    "PretrainDataset",
    "View",
    "collate",
    "event_density",
    "frame_times",
    "time_flip",
    "view_tokens",
]


def collate(samples: list[dict]) -> dict:
    """The batch of ``PretrainDataset`` samples: every field has one shape per dataset, so stacking is all a batch
    needs, but the events of ``transforms="device"`` samples, which are packed (``pack_events``)."""
    if not samples or "events" not in samples[0]:
        return default_collate(samples)
    rest = default_collate([{key: value for key, value in s.items() if key != "events"} for s in samples])
    return rest | {"events": pack_events([s["events"] for s in samples])}


@dataclass(frozen=True)
class View:
    """One read's draw: the frame ``interval`` (None: the whole clip), the ``crop`` (top, left, height, width) in
    pixels of the grid it applies to (``PretrainDataset.grid_size``), the horizontal and the time flip."""

    interval: int | None
    crop: CropBox
    hflip: bool
    time_flip: bool


def event_density(
    events: np.ndarray,
    sensor_size: tuple[int, int],
    size: tuple[int, int],
    *,
    grid_size: tuple[int, int] | None = None,
    crop: CropBox | None = None,
) -> np.ndarray:
    """Events per pixel, (H, W) float32, of ``EVENT_DTYPE`` events from a ``sensor_size`` (H_s, W_s) sensor counted
    on a ``size`` (H, W) grid. Sensor column x falls in column floor(x * W_g / W_s) of ``grid_size`` (default the
    sensor's), and a column x_g inside ``crop`` (top, left, h, w) of that grid in column floor((x_g - left) * W / w);
    rows alike; events outside the crop are not counted."""
    (sensor_h, sensor_w), (height, width) = sensor_size, size
    grid_h, grid_w = grid_size or sensor_size
    top, left, crop_h, crop_w = crop or (0, 0, grid_h, grid_w)
    rows = events["y"].astype(np.int64) * grid_h // sensor_h - top
    cols = events["x"].astype(np.int64) * grid_w // sensor_w - left
    inside = (rows >= 0) & (rows < crop_h) & (cols >= 0) & (cols < crop_w)
    rows, cols = rows[inside] * height // crop_h, cols[inside] * width // crop_w
    counts = np.bincount(rows * width + cols, minlength=height * width)
    return counts.astype(np.float32).reshape(height, width)


def time_flip(voxel: torch.Tensor) -> torch.Tensor:
    """The voxel grid (..., num_bins, H, W) of the same events played backwards: bins reversed, sign negated."""
    return voxel.flip(-3).neg_()


def view_tokens(
    tokens: torch.Tensor, token_grid: tuple[int, int], view: View, grid_size: tuple[int, int]
) -> torch.Tensor:
    """Teacher tokens (gh * gw, D), row-major over ``token_grid`` and covering the whole ``grid_size`` view, moved as
    ``view`` moves the voxel grid: the crop box resampled bilinearly onto the token grid (cell centres matched,
    border values beyond the edge), then mirrored left-right under the horizontal flip."""
    (gh, gw), (height, width) = token_grid, grid_size
    top, left, crop_h, crop_w = view.crop
    maps = tokens.T.reshape(1, -1, gh, gw)
    if (top, left, crop_h, crop_w) != (0, 0, height, width):
        # Output cell centres in the view's normalised coordinates (-1 and 1 at its outer edges).
        ys = (top + (torch.arange(gh, dtype=maps.dtype) + 0.5) * crop_h / gh) / height * 2 - 1
        xs = (left + (torch.arange(gw, dtype=maps.dtype) + 0.5) * crop_w / gw) / width * 2 - 1
        where = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, gh, gw, (x, y))
        maps = F.grid_sample(maps, where, mode="bilinear", padding_mode="border", align_corners=False)
    if view.hflip:
        maps = maps.flip(-1)
    return maps.reshape(-1, gh * gw).T


class PretrainDataset(Dataset):
    """Pre-training samples of one event store; see the module docstring for the fields, windows and views.

    Args:
        store_path: an event store (``evpretrain.data.store``).
        num_bins: temporal bins of the voxel grid.
        input_size: (H, W) of the network input, or one int for a square; None keeps the store's sensor size.
        window: ``interval`` (one frame interval at random per read) or ``clip`` (the whole video).
        augment: the view augmentation; the default changes nothing.
        resize: how the voxel grid reaches the input size: ``nearest``, ``bilinear`` or ``scale_events``.
        target_resize: how the targets do: ``bicubic`` or ``bilinear``.
        with_image: add the frame ``image`` (needs frames in the store).
        image_size: (H_t, W_t) of ``image``, or one int for a square.
        seed: seed of every draw (interval, crop, flips).
        transforms: ``worker`` (a read gives the sample above) or ``device`` (a read gives what the sample is made
            of, ``collate`` packs it and ``batch_views()`` makes the batch where it lives; see the module docstring).
    """

    def __init__(
        self,
        store_path: str | Path,
        *,
        num_bins: int = 5,
        input_size: tuple[int, int] | int | None = None,
        window: Window = "clip",
        augment: PretrainAugment = PretrainAugment(),
        resize: GridResize = "bilinear",
        target_resize: TargetResize = "bilinear",
        with_image: bool = False,
        image_size: tuple[int, int] | int = 224,
        seed: int = 0,
        transforms: Transforms = "worker",
    ):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        for name, value, allowed in (
            ("window", window, ("interval", "clip")),
            ("resize", resize, ("nearest", "bilinear", "scale_events")),
            ("target_resize", target_resize, ("bicubic", "bilinear")),
            ("transforms", transforms, ("worker", "device")),
        ):
            if value not in allowed:
                raise ValueError(f"pretrain.data.{name} must be one of {list(allowed)}, got {value!r}")
        self.store_path = Path(store_path)
        self._store = store = EventStore(self.store_path)  # opens a handle per process, as workers need
        self.sensor_size: tuple[int, int] = store.sensor_size
        fields = set(store.fields)
        labels = store.labels
        self._num_samples = len(store)
        self.num_bins = num_bins
        self.input_size = as_size(input_size) if input_size is not None else self.sensor_size
        # The grid the voxel grid is built on and the crop is drawn on: the input's when event coordinates are scaled.
        self.grid_size = self.input_size if resize == "scale_events" else self.sensor_size
        self.image_size = as_size(image_size)
        self.window, self.augment, self.resize, self.target_resize = window, augment, resize, target_resize
        self.with_image = with_image
        self.seed = int(seed)
        self.transforms = transforms
        self.has_difference = "diff_maps" in fields
        self.has_frames = "frames" in fields
        if with_image and not self.has_frames:
            raise StoreError(self.store_path, "with_image=True needs frames, but this store holds none")
        if transforms == "device" and max(self.sensor_size) > np.iinfo(np.int16).max:
            raise StoreError(self.store_path, f"transforms: device packs int16 pixels; sensor {self.sensor_size}")
        self._num_frames = len(store.dense("frames", 0)) if self.has_frames and len(store) else 0
        self._times = self._frame_times(store) if window == "interval" else None
        self._labels = labels if labels is not None else np.full(self._num_samples, -1, np.int64)
        # Shared memory: set_epoch in the main process reaches the workers, persistent ones included.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def _frame_times(self, store: EventStore) -> np.ndarray:
        rate = store.attrs.get("frame_rate_hz")
        if rate is None or not (self.has_difference or self.has_frames) or len(store) == 0:
            raise StoreError(
                self.store_path,
                "pretrain.data.window: interval needs the frame times (the attribute frame_rate_hz, here "
                f"{rate!r}) and the frame count (diff_maps or frames, here {sorted(store.fields)}); use window: clip",
            )
        count = len(store.dense("frames", 0)) if self.has_frames else len(store.dense("diff_maps", 0)) + 1
        return frame_times(count, float(rate))

    def __len__(self) -> int:
        return self._num_samples

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @property
    def num_intervals(self) -> int | None:
        """Frame intervals per stored video with ``window="interval"``, else None."""
        return None if self._times is None else len(self._times) - 1

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch``; call before iterating over each epoch."""
        self._epoch.fill_(int(epoch))

    def view(self, index: int) -> View:
        """Sample ``index``'s draw in the current epoch: interval, crop, horizontal flip, time flip, in that order."""
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        interval = int(rng.integers(self.num_intervals)) if self._times is not None else None
        crop = view_crop_box(self.grid_size, self.augment.crop_scale, rng)
        hflip = _chance(rng, self.augment.hflip_p)
        return View(interval, crop, hflip, _chance(rng, self.augment.time_flip_p))

    def is_flipped(self, index: int) -> bool:
        """Whether sample ``index`` is time-flipped in the current epoch."""
        return self.view(index).time_flip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.store_path}: sample {index} out of range for {len(self)} samples")
        store, view = self._store, self.view(index)
        events = self._window_events(store.events(index), view.interval)
        if self.transforms == "device":
            return self._parts(index, view, events)
        voxel = torch.from_numpy(
            voxel_grid(self._on_grid(events), self.num_bins, height=self.grid_size[0], width=self.grid_size[1])
        )
        density = torch.from_numpy(
            event_density(events, self.sensor_size, self.input_size, grid_size=self.grid_size, crop=view.crop)
        )
        sample: dict[str, torch.Tensor] = {
            "voxel": self._view(time_flip(voxel) if view.time_flip else voxel, view, self._grid_mode),
            "density": density.flip(-1) if view.hflip else density,
            "label": torch.tensor(self._labels[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.has_difference:
            difference = self._difference(index, view.interval).astype(np.float32, copy=False)
            difference = torch.from_numpy(-difference if view.time_flip else difference)
            sample["target_difference"] = self._target(difference, view)
        if self.has_frames:
            target, end = self._frame_indices(view)
            frame = store.dense("frames", index, target)
            sample["target_frame"] = self._target(_intensity(frame)[None], view)
            if self.with_image:
                frame = frame if end == target else store.dense("frames", index, end)
                image = resize_maps(_intensity(frame)[None], self.image_size).clamp(0.0, 1.0)
                sample["image"] = image.expand(3, -1, -1)  # a view: collating makes the copy
        return sample

    def _parts(self, index: int, view: View, events: np.ndarray) -> dict[str, Any]:
        """What sample ``index`` is made of, for ``transforms="device"``: the window's ``events``, the ``view``
        (``pack_view``), ``label``, ``index``, the sensor-sized ``difference`` (1, H_s, W_s) (the stored dtype, or
        float32 for a clip's sum) and ``frame`` (H_s, W_s) of the targets, the ``image_frame`` of the image."""
        store = self._store
        sample: dict[str, Any] = {
            "events": events,
            "view": pack_view(view.crop, view.hflip, view.time_flip),
            "label": torch.tensor(self._labels[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.has_difference:
            sample["difference"] = torch.from_numpy(self._difference(index, view.interval))
        if self.has_frames:
            target, end = self._frame_indices(view)
            sample["frame"] = torch.from_numpy(store.dense("frames", index, target))
            if self.with_image:
                sample["image_frame"] = (
                    sample["frame"] if end == target else torch.from_numpy(store.dense("frames", index, end))
                )
        return sample

    def _difference(self, index: int, interval: int | None) -> np.ndarray:
        """The window's difference map (1, H_s, W_s) as stored, or the clip's sum in float32."""
        if interval is None:
            # Consecutive differences telescope: their sum is log I(T_end) - log I(T_0). Summed in float32: EF
            # stores keep them in float16.
            return self._store.dense("diff_maps", index).sum(axis=0, dtype=np.float32, keepdims=True)
        return self._store.dense("diff_maps", index, interval)[None]

    def _frame_indices(self, view: View) -> tuple[int, int]:
        """The frames of the frame target (the window's end, its start when time-flipped) and of the image (the
        end)."""
        start, end = (0, self._num_frames - 1) if view.interval is None else (view.interval, view.interval + 1)
        return (start if view.time_flip else end), end

    def batch_views(self) -> PretrainBatchViews:
        """The device-side transform of this dataset's packed batches (``transforms="device"``)."""
        return PretrainBatchViews(self)

    def _window_events(self, events: np.ndarray, interval: int | None) -> np.ndarray:
        """The events of frame interval ``interval`` (t_i <= t < t_(i+1), the last interval closed), or all."""
        if interval is None:
            return events
        last = interval + 1 == self.num_intervals
        start = np.searchsorted(events["t"], self._times[interval], "left")
        stop = np.searchsorted(events["t"], self._times[interval + 1], "right" if last else "left")
        return events[start:stop]

    def _on_grid(self, events: np.ndarray) -> np.ndarray:
        """Events with coordinates on ``grid_size``: scaled, floor(x * W_g / W_s), as the paper's ``events_reshape``
        followed by the grid's ``.long()``; unchanged on the sensor grid."""
        if self.grid_size == self.sensor_size:
            return events
        scaled = events.copy()
        for axis, grid, sensor in (
            ("y", self.grid_size[0], self.sensor_size[0]),
            ("x", self.grid_size[1], self.sensor_size[1]),
        ):
            scaled[axis] = events[axis].astype(np.int64) * grid // sensor
        return scaled

    @property
    def _grid_mode(self) -> str:
        # scale_events resizes its crop with nearest neighbours, as the paper's evg_augment after events_reshape.
        return "bilinear" if self.resize == "bilinear" else "nearest"

    def _view(self, maps: torch.Tensor, view: View, mode: str) -> torch.Tensor:
        return apply_view(maps, view.crop, self.input_size, view.hflip, mode)

    def _target(self, maps: torch.Tensor, view: View) -> torch.Tensor:
        """A sensor-sized target (1, H_s, W_s) moved by ``view``: brought onto the crop's grid first (scale_events)."""
        return self._view(resize_maps(maps, self.grid_size, self.target_resize), view, self.target_resize)

    def close(self) -> None:
        """Close this process's store handle (it reopens on the next read)."""
        self._store.close()


class PretrainBatchViews:
    """A batch of ``PretrainDataset`` parts (``transforms="device"``, through ``collate``) made into the batch the
    worker path gives, on the device the batch lives on: voxel grids (``voxel_grid_batch``), time flips, crops and
    resizes (``apply_view``'s ops), density, targets and image; other keys (the teacher tokens) pass through.
    The voxel grids equal the worker path's to float32 rounding (its numba loop computes the bin position in float64
    and adds in another order); every other step is the same operation on the same values."""

    def __init__(self, dataset: PretrainDataset):
        self.num_bins, self.resize, self.target_resize = dataset.num_bins, dataset.resize, dataset.target_resize
        self.sensor_size, self.grid_size, self.input_size = dataset.sensor_size, dataset.grid_size, dataset.input_size
        self.image_size = dataset.image_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        parts = ("events", "view", "difference", "frame", "image_frame")
        out = {key: value for key, value in batch.items() if key not in parts}
        events = batch["events"]
        crops, hflips, time_flips = unpack_views(batch["view"])
        voxel = time_flip_where(voxel_grids(events, self.num_bins, self.grid_size, self.sensor_size), time_flips)
        # scale_events resizes its crop with nearest neighbours, as the paper's evg_augment after events_reshape.
        out["voxel"] = apply_views(
            voxel, crops, hflips, self.input_size, "bilinear" if self.resize == "bilinear" else "nearest"
        )
        density = event_density_batch(events, self.sensor_size, self.input_size, self.grid_size, crops)
        out["density"] = torch.where(hflips.view(-1, 1, 1), density.flip(-1), density)
        if "difference" in batch:
            difference = batch["difference"].float()
            difference = torch.where(time_flips.view(-1, 1, 1, 1), -difference, difference)
            out["target_difference"] = self._target(difference, crops, hflips)
        if "frame" in batch:
            out["target_frame"] = self._target(_intensity_tensor(batch["frame"])[:, None], crops, hflips)
        if "image_frame" in batch:
            image = resize_maps(_intensity_tensor(batch["image_frame"]), self.image_size).clamp(0.0, 1.0)
            out["image"] = image[:, None].expand(-1, 3, -1, -1).contiguous()
        return out

    def _target(self, maps: torch.Tensor, crops: list[CropBox], hflips: torch.Tensor) -> torch.Tensor:
        """Sensor-sized targets (B, 1, H_s, W_s) moved by the views, as ``PretrainDataset._target``."""
        on_grid = resize_maps(maps[:, 0], self.grid_size, self.target_resize)[:, None]
        return apply_views(on_grid, crops, hflips, self.input_size, self.target_resize)


def _chance(rng: np.random.Generator, p: float) -> bool:
    """True with probability ``p``; a certain outcome (p 0 or 1) draws nothing, so that the other draws stay put."""
    return p >= 1.0 or (p > 0.0 and bool(rng.random() < p))


def _intensity(frame: np.ndarray) -> torch.Tensor:
    """A stored frame (H, W), float in [0, 1] or uint8 (EF stores), as float32 in [0, 1]."""
    if frame.dtype == np.uint8:
        return torch.from_numpy(frame.astype(np.float32) / 255.0)
    return torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))


def _intensity_tensor(frames: torch.Tensor) -> torch.Tensor:
    """Stored frames (..., H, W), float or uint8, as float32 in [0, 1]: ``_intensity`` on tensors."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
