"""Cut a time-sorted event stream into windows of a fixed event count or a fixed duration, chunk by chunk.

``WindowSpec.parse("events:N")``: consecutive windows of N events, ``events[kN : (k + 1)N]``.
``WindowSpec.parse("ms:T")``: windows of T milliseconds (T * 1000 a whole number of microseconds) from the first
event, ``t0 + k * T <= t < t0 + (k + 1) * T``; a window is complete once an event at or after its end has arrived.
Only complete windows come out: the last, incomplete one is dropped (so every window has the same size), and
duration windows that hold no event (a gap in the recording) are skipped. A recording of n events spanning
``t_last - t_first`` microseconds thus gives ``n // N`` count windows, or at most ``(t_last - t_first) // T_us``
duration windows.

``Windower`` keeps the events of the open window between chunks, so any chunking of the same sorted events gives
the same windows; it holds at most one window plus one chunk of events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Window", "WindowSpec", "Windower", "cut_windows"]

_SPEC = re.compile(r"^(events|ms):([0-9]+(?:\.[0-9]+)?)$")


@dataclass(frozen=True)
class WindowSpec:
    """``kind`` ``events`` (``size`` events a window) or ``ms`` (``size`` microseconds a window)."""

    kind: Literal["events", "ms"]
    size: int

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        """``events:N`` (N >= 1 events) or ``ms:T`` (T > 0 milliseconds, a whole number of microseconds)."""
        match = _SPEC.match(str(text).strip())
        if match is None:
            raise ValueError(f"window {text!r}: expected events:N (events a window) or ms:T (milliseconds a window)")
        kind, number = match.groups()
        if kind == "events":
            if "." in number or int(number) < 1:
                raise ValueError(f"window {text!r}: events:N needs a whole number N >= 1")
            return cls("events", int(number))
        micro = float(number) * 1000
        if micro < 1 or micro != round(micro):
            raise ValueError(f"window {text!r}: ms:T needs T * 1000 to be a whole number of microseconds >= 1")
        return cls("ms", int(round(micro)))

    def __str__(self) -> str:
        return f"events:{self.size}" if self.kind == "events" else f"ms:{self.size / 1000:g}"


@dataclass(frozen=True)
class Window:
    """One window's events and its span ``[start_us, end_us)``: for a count window, the first event's time to the
    last event's time + 1; for a duration window, its slot ``t0 + k * T`` to ``t0 + (k + 1) * T``."""

    events: np.ndarray
    start_us: int
    end_us: int


class Windower:
    """Feed sorted event chunks (``push``), get the windows they complete; ``finish`` drops the open window.

    The open window's chunks are kept as a list and joined only when a window completes, so a window spanning many
    chunks costs one copy, not one per chunk.
    """

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self._pending: list[np.ndarray] = []  # chunks of the open window (and, for counts, beyond)
        self._pending_len = 0
        self._t0: int | None = None  # duration windows: the first event's time
        self._slot = 0  # duration windows: index of the open window

    def push(self, chunk: np.ndarray) -> Iterator[Window]:
        """The windows that ``chunk`` (EVENT_DTYPE, t sorted and not before earlier chunks) completes, in order."""
        if not len(chunk):
            return
        if self._t0 is None:
            self._t0 = int(chunk["t"][0])
        if self.spec.kind == "events":
            complete = self._pending_len + len(chunk) >= self.spec.size
        else:
            complete = (int(chunk["t"][-1]) - self._t0) // self.spec.size > self._slot
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
            yield Window(window, int(window["t"][0]), int(window["t"][-1]) + 1)
        return events[full * n :]

    def _by_time(self, events: np.ndarray):
        size = self.spec.size
        slots = (events["t"] - self._t0) // size  # each event's window index
        last = int(slots[-1])  # the windows before this one are complete
        cuts = np.searchsorted(slots, np.arange(self._slot, last + 1), "left")
        for i, slot in enumerate(range(self._slot, last)):
            if cuts[i + 1] > cuts[i]:  # an empty window (a gap in the recording) is skipped
                start = self._t0 + slot * size
                yield Window(events[cuts[i] : cuts[i + 1]], start, start + size)
        self._slot = last
        return events[cuts[-1] :]

    def finish(self) -> int:
        """End of the stream: drop the open, incomplete window; return how many events it held."""
        dropped, self._pending, self._pending_len = self._pending_len, [], 0
        return dropped


def cut_windows(chunks: Iterable[np.ndarray], spec: WindowSpec) -> Iterator[Window]:
    """Every complete window of a stream of sorted event chunks (``Windower``)."""
    windower = Windower(spec)
    for chunk in chunks:
        yield from windower.push(chunk)
    windower.finish()
