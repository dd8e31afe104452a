"""Dense tensors from events: the paper's voxel grid and the ECDP and MEM event histograms.

Each representation takes events in one of two forms and answers in the same one:

- numpy: an ``EVENT_DTYPE`` array (one sample, sorted by ``t``) -> a float32 numpy array ``(C, H, W)``, built by a
  compiled single-threaded loop (numba): one pass over the events, no per-event temporaries. ``voxel_grid_many``
  runs that loop over a list of samples on numba's threads, one sample per task.
- torch: ``EventTensors`` (1-D tensors ``t, x, y, p`` and an optional per-event sample index ``batch``) -> a float32
  tensor on the events' device, ``(C, H, W)``, or ``(B, C, H, W)`` when ``batch`` is given; built by scatters over
  flat int64 indices, so it runs batched on the GPU.

Coordinates outside ``height x width`` raise ``EventFormatError`` (they would otherwise land in another pixel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError

__all__ = ["EventTensors", "voxel_grid", "voxel_grid_many", "voxel_grid_batch", "histogram_ecdp", "histogram_mem"]


class EventTensors(NamedTuple):
    """Events as 1-D torch tensors of one length N on one device: the torch form of ``EVENT_DTYPE`` arrays.

    t: (N,) int64 microseconds, sorted within each sample.
    x, y: (N,) integer pixel column and row (int16/32/64 or uint8: torch has no arithmetic on uint16).
    p: (N,) polarity; > 0 is ON (+1), anything else OFF (-1), so {-1, +1} and {0, 1} both work.
    batch: (N,) int64 index in [0, B) of the sample each event belongs to, or None for a single sample.
    batch_size: B, where ``batch`` is set; None means ``batch.max() + 1`` (trailing samples without events drop).
    """

    t: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    p: torch.Tensor
    batch: torch.Tensor | None = None
    batch_size: int | None = None

    @classmethod
    def from_numpy(cls, events: np.ndarray, device: torch.device | str | None = None) -> EventTensors:
        """One ``EVENT_DTYPE`` array as one sample (``batch`` None); x and y become int32."""
        _check_event_array(events)
        return cls(*(_column_tensor(events, name, device) for name in ("t", "x", "y", "p")))

    @classmethod
    def collate(cls, samples: Sequence[np.ndarray], device: torch.device | str | None = None) -> EventTensors:
        """Samples (``EVENT_DTYPE`` arrays) concatenated into one batch; ``batch`` holds each event's sample index."""
        for events in samples:
            _check_event_array(events)
        events = np.concatenate(samples) if samples else np.empty(0, EVENT_DTYPE)
        batch = np.repeat(np.arange(len(samples)), [len(s) for s in samples])
        columns = (_column_tensor(events, name, device) for name in ("t", "x", "y", "p"))
        return cls(*columns, batch=torch.from_numpy(batch).to(device), batch_size=len(samples))


def voxel_grid(
    events: np.ndarray | EventTensors, num_bins: int = 5, *, height: int, width: int
) -> np.ndarray | torch.Tensor:
    """Voxel grid of events, bilinear in time, polarity +/-1: the paper's input representation.

    The window spans the first to the last event of each sample; an event at t lands at the continuous bin
    ``(num_bins - 1) * (t - t_first) / (t_last - t_first)`` and adds ``p * (1 - d)`` to the bin below it and ``p * d``
    to the bin above, ``d`` being the fractional part. This equals ``events_to_voxel_grid`` of the paper's code
    (BIT-Vision/EventPretrain, dataset/dataset_utils/events_to_voxel_grid.py), itself the event volume of
    Zhu et al. (CVPR 2019), to float32 rounding.

    Args:
        events: an ``EVENT_DTYPE`` array, or ``EventTensors`` (x, y < width, height).
        num_bins: temporal bins B.
        height, width: grid size in pixels.

    Returns:
        float32 (num_bins, height, width): numpy for a numpy array, a tensor on the events' device for
        ``EventTensors``; (B, num_bins, height, width) when ``events.batch`` is set.
    """
    _check_size(num_bins, height, width)
    if isinstance(events, EventTensors):
        t, x, y, p, batch, batch_size = events
        grids = voxel_grid_batch(
            t, x, y, p, batch, num_bins=num_bins, height=height, width=width, batch_size=batch_size
        )
        return grids if batch is not None else grids[0]
    _check_event_array(events)
    grid = np.zeros((num_bins, height, width), np.float32)
    if events.size:
        _raise_if_outside(_voxel_grid_kernel(events, num_bins, height, width, grid.reshape(-1)), events, height, width)
    return grid


