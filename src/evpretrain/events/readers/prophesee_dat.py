"""Prophesee DAT files: N-Cars, the Gen1 and Gen4 (1 Mpx) automotive datasets, Metavision recordings.

Layout: a ``%`` text header (see ``prophesee_header``: ``Version``, ``Width``/``Height`` or ``geometry``, ``Date``,
...), then one byte event type and one byte event size, then events of that size. CD events (type 0x0C "EventCD",
or 0x00 "Event2D" in older files such as N-Cars) are 8 bytes, two little-endian uint32 words:

    word 0   timestamp, microseconds
    word 1   Version 2 (or no Version line):  x bits 0..13, y bits 14..27, polarity bits 28..31
             Version 1:                        x bits 0..8,  y bits 9..16,  polarity bits 17..20

The polarity field holds 0 (OFF) or 1 (ON) for CD events; anything else is rejected. The 32-bit timestamp wraps
every 2^32 us (71.6 min); a backward jump of more than 2^31 us is taken as a wrap and 2^32 us added from there on.
A ``T0`` header field (written by faery, which stores timestamps relative to it) is added to every timestamp.
Files without a header are refused: nothing would then tell a DAT file from any other binary file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, make_recording, pack_events
from evpretrain.events.readers.prophesee_header import read_prophesee_header

CD_EVENT_BYTES = 8
CD_EVENT_TYPES = {0x00: "Event2D", 0x0C: "EventCD"}
# (x mask, y shift, y mask, polarity shift, polarity mask) of the second word, per DAT version
WORD_LAYOUTS = {"1": (0x1FF, 9, 0xFF, 17, 0xF), "2": (0x3FFF, 14, 0x3FFF, 28, 0xF)}
TIMESTAMP_WRAP_US = 1 << 32


@dataclass(frozen=True)
class DatLayout:
    """What the header of a DAT file says: where the events start (byte ``data_start``), how many there are, the
    word layout ``version``, the ``T0`` (microseconds added to every timestamp), the sensor size and metadata."""

    data_start: int
    num_events: int
    version: str
    t0: int
    sensor_size: tuple[int, int] | None
    metadata: dict


def read_prophesee_dat(path: str | os.PathLike) -> Recording:
    """Read a Prophesee DAT file of CD events (layout in the module docstring); t in microseconds.

    ``sensor_size`` comes from the header (None when it gives none); ``metadata`` holds the header fields, the DAT
    version and the event type.
    """
    layout = read_dat_layout(path)
    with open(path, "rb") as file:
        file.seek(layout.data_start)
        words = np.fromfile(file, dtype="<u4").reshape(-1, 2)
    t, x, y, p = _decode_cd_words(words, layout.version, path, layout.data_start, layout.sensor_size)
    return make_recording(t + layout.t0, x, y, p, source=path, sensor_size=layout.sensor_size, metadata=layout.metadata)


def iter_prophesee_dat(
    path: str | os.PathLike, chunk_events: int, layout: DatLayout | None = None
) -> Iterator[np.ndarray]:
    """A DAT file's events (as ``read_prophesee_dat`` gives them) in sorted ``EVENT_DTYPE`` chunks of up to
    ``chunk_events`` events, read through a memory map: memory O(chunk_events). ``layout``: the file's
    ``read_dat_layout`` (read here if None). Each chunk is checked as it is read (errors name the event's file-wide
    index and byte offset); timestamp wraps are carried across chunks, so the chunks joined equal the whole read
    when the file is in time order."""
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    layout = read_dat_layout(path) if layout is None else layout
    if not layout.num_events:
        return
    words = np.memmap(path, dtype="<u4", mode="r", offset=layout.data_start, shape=(layout.num_events, 2))
    high = None  # the multiple of 2^32 added to the previous chunk's last timestamp, and that timestamp
    for start in range(0, layout.num_events, chunk_events):
        block = np.array(words[start : start + chunk_events])
        t, x, y, p = _decode_cd_words(block, layout.version, path, layout.data_start, layout.sensor_size, start)
        if high is not None:
            wrap_base, last = high
            t += wrap_base
            if t[0] < last - TIMESTAMP_WRAP_US // 2:  # a wrap between the chunks
                t += TIMESTAMP_WRAP_US
        high = (int(t[-1]) - int(block[-1, 0]), int(t[-1]))
        yield pack_events(t + layout.t0, x, y, p, source=path, sensor_size=layout.sensor_size)


def read_dat_layout(path: str | os.PathLike) -> DatLayout:
    """Read and check the header of a DAT file (module docstring); the events are not read."""
    with open(path, "rb") as file:
        header = read_prophesee_header(file, source=path)
        if not header.fields:
            raise EventFormatError(path, "expected a '%' text header (a Prophesee DAT file)", offset=0)
        type_and_size = file.read(2)
    if len(type_and_size) < 2:
        raise EventFormatError(path, "file ends before the event type and size bytes", offset=header.size)
    event_type, event_size = type_and_size
    if event_type not in CD_EVENT_TYPES:
        raise EventFormatError(
            path,
            f"event type 0x{event_type:02X} is not a CD event type (expected 0x00 Event2D or 0x0C EventCD)",
            offset=header.size,
        )
    if event_size != CD_EVENT_BYTES:
        raise EventFormatError(
            path, f"event size {event_size} bytes, expected {CD_EVENT_BYTES} for CD events", offset=header.size + 1
        )
    version = header.get("Version") or "2"
    if version not in WORD_LAYOUTS:
        raise EventFormatError(
            path, f"DAT version {version!r} is not supported (expected 1 or 2)", offset=header.offset("Version")
        )
    data_start = header.size + 2
    body = os.stat(path).st_size - data_start
    if body % CD_EVENT_BYTES:
        complete = body - body % CD_EVENT_BYTES
        raise EventFormatError(
            path,
            f"truncated event: {body % CD_EVENT_BYTES} bytes left after the last complete {CD_EVENT_BYTES}-byte event",
            offset=data_start + complete,
        )
    t0 = header.get("T0") or "0"
    if not t0.isdigit():
        raise EventFormatError(
            path, f"header 'T0 {t0}' is not a whole number of microseconds", offset=header.offset("T0")
        )
    metadata = {
        "format": "dat",
        "version": int(version),
        "event_type": CD_EVENT_TYPES[event_type],
        "header": dict(header.fields),
    }
    return DatLayout(data_start, body // CD_EVENT_BYTES, version, int(t0), header.geometry(source=path), metadata)


def _decode_cd_words(words: np.ndarray, version: str, source, data_start: int, sensor_size, first: int = 0):
    """(N, 2) uint32 words -> (t int64 us, x, y, p int8 +/-1), checked; errors name the event (``words[0]`` being
    the file's event ``first``) and its byte offset."""
    x_mask, y_shift, y_mask, p_shift, p_mask = WORD_LAYOUTS[version]
    packed = words[:, 1]
    x = (packed & x_mask).astype(np.uint16)
    y = ((packed >> y_shift) & y_mask).astype(np.uint16)
    polarity = (packed >> p_shift) & p_mask
    i = first_index(polarity > 1)
    if i is not None:
        raise EventFormatError(
            source,
            f"event {first + i} has polarity field {polarity[i]}, expected 0 or 1",
            offset=data_start + 8 * (first + i),
        )
    if sensor_size is not None:
        height, width = sensor_size
        i = first_index((x >= width) | (y >= height))
        if i is not None:
            raise EventFormatError(
                source,
                f"event {first + i} has x={x[i]}, y={y[i]}, outside the {width}x{height} sensor of the header",
                offset=data_start + 8 * (first + i),
            )
    t = words[:, 0].astype(np.int64)
    if t.size > 1:
        wraps = np.diff(t) < -(TIMESTAMP_WRAP_US // 2)
        if wraps.any():
            t[1:] += np.cumsum(wraps, dtype=np.int64) * TIMESTAMP_WRAP_US
    p = (polarity.astype(np.int8) * 2 - 1).astype(np.int8)
    return t, x, y, p
