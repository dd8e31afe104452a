"""N-MNIST and N-Caltech101 ``.bin`` files (Orchard et al., 2015): ATIS events, 5 bytes each.

Each event is 40 bits, most significant byte first:

    byte 0      x (8 bits, pixels)
    byte 1      y (8 bits, pixels)
    byte 2..4   bit 23 polarity (1 = ON, 0 = OFF), bits 22..0 timestamp (microseconds)

The 23-bit timestamp wraps every 2^23 us (8.39 s). The recording software marks each wrap with an event whose
y is 240, a row the 304x240 ATIS does not have; the authors' Python loader (``eventvision.read_dataset``) drops
these markers, whatever their x. Here too, and every marker adds 2^23 us to the events that follow it. (That
loader adds 2^13 instead, which cannot be the wrap of a 23-bit counter; samples of both datasets last about
0.3 s, far below one wrap, so the choice does not touch their events.)
"""

from __future__ import annotations

import os

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, make_recording

EVENT_BYTES = 5
OVERFLOW_ROW = 240
TIMESTAMP_WRAP_US = 1 << 23
ATIS_SIZE = (240, 304)  # (height, width) of the sensor both datasets were recorded with


def decode_atis_bin(data: bytes, *, source: str | os.PathLike | None = None) -> Recording:
    """Decode the bytes of one ``.bin`` file; see the module docstring for the layout.

    Returns events in microseconds, sorted by t, with ``sensor_size`` None: the files do not say the sample's
    extent (34x34 for N-MNIST, at most 240x180 for N-Caltech101), only that it lies within the 304x240 ATIS.
    """
    if len(data) % EVENT_BYTES:
        complete = len(data) - len(data) % EVENT_BYTES
        raise EventFormatError(
            source,
            f"truncated event: the file holds {len(data)} bytes, not a multiple of {EVENT_BYTES} "
            f"({len(data) - complete} bytes left over after the last complete event)",
            offset=complete,
        )
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, EVENT_BYTES)
    x = raw[:, 0]
    y = raw[:, 1]
    is_overflow = y == OVERFLOW_ROW
    height, width = ATIS_SIZE
    outside = ~is_overflow & ((y >= height) | (x >= width))
    i = first_index(outside)
    if i is not None:
        raise EventFormatError(
            source,
            f"event {i} has x={x[i]}, y={y[i]}, outside the {width}x{height} ATIS (and not a y={OVERFLOW_ROW} "
            "timestamp-overflow marker)",
            offset=i * EVENT_BYTES,
        )
    t = (raw[:, 2].astype(np.int64) & 0x7F) << 16 | raw[:, 3].astype(np.int64) << 8 | raw[:, 4]
    if is_overflow.any():
        t += np.cumsum(is_overflow, dtype=np.int64) * TIMESTAMP_WRAP_US
    keep = ~is_overflow
    p = (raw[keep, 2] >> 7).astype(np.int8) * 2 - 1
    metadata = {"format": "bin", "overflow_markers": int(is_overflow.sum()), "sensor": "ATIS 304x240"}
    return make_recording(t[keep], x[keep], y[keep], p, source=source, metadata=metadata)


def read_atis_bin(path: str | os.PathLike) -> Recording:
    """Read an N-MNIST / N-Caltech101 ``.bin`` file (layout in the module docstring); t in microseconds."""
    with open(path, "rb") as file:
        data = file.read()
    return decode_atis_bin(data, source=path)