def voxel_grid_many(
    samples: Sequence[np.ndarray], num_bins: int = 5, *, height: int, width: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Voxel grids of many samples at once, one sample per task on numba's threads; see ``voxel_grid``.

    Each grid equals ``voxel_grid(samples[i], ...)`` bit for bit (the same compiled loop). The threads are numba's:
    ``NUMBA_NUM_THREADS`` or ``numba.set_num_threads`` sets how many. numba's OpenMP layer (the default where TBB is
    absent) does not survive a fork: fork DataLoader workers before the parent first calls this, or use spawn.

    Args:
        samples: ``EVENT_DTYPE`` arrays, each sorted by ``t``; empty ones give zero grids.
        num_bins: temporal bins B.
        height, width: grid size in pixels.
        out: a C-contiguous float32 array (len(samples), num_bins, height, width) to overwrite, or None for a new one.
            Reusing one spares the page faults of fresh memory, which cost more than the events themselves here.

    Returns:
        float32 numpy (len(samples), num_bins, height, width): ``out`` where given.
    """
    _check_size(num_bins, height, width)
    events_list = numba.typed.List.empty_list(_EVENTS_TYPE)
    for events in samples:
        _check_event_array(events)
        events_list.append(np.ascontiguousarray(events))
    shape = (len(samples), num_bins, height, width)
    if out is None:
        out = np.empty(shape, np.float32)  # each task zeroes its own grid: in parallel, and into its cache
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        got = type(out).__name__
        if isinstance(out, np.ndarray):
            got = f"{'' if out.flags.c_contiguous else 'non-contiguous '}{out.dtype} {out.shape}"
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, got {got}")
    flat = out.reshape(len(samples), num_bins * height * width)
    status = _voxel_grid_many_kernel(events_list, num_bins, height, width, flat)
    outside = np.flatnonzero(status >= 0)
    if outside.size:  # the first bad sample, as a loop over voxel_grid would report it
        first = int(outside[0])
        _raise_if_outside(int(status[first]), samples[first], height, width, sample=first)
    return out


def voxel_grid_batch(
    t: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    p: torch.Tensor,
    batch: torch.Tensor | None = None,
    *,
    num_bins: int = 5,
    height: int,
    width: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Voxel grids of a batch of samples given as flat event tensors; see ``voxel_grid`` for the definition.

    Args:
        t: (N,) int64 microseconds. Each sample's window spans its earliest to its latest event.
        x, y: (N,) integer pixel column and row.
        p: (N,) polarity; > 0 counts +1, anything else -1.
        batch: (N,) int64 sample index of each event, or None: all events form one sample.
        batch_size: B; by default ``batch.max() + 1``. Samples without events give zero grids.

    Returns:
        float32 (B, num_bins, height, width) on the device of ``t``.
    """
    _check_size(num_bins, height, width)
    batch_size = _batch_size(batch, batch_size)
    grids = torch.zeros(batch_size * num_bins * height * width, dtype=torch.float32, device=t.device)
    if t.numel():
        _check_tensor_bounds(x, y, batch, height, width, batch_size)
        plane = height * width
        t_first, scale = _sample_windows(t, batch, batch_size, num_bins - 1)
        position = (t - t_first).to(torch.float32).mul_(scale).clamp_(0, num_bins - 1)
        lower_bin = position.floor()
        upper_weight = position.sub_(lower_bin)  # in place: position is not needed any more
        lower_bin = lower_bin.to(torch.int64)
        signed = torch.where(p > 0, 1.0, -1.0).to(torch.float32)
        upper_value = signed * upper_weight
        lower_value = signed.sub_(upper_value)
        # In the last bin the upper weight is exactly 0: sending it to the lower cell spares a mask and a compaction.
        upper_step = (lower_bin < num_bins - 1).to(torch.int64).mul_(plane)
        lower = y.to(torch.int64, copy=True).mul_(width).add_(x).add_(lower_bin.mul_(plane))
        if batch is not None:
            lower.add_(batch * (num_bins * plane))
        # index_add_ is an atomic-add scatter on CUDA, and the fastest of index_add_/index_put_/bincount on the CPU.
        grids.index_add_(0, lower, lower_value)
        grids.index_add_(0, upper_step.add_(lower), upper_value)
    return grids.view(batch_size, num_bins, height, width)


