"""Decoded columns -> the event contract: the step every reader ends with.

Readers decode a file into plain column arrays (t in microseconds, x, y, polarity) and hand them here to be
range-checked, sorted by time and packed into ``EVENT_DTYPE``. Every check is one vectorised pass (no sort, no
Python loop) because recordings run to tens of millions of events.
"""

from __future__ import annotations

from os import PathLike

import numpy as np

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, Recording, validate_events

Source = str | PathLike | None


def first_index(mask: np.ndarray) -> int | None:
    """Index of the first True in ``mask``, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def event_offset(offsets: tuple[int, int] | None, event: int) -> int | None:
    """Byte offset of a field of file-wide event ``event``, given ``offsets = (field offset in event 0, event size)``
    for a file of fixed-size records; None for files whose events have no fixed position (compressed, columnar)."""
    return None if offsets is None else offsets[0] + offsets[1] * event


def signed_polarity(
    p: np.ndarray, *, source: Source, first_event: int = 0, offsets: tuple[int, int] | None = None
) -> np.ndarray:
    """Map polarity in {0, 1}, {False, True} or {-1, +1} to int8 {-1, +1}; raise naming the first bad event.

    Unlike ``contract.polarity_to_signed`` it needs no ``np.unique`` (a sort), which matters at tens of millions
    of events. ``first_event``: the file-wide number of ``p[0]``, for error messages about a block; ``offsets``:
    see ``event_offset``, for the error's byte offset.
    """
    p = np.asarray(p)
    if p.dtype == np.bool_:
        return np.where(p, np.int8(1), np.int8(-1))
    if p.size == 0:
        return p.astype(np.int8)
    if not np.issubdtype(p.dtype, np.integer):
        # Float columns (MVSEC, some npz files) must still hold exact integers.
        i = first_index(~(np.isfinite(p) & (p == np.round(p))))
        if i is not None:
            raise EventFormatError(
                source,
                f"event {first_event + i} has polarity {p[i]}, expected -1/+1 or 0/1",
                offset=event_offset(offsets, first_event + i),
            )
    if p.min() >= 0:  # the {0, 1} encoding
        i = first_index(p > 1)
        if i is None:
            return (p.astype(np.int8) * 2 - 1).astype(np.int8)
    else:  # the {-1, +1} encoding
        i = first_index((p != 1) & (p != -1))
        if i is None:
            return p.astype(np.int8)
    raise EventFormatError(
        source,
        f"event {first_event + i} has polarity {p[i]}, expected values in {{0, 1}} or {{-1, +1}}",
        offset=event_offset(offsets, first_event + i),
    )


def check_coordinate(
    values: np.ndarray,
    name: str,
    limit: int,
    *,
    source: Source,
    first_event: int = 0,
    offsets: tuple[int, int] | None = None,
) -> None:
    """Raise unless every value is an integer in [0, limit); names the first offending event (see
    ``signed_polarity`` for ``first_event`` and ``offsets``)."""
    values = np.asarray(values)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        exact = np.isfinite(values) & (values == np.round(values))
        i = first_index(~exact)
        if i is not None:
            raise EventFormatError(
                source,
                f"event {first_event + i} has {name}={values[i]}, expected an integer pixel coordinate",
                offset=event_offset(offsets, first_event + i),
            )
    if values.min() < 0 or values.max() >= limit:
        i = first_index((values < 0) | (values >= limit))
        raise EventFormatError(
            source,
            f"event {first_event + i} has {name}={values[i]}, expected 0 <= {name} < {limit}",
            offset=event_offset(offsets, first_event + i),
        )


def pack_events(
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    *,
    source: Source,
    sensor_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Columns -> a sorted, validated ``EVENT_DTYPE`` array.

    ``t`` integer microseconds (any order: a stable sort by t is applied when needed), ``x``/``y`` integer pixel
    coordinates, ``p`` already int8 {-1, +1} (see ``signed_polarity``). ``sensor_size`` is ``(height, width)``;
    without it coordinates need only fit uint16.
    """
    t = np.asarray(t, dtype=np.int64)
    height, width = sensor_size if sensor_size is not None else (65536, 65536)
    check_coordinate(x, "x", width, source=source)
    check_coordinate(y, "y", height, source=source)
    order = None if t.size < 2 or np.all(t[1:] >= t[:-1]) else np.argsort(t, kind="stable")
    events = np.empty(len(t), dtype=EVENT_DTYPE)
    for name, column in (("t", t), ("x", x), ("y", y), ("p", p)):
        events[name] = column if order is None else np.asarray(column)[order]
    return validate_events(events, source=source, sensor_size=sensor_size)


def make_recording(
    t, x, y, p, *, source: Source, sensor_size: tuple[int, int] | None = None, metadata: dict | None = None
) -> Recording:
    """``pack_events`` wrapped into a ``Recording``."""
    events = pack_events(t, x, y, p, source=source, sensor_size=sensor_size)
    return Recording(events=events, sensor_size=sensor_size, metadata=dict(metadata or {}))
