"""The pre-training dataset: one event-store sample in, the network's input and every stage's targets out.

A sample of the store is one event window (the events of a short video, ``frames[0]`` to ``frames[-1]``). It
becomes a dict of tensors (``default_collate`` stacks them into the batch of the pre-training contract):

- ``voxel`` (num_bins, H, W) float32: the 5-bin voxel grid, bilinear in time, polarity +/-1
  (``evpretrain.events.representations.voxel_grid``). Not normalised, as in the paper's code: its pre-training
  loaders (BIT-Vision/EventPretrain, dataset/pretrain/pr_n_imagenet_dataset.py ``PretrainNImageNetDataset`` and
  dataset/pretrain/pr_ef_imagenet_dataset.py ``PretrainEFImageNetDataset``) feed the raw ``events_to_voxel_grid``
  output through ``evg_augment`` (dataset/augmentation/view_augment.py: crop, resize, flips) and nothing else;
  only the 2- and 3-channel histograms of ECDP and MEM are rescaled (dataset/finetune_cls/ft_n_imagenet_dataset.py).
- ``target_difference`` (1, H, W) float32, when the store holds ``diff_maps``: the window's temporal log-intensity
  difference ``log I(T_end) - log I(T_0)`` in nepers, the sum of the sample's consecutive difference maps.
- ``target_frame`` (1, H, W) float32 in [0, 1], when the store holds ``frames``: the intensity at the window end.
- ``density`` (H, W) float32: events per pixel of the H x W grid (it sums to the sample's event count).
- ``label`` () int64, -1 where the store has no labels; ``index`` () int64, the sample's index in the store.
- ``image`` (3, H_t, W_t) float32 in [0, 1], with ``with_image=True``: the frame at the window end, grey in three
  channels, at the image teacher's input size.

Resizing, where ``input_size`` differs from the store's sensor size: the voxel grid, the difference target and the
frame are resized as images (bilinear, half-pixel centres, antialiased when shrinking), so a value stays a per-pixel
value and the grid's values are averaged, not summed, over the sensor pixels an input pixel covers. The density is
counted directly on the input grid (sensor pixel x lands in column floor(x * W / W_sensor)), so it stays an exact
event count. The paper's loaders instead scale the event coordinates before building the voxel grid
(dataset/augmentation/events_augment.py ``events_reshape``), which sums where we average.

Time flip (augmentation, probability ``time_flip_p``): the window played backwards. The bins are reversed and the
voxel grid and the difference target negated (as the paper's ``evg_time_flip`` and ``frame_time_flip``); the frame
target becomes the intensity at the reversed window's end, ``frames[0]``. The flipped grid equals the voxel grid of
the time-reversed events with flipped polarity. The density and the teacher image do not change (the teacher's
features are cached once per sample). The decision is a function of (seed, epoch, index): ``set_epoch`` before each
epoch, as with ``DistributedSampler``; the epoch lives in shared memory, so it also reaches persistent workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from evpretrain.data.resize import as_size, resize_maps
from evpretrain.data.store import EventStore, StoreError
from evpretrain.events.representations import voxel_grid

__all__ = ["PretrainDataset", "collate", "event_density", "time_flip"]

# Every field has one shape per dataset, so stacking is all a batch needs.
collate = default_collate


def event_density(events: np.ndarray, sensor_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Events per pixel, (H, W) float32, of ``EVENT_DTYPE`` events from a ``sensor_size`` (H_s, W_s) sensor counted
    on an ``size`` (H, W) grid: sensor column x falls in column floor(x * W / W_s), rows alike."""
    (sensor_h, sensor_w), (height, width) = sensor_size, size
    rows = events["y"].astype(np.int64) * height // sensor_h
    cols = events["x"].astype(np.int64) * width // sensor_w
    counts = np.bincount(rows * width + cols, minlength=height * width)
    return counts.astype(np.float32).reshape(height, width)


def time_flip(voxel: torch.Tensor) -> torch.Tensor:
    """The voxel grid (..., num_bins, H, W) of the same events played backwards: bins reversed, sign negated."""
    return voxel.flip(-3).neg_()


