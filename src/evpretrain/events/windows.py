"""Cut a time-sorted event stream into windows of a fixed event count or a fixed duration, chunk by chunk.

``WindowSpec.parse("events:N")``: consecutive windows of N events, ``events[kN : (k + 1)N]``, spanning the first
event's time to the last event's time + 1. ``WindowSpec.parse("ms:T")``: windows of T milliseconds (T * 1000 a whole
number of microseconds) from the first event's time t0, ``t0 + k * T <= t < t0 + (k + 1) * T``; a window is complete
once an event at or after its end has arrived. Windows do not overlap.

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
from evpretrain.events.contract import EventFormatError

__all__ = ["Window", "WindowSpec", "Windower"]

_SPEC = re.compile(r"(events|ms):([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class WindowSpec:
    """``kind`` ``events`` (``size`` events a window) or ``ms`` (``size`` microseconds a window)."""

    kind: Literal["events", "ms"]
    size: int

    def __post_init__(self) -> None:
        if self.kind not in ("events", "ms"):
            raise ConfigError(f"window: kind must be 'events' or 'ms', got {self.kind!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"window: size must be a whole number >= 1 (events or microseconds), got {self.size!r}")

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        """``events:N`` (N >= 1 events) or ``ms:T`` (T > 0 milliseconds, a whole number of microseconds), e.g.
        ``events:50000``, ``ms:50``, ``ms:0.5``; anything else raises ConfigError saying what is expected."""
        match = _SPEC.fullmatch(str(text).strip())
        if match is None:
            raise ConfigError(f"window {text!r}: expected events:N (events a window) or ms:T (milliseconds a window)")
        kind, number = match.groups()
        if kind == "events":
            if "." in number or int(number) < 1:
                raise ConfigError(f"window {text!r}: events:N needs a whole number N >= 1")
            return cls("events", int(number))
        micro = Decimal(number) * 1000  # exact: ms:0.3 is 300 us, not 300.00000000000006
        if micro < 1 or micro != micro.to_integral_value():
            raise ConfigError(f"window {text!r}: ms:T needs T * 1000 to be a whole number of microseconds >= 1")
        return cls("ms", int(micro))

    def __str__(self) -> str:
        return f"events:{self.size}" if self.kind == "events" else f"ms:{Decimal(self.size) / 1000:f}"


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
