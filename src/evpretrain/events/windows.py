"""Cut a stream of events into consecutive windows, by event count or by duration, in bounded memory.

``events:N``: windows of N consecutive events, [t of the first, t of the last + 1) microseconds. ``ms:T``: windows of
T milliseconds, [t0 + k T, t0 + (k + 1) T) from the first event's time t0; a window without events is still one
(its input is empty). Windows do not overlap. The incomplete window at the end (fewer than N events; a span that
reaches past the last event) is left out, and counted in ``WindowCutter.dropped_events``; a recording without one
complete window is refused, naming the file and its size.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from evpretrain.config import ConfigError
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError

__all__ = ["Window", "WindowCutter", "WindowSpec"]


@dataclass(frozen=True)
class WindowSpec:
    """``unit`` "events" (``size`` events) or "ms" (``size`` milliseconds, a whole number of microseconds)."""

    unit: Literal["events", "ms"]
    size: float

    def __post_init__(self) -> None:
        if self.unit not in ("events", "ms"):
            raise ConfigError(f"window: unit must be 'events' or 'ms', got {self.unit!r}")
        if not (math.isfinite(self.size) and self.size > 0):
            raise ConfigError(f"window: size must be > 0, got {self.size}")
        if self.unit == "events" and self.size != int(self.size):
            raise ConfigError(f"window: events:N needs a whole number of events, got {self.size}")
        if self.unit == "ms" and round(self.size * 1000) < 1:
            raise ConfigError(f"window: ms:T needs at least 1 microsecond, got {self.size} ms")

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        """``"events:N"`` or ``"ms:T"`` (e.g. ``events:50000``, ``ms:50``, ``ms:0.5``)."""
        match = re.fullmatch(r"\s*(events|ms)\s*:\s*([0-9.eE+]+)\s*", text)
        if match is None:
            raise ConfigError(f"--window: expected events:N or ms:T (e.g. events:50000, ms:50), got {text!r}")
        try:
            size = float(match[2])
        except ValueError:
            raise ConfigError(f"--window: {match[2]!r} is not a number (in {text!r})") from None
        return cls(match[1], int(size) if match[1] == "events" and size == int(size) else size)

    @property
    def duration_us(self) -> int:
        """The window's length in microseconds (``ms`` windows)."""
        return int(round(self.size * 1000))

    def __str__(self) -> str:
        size = int(self.size) if self.size == int(self.size) else self.size
        return f"{self.unit}:{size}"


class Window(NamedTuple):
    """One window: its events (``EVENT_DTYPE``, time order) and its span [t_start, t_end) in microseconds."""

    events: np.ndarray
    t_start: int
    t_end: int


class WindowCutter:
    """Iterate to get the ``Window`` s of ``chunks`` (``EVENT_DTYPE`` arrays in time order, e.g. from
    ``stream_recording``); afterwards ``events`` (seen), ``windows`` (given out), ``dropped_events`` (of the
    incomplete last window) and ``first_t`` / ``last_t`` describe the recording. Memory: one chunk plus one window.
    ``source`` names the recording in errors; ``required``: a recording without one complete window is an error
    (else it gives none)."""

    def __init__(
        self,
        chunks: Iterable[np.ndarray],
        spec: WindowSpec,
        source: str | os.PathLike | None = None,
        *,
        required: bool = True,
    ):
        self.chunks, self.spec, self.source, self.required = chunks, spec, source, required
        self.events = self.windows = self.dropped_events = 0
        self.first_t: int | None = None
        self.last_t: int | None = None
        self._next_start: int | None = None  # ms windows: the start of the next one

    def __iter__(self) -> Iterator[Window]:
        pending = np.empty(0, EVENT_DTYPE)
        cut = self._by_count if self.spec.unit == "events" else self._by_time
        for chunk in self.chunks:
            if not len(chunk):
                continue
            if self.last_t is not None and int(chunk["t"][0]) < self.last_t:
                raise EventFormatError(
                    self.source, f"timestamps not sorted: t={int(chunk['t'][0])} after t={self.last_t}"
                )
            if self.first_t is None:
                self.first_t = int(chunk["t"][0])
            self.last_t = int(chunk["t"][-1])
            self.events += len(chunk)
            pending = np.concatenate([pending, chunk]) if len(pending) else chunk
            windows, pending = cut(pending)
            for window in windows:
                self.windows += 1
                yield window
        self.dropped_events = len(pending)
        if self.windows == 0 and self.required:
            span = 0 if self.first_t is None else self.last_t - self.first_t
            raise EventFormatError(
                self.source,
                f"the window {self.spec} is larger than the recording, which holds {self.events} events over "
                f"{span / 1000:g} ms: expected at least one complete window; choose a smaller --window",
            )

    def _by_count(self, pending: np.ndarray) -> tuple[list[Window], np.ndarray]:
        size = int(self.spec.size)
        complete = len(pending) // size
        windows = [
            Window(part, int(part["t"][0]), int(part["t"][-1]) + 1)
            for part in (pending[k * size : (k + 1) * size] for k in range(complete))
        ]
        return windows, pending[complete * size :].copy()  # a copy: the chunk it views can go

    def _by_time(self, pending: np.ndarray) -> tuple[list[Window], np.ndarray]:
        length = self.spec.duration_us
        if self._next_start is None:
            self._next_start = self.first_t
        origin = self._next_start
        # A window [a, b) is complete once an event at b or later has been seen: events come in time order.
        complete = (self.last_t - origin) // length
        self._next_start = origin + complete * length
        ends = origin + length * np.arange(1, complete + 1, dtype=np.int64)
        cuts = np.searchsorted(pending["t"], ends, side="left")
        windows, start = [], 0
        for k, stop in enumerate(cuts):
            windows.append(Window(pending[start:stop], int(ends[k] - length), int(ends[k])))
            start = int(stop)
        return windows, pending[start:].copy()