def histogram_ecdp(
    events: np.ndarray | EventTensors,
    *,
    height: int,
    width: int,
    normalize: bool = True,
    clip_hot_pixels: bool = False,
) -> np.ndarray | torch.Tensor:
    """ECDP's 2-channel event histogram (Yang et al., "Event Camera Data Pre-training", ICCV 2023).

    Channel 0 counts the ON (positive) events at each pixel, channel 1 the OFF (negative) events. As in ECDP's code
    (github.com/Yan98/Event-Camera-Data-Pre-training, data/imagenet_dataset.py: ``reshape_then_acc_count_pol``, then
    ``remove_hot_pixels`` and ``event / (event.amax([1, 2], True) + 1)``):

    - ``clip_hot_pixels`` (ECDP: on for fine-tuning, off for pre-training) caps every value at the mean of the
      values above 0.1, i.e. the mean count over both channels' active pixels, per sample;
    - ``normalize`` then divides each channel by its own maximum plus 1, so values lie in [0, 1).

    The paper's code (BIT-Vision/EventPretrain, ``events_to_image_ecdp``) builds the same counts and, when
    fine-tuning, maps the normalised histogram to [-1, 1) with ``2 * h - 1``; that step is left to the caller.

    Returns:
        float32 (2, height, width), or (B, 2, height, width) for batched ``EventTensors``; numpy in, numpy out.
    """
    histograms, numpy_out = _polarity_counts(events, height, width, channels=2, neg_channel=1, time_channel=-1)
    if clip_hot_pixels:
        active = histograms > 0.1
        cap = (histograms * active).sum((1, 2, 3)) / active.sum((1, 2, 3))
        # A sample without events has no active value (cap NaN): leave it as it is.
        cap = torch.nan_to_num(cap, nan=torch.inf).view(-1, 1, 1, 1)
        torch.minimum(histograms, cap, out=histograms)
    if normalize:
        histograms /= histograms.amax((2, 3), keepdim=True) + 1
    return _finish(histograms, events, numpy_out)


def histogram_mem(
    events: np.ndarray | EventTensors,
    *,
    height: int,
    width: int,
    time_surface: bool = False,
    hot_pixel_stds: float | None = 10.0,
    normalize: bool = True,
) -> np.ndarray | torch.Tensor:
    """MEM's 3-channel event histogram (Klenk et al., "Masked Event Modeling", WACV 2024).

    Channel 0 counts the ON events at each pixel, channel 2 the OFF events; channel 1 is zero, or with
    ``time_surface`` the normalised time (t - t_first) / (t_last - t_first) of the pixel's latest event (0 where
    none). As in MEM's code (github.com/tum-vision/mem, mem/datasets.py ``EventArrToImg``, mem/transforms.py
    ``RemoveHotPixels`` and ``NormalizeEvent``; defaults from configs/*.conf: no time surface, hot-pixel filter at
    10 standard deviations, normalisation on):

    - ``hot_pixel_stds``: a pixel whose ON or OFF value exceeds mean + k * std (unbiased) of both polarity channels
      of its sample is zeroed in both; None keeps every pixel;
    - ``normalize`` then divides both polarity channels by their joint maximum (when it is not 0); channel 1 keeps
      its [0, 1] range.

    Differences from MEM's code, on purpose: counts are float32 (MEM accumulates in uint8, which wraps at 256
    events per pixel), and the time surface is not quantised to 8 bits. The paper's code (BIT-Vision/EventPretrain,
    ``events_to_image_mem`` and ``remove_hot_pixel_mem``) follows MEM with channel 1 always zero.

    Returns:
        float32 (3, height, width), or (B, 3, height, width) for batched ``EventTensors``; numpy in, numpy out.
    """
    histograms, numpy_out = _polarity_counts(
        events, height, width, channels=3, neg_channel=2, time_channel=1 if time_surface else -1
    )
    polarity = histograms[:, 0::2]
    if hot_pixel_stds is not None:
        flat = polarity.flatten(1)
        threshold = flat.mean(1) + hot_pixel_stds * flat.std(1)
        hot = (polarity > threshold.view(-1, 1, 1, 1)).any(1, keepdim=True)
        polarity.masked_fill_(hot, 0.0)
    if normalize:
        peak = polarity.amax((1, 2, 3), keepdim=True)
        polarity /= torch.where(peak > 0, peak, 1.0)
    return _finish(histograms, events, numpy_out)


