"""Batched, device-side counterparts of the per-sample dataset transforms: a loader's workers only read (events,
the view's draw, sensor-sized maps) and pack; these functions turn the packed batch into the network's inputs where
the batch lives, on the GPU. Each one gives what its per-sample counterpart gives, sample by sample:

- ``pack_events`` (in the workers' collate) -> ``voxel_grids`` (``voxel_grid`` of each sample),
- ``event_density_batch`` (``pretrain.data.event_density``),
- ``apply_views`` (``data.view.apply_view``), ``time_flip_where`` (``pretrain.data.time_flip``).

Packed events: a dict of flat tensors, ``t`` (N,) int64 microseconds, ``x`` and ``y`` (N,) int16 pixels, ``p`` (N,)
int8 polarity, and ``count`` (B,) int64, the events of each sample in order (sample i's are the next ``count[i]``).
A view's draw travels as ``view`` (B, 6) int64: top, left, height, width of the crop (pixels), hflip, time flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from evpretrain.data.resize import resize_maps
from evpretrain.data.view import CropBox
from evpretrain.events.representations import voxel_grid_batch

__all__ = [
    "apply_views",
    "event_density_batch",
    "event_sample_index",
    "pack_events",
    "pack_view",
    "time_flip_where",
    "unpack_views",
    "voxel_grids",
]


def pack_events(samples: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """``EVENT_DTYPE`` arrays of B samples as flat columns (see the module docstring); x and y must be < 32768."""
    counts = [len(events) for events in samples]
    out = {"count": torch.tensor(counts, dtype=torch.int64)}
    # int16 coordinates and a per-sample count instead of a per-event index: 13 bytes an event through the workers'
    # shared memory and the host-to-device copy, instead of 33 (int64 x, y and batch). Each column is gathered
    # straight from the records (a concatenation of records first costs 10x more).
    for name, dtype in (("t", np.int64), ("x", np.int16), ("y", np.int16), ("p", np.int8)):
        column, start = np.empty(sum(counts), dtype), 0
        for events in samples:
            column[start : start + len(events)] = events[name]
            start += len(events)
        out[name] = torch.from_numpy(column)
    return out


def pack_view(crop: CropBox, hflip: bool, time_flip: bool) -> torch.Tensor:
    """One sample's view as the (6,) int64 row of ``view``."""
    return torch.tensor([*crop, hflip, time_flip], dtype=torch.int64)


def unpack_views(view: torch.Tensor) -> tuple[list[CropBox], torch.Tensor, torch.Tensor]:
    """(B, 6) views -> the crop boxes (host ints: they shape the slices; one device sync), hflip and time-flip
    flags (B,) bool on the views' device."""
    crops = [tuple(row) for row in view[:, :4].tolist()]
    return crops, view[:, 4].bool(), view[:, 5].bool()


def event_sample_index(events: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) int64 sample index of each packed event."""
    count = events["count"]
    samples = torch.arange(len(count), device=count.device)
    return torch.repeat_interleave(samples, count, output_size=len(events["t"]))  # output_size: no device sync


def voxel_grids(
    events: dict[str, torch.Tensor],
    num_bins: int,
    size: tuple[int, int],
    sensor_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, num_bins, H, W) float32 voxel grids of packed events on a ``size`` (H, W) grid; with ``sensor_size``
    (H_s, W_s) the coordinates are scaled first, floor(x * W / W_s), as ``PretrainDataset._on_grid``."""
    height, width = size
    x, y = events["x"], events["y"]
    if sensor_size is not None and tuple(sensor_size) != tuple(size):
        y = y.to(torch.int64) * height // sensor_size[0]
        x = x.to(torch.int64) * width // sensor_size[1]
    return voxel_grid_batch(
        events["t"],
        x,
        y,
        events["p"],
        event_sample_index(events),
        num_bins=num_bins,
        height=height,
        width=width,
        batch_size=len(events["count"]),
    )


def event_density_batch(
    events: dict[str, torch.Tensor],
    sensor_size: tuple[int, int],
    size: tuple[int, int],
    grid_size: tuple[int, int],
    crops: Sequence[CropBox],
) -> torch.Tensor:
    """(B, H, W) float32 events per pixel of ``size``: ``event_density(events_i, sensor_size, size, grid_size=...,
    crop=crops[i])`` of each sample (integer arithmetic alike, so the counts are exact)."""
    (sensor_h, sensor_w), (height, width), (grid_h, grid_w) = sensor_size, size, grid_size
    batch = event_sample_index(events)
    device = batch.device
    top, left, crop_h, crop_w = torch.tensor(crops, dtype=torch.int64, device=device).view(-1, 4)[batch].unbind(1)
    rows = events["y"].to(torch.int64) * grid_h // sensor_h - top
    cols = events["x"].to(torch.int64) * grid_w // sensor_w - left
    inside = (rows >= 0) & (rows < crop_h) & (cols >= 0) & (cols < crop_w)
    plane, cells = height * width, len(crops) * height * width
    index = batch * plane + rows * height // crop_h * width + cols * width // crop_w
    # Events outside their crop go to one spare cell past the end: no boolean compaction, no device sync.
    counts = torch.bincount(torch.where(inside, index, cells), minlength=cells + 1)[:cells]
    return counts.to(torch.float32).view(len(crops), height, width)


def time_flip_where(voxel: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(B, num_bins, H, W) voxel grids with those of ``flags`` (B,) bool played backwards: bins reversed, negated."""
    return torch.where(flags.view(-1, 1, 1, 1), voxel.flip(1).neg(), voxel)


def apply_views(
    maps: torch.Tensor,
    crops: Sequence[CropBox],
    hflips: torch.Tensor,
    size: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """(B, C, H, W) maps, sample i cropped to ``crops[i]``, resized to ``size`` with ``mode`` and mirrored where
    ``hflips[i]``: ``apply_view`` per sample. Samples with crops of one size share one resize (their maps stacked
    as channels: every resize mode treats channels alike), so a batch without crops takes one call."""
    batch, channels, height, width = maps.shape
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, crop_h, crop_w) in enumerate(crops):
        groups.setdefault((crop_h, crop_w), []).append(i)
    if len(groups) == 1 and next(iter(groups)) == (height, width):
        out = resize_maps(maps.reshape(-1, height, width), size, mode).reshape(batch, channels, *size)
    else:
        out = maps.new_empty(batch, channels, *size)
        for (crop_h, crop_w), members in groups.items():
            cut = torch.stack(
                [maps[i, :, crops[i][0] : crops[i][0] + crop_h, crops[i][1] : crops[i][1] + crop_w] for i in members]
            )
            resized = resize_maps(cut.reshape(-1, crop_h, crop_w), size, mode)
            out[members] = resized.reshape(len(members), channels, *size)
    return torch.where(hflips.view(-1, 1, 1, 1), out.flip(-1), out)
