"""MVSEC ``<sequence>_data.hdf5`` (Zhu et al., 2018): DAVIS 346x260 events of a stereo rig.

``davis/{left,right}/events`` is an (N, 4) float64 array of rows ``(x, y, t, p)``: pixel coordinates stored as
floats, t in seconds (ROS time, about 1.5e9), p in {-1, +1}. Timestamps are returned as integer microseconds,
``round(t * 1e6)``: at 1.5e9 s a float64 resolves 0.24 us, so rounding recovers the sensor's microsecond ticks.
The array is converted in blocks, so a file of 10^8 events never holds more than one float64 block at a time
besides the output.
"""

from __future__ import annotations

import os

import numpy as np

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, Recording, validate_events
from evpretrain.events.readers._columns import check_coordinate, first_index, signed_polarity
from evpretrain.events.readers._io import h5_dataset, h5_read, open_h5

SENSOR_SIZE = (260, 346)
CAMERAS = ("left", "right")
BLOCK_ROWS = 1 << 22


def read_mvsec(path: str | os.PathLike, *, camera: str = "left") -> Recording:
    """Read the events of one camera (``"left"`` or ``"right"``) of an MVSEC data file; t in microseconds."""
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
    key = f"davis/{camera}/events"
    with open_h5(path) as file:
        dataset = h5_dataset(file, key, source=path)
        if dataset.ndim != 2 or dataset.shape[1] != 4 or not np.issubdtype(dataset.dtype, np.number):
            raise EventFormatError(
                path, f"'{key}' is {dataset.dtype} {dataset.shape}, expected (N, 4) numeric rows of x, y, t, p"
            )
        events = np.empty(dataset.shape[0], EVENT_DTYPE)
        for start in range(0, dataset.shape[0], BLOCK_ROWS):
            block = h5_read(dataset, np.s_[start : start + BLOCK_ROWS], source=path).astype(np.float64)
            _convert_block(block, events[start : start + len(block)], source=path, first_event=start)
    if len(events) > 1 and not np.all(events["t"][1:] >= events["t"][:-1]):
        events = events[np.argsort(events["t"], kind="stable")]
    validate_events(events, source=path, sensor_size=SENSOR_SIZE)
    return Recording(events=events, sensor_size=SENSOR_SIZE, metadata={"format": "mvsec", "camera": camera})


def _convert_block(block: np.ndarray, out: np.ndarray, *, source, first_event: int) -> None:
    """Write float64 rows (x, y, t seconds, p) into ``out`` (EVENT_DTYPE); errors count events from the file start."""
    height, width = SENSOR_SIZE
    check_coordinate(block[:, 0], "x", width, source=source, first_event=first_event)
    check_coordinate(block[:, 1], "y", height, source=source, first_event=first_event)
    out["p"] = signed_polarity(block[:, 3], source=source, first_event=first_event)
    t = block[:, 2]
    i = first_index(~(np.isfinite(t) & (np.abs(t) < 9e12)))  # 9e12 s * 1e6 stays within int64
    if i is not None:
        raise EventFormatError(source, f"event {first_event + i} has t={t[i]}, expected a finite time in seconds")
    out["t"] = np.rint(t * 1e6).astype(np.int64)
    out["x"] = block[:, 0]
    out["y"] = block[:, 1]


class MvsecEvents:
    """Row- and time-window access to one camera of an MVSEC data file; use as a context manager.

    The events of a file are sorted by time, as MVSEC writes them (ROS messages in order), so a time is found by
    a two-level search: a coarse index of every ``INDEX_STRIDE``-th timestamp, then the one block between two of
    its entries. Only those blocks and the rows of a window are read, never the whole (N, 4) float64 array.
    """

    sensor_size = SENSOR_SIZE
    INDEX_STRIDE = 1 << 14

    def __init__(self, path: str | os.PathLike, *, camera: str = "left"):
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
        self.path = path
        self.key = f"davis/{camera}/events"
        self._file = open_h5(path)
        try:
            self._events = h5_dataset(self._file, self.key, source=path)
            shape, dtype = self._events.shape, self._events.dtype
            if len(shape) != 2 or shape[1] != 4 or not np.issubdtype(dtype, np.number):
                raise EventFormatError(path, f"'{self.key}' is {dtype} {shape}, expected (N, 4) rows of x, y, t, p")
        except BaseException:
            self._file.close()
            raise
        self.num_events = self._events.shape[0]
        self._coarse_us: np.ndarray | None = None

    def index_at(self, t_us: np.ndarray) -> np.ndarray:
        """For each time (microseconds), the index of the first event with ``t >= t_us`` (N when none), int64."""
        t_us = np.asarray(t_us, dtype=np.int64)
        coarse = self._coarse_index()
        block = np.searchsorted(coarse, t_us, side="left")  # coarse[block - 1] < t_us <= coarse[block]
        out = np.zeros(t_us.shape, dtype=np.int64)
        for b in np.unique(block[block > 0]):
            low = (int(b) - 1) * self.INDEX_STRIDE
            high = min(int(b) * self.INDEX_STRIDE + 1, self.num_events)
            times = self._times_us(low, high)
            if np.any(np.diff(times) < 0):
                raise EventFormatError(self.path, f"'{self.key}' rows {low}..{high - 1} are not sorted by time")
            hits = block == b
            out[hits] = low + np.searchsorted(times, t_us[hits], side="left")
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Events ``start..stop-1`` of the file as ``EVENT_DTYPE``, sorted by time."""
        block = h5_read(self._events, np.s_[start:stop], source=self.path).astype(np.float64)
        events = np.empty(len(block), EVENT_DTYPE)
        _convert_block(block, events, source=self.path, first_event=start)
        if len(events) > 1 and np.any(events["t"][1:] < events["t"][:-1]):
            events = events[np.argsort(events["t"], kind="stable")]
        return events

    def window(self, t_start_us: int, t_end_us: int) -> np.ndarray:
        """Events with ``t_start_us <= t < t_end_us`` (microseconds, the file's clock), sorted, as ``EVENT_DTYPE``."""
        if t_end_us < t_start_us:
            raise ValueError(f"window end {t_end_us} us is before its start {t_start_us} us")
        start, stop = self.index_at(np.array([t_start_us, t_end_us]))
        return self.rows(int(start), int(stop))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MvsecEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _times_us(self, start: int, stop: int, step: int = 1) -> np.ndarray:
        """Timestamps of rows ``start:stop:step`` in microseconds (as ``read_mvsec``)."""
        seconds = h5_read(self._events, np.s_[start:stop:step, 2], source=self.path).astype(np.float64)
        i = first_index(~(np.isfinite(seconds) & (np.abs(seconds) < 9e12)))
        if i is not None:
            event = start + i * step
            raise EventFormatError(self.path, f"event {event} has t={seconds[i]}, expected a finite time in seconds")
        return np.rint(seconds * 1e6).astype(np.int64)

    def _coarse_index(self) -> np.ndarray:
        """Every ``INDEX_STRIDE``-th timestamp in microseconds, read once with one strided selection."""
        if self._coarse_us is None:
            coarse = self._times_us(0, self.num_events, step=self.INDEX_STRIDE)
            if np.any(np.diff(coarse) < 0):
                raise EventFormatError(self.path, f"'{self.key}' is not sorted by time")
            self._coarse_us = coarse
        return self._coarse_us