# --- compiled loops (numpy path) -------------------------------------------------------------------------------


# The item type of voxel_grid_many's list: read-only, so that writable and read-only arrays both fit without a copy.
_EVENTS_TYPE = numba.types.Array(numba.from_dtype(EVENT_DTYPE), 1, "C", readonly=True)


# error_model="numpy" and unsigned grid indices drop numba's division and wraparound checks: x1.2-1.7 (bench/README.md).
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _voxel_grid_kernel(events, num_bins, height, width, grid):
    """Accumulate into flat ``grid`` (num_bins * height * width); return the first out-of-grid event or -1."""
    n = events.shape[0]
    t_first = events[0].t
    span = events[n - 1].t - t_first
    scale = (num_bins - 1) / (span if span > 0 else 1)
    last = float(num_bins - 1)
    plane = height * width
    for i in range(n):
        event = events[i]
        col = np.int64(event.x)
        row = np.int64(event.y)
        if col >= width or row >= height:
            return i
        position = min(max((event.t - t_first) * scale, 0.0), last)
        lower_bin = int(position)
        upper_weight = np.float32(position - lower_bin)
        signed = np.float32(2 * (event.p > 0) - 1)  # branch-free: polarity is a coin flip for the predictor
        index = np.uint64(lower_bin * plane + row * width + col)
        grid[index] += signed - signed * upper_weight
        if lower_bin < num_bins - 1:
            grid[index + np.uint64(plane)] += signed * upper_weight
    return -1


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _voxel_grid_many_kernel(samples, num_bins, height, width, grids):
    """Zero each row of ``grids`` (samples, num_bins * height * width) and run ``_voxel_grid_kernel`` of its sample
    into it, in parallel; return each sample's first out-of-grid event or -1."""
    status = np.full(len(samples), -1, np.int64)
    for s in numba.prange(len(samples)):
        grids[s] = 0.0
        events = samples[np.int64(s)]  # prange makes s unsigned; the typed list takes int64
        if events.shape[0]:
            status[s] = _voxel_grid_kernel(events, num_bins, height, width, grids[s])
    return status


@numba.njit(cache=True, nogil=True)
def _polarity_count_kernel(events, neg_channel, time_channel, height, width, counts):
    """Count ON events into plane 0 and OFF into ``neg_channel`` of flat ``counts``; with ``time_channel`` >= 0 write
    the normalised time of each pixel's latest event there. Return the first out-of-grid event or -1."""
    n = events.shape[0]
    t_first = events[0].t
    span = events[n - 1].t - t_first
    inverse_span = 1.0 / (span if span > 0 else 1)
    plane = height * width
    for i in range(n):
        event = events[i]
        col = np.int64(event.x)
        row = np.int64(event.y)
        if col >= width or row >= height:
            return i
        pixel = row * width + col
        counts[(0 if event.p > 0 else neg_channel) * plane + pixel] += 1.0
        if time_channel >= 0:
            counts[time_channel * plane + pixel] = (event.t - t_first) * inverse_span
    return -1


# --- helpers ------------------------------------------------------------------------------------------------------


