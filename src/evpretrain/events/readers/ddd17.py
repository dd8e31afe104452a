"""DDD17 as repackaged for semantic segmentation by ESS (Sun et al., ECCV 2022; github.com/uzh-rpg/ess).

One folder a sequence (``dir0``, ``dir1``, ...), 346x260 DAVIS events in two raw numpy memmaps without headers:
- ``events.dat.t``: int64 timestamps, nanoseconds, one per event (file size 8 N);
- ``events.dat.xyp``: int16 rows ``(x, y, p)``, p 0 = OFF, 1 = ON (file size 6 N);
- ``index/index_{10,50,250}ms.npy``: one row per image, ``(t_ns, event_index, event_index_before)`` (the ESS
  loader reads ``timestamp, event_idx, event_idx_before = index[i]``), int64.

Timestamps returned here are microseconds: ``t_ns // 1000`` (floor), so a window [t0, t1) in microseconds holds
exactly the events with 1000 t0 <= t_ns < 1000 t1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, Recording
from evpretrain.events.readers._columns import check_coordinate, first_index, pack_events, signed_polarity
from evpretrain.events.readers._io import file_size, load_npy

SENSOR_SIZE = (260, 346)
T_FILE = "events.dat.t"
XYP_FILE = "events.dat.xyp"
INDEX_WINDOWS_MS = (10, 50, 250)
NS_PER_US = 1000


def sequence_dir(path: str | os.PathLike) -> Path:
    """The sequence folder, given it or either of its ``events.dat.*`` files."""
    path = Path(path)
    return path.parent if path.name in (T_FILE, XYP_FILE) else path


class Ddd17Events:
    """Time-window access to one ESS DDD17 sequence (memory-mapped: only the rows a window needs are read)."""

    sensor_size = SENSOR_SIZE

    def __init__(self, path: str | os.PathLike):
        self.directory = sequence_dir(path)
        t_path, xyp_path = self.directory / T_FILE, self.directory / XYP_FILE
        t_bytes, xyp_bytes = file_size(t_path), file_size(xyp_path)
        if t_bytes % 8:
            raise EventFormatError(
                t_path, f"size {t_bytes} bytes is not a multiple of 8 (int64 timestamps)", offset=t_bytes - t_bytes % 8
            )
        self.num_events = t_bytes // 8
        if xyp_bytes != 6 * self.num_events:
            raise EventFormatError(
                xyp_path,
                f"size {xyp_bytes} bytes, expected {6 * self.num_events} (3 int16 a row for the {self.num_events} "
                f"timestamps of {T_FILE})",
                offset=min(xyp_bytes, 6 * self.num_events),
            )
        if self.num_events:
            self._t = np.memmap(t_path, dtype="<i8", mode="r", shape=(self.num_events,))
            self._xyp = np.memmap(xyp_path, dtype="<i2", mode="r", shape=(self.num_events, 3))
        else:  # numpy cannot map an empty file
            self._t = np.empty(0, "<i8")
            self._xyp = np.empty((0, 3), "<i2")

    def window(self, t_start_us: int, t_end_us: int) -> np.ndarray:
        """Events with ``t_start_us <= t < t_end_us`` (microseconds), sorted, as ``EVENT_DTYPE``."""
        if t_end_us < t_start_us:
            raise ValueError(f"window end {t_end_us} us is before its start {t_start_us} us")
        first, last = np.searchsorted(self._t, [t_start_us * NS_PER_US, t_end_us * NS_PER_US], side="left")
        return self._events(int(first), int(last), require_sorted=True)

    def rows(self, first: int, last: int) -> np.ndarray:
        """Events of file rows ``first .. last - 1`` (clipped to the file), sorted, as ``EVENT_DTYPE``.

        Rows are what the ESS image index counts (``event_index``), so windows defined by it are read exactly.
        """
        first, last = max(int(first), 0), min(int(last), self.num_events)
        return self._events(first, last, require_sorted=True)

    def read_all(self) -> np.ndarray:
        """Every event of the sequence, sorted (stably, where the file is not), as ``EVENT_DTYPE``."""
        return self._events(0, self.num_events, require_sorted=False)

    def image_index(self, window_ms: int = 50) -> np.ndarray:
        """``index/index_{window_ms}ms.npy``: (N_images, 3) int64 rows ``(t_ns, event_index, event_index_before)``."""
        path = self.directory / "index" / f"index_{window_ms}ms.npy"
        index = load_npy(path)
        if index.ndim != 2 or index.shape[1] != 3 or not np.issubdtype(index.dtype, np.number):
            raise EventFormatError(path, f"has shape {index.shape} and dtype {index.dtype}, expected (N, 3) numbers")
        return index.astype(np.int64)

    def _events(self, first: int, last: int, *, require_sorted: bool) -> np.ndarray:
        """Events first..last-1; a window found by binary search is only right if the file is sorted."""
        if last <= first:
            return np.empty(0, EVENT_DTYPE)
        t_ns = np.asarray(self._t[first:last])
        xyp = np.asarray(self._xyp[first:last])
        i = first_index(np.diff(t_ns) < 0) if require_sorted else None
        if i is not None:
            raise EventFormatError(
                self.directory / T_FILE,
                f"timestamps not sorted: event {first + i + 1} comes before event {first + i}",
                offset=8 * (first + i + 1),
            )
        # Checked here, not only in pack_events, so that errors give the row's byte offset in the .xyp file.
        xyp_path = self.directory / XYP_FILE
        height, width = SENSOR_SIZE
        check_coordinate(xyp[:, 0], "x", width, source=xyp_path, first_event=first, offsets=(0, 6))
        check_coordinate(xyp[:, 1], "y", height, source=xyp_path, first_event=first, offsets=(2, 6))
        polarity = signed_polarity(xyp[:, 2], source=xyp_path, first_event=first, offsets=(4, 6))
        t = t_ns // NS_PER_US
        return pack_events(t, xyp[:, 0], xyp[:, 1], polarity, source=self.directory, sensor_size=SENSOR_SIZE)


def read_ddd17(path: str | os.PathLike) -> Recording:
    """Read a whole ESS DDD17 sequence (its folder or either ``events.dat.*`` file); t in microseconds, 346x260.

    ``metadata`` lists the image-index files present (``index_{10,50,250}ms.npy``).
    """
    events = Ddd17Events(path)
    indices = [
        f"index_{ms}ms.npy" for ms in INDEX_WINDOWS_MS if (events.directory / "index" / f"index_{ms}ms.npy").exists()
    ]
    metadata = {"format": "ddd17", "time_unit_in_file": "ns", "index_files": indices}
    return Recording(events=events.read_all(), sensor_size=SENSOR_SIZE, metadata=metadata)
