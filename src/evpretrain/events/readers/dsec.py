"""DSEC ``events.h5`` (Gehrig et al., 2021; also DSEC-Semantic): 640x480 events, Blosc-compressed HDF5.

Layout, as read by the dataset's own ``EventSlicer``:
- ``events/x``, ``events/y`` (uint16), ``events/t`` (uint32 microseconds relative to ``t_offset``), ``events/p``
  (uint8, 0 = OFF, 1 = ON), all of length N and sorted by t;
- ``ms_to_idx`` (N_ms,): for every millisecond m, the index of the first event with t >= 1000 m;
- ``t_offset`` (scalar int64, microseconds; absent in some files, then 0).

Timestamps returned here are absolute: ``t + t_offset`` microseconds, and windows are given in the same clock.

``rectify_map.h5`` (beside ``events.h5``) holds ``rectify_map`` (480, 640, 2) float: for a raw pixel (x, y), the
rectified position ``rectify_map[y, x] = (x', y')``. DSEC-Semantic's labels live in the rectified frame. When a map
is given, each event moves to ``(floor(x' + 0.5), floor(y' + 0.5))`` (nearest pixel, halves rounded up; or, with
``rounding="floor"``, to ``(floor(x'), floor(y'))`` as ESS-style loaders that cast rectified coordinates to integers do)
and events landing outside the 640x480 frame (or on a non-finite map entry) are dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, pack_events, signed_polarity
from evpretrain.events.readers._io import h5_dataset, h5_read, open_h5

SENSOR_SIZE = (480, 640)
EVENT_KEYS = ("events/x", "events/y", "events/t", "events/p")
Rounding = Literal["nearest", "floor"]


def load_rectify_map(path: str | os.PathLike) -> np.ndarray:
    """``rectify_map`` (480, 640, 2) float64 from a DSEC ``rectify_map.h5``."""
    with open_h5(path) as file:
        rectify_map = h5_read(h5_dataset(file, "rectify_map", source=path), source=path)
    if rectify_map.shape != (*SENSOR_SIZE, 2) or not np.issubdtype(rectify_map.dtype, np.floating):
        raise EventFormatError(
            path,
            f"'rectify_map' has shape {rectify_map.shape} and dtype {rectify_map.dtype}, expected (480, 640, 2) float",
        )
    return rectify_map.astype(np.float64)


class DsecEvents:
    """Time-window access to one DSEC ``events.h5``, optionally rectified; use as a context manager.

    ``rectify_map``: None, a path to ``rectify_map.h5``, or the (480, 640, 2) array itself. ``rounding``: how a
    rectified position becomes a pixel, ``"nearest"`` or ``"floor"`` (module docstring).
    """

    sensor_size = SENSOR_SIZE

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rectify_map: str | os.PathLike | np.ndarray | None = None,
        rounding: Rounding = "nearest",
    ):
        import hdf5plugin  # noqa: F401  (registers the Blosc filter the DSEC files are compressed with)

        if rounding not in ("nearest", "floor"):
            raise ValueError(f"rounding is {rounding!r}, expected 'nearest' or 'floor'")
        self.path = Path(path)
        self.rectify_map = None if rectify_map is None else self._rectify_map_array(rectify_map)
        self.rounding = rounding
        self._file = open_h5(path)
        try:
            self._columns = {key: h5_dataset(self._file, key, source=path) for key in EVENT_KEYS}
            shapes = {key: dataset.shape for key, dataset in self._columns.items()}
            kinds = {key: str(dataset.dtype) for key, dataset in self._columns.items()}
            if len(set(shapes.values())) != 1 or len(shapes["events/t"]) != 1:
                raise EventFormatError(path, f"event columns have shapes {shapes}, expected equal 1-D shapes")
            if not all(np.issubdtype(dataset.dtype, np.integer) for dataset in self._columns.values()):
                raise EventFormatError(path, f"event columns have dtypes {kinds}, expected integers")
            self.num_events = shapes["events/t"][0]
            self.ms_to_idx = self._read_ms_to_idx()
            self.t_offset = self._read_t_offset()
        except BaseException:
            self._file.close()
            raise

    def window(self, t_start_us: int, t_end_us: int) -> np.ndarray:
        """Events with ``t_start_us <= t < t_end_us`` (absolute microseconds), sorted, as ``EVENT_DTYPE``.

        Only the milliseconds spanning the window are read from disk (through ``ms_to_idx``).
        """
        if t_end_us < t_start_us:
            raise ValueError(f"window end {t_end_us} us is before its start {t_start_us} us")
        start = t_start_us - self.t_offset
        end = t_end_us - self.t_offset
        low = self._index_at_ms(start // 1000)
        high = self._index_at_ms(-(-end // 1000))  # ceil, in integers
        t = h5_read(self._columns["events/t"], np.s_[low:high], source=self.path).astype(np.int64)
        first = low + int(np.searchsorted(t, start, side="left"))
        last = low + int(np.searchsorted(t, end, side="left"))
        return self._events(low, first, last, t)

    def last_events(self, t_end_us: int, count: int) -> np.ndarray:
        """The last ``count`` events with ``t < t_end_us`` (absolute microseconds), fewer where the file has fewer.

        The count is taken in the file, before rectification drops events leaving the frame (as ESS's
        ``EventSlicer.get_events_fixed_num`` does). Only the millisecond around ``t_end_us`` and the events
        selected are read from disk.
        """
        if count < 0:
            raise ValueError(f"count is {count}, expected >= 0")
        end = t_end_us - self.t_offset
        low = self._index_at_ms(end // 1000)
        high = self._index_at_ms(-(-end // 1000))
        t_near_end = h5_read(self._columns["events/t"], np.s_[low:high], source=self.path).astype(np.int64)
        last = low + int(np.searchsorted(t_near_end, end, side="left"))
        first = max(0, last - count)
        t = h5_read(self._columns["events/t"], np.s_[first:last], source=self.path).astype(np.int64)
        return self._events(first, first, last, t)

    def read_all(self) -> np.ndarray:
        """Every event of the file, sorted, as ``EVENT_DTYPE``."""
        t = h5_read(self._columns["events/t"], source=self.path).astype(np.int64)
        return self._events(0, 0, self.num_events, t)

    @property
    def time_span_us(self) -> tuple[int, int]:
        """(first, last) event timestamp, absolute microseconds; (t_offset, t_offset) for an empty file."""
        if self.num_events == 0:
            return self.t_offset, self.t_offset
        t = self._columns["events/t"]
        first, last = (int(h5_read(t, i, source=self.path)) for i in (0, self.num_events - 1))
        return self.t_offset + first, self.t_offset + last

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DsecEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _events(self, read_from: int, first: int, last: int, t_read: np.ndarray) -> np.ndarray:
        """Events first..last-1, given their timestamps already read from index ``read_from`` on."""
        if last <= first:
            return np.empty(0, EVENT_DTYPE)
        selection = np.s_[first:last]
        x, y, p = (h5_read(self._columns[f"events/{c}"], selection, source=self.path) for c in "xyp")
        t = t_read[first - read_from : last - read_from] + self.t_offset
        height, width = SENSOR_SIZE
        i = first_index((x >= width) | (y >= height))
        if i is not None:
            raise EventFormatError(self.path, f"event {first + i} has x={x[i]}, y={y[i]}, outside the 640x480 sensor")
        polarity = signed_polarity(p, source=self.path)
        if self.rectify_map is not None:
            t, x, y, polarity = _rectify(self.rectify_map, t, x, y, polarity, self.rounding)
        return pack_events(t, x, y, polarity, source=self.path, sensor_size=SENSOR_SIZE)

    def _index_at_ms(self, ms: int) -> int:
        """``ms_to_idx[ms]``, clamped: 0 before the first millisecond, N after the last."""
        if ms < 0:
            return 0
        if ms >= len(self.ms_to_idx):
            return self.num_events
        return int(self.ms_to_idx[ms])

    def _read_ms_to_idx(self) -> np.ndarray:
        index = h5_read(h5_dataset(self._file, "ms_to_idx", source=self.path), source=self.path)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise EventFormatError(self.path, f"'ms_to_idx' is {index.dtype} {index.shape}, expected (N_ms,) integers")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() > self.num_events or np.any(np.diff(index) < 0)):
            raise EventFormatError(
                self.path, f"'ms_to_idx' is not a non-decreasing index into the {self.num_events} events"
            )
        return index

    def _read_t_offset(self) -> int:
        if "t_offset" not in self._file:
            return 0  # as DSEC's EventSlicer
        value = h5_read(h5_dataset(self._file, "t_offset", source=self.path), source=self.path)
        if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
            raise EventFormatError(self.path, f"'t_offset' is {value.dtype} {value.shape}, expected one integer")
        return int(value.reshape(()))

    @staticmethod
    def _rectify_map_array(rectify_map: str | os.PathLike | np.ndarray) -> np.ndarray:
        if isinstance(rectify_map, np.ndarray):
            if rectify_map.shape != (*SENSOR_SIZE, 2):
                raise ValueError(f"rectify_map has shape {rectify_map.shape}, expected (480, 640, 2)")
            return rectify_map.astype(np.float64, copy=False)
        return load_rectify_map(rectify_map)


def _rectify(rectify_map: np.ndarray, t, x, y, polarity, rounding: Rounding = "nearest"):
    """Move events to their rectified pixel (nearest with halves up, or floor); drop those leaving the frame."""
    mapped = rectify_map[y, x]
    shift = 0.5 if rounding == "nearest" else 0.0
    x_rect = np.floor(mapped[:, 0] + shift)
    y_rect = np.floor(mapped[:, 1] + shift)
    height, width = SENSOR_SIZE
    keep = np.isfinite(x_rect) & np.isfinite(y_rect)
    keep &= (x_rect >= 0) & (x_rect < width) & (y_rect >= 0) & (y_rect < height)
    return t[keep], x_rect[keep].astype(np.uint16), y_rect[keep].astype(np.uint16), polarity[keep]


def read_dsec(path: str | os.PathLike, *, rectify_map: str | os.PathLike | np.ndarray | None = None) -> Recording:
    """Read a whole DSEC ``events.h5`` (module docstring); t in absolute microseconds, 640x480.

    ``rectify_map``: see ``DsecEvents``. ``metadata`` holds ``t_offset`` and whether events were rectified.
    """
    with DsecEvents(path, rectify_map=rectify_map) as events:
        metadata = {"format": "dsec", "t_offset": events.t_offset, "rectified": rectify_map is not None}
        return Recording(events=events.read_all(), sensor_size=SENSOR_SIZE, metadata=metadata)
