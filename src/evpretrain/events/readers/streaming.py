"""Read a recording chunk by chunk, in bounded memory: what ``read_recording`` returns, as a stream.

``stream_recording(path)`` opens the file (header checks as ``read_recording``) and returns an ``EventStream``:
its ``sensor_size`` and ``metadata``, and ``chunks()``, a generator of sorted ``EVENT_DTYPE`` arrays whose
concatenation equals ``read_recording(path).events`` (same order, ties included).

- Prophesee RAW (EVT 2.0/2.1/3.0), AEDAT4, Event Stream, and DAT through faery (``dat_faery``): faery's packets,
  gathered into chunks of about ``chunk_events`` events. Memory O(chunk_events).
- Prophesee DAT: a memory map, ``chunk_events`` events at a time. Memory O(chunk_events).
- Every other format is read whole (its reader has no streaming form; those files are dataset samples, not long
  recordings), then cut into chunks: memory O(file).

Sorting: each chunk is sorted as the whole-file readers sort (stable, by t). Events that come earlier than events of
the previous chunk are held back and merged, so the stream stays sorted as long as the file's disorder spans less
than one chunk; beyond that a clear EventFormatError names the file (read it whole, or raise ``chunk_events``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evpretrain.config import ConfigError
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers._columns import pack_events
from evpretrain.events.readers.dispatch import FORMATS, detect_format, read_recording
from evpretrain.events.readers.faery_formats import FILE_TYPES, UNBOUNDED_DIMENSIONS, faery_preflight
from evpretrain.events.readers.prophesee_dat import iter_prophesee_dat, read_dat_layout

__all__ = ["CHUNK_EVENTS", "EventStream", "stream_recording"]

CHUNK_EVENTS = 1 << 20  # about 15 MB of EVENT_DTYPE a chunk
FAERY_FORMATS = {"raw": "raw", "aedat4": "aedat4", "es": "es", "dat_faery": "dat"}  # ours -> faery_formats' name


@dataclass
class EventStream:
    """An open recording: ``sensor_size`` (H, W) or None, ``metadata``, and ``chunks()`` (one pass per call)."""

    path: Path
    format: str
    sensor_size: tuple[int, int] | None
    metadata: dict = field(default_factory=dict)
    _columns: Callable[[], Iterator[tuple]] | None = None  # (t, x, y, p) blocks, p int8 +/-1, unsorted
    _whole: np.ndarray | None = None
    chunk_events: int = CHUNK_EVENTS

    def chunks(self) -> Iterator[np.ndarray]:
        """Sorted EVENT_DTYPE chunks, t in microseconds, whose concatenation is the file's sorted events."""
        if self._whole is not None:
            for start in range(0, len(self._whole), self.chunk_events):
                yield self._whole[start : start + self.chunk_events]
            return
        blocks = (
            pack_events(t, x, y, p, source=self.path, sensor_size=self.sensor_size) for t, x, y, p in self._columns()
        )
        yield from _in_time_order(blocks, self.path)


def stream_recording(
    path: str | os.PathLike, *, format: str | None = None, chunk_events: int = CHUNK_EVENTS
) -> EventStream:
    """Open ``path`` (format detected, or ``format`` from ``supported_formats()``) as an ``EventStream``."""
    path = Path(path)
    name = detect_format(path) if format is None else format
    if name not in FORMATS:
        raise ConfigError(f"{path}: unknown format {name!r}; supported: {', '.join(FORMATS)}")
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    if name == "dat":
        layout = read_dat_layout(path)
        return EventStream(
            path, name, layout.sensor_size, layout.metadata, lambda: iter_prophesee_dat(path, chunk_events), None,
            chunk_events,
        )  # fmt: skip
    if name in FAERY_FORMATS:
        file_type = FAERY_FORMATS[name]
        metadata, sensor_size = faery_preflight(path, file_type)
        decoder = _faery_decoder(path, FILE_TYPES[file_type])
        if file_type in ("aedat4", "es"):
            width, height = decoder.dimensions()
            sensor_size = (height, width)
        return EventStream(
            path, name, sensor_size, metadata, lambda: _faery_columns(decoder, path, chunk_events), None, chunk_events
        )
    recording = read_recording(path, format=name)
    return EventStream(path, name, recording.sensor_size, recording.metadata, None, recording.events, chunk_events)


def _faery_decoder(path: Path, faery_type: str):
    import faery

    try:
        return faery.events_stream_from_file(path, file_type=faery_type, dimensions_fallback=UNBOUNDED_DIMENSIONS)
    except BaseException as error:  # faery raises bare Exception, and pyo3's PanicException on Rust panics
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        raise EventFormatError(path, f"faery could not decode it as {faery_type}: {error}") from error


def _faery_columns(decoder, path: Path, chunk_events: int) -> Iterator[tuple]:
    """faery's packets gathered into blocks of at least ``chunk_events`` events (the last may be smaller)."""
    packets, count = [], 0
    try:
        for packet in decoder:
            packets.append(packet)
            count += len(packet)
            if count >= chunk_events:
                yield _faery_block(packets, path)
                packets, count = [], 0
    except BaseException as error:
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        raise EventFormatError(path, f"faery could not decode it: {error}") from error
    if packets:
        yield _faery_block(packets, path)


def _faery_block(packets: list[np.ndarray], path: Path) -> tuple:
    events = np.concatenate(packets)
    t = events["t"]
    if t.size and t.max() > np.iinfo(np.int64).max:
        raise EventFormatError(path, f"timestamp {t.max()} us does not fit int64")
    return t.astype(np.int64), events["x"], events["y"], np.where(events["on"], np.int8(1), np.int8(-1))


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