def _polarity_counts(events, height, width, *, channels, neg_channel, time_channel):
    """(B, channels, H, W) float32 counts as a tensor, and whether the caller gets numpy back (B = 1 then)."""
    _check_size(channels, height, width)
    if not isinstance(events, EventTensors):
        _check_event_array(events)
        counts = np.zeros((1, channels, height, width), np.float32)
        if events.size:
            status = _polarity_count_kernel(events, neg_channel, time_channel, height, width, counts.reshape(-1))
            _raise_if_outside(status, events, height, width)
        return torch.from_numpy(counts), True
    t, x, y, p, batch, batch_size = events
    batch_size = _batch_size(batch, batch_size)
    plane = height * width
    size = batch_size * channels * plane
    if not t.numel():
        return torch.zeros(batch_size, channels, height, width, device=t.device), False
    _check_tensor_bounds(x, y, batch, height, width, batch_size)
    pixel = y.to(torch.int64, copy=True).mul_(width).add_(x)  # a copy: y may be the caller's int64 tensor
    if batch is not None:
        pixel.add_(batch * (channels * plane))
    index = pixel + (p <= 0).to(torch.int64).mul_(neg_channel * plane)
    counts = torch.bincount(index, minlength=size).to(torch.float32)
    if time_channel >= 0:
        t_first, inverse_span = _sample_windows(t, batch, batch_size, 1)
        latest = (t - t_first).to(torch.float32).mul_(inverse_span)
        counts.scatter_reduce_(0, pixel.add_(time_channel * plane), latest, "amax")
    return counts.view(batch_size, channels, height, width), False


def _finish(histograms: torch.Tensor, events, numpy_out: bool):
    if numpy_out:
        return histograms[0].numpy()
    return histograms if events.batch is not None else histograms[0]


def _batch_size(batch: torch.Tensor | None, batch_size: int | None) -> int:
    if batch is None:
        return 1
    if batch_size is None:
        return int(batch.max()) + 1 if batch.numel() else 0
    return batch_size


def _sample_windows(t: torch.Tensor, batch: torch.Tensor | None, batch_size: int, bins: int):
    """Per event: its sample's first time (int64) and ``bins / span`` (float32), span = latest - earliest, >= 1 us."""
    if t.is_floating_point():
        raise EventFormatError(None, f"t is {t.dtype}, expected integer microseconds (int64)")
    if batch is None:
        t_first, t_last = torch.aminmax(t)
    else:
        t_first = torch.zeros(batch_size, dtype=t.dtype, device=t.device)
        t_last = t_first.clone()
        t_first.scatter_reduce_(0, batch, t, "amin", include_self=False)
        t_last.scatter_reduce_(0, batch, t, "amax", include_self=False)
    scale = bins / (t_last - t_first).clamp_(min=1).to(torch.float32)
    if batch is None:
        return t_first, scale
    return t_first[batch], scale[batch]


def _check_tensor_bounds(x, y, batch, height, width, batch_size) -> None:
    """One device sync for all range checks: a coordinate out of range would write into another pixel."""
    columns = [x, y] if batch is None else [x, y, batch]
    limits = torch.stack([torch.stack(torch.aminmax(c)) for c in columns]).tolist()
    for name, (low, high), bound in zip(("x", "y", "batch"), limits, (width, height, batch_size)):
        if low < 0 or high >= bound:
            raise EventFormatError(None, f"{name} spans [{low}, {high}], expected values in [0, {bound})")


def _check_event_array(events) -> None:
    if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE or events.ndim != 1:
        got = getattr(events, "dtype", type(events).__name__)
        raise EventFormatError(None, f"expected a 1-D array of dtype {EVENT_DTYPE} or EventTensors, got {got}")


def _check_size(channels: int, height: int, width: int) -> None:
    if channels < 1 or height < 1 or width < 1:
        raise ValueError(f"expected positive sizes, got {channels} bins/channels, {height}x{width} (HxW)")


def _raise_if_outside(status: int, events: np.ndarray, height: int, width: int, sample: int | None = None) -> None:
    if status >= 0:
        x, y = events["x"][status], events["y"][status]
        where = "" if sample is None else f"sample {sample}: "
        message = f"{where}event {status} has x={x}, y={y}, outside the {height}x{width} (HxW) grid"
        raise EventFormatError(None, message)


def _column_tensor(events: np.ndarray, name: str, device) -> torch.Tensor:
    # Fields of a packed record are strided by 13 bytes, which torch cannot view: astype copies to a fresh array.
    column = events[name].astype(np.int32 if name in ("x", "y") else events.dtype[name])
    return torch.from_numpy(column).to(device)
