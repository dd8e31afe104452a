"""Downstream samples of one event store: an event window in, the voxel grid and the task's target out.

A sample becomes a dict of tensors (``default_collate`` stacks them):

- ``voxel`` (num_bins, H, W) float32: the voxel grid of the sample's event window at the input size (H, W).
- ``classify``: ``label`` () int64.
- ``segment``: ``mask`` (H', W') int64, class ids, ``ignore_index`` (255) where a pixel has no label.
- ``flow``: ``flow`` (2, H', W') float32, (dx, dy) in pixels of (H', W'); ``valid`` (H', W') bool (all True when
  the store holds no ``valid`` field); ``events`` (H', W') bool, the pixels where the window's voxel grid at the
  sensor size is non-zero in some bin (the paper code's ``events_mask``, BIT-Vision/EventPretrain
  ``trainer/finetune_flow/ft_flow_trainer.py:198``: a pixel whose events cancel in every bin counts as without).

Dense targets live at (H', W') = the store's sensor size, the label's own resolution, when ``target_resolution`` is
"label" (the paper's code: predictions are resized to the label, ``ft_flow_trainer.py:191``,
``ft_semseg_trainer.py:207``), or at the input size (H, W) when it is "input".
- ``index`` () int64: the sample's index in the store.

Event window (classification only; the paper's ``get_random_index``, BIT-Vision/EventPretrain
dataset/augmentation/events_augment.py:5-20): training takes ``train_events`` consecutive events at a random start,
evaluation ``eval_events`` at a start set by ``eval_position``: ``random`` (theirs: a random start at evaluation too;
here drawn from (seed, index), so an evaluation is the same every epoch and every run of a seed) or ``middle`` (the
middle of the sample, deterministic without a seed). A random start lies in [0, N - L), as theirs; None or a sample
with at most L events takes them all. Segmentation and flow samples are windows already (their labels belong to the
window's end), so they always take every event.

Augmentation (training only, each draw a function of (seed, epoch, index) as in ``PretrainDataset``):
event level, the paper's ``erase_and_add_events`` (events_augment.py:28-55): of N events, a count drawn in
[int(low N), int(high N)) of ``erase_add_fraction`` is erased and an independent count in the same range is added as
copies of random events moved by N(0, ``jitter_px``) pixels and N(0, ``jitter_us``) microseconds; view level, the
paper's ``evg_augment`` (view_augment.py:65-77): a random crop of ``crop_scale`` of the area (aspect rule
``crop_aspect``), resized to the input size, a horizontal flip with probability ``hflip_p`` (0 for digits and text,
where a mirror changes the class) and a time flip with probability ``time_flip_p`` (bins reversed and negated, flow
negated). Dense targets are cropped alike and resized with nearest neighbours to (H', W'); flow is scaled by the resize
factors (and dx negated under the flip), so it stays a displacement in pixels of (H', W').

``transforms``: ``worker`` (a read gives the sample above) or ``device``: a read gives what the sample is made of (the
window's ``events`` after corruption and erase-and-add, the ``view`` drawn from the same stream, ``pack_view``, and
the sensor-sized targets as stored), ``collate`` packs the events, and ``DownstreamBatchViews`` makes the batch on
the training device: the same tensors, the voxel grids to float32 rounding (``evpretrain.data.batch_views``).

``corruption`` (robustness evaluation): applied to the window's events before anything else, with a stream given
by ``corruption_seed(seed, index, corruption)``: the same noise whatever the evaluation order or worker count.
``event_noise`` (the authors' ``--val_event_noise``, main_finetune_cls.py:51): the training erase-and-add applied
to evaluation samples too, drawn from (seed, index).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from evpretrain.data.batch_views import apply_views, pack_events, pack_view, time_flip_where, unpack_views, voxel_grids
from evpretrain.data.resize import as_size, resize_maps
from evpretrain.data.store import EventStore, StoreError
from evpretrain.downstream.config import TARGET_RESOLUTIONS, AugmentConfig, Task, Transforms, WindowConfig
from evpretrain.events.corruption import Corruption, apply_corruption, corruption_seed
from evpretrain.events.representations import voxel_grid

__all__ = [
    "DownstreamBatchViews",
    "DownstreamDataset",
    "collate",
    "IGNORE_INDEX",
    "TASKS",
    "erase_and_add_events",
]

TASKS = ("classify", "segment", "flow")
IGNORE_INDEX = 255
TARGET_KEYS = ("mask", "flow", "valid")


def collate(samples: list[dict]) -> dict:
    """The batch of ``DownstreamDataset`` samples: stacked, the events of ``transforms="device"`` samples packed."""
    if not samples or "event_stream" not in samples[0]:
        return default_collate(samples)
    rest = default_collate([{key: value for key, value in s.items() if key != "event_stream"} for s in samples])
    return rest | {"event_stream": pack_events([s["event_stream"] for s in samples])}


def erase_and_add_events(
    events: np.ndarray,
    fraction: tuple[float, float],
    jitter_px: float,
    sensor_size: tuple[int, int],
    rng: np.random.Generator,
    jitter_us: float = 0.0,
) -> np.ndarray:
    """The authors' ``erase_and_add_events`` (events_augment.py:28-55) on ``events`` (the event contract, N events).

    Erases a count drawn uniformly in [int(low N), int(high N)) of random events and adds an independent count in
    the same range: copies of random events (erased ones included) moved by N(0, ``jitter_px``) pixels, clipped
    to the sensor (height, width) and truncated to whole pixels as their voxel grid's ``.long()`` does, and by
    N(0, ``jitter_us``) microseconds. Nothing changes when int(high N) is 0. Returns a new array sorted by t.
    """
    low, high = (int(f * len(events)) for f in fraction)
    if high == 0:
        return events
    erase, add = (int(rng.integers(low, high)) if high > low else low for _ in range(2))
    kept = np.delete(events, rng.choice(len(events), size=erase, replace=False))
    added = events[rng.choice(len(events), size=add, replace=False)].copy()
    height, width = sensor_size
    for axis, size in (("x", width), ("y", height)):
        added[axis] = np.clip(added[axis] + rng.normal(0.0, jitter_px, add), 0, size - 1)  # assignment truncates
    if jitter_us > 0:
        added["t"] = np.rint(added["t"] + rng.normal(0.0, jitter_us, add)).astype(np.int64)
    merged = np.concatenate([kept, added])
    return merged[np.argsort(merged["t"], kind="stable")]


class DownstreamDataset(Dataset):
    """Samples of ``task`` from one event store; see the module docstring for the fields, windows and augmentation.

    Args:
        store_path: an event store (``evpretrain.data.store``) holding labels, masks or flow as ``task`` needs.
        task: "classify", "segment" or "flow".
        train: draw windows and augmentations (True) or use the fixed evaluation window (False).
        num_bins: temporal bins of the voxel grid.
        input_size: (H, W) of the network input, or one int for a square; None keeps the sensor size.
        window, augment: see ``WindowConfig`` and ``AugmentConfig`` (augment applies only when ``train``).
        target_resolution: dense targets at the store's sensor size ("label") or at ``input_size`` ("input").
        corruption: a robustness corruption of the events, or None.
        event_noise: apply ``augment``'s erase-and-add at evaluation too (the authors' ``--val_event_noise``).
        seed: seed of every random draw (windows, augmentation, corruption).
        transforms: ``worker`` or ``device`` (see the module docstring).
    """

    def __init__(
        self,
        store_path: str | Path,
        task: Task,
        *,
        train: bool,
        num_bins: int = 5,
        input_size: tuple[int, int] | int | None = None,
        window: WindowConfig = WindowConfig(),
        augment: AugmentConfig = AugmentConfig(),
        target_resolution: str = "label",
        corruption: Corruption | None = None,
        event_noise: bool = False,
        seed: int = 0,
        transforms: Transforms = "worker",
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if target_resolution not in TARGET_RESOLUTIONS:
            raise ValueError(f"target_resolution must be one of {TARGET_RESOLUTIONS}, got {target_resolution!r}")
        self.store_path = Path(store_path)
        self._store = store = EventStore(self.store_path)  # opens a handle per process, as workers need
        self.sensor_size: tuple[int, int] = tuple(store.sensor_size)
        self._num_samples = len(store)
        fields = set(store.fields)
        self._labels = store.labels
        self.attrs = store.attrs
        needed = {"classify": "labels", "segment": "masks", "flow": "flow"}[task]
        if needed not in fields:
            raise StoreError(
                self.store_path, f"task {task!r} needs the field {needed!r}; this store holds {sorted(fields)}"
            )
        self.task = task
        self.train = train
        self.num_bins = num_bins
        self.input_size = as_size(input_size) if input_size is not None else self.sensor_size
        self.target_size = self.sensor_size if target_resolution == "label" else self.input_size
        self.window = window
        self.augment = augment
        self.corruption = corruption
        self.event_noise = event_noise
        self.seed = int(seed)
        if transforms not in ("worker", "device"):
            raise ValueError(f"transforms must be one of ['worker', 'device'], got {transforms!r}")
        if transforms == "device" and max(self.sensor_size) > np.iinfo(np.int16).max:
            raise StoreError(self.store_path, f"transforms: device packs int16 pixels; sensor {self.sensor_size}")
        self.transforms = transforms
        self.has_valid = "valid" in fields
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # reaches persistent workers

    def __len__(self) -> int:
        return self._num_samples

    @property
    def num_classes(self) -> int | None:
        """Classes of the task from the store's attributes (``class_names`` / ``mask_class_names``), else None."""
        names = self.attrs.get({"classify": "class_names", "segment": "mask_class_names"}.get(self.task, ""))
        return len(names) if names is not None else None

    @property
    def deterministic(self) -> bool:
        """Whether every epoch reads the same inputs: no random window, augmentation or corruption. (An evaluation
        window at a random start is drawn from (seed, index) alone: the same every epoch.)"""
        if not self.train:
            return self.corruption is None and not self.event_noise
        random_window = self.task == "classify" and self.window.train_events is not None
        return self.corruption is None and not random_window and self.augment == AugmentConfig()

    def with_corruption(self, corruption: Corruption | None, event_noise: bool = False) -> DownstreamDataset:
        """This dataset reading its samples under ``corruption`` and, with ``event_noise``, the training
        erase-and-add of ``augment`` (a shallow copy)."""
        other = copy.copy(self)
        other.corruption, other.event_noise = corruption, event_noise
        return other

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``; call before iterating over each epoch."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.store_path}: sample {index} out of range for {len(self)} samples")
        store = self._store
        rng = np.random.default_rng((self.seed, int(self._epoch) if self.train else 0, int(index)))
        events = self._window(store.events(index), rng)
        if self.corruption is not None:
            events = apply_corruption(
                events, self.sensor_size, self.corruption, corruption_seed(self.seed, index, self.corruption)
            )
        if (self.train or self.event_noise) and self.augment.erase_add_fraction[1] > 0:
            augment = self.augment
            events = erase_and_add_events(
                events, augment.erase_add_fraction, augment.jitter_px, self.sensor_size, rng, augment.jitter_us
            )
        sample: dict[str, Any] = {"index": torch.tensor(index, dtype=torch.int64)}
        if self.task == "classify":
            sample["label"] = torch.tensor(int(self._labels[index]), dtype=torch.int64)
        elif self.task == "segment":
            sample["mask"] = torch.from_numpy(store.dense("masks", index).astype(np.int64))
        else:
            sample["flow"] = torch.from_numpy(np.asarray(store.dense("flow", index), dtype=np.float32))
            valid = store.dense("valid", index) if self.has_valid else np.ones(self.sensor_size, bool)
            sample["valid"] = torch.from_numpy(np.asarray(valid, dtype=bool))
        crop, flip, time_flip = self._draw_view(rng)
        if self.transforms == "device":
            return sample | {"event_stream": events, "view": pack_view(crop, flip, time_flip)}
        height, width = self.sensor_size
        voxel = torch.from_numpy(voxel_grid(events, self.num_bins, height=height, width=width))
        if self.task == "flow":
            sample["events"] = voxel.abs().sum(dim=0) > 0
        sample["voxel"] = resize_maps(
            voxel[:, crop[0] : crop[0] + crop[2], crop[1] : crop[1] + crop[3]].contiguous(), self.input_size
        )
        sample["voxel"] = sample["voxel"].flip(-1) if flip else sample["voxel"]
        if time_flip:  # evg_time_flip (view_augment.py:49-58): the events played backwards
            sample["voxel"] = -sample["voxel"].flip(0)
        return view_targets(sample, crop, flip, time_flip, self.target_size)

    def _window(self, events: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        length = self.window.train_events if self.train else self.window.eval_events
        if self.task != "classify" or length is None or len(events) <= length:
            return events
        if self.train or self.window.eval_position == "random":
            start = int(rng.integers(0, len(events) - length))  # [0, N - L), as np.random.randint in theirs
        else:
            start = (len(events) - length) // 2
        return events[start : start + length]

    def _draw_view(self, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool, bool]:
        """The view of a read: the crop (top, left, height, width) on the sensor, the horizontal and the time flip;
        training only (else the whole sensor, no flips)."""
        if not self.train:
            return (0, 0, *self.sensor_size), False, False
        augment = self.augment
        crop = _random_crop(self.sensor_size, augment.crop_scale, augment.crop_aspect, rng)
        flip = bool(rng.random() < augment.hflip_p)
        time_flip = augment.time_flip_p > 0 and bool(rng.random() < augment.time_flip_p)
        return crop, flip, time_flip

    def batch_views(self) -> DownstreamBatchViews:
        """The device-side transform of this dataset's packed batches (``transforms="device"``)."""
        return DownstreamBatchViews(self)


def view_targets(
    sample: dict[str, Any], crop: tuple[int, int, int, int], flip: bool, time_flip: bool, size: tuple[int, int]
) -> dict[str, Any]:
    """The dense targets of ``sample`` (sensor-sized ``mask``, ``flow``, ``valid``, ``events``) cropped to ``crop``,
    resized with nearest neighbours to ``size``, mirrored under ``flip`` and, for flow, reversed under ``time_flip``;
    flow is scaled by the resize factors and dx negated under the flip, so it stays a displacement in pixels."""
    top, left, crop_h, crop_w = crop
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    for key in ("mask", "valid", "events"):
        if key in sample:
            sample[key] = _resize_nearest(sample[key][window], size)
    if "flow" in sample:
        scale = torch.tensor([size[1] / crop_w, size[0] / crop_h], device=sample["flow"].device).view(2, 1, 1)
        sample["flow"] = _resize_nearest(sample["flow"][(slice(None), *window)], size) * scale
    if flip:
        for key in ("mask", "flow", "valid", "events"):
            if key in sample:
                sample[key] = sample[key].flip(-1)
        if "flow" in sample:
            sample["flow"][0].neg_()
    if time_flip and "flow" in sample:  # evg_time_flip: the events played backwards, so the flow reverses too
        sample["flow"] = -sample["flow"]
    return sample


class DownstreamBatchViews:
    """A batch of ``DownstreamDataset`` parts (``transforms="device"``, through ``collate``) made into the batch the
    worker path gives, on the device it lives on: the voxel grids at the sensor size (``voxel_grid_batch``), cropped,
    resized, flipped (``apply_views``); dense targets through ``view_targets`` sample by sample."""

    def __init__(self, dataset: DownstreamDataset):
        self.num_bins, self.sensor_size = dataset.num_bins, dataset.sensor_size
        self.input_size, self.target_size = dataset.input_size, dataset.target_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {key: value for key, value in batch.items() if key not in ("event_stream", "view")}
        crops, hflips, time_flips = unpack_views(batch["view"])
        voxel = voxel_grids(batch["event_stream"], self.num_bins, self.sensor_size)
        if "flow" in batch:
            out["events"] = voxel.abs().sum(dim=1) > 0
        out["voxel"] = time_flip_where(apply_views(voxel, crops, hflips, self.input_size), time_flips)
        keys = [key for key in (*TARGET_KEYS, "events") if key in out]
        if keys:
            flags = zip(hflips.tolist(), time_flips.tolist())
            views = [
                view_targets({key: out[key][i] for key in keys}, crop, flip, time_flip, self.target_size)
                for i, (crop, (flip, time_flip)) in enumerate(zip(crops, flags))
            ]
            out |= {key: torch.stack([view[key] for view in views]) for key in keys}
        return out


def _random_crop(
    size: tuple[int, int], scale: tuple[float, float], aspect: str, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of ``scale`` of the area (10 tries, else the whole view).

    ``aspect`` ``torchvision``: RandomResizedCrop's draw, log-uniform aspect in [3/4, 4/3], the crop within the view.
    ``sensor_relative``: the authors' ``view_crop`` (view_augment.py:9-33), aspect uniform in [3/4, 4/3] x W/H, width
    and height swapped with p 1/2, a crop strictly smaller than the view on both sides, its start in [0, W - w).
    """
    height, width = size
    if scale == (1.0, 1.0):
        return 0, 0, height, width
    area = height * width
    for _ in range(10):
        target = rng.uniform(*scale) * area
        if aspect == "torchvision":
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        else:
            ratio = rng.uniform(width / height * 3 / 4, width / height * 4 / 3)
        crop_w = int(round(math.sqrt(target * ratio)))
        crop_h = int(round(math.sqrt(target / ratio)))
        if aspect == "torchvision":
            if 0 < crop_w <= width and 0 < crop_h <= height:
                return (
                    int(rng.integers(0, height - crop_h + 1)),
                    int(rng.integers(0, width - crop_w + 1)),
                    crop_h,
                    crop_w,
                )
            continue
        if rng.random() < 0.5:
            crop_w, crop_h = crop_h, crop_w
        if 0 < crop_w < width and 0 < crop_h < height:
            return int(rng.integers(0, height - crop_h)), int(rng.integers(0, width - crop_w)), crop_h, crop_w
    return 0, 0, height, width


def _resize_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) labels, flow or masks resized with nearest neighbours ('nearest-exact': half-pixel centres)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    dtype = maps.dtype
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest-exact")[0].reshape(*lead, *size).to(dtype)
