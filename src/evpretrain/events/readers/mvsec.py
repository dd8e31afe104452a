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