class PretrainDataset(Dataset):
    """Pre-training samples of one event store; see the module docstring for the fields and their units.

    Args:
        store_path: an event store (``evpretrain.data.store``).
        num_bins: temporal bins of the voxel grid.
        input_size: (H, W) of the network input, or one int for a square; None keeps the store's sensor size.
        time_flip_p: probability of the time flip, per (seed, epoch, index).
        with_image: add the teacher's input ``image`` (needs frames in the store).
        image_size: (H_t, W_t) of ``image``, or one int for a square.
        seed: seed of the time-flip decisions.
    """

    def __init__(
        self,
        store_path: str | Path,
        *,
        num_bins: int = 5,
        input_size: tuple[int, int] | int | None = None,
        time_flip_p: float = 0.0,
        with_image: bool = False,
        image_size: tuple[int, int] | int = 224,
        seed: int = 0,
    ):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not 0.0 <= time_flip_p <= 1.0:
            raise ValueError(f"time_flip_p must lie in [0, 1], got {time_flip_p}")
        self.store_path = Path(store_path)
        self._store = store = EventStore(self.store_path)  # opens a handle per process, as workers need
        self.sensor_size: tuple[int, int] = store.sensor_size
        fields = set(store.fields)
        labels = store.labels
        self._num_samples = len(store)
        self.num_bins = num_bins
        self.input_size = as_size(input_size) if input_size is not None else self.sensor_size
        self.image_size = as_size(image_size)
        self.time_flip_p = float(time_flip_p)
        self.with_image = with_image
        self.seed = int(seed)
        self.has_difference = "diff_maps" in fields
        self.has_frames = "frames" in fields
        if with_image and not self.has_frames:
            raise StoreError(self.store_path, "with_image=True needs frames, but this store holds none")
        self._labels = labels if labels is not None else np.full(self._num_samples, -1, np.int64)
        # Shared memory: set_epoch in the main process reaches the workers, persistent ones included.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self._num_samples

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the time-flip draws of ``epoch``; call before iterating over each epoch."""
        self._epoch.fill_(int(epoch))

    def is_flipped(self, index: int) -> bool:
        """Whether sample ``index`` is time-flipped in the current epoch."""
        if self.time_flip_p in (0.0, 1.0):
            return self.time_flip_p == 1.0
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        return bool(rng.random() < self.time_flip_p)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.store_path}: sample {index} out of range for {len(self)} samples")
        store = self._store
        events = store.events(index)
        height, width = self.sensor_size
        voxel = torch.from_numpy(voxel_grid(events, self.num_bins, height=height, width=width))
        flipped = self.is_flipped(index)
        # Flip before resizing, on the smaller grid: both are linear per channel and commute exactly.
        sample: dict[str, torch.Tensor] = {
            "voxel": resize_maps(time_flip(voxel) if flipped else voxel, self.input_size),
            "density": torch.from_numpy(event_density(events, self.sensor_size, self.input_size)),
            "label": torch.tensor(self._labels[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.has_difference:
            # Consecutive differences telescope: their sum is log I(T_end) - log I(T_0). Summed in float32: EF
            # stores keep them in float16.
            difference = store.dense("diff_maps", index).sum(axis=0, dtype=np.float32, keepdims=True)
            difference = torch.from_numpy(-difference if flipped else difference)
            sample["target_difference"] = resize_maps(difference, self.input_size)
        if self.has_frames:
            frames = store.dense("frames", index)
            end = frames[0] if flipped else frames[-1]
            sample["target_frame"] = resize_maps(_intensity(end)[None], self.input_size)
            if self.with_image:
                image = resize_maps(_intensity(frames[-1])[None], self.image_size).clamp(0.0, 1.0)
                sample["image"] = image.expand(3, -1, -1)  # a view: collating makes the copy
        return sample

    def close(self) -> None:
        """Close this process's store handle (it reopens on the next read)."""
        self._store.close()


def _intensity(frame: np.ndarray) -> torch.Tensor:
    """A stored frame (H, W), float in [0, 1] or uint8 (EF stores), as float32 in [0, 1]."""
    if frame.dtype == np.uint8:
        return torch.from_numpy(frame.astype(np.float32) / 255.0)
    return torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))
