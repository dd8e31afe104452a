"""The paper's voxel grid, re-implemented op for op, as the reference ours must equal.

``events_to_voxel_grid`` of the paper's code (BIT-Vision/EventPretrain, dataset/dataset_utils/events_to_voxel_grid.py):
a float (N, 4) array [x, y, t, p in {0, 1}] in, two torch ``index_add_`` calls. Used by the equivalence tests and by
bench/bench_voxel_grid.py as the speed baseline; the pipeline itself uses ``evpretrain.events.representations``.
"""

from __future__ import annotations

import numpy as np
import torch


def paper_voxel_grid(events_nx4: np.ndarray, num_bins: int, height: int, width: int) -> torch.Tensor:
    """The paper's events_to_voxel_grid (BIT-Vision/EventPretrain): float (N, 4) [x, y, t, p in {0, 1}] in, two
    torch index_add_."""
    events = torch.from_numpy(events_nx4)
    grid = torch.zeros(num_bins, height, width, dtype=torch.float32).flatten()
    first, last = events[0, 2], events[-1, 2]
    span = last - first
    if span == 0:
        span = 1.0
    xs, ys = events[:, 0].long(), events[:, 1].long()
    ts = (num_bins - 1) * (events[:, 2] - first) / span
    ps = events[:, 3].float()
    ps[ps == 0] = -1
    tis = torch.floor(ts)
    tis_long = tis.long()
    dts = ts - tis
    values_left, values_right = ps * (1.0 - dts.float()), ps * dts.float()
    valid = tis < num_bins
    valid &= tis >= 0
    index = xs[valid] + ys[valid] * width + tis_long[valid] * width * height
    grid.index_add_(0, index, values_left[valid])
    valid = (tis + 1) < num_bins
    valid &= tis >= 0
    index = xs[valid] + ys[valid] * width + (tis_long[valid] + 1) * width * height
    grid.index_add_(0, index, values_right[valid])
    return grid.view(num_bins, height, width)


def as_paper_array(events: np.ndarray) -> np.ndarray:
    """float64 [x, y, t, p in {0, 1}], t in microseconds: exact in float64. (The paper's loaders pass seconds, t / 1e6,
    which at absolute times near 1e12 us is off by 1e-4 us: enough to move the weights of a 2 us window by 5e-5.)"""
    return np.stack([events["x"], events["y"], events["t"], events["p"] > 0], axis=1).astype(np.float64)
