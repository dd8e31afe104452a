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

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, make_recording
from evpretrain.events.readers.prophesee_header import read_prophesee_header

CD_EVENT_BYTES = 8
CD_EVENT_TYPES = {0x00: "Event2D", 0x0C: "EventCD"}
# (x mask, y shift, y mask, polarity shift, polarity mask) of the second word, per DAT version
WORD_LAYOUTS = {"1": (0x1FF, 9, 0xFF, 17, 0xF), "2": (0x3FFF, 14, 0x3FFF, 28, 0xF)}
TIMESTAMP_WRAP_US = 1 << 32


def read_prophesee_dat(path: str | os.PathLike) -> Recording:
    """Read a Prophesee DAT file of CD events (layout in the module docstring); t in microseconds.

    ``sensor_size`` comes from the header (None when it gives none); ``metadata`` holds the header fields, the DAT
    version and the event type.
    """
    with open(path, "rb") as file:
        layout = _read_layout(file, path)
        body = np.fromfile(file, dtype=np.uint8)
    if body.size % CD_EVENT_BYTES:
        complete = body.size - body.size % CD_EVENT_BYTES
        raise EventFormatError(
            path,
            f"truncated event: {body.size % CD_EVENT_BYTES} bytes left after the last complete "
            f"{CD_EVENT_BYTES}-byte event",
            offset=layout.data_start + complete,
        )
    words = body.view("<u4").reshape(-1, 2)
    t, x, y, p = _decode_cd_words(words, layout.version, path, layout.data_start, layout.sensor_size)
    return make_recording(t + layout.t0, x, y, p, source=path, sensor_size=layout.sensor_size, metadata=layout.metadata)


def iter_prophesee_dat(path: str | os.PathLike, chunk_events: int) -> tuple[Recording, Iterator[np.ndarray]]:
    """A DAT file read ``chunk_events`` events at a time: (a ``Recording`` without events that gives the sensor size
    and metadata, an iterator of ``EVENT_DTYPE`` chunks). The header is checked at once, each chunk as it is read,
    as ``read_prophesee_dat`` checks them; timestamp wraps carry across chunks. Memory: one chunk."""
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    with open(path, "rb") as file:
        layout = _read_layout(file, path)
    return Recording(np.empty(0, EVENT_DTYPE), layout.sensor_size, layout.metadata), _dat_chunks(
        path, layout, chunk_events
    )


def _dat_chunks(path, layout: _Layout, chunk_events: int) -> Iterator[np.ndarray]:
    added, last_raw, done = 0, None, 0  # us added by wraps so far, the last raw timestamp, events read
    with open(path, "rb") as file:
        file.seek(layout.data_start)
        while True:
            body = np.fromfile(file, dtype=np.uint8, count=chunk_events * CD_EVENT_BYTES)
            if body.size == 0:
                return
            start = layout.data_start + done * CD_EVENT_BYTES
            if body.size % CD_EVENT_BYTES:
                raise EventFormatError(
                    path,
                    f"truncated event: {body.size % CD_EVENT_BYTES} bytes left after the last complete "
                    f"{CD_EVENT_BYTES}-byte event",
                    offset=start + body.size - body.size % CD_EVENT_BYTES,
                )
            words = body.view("<u4").reshape(-1, 2)
            t, x, y, p = _decode_cd_words(words, layout.version, path, layout.data_start, layout.sensor_size, done)
            raw = int(words[0, 0])
            if last_raw is not None and last_raw - raw > TIMESTAMP_WRAP_US // 2:
                added += TIMESTAMP_WRAP_US
            t += added
            added = int(t[-1]) - int(words[-1, 0])
            last_raw = int(words[-1, 0])
            events = make_recording(t + layout.t0, x, y, p, source=path, sensor_size=layout.sensor_size).events
            done += len(words)
            yield events


@dataclass(frozen=True)
class _Layout:
    version: str
    sensor_size: tuple[int, int] | None
    t0: int
    data_start: int
    metadata: dict


def _read_layout(file, path) -> _Layout:
    """The header and the event type and size bytes of an open DAT file, checked; ``file`` is left at the events."""
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
    return _Layout(version, header.geometry(source=path), int(t0), header.size + 2, metadata)


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
