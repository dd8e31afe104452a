"""The event contract every reader, builder and representation shares.

An event array is a 1-D numpy structured array of ``EVENT_DTYPE``:
``t`` int64 microseconds, ``x`` uint16 column, ``y`` uint16 row, ``p`` int8 polarity in {-1, +1},
sorted by ``t`` (ties keep their input order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "i1")])


class EventFormatError(ValueError):
    """Bad event input: names the file, the byte offset (where one applies) and what was expected."""

    def __init__(self, path: str | PathLike | None, message: str, offset: int | None = None):
        self.path = None if path is None else str(path)
        self.offset = offset
        self.reason = message
        where = self.path or "<events>"
        if offset is not None:
            where += f": at byte offset {offset}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Recording:
    """Events with what is known of the sensor that produced them.

    ``sensor_size`` is ``(height, width)`` in pixels, or None where the file does not say.
    ``metadata`` holds format-specific facts (header fields, source format) as plain values.
    """

    events: np.ndarray
    sensor_size: tuple[int, int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def make_events(t, x, y, p, *, source: str | PathLike | None = None) -> np.ndarray:
    """Pack column arrays into a validated ``EVENT_DTYPE`` array.

    ``p`` may be {0, 1}, {False, True} or {-1, +1}; 0/False become -1.
    ``t`` is in microseconds and must be non-decreasing: readers sort, or raise, before calling this.
    """
    t = np.asarray(t)
    n = t.shape[0]
    for name, col in (("x", x), ("y", y), ("p", p)):
        if np.shape(col) != (n,):
            raise EventFormatError(source, f"column {name!r} has shape {np.shape(col)}, expected ({n},) like 't'")
    events = np.empty(n, dtype=EVENT_DTYPE)
    events["t"] = t
    _store_coordinate(events, "x", x, source)
    _store_coordinate(events, "y", y, source)
    events["p"] = polarity_to_signed(p, source=source)
    validate_events(events, source=source)
    return events


def _store_coordinate(events: np.ndarray, name: str, values, source) -> None:
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
        raise EventFormatError(
            source, f"column {name!r} holds values outside [0, 65535] (min {values.min()}, max {values.max()})"
        )
    events[name] = values


def polarity_to_signed(p, *, source: str | PathLike | None = None) -> np.ndarray:
    """Map polarity in {0, 1}, {False, True} or {-1, +1} to int8 {-1, +1}; anything else raises."""
    p = np.asarray(p)
    if p.dtype == np.bool_:
        return np.where(p, 1, -1).astype(np.int8)
    if p.size == 0:
        return p.astype(np.int8)
    values = np.unique(p)
    if np.isin(values, (-1, 1)).all():
        return p.astype(np.int8)
    if np.isin(values, (0, 1)).all():
        return (2 * p.astype(np.int8) - 1).astype(np.int8)
    raise EventFormatError(source, f"polarity holds {values[:5].tolist()}, expected values in {{0, 1}} or {{-1, +1}}")


def validate_events(
    events: np.ndarray,
    *,
    source: str | PathLike | None = None,
    sensor_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Check an array against the contract; return it unchanged or raise ``EventFormatError``.

    ``sensor_size`` is ``(height, width)``; when given, every x < width and y < height.
    """
    if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE or events.ndim != 1:
        got = getattr(events, "dtype", type(events).__name__)
        raise EventFormatError(source, f"expected a 1-D array of dtype {EVENT_DTYPE}, got {got}")
    if events.size == 0:
        return events
    t = events["t"]
    decreasing = np.flatnonzero(t[1:] < t[:-1])
    if decreasing.size:
        i = int(decreasing[0])
        raise EventFormatError(source, f"timestamps not sorted: event {i + 1} has t={t[i + 1]} after t={t[i]}")
    bad_p = np.flatnonzero((events["p"] != 1) & (events["p"] != -1))
    if bad_p.size:
        i = int(bad_p[0])
        raise EventFormatError(source, f"event {i} has polarity {events['p'][i]}, expected -1 or +1")
    if sensor_size is not None:
        height, width = sensor_size
        for name, limit in (("x", width), ("y", height)):
            outside = np.flatnonzero(events[name] >= limit)
            if outside.size:
                i = int(outside[0])
                raise EventFormatError(
                    source, f"event {i} has {name}={events[name][i]}, outside the sensor ({height}x{width}, HxW)"
                )
    return events


def sort_events(events: np.ndarray) -> np.ndarray:
    """Return events sorted by time, stable for equal timestamps."""
    order = np.argsort(events["t"], kind="stable")
    return events[order]
