"""Cut a time-sorted event stream into windows of a fixed event count or a fixed duration, chunk by chunk.

``WindowSpec.parse("events:N")``: consecutive windows of N events, ``events[kN : (k + 1)N]``, spanning the first
event's time to the last event's time + 1. ``WindowSpec.parse("ms:T")``: windows of T milliseconds (T * 1000 a whole
number of microseconds) from the first event's time t0, ``t0 + k * T <= t < t0 + (k + 1) * T``; a window is complete
once an event at or after its end has arrived. Windows do not overlap.

``WindowSpec.parse("frames:K")``: windows of K intervals of a recording's intensity frames (DAVIS APS frames,
which come at irregular times): window k holds frames ``kK .. (k + 1)K`` (K + 1 frames; consecutive windows share
their boundary frame) and the events ``t_kK <= t < t_(k+1)K``, t_n being frame n's timestamp (``frame_windows``;
events before the first frame or after the last complete window's end belong to no window).

Only complete windows come out: the last, incomplete one is dropped (so every window has the same size) and counted
in ``Windower.dropped_events``. A duration window that holds no event (a gap in the recording) is skipped by default
(``evpretrain data import``: a store keeps no empty sample) or given out with no events with ``keep_empty=True``
(``embed`` / ``predict``: one output per slot of the time grid). A recording of n events spanning
``t_last - t_first`` microseconds thus gives ``n // N`` count windows, or ``(t_last - t_first) // T_us`` duration
windows with ``keep_empty`` (at most that many without).

``Windower`` keeps the events of the open window between chunks (as a list, joined once the window completes), so
any chunking of the same sorted events gives the same windows; it holds at most one window plus one chunk of events.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, NamedTuple

import numpy as np

from evpretrain.config import ConfigError
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError

__all__ = ["FrameWindow", "Window", "WindowSpec", "Windower", "frame_windows"]

_SPEC = re.compile(r"(events|ms|frames):([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class WindowSpec:
    """``kind`` ``events`` (``size`` events a window), ``ms`` (``size`` microseconds a window) or ``frames`` (``size``
    intervals of the recording's intensity frames a window)."""

    kind: Literal["events", "ms", "frames"]
    size: int

    def __post_init__(self) -> None:
        if self.kind not in ("events", "ms", "frames"):
            raise ConfigError(f"window: kind must be 'events', 'ms' or 'frames', got {self.kind!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(
                f"window: size must be a whole number >= 1 (events, microseconds or frame intervals), got {self.size!r}"
            )

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        """``events:N`` (N >= 1 events), ``ms:T`` (T > 0 milliseconds, a whole number of microseconds) or
        ``frames:K`` (K >= 1 frame intervals), e.g. ``events:50000``, ``ms:50``, ``ms:0.5``, ``frames:1``; anything
        else raises ConfigError saying what is expected."""
        match = _SPEC.fullmatch(str(text).strip())
        if match is None:
            raise ConfigError(
                f"window {text!r}: expected events:N (events a window), ms:T (milliseconds a window) or frames:K "
                "(intensity-frame intervals a window)"
            )
        kind, number = match.groups()
        if kind in ("events", "frames"):
            if "." in number or int(number) < 1:
                raise ConfigError(
                    f"window {text!r}: {kind}:{'N' if kind == 'events' else 'K'} needs a whole number >= 1"
                )
            return cls(kind, int(number))
        micro = Decimal(number) * 1000  # exact: ms:0.3 is 300 us, not 300.00000000000006
        if micro < 1 or micro != micro.to_integral_value():
            raise ConfigError(f"window {text!r}: ms:T needs T * 1000 to be a whole number of microseconds >= 1")
        return cls("ms", int(micro))

    def __str__(self) -> str:
        return f"ms:{Decimal(self.size) / 1000:f}" if self.kind == "ms" else f"{self.kind}:{self.size}"


class Window(NamedTuple):
    """One window: its events (``EVENT_DTYPE``, time order; empty for a kept empty duration window) and its span
    ``[t_start, t_end)`` in microseconds: for a count window, the first event's time to the last event's time + 1;
    for a duration window, its slot ``t0 + k * T`` to ``t0 + (k + 1) * T``."""

    events: np.ndarray
    t_start: int
    t_end: int


class Windower:
    """Cut sorted ``EVENT_DTYPE`` chunks (e.g. ``EventStream.chunks()``) into ``Window`` s: ``cut(chunks)``, or
    ``push`` each chunk (iterate what it returns) and ``finish``. ``keep_empty``: give out duration windows without
    events (module docstring); ``source`` names the recording in errors. Afterwards ``events`` (seen), ``windows``
    (given out), ``dropped_events`` (of the incomplete last window) and ``first_t`` / ``last_t`` (us) describe the
    stream. Chunks must not go back in time (a chunk starting before the previous one ended is an error)."""

    def __init__(self, spec: WindowSpec, *, keep_empty: bool = False, source: str | os.PathLike | None = None):
        if spec.kind == "frames":
            raise ConfigError(
                f"window {spec}: frames:K windows are cut at a recording's intensity frames, which only "
                "`evpretrain data import` reads (AEDAT4 recordings with frames): use events:N or ms:T"
            )
        self.spec, self.keep_empty, self.source = spec, keep_empty, source
        self.events = self.windows = self.dropped_events = 0
        self.first_t: int | None = None
        self.last_t: int | None = None
        self._pending: list[np.ndarray] = []  # chunks of the open window (and, for counts, beyond)
        self._pending_len = 0
        self._slot = 0  # duration windows: index of the open window

    def cut(self, chunks: Iterable[np.ndarray], *, required: bool = True) -> Iterator[Window]:
        """Every complete window of ``chunks``; ``required``: a stream without one complete window is an error."""
        for chunk in chunks:
            yield from self.push(chunk)
        self.finish(required=required)

    def push(self, chunk: np.ndarray) -> Iterator[Window]:
        """The windows that ``chunk`` (EVENT_DTYPE, t sorted and not before earlier chunks) completes, in order."""
        if not len(chunk):
            return
        first, last = int(chunk["t"][0]), int(chunk["t"][-1])
        if self.last_t is not None and first < self.last_t:
            raise EventFormatError(self.source, f"timestamps not sorted: t={first} us after t={self.last_t} us")
        if self.first_t is None:
            self.first_t = first
        self.last_t = last
        self.events += len(chunk)
        if self.spec.kind == "events":
            complete = self._pending_len + len(chunk) >= self.spec.size
        else:
            complete = (last - self.first_t) // self.spec.size > self._slot
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if not complete:
            return
        events = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rest = yield from (self._by_count(events) if self.spec.kind == "events" else self._by_time(events))
        self._pending = [rest.copy()] if len(rest) else []  # a copy: a view would keep the whole chunk alive
        self._pending_len = len(rest)

    def _by_count(self, events: np.ndarray):
        n = self.spec.size
        full = len(events) // n
        for k in range(full):
            window = events[k * n : (k + 1) * n]
            self.windows += 1
            yield Window(window, int(window["t"][0]), int(window["t"][-1]) + 1)
        return events[full * n :]

    def _by_time(self, events: np.ndarray):
        size = self.spec.size
        slots = (events["t"] - self.first_t) // size  # each event's window index
        last = int(slots[-1])  # the windows before this one are complete
        cuts = np.searchsorted(slots, np.arange(self._slot, last + 1), "left")
        for i, slot in enumerate(range(self._slot, last)):
            if self.keep_empty or cuts[i + 1] > cuts[i]:
                start = self.first_t + slot * size
                self.windows += 1
                yield Window(events[cuts[i] : cuts[i + 1]], start, start + size)
        self._slot = last
        return events[cuts[-1] :]

    def finish(self, *, required: bool = False) -> int:
        """End of the stream: drop the open, incomplete window and return how many events it held. ``required``:
        raise EventFormatError, naming the source and its size, if no window came out."""
        self.dropped_events, self._pending, self._pending_len = self._pending_len, [], 0
        if required and self.windows == 0:
            span = 0 if self.first_t is None else self.last_t - self.first_t
            raise EventFormatError(
                self.source,
                f"the window {self.spec} is larger than the recording, which holds {self.events} events over "
                f"{span} us: not one complete window fits; choose a smaller window",
            )
        return self.dropped_events


class FrameWindow(NamedTuple):
    """One ``frames:K`` window: its events (``EVENT_DTYPE``, time order), its K + 1 ``frames`` (K + 1, H, W) and
    their ``times`` (K + 1,) int64 microseconds; the span ``[t_start, t_end)`` is ``[times[0], times[-1])``."""

    events: np.ndarray
    frames: np.ndarray
    times: np.ndarray

    @property
    def t_start(self) -> int:
        return int(self.times[0])

    @property
    def t_end(self) -> int:
        return int(self.times[-1])


def frame_windows(
    chunks: Iterable[np.ndarray],
    frames: Iterable[tuple[int, np.ndarray]],
    intervals: int,
    *,
    source: str | os.PathLike | None = None,
) -> Iterator[FrameWindow]:
    """Cut sorted ``EVENT_DTYPE`` ``chunks`` at the times of ``frames`` ((t_us, frame (H, W)) pairs in file order)
    into windows of ``intervals`` frame intervals (module docstring). Both streams are read lazily, side by side:
    memory is one window's events and frames plus one chunk. Windows without events are skipped (a store keeps no
    empty sample). Raises EventFormatError naming ``source`` if frame times do not increase, or if not one complete
    window fits."""
    if intervals < 1:
        raise ValueError(f"intervals must be >= 1, got {intervals}")
    chunks = iter(chunks)
    held = np.empty(0, EVENT_DTYPE)  # read events not yet given out, t >= the open window's start
    ended = False  # the event stream is exhausted
    window_frames: list[np.ndarray] = []
    window_times: list[int] = []
    count = 0
    for t, frame in frames:
        t = int(t)
        if window_times and t <= window_times[-1]:
            raise EventFormatError(
                source, f"intensity frame times do not increase: a frame at t={t} us after one at {window_times[-1]} us"
            )
        window_frames.append(frame)
        window_times.append(t)
        if len(window_times) < intervals + 1:
            continue
        while not ended and (not len(held) or int(held["t"][-1]) < t):  # read until an event at or after the end
            chunk = next(chunks, None)
            if chunk is None:
                ended = True
            elif len(chunk):
                held = np.concatenate([held, chunk]) if len(held) else chunk
                held = held[np.searchsorted(held["t"], window_times[0], "left") :]  # before the window: in none
        stop = int(np.searchsorted(held["t"], t, "left"))
        count += 1
        if stop:
            yield FrameWindow(held[:stop].copy(), np.stack(window_frames), np.asarray(window_times, np.int64))
        held = held[stop:]
        window_frames, window_times = window_frames[-1:], window_times[-1:]  # the boundary frame opens the next one
    if count == 0:
        raise EventFormatError(
            source,
            f"the window frames:{intervals} needs {intervals + 1} intensity frames, but the recording holds "
            f"{len(window_times)}: not one complete window fits; choose a smaller window",
        )
