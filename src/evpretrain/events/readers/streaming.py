"""Read a recording chunk by chunk, in bounded memory: what ``read_recording`` returns, as a stream.

``stream_recording(path)`` opens the file (header checks as ``read_recording``) and returns an ``EventStream``:
its ``sensor_size`` and ``metadata``, and ``chunks()``, a generator of sorted ``EVENT_DTYPE`` arrays whose
concatenation equals ``read_recording(path).events`` (same order, ties included; ``time_origin`` as there). It is
what ``evpretrain data import``, ``embed`` and ``predict`` read recordings with.

- Prophesee RAW (EVT 2.0/2.1/3.0), AEDAT4, Event Stream, and DAT through faery (``dat_faery``): faery's packets,
  gathered into chunks of about ``chunk_events`` events. Memory O(chunk_events).
- Prophesee DAT: a memory map, ``chunk_events`` events at a time. Memory O(chunk_events).
- Every other format, and any format given reader ``options``, is read whole (its reader has no streaming form;
  those files are dataset samples, not long recordings), then cut into chunks: memory O(file).

Sorting: each chunk is sorted as the whole-file readers sort (stable, by t). Events that come earlier than events of
the previous chunk are held back and merged, so the stream stays sorted as long as the file's disorder spans less
than one chunk; beyond that a clear EventFormatError names the file (read it whole, or raise ``chunk_events``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from evpretrain.config import ConfigError
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers.dispatch import FORMATS, detect_format, read_recording
from evpretrain.events.readers.faery_formats import faery_preflight, iter_with_faery
from evpretrain.events.readers.prophesee_dat import iter_prophesee_dat, read_dat_layout

__all__ = ["CHUNK_EVENTS", "STREAMED", "EventStream", "stream_recording"]

CHUNK_EVENTS = 1 << 20  # about 15 MB of EVENT_DTYPE a chunk
FAERY_FORMATS = {"raw": "raw", "aedat4": "aedat4", "es": "es", "dat_faery": "dat"}  # ours -> faery_formats' name
STREAMED = ("dat", *FAERY_FORMATS)  # decoded chunk by chunk; the others are read whole


@dataclass
class EventStream:
    """An open recording: ``sensor_size`` (H, W) or None, ``metadata``, and ``chunks()`` (one pass per call)."""

    path: Path
    format: str
    sensor_size: tuple[int, int] | None
    metadata: dict = field(default_factory=dict)
    _decoded: Callable[[], Iterator[np.ndarray]] | None = None  # sorted EVENT_DTYPE chunks, in file order
    _whole: np.ndarray | None = None
    chunk_events: int = CHUNK_EVENTS
    time_origin: Literal["file", "first_event"] = "file"

    def chunks(self) -> Iterator[np.ndarray]:
        """Sorted EVENT_DTYPE chunks, t in microseconds, whose concatenation is the file's sorted events (shifted
        to start at 0 with ``time_origin="first_event"``, which sets ``metadata["time_shift_us"]``). Errors are
        raised as the chunk that holds them is read."""
        if self._whole is not None:  # read_recording applied time_origin
            for start in range(0, len(self._whole), self.chunk_events):
                yield self._whole[start : start + self.chunk_events]
            return
        shift = None
        for chunk in _in_time_order(self._decoded(), self.path):
            if self.time_origin == "first_event":
                if shift is None:
                    shift = int(chunk["t"][0])
                    self.metadata["time_shift_us"] = -shift
                chunk["t"] -= shift  # in place: every chunk is a fresh array, or a part of one, made for this pass
            yield chunk


def stream_recording(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    time_origin: Literal["file", "first_event"] = "file",
    chunk_events: int = CHUNK_EVENTS,
    **options,
) -> EventStream:
    """Open ``path`` (format detected, or ``format`` from ``supported_formats()``) as an ``EventStream``; the header
    is checked at once. ``time_origin`` and ``options`` as ``read_recording``'s (a format of ``STREAMED`` given
    reader options is read whole)."""
    path = Path(path)
    name = detect_format(path) if format is None else format
    if name not in FORMATS:
        raise ConfigError(f"{path}: unknown format {name!r}; supported: {', '.join(FORMATS)}")
    if time_origin not in ("file", "first_event"):
        raise ValueError(f"time_origin must be 'file' or 'first_event', got {time_origin!r}")
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    stream = EventStream(path, name, None, chunk_events=chunk_events, time_origin=time_origin)
    if name == "dat" and not options:
        layout = read_dat_layout(path)
        stream.sensor_size, stream.metadata = layout.sensor_size, layout.metadata
        stream._decoded = lambda: iter_prophesee_dat(path, chunk_events, layout)
    elif name in FAERY_FORMATS and not options:
        file_type = FAERY_FORMATS[name]
        stream.metadata, stream.sensor_size = faery_preflight(path, file_type)
        stream._decoded = lambda: iter_with_faery(path, file_type, chunk_events, stream.sensor_size)
    else:
        recording = read_recording(path, format=name, time_origin=time_origin, **options)
        stream.sensor_size, stream.metadata, stream._whole = recording.sensor_size, recording.metadata, recording.events
    return stream


def _in_time_order(chunks: Iterator[np.ndarray], source: Path) -> Iterator[np.ndarray]:
    """Sorted chunks -> a sorted stream: events of a chunk that are not before the next chunk's first event are held
    back and merged with it (stable: earlier in the file first among equal times), as a whole-file stable sort."""
    held: np.ndarray | None = None
    released = None  # the last timestamp given out
    for chunk in chunks:
        if not len(chunk):
            continue
        first = int(chunk["t"][0])
        if released is not None and first < released:
            raise EventFormatError(
                source,
                f"an event at t={first} us comes after events up to t={released} us that are more than one chunk "
                "earlier in the file: it cannot be read in time order in chunks; read it whole",
            )
        if held is None:
            held = chunk
            continue
        cut = int(np.searchsorted(held["t"], first, "left"))  # held[:cut] precede everything still to come
        if cut:
            released = int(held["t"][cut - 1])
            yield held[:cut]
        rest = held[cut:]
        if len(rest):
            merged = np.concatenate([rest, chunk])
            held = merged[np.argsort(merged["t"], kind="stable")]
        else:
            held = chunk
    if held is not None:
        yield held
