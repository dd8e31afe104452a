"""Event-level corruptions for robustness evaluation: background shot noise and random event loss.

Every function takes an ``EVENT_DTYPE`` array sorted by t (microseconds), returns a new one that follows the
contract, and never writes to its input. Randomness comes from the caller as a numpy ``Generator`` or a seed.
An evaluation over many samples derives each sample's seed with ``corruption_seed(seed, index, corruption)``, so the
corrupted data are a function of (seed, sample index, kind) alone, not of evaluation order, batching or worker count.

The shot-noise model is the simulator's (``evpretrain.events.simulator``): per-pixel Poisson processes, polarity ON
or OFF with probability 1/2, so noise added here to real recordings matches noise simulated into pre-training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

import numpy as np

from evpretrain.events.contract import validate_events
from evpretrain.events.simulator import _shot_noise_columns, _to_events

CorruptionKind = Literal["shot_noise", "drop"]
# A kind's position here is part of its seed key (see ``corruption_seed``): append new kinds, never reorder.
CORRUPTION_KINDS: tuple[str, ...] = ("shot_noise", "drop")

_MAX_SIDE = int(np.iinfo(np.uint16).max) + 1  # event coordinates are uint16

RngOrSeed = np.random.Generator | np.random.SeedSequence | int


@dataclass(frozen=True)
class Corruption:
    """One corruption at one strength; level 0 is the identity.

    ``level``: for ``"shot_noise"`` the noise rate in events per pixel per second (Hz), >= 0;
    for ``"drop"`` the fraction of events removed, in [0, 1].
    """

    kind: CorruptionKind
    level: float

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTION_KINDS:
            raise ValueError(f"kind: expected one of {CORRUPTION_KINDS}, got {self.kind!r}")
        if self.kind == "shot_noise":
            _checked_rate(self.level, "level")
        else:
            _checked_fraction(self.level, "level")


def add_shot_noise(
    events: np.ndarray,
    sensor_size: tuple[int, int],
    rate_hz: float,
    rng_or_seed: RngOrSeed,
    window_us: tuple[int, int] | None = None,
) -> np.ndarray:
    """Add Poisson background activity: ``rate_hz`` events per pixel per second over ``window_us``.

    events: ``EVENT_DTYPE`` sorted by t, every event inside ``sensor_size`` = (height, width) pixels.
    window_us: (t0, t1) whole microseconds, t0 <= t1, both ends inclusive; by default the span of ``events``
    (first to last timestamp), which an empty input does not have. The number of noise events is Poisson with mean
    ``rate_hz * height * width * (t1 - t0) * 1e-6``; pixels are uniform, times uniform over the window's
    microseconds, polarity -1 or +1 with probability 1/2.
    Returns a new array: the input events, all of them, merged in time order with the noise; at equal t the input
    events come first. At rate 0 a copy of the input.
    """
    height, width = _checked_sensor_size(sensor_size)
    rate_hz = _checked_rate(rate_hz, "rate_hz")
    window = None if window_us is None else _checked_window(window_us)
    validate_events(events, source="events", sensor_size=(height, width))
    rng = _generator(rng_or_seed)
    if rate_hz == 0:
        return events.copy()
    if window is None:
        if events.size == 0:
            raise ValueError(
                "events: empty, so there is no time span for the noise window to default to; "
                "pass window_us=(t0, t1) in microseconds"
            )
        window = int(events["t"][0]), int(events["t"][-1])
    noise = _shot_noise_columns(rate_hz, (height, width), window[0], window[1], rng)
    originals = tuple(np.ascontiguousarray(events[name]) for name in ("t", "x", "y", "p"))
    return _to_events(originals, noise)


def drop_events(events: np.ndarray, fraction: float, rng_or_seed: RngOrSeed) -> np.ndarray:
    """Remove events at random: each is kept independently with probability ``1 - fraction``.

    events: ``EVENT_DTYPE`` sorted by t. fraction: in [0, 1]; 0 keeps every event, 1 none.
    Returns a new array: the kept events in their input order.

    Independent loss rather than an exact count round((1 - fraction) * N): a window of the output is then
    distributed like the corruption applied to that window, so results do not depend on how a recording was cut
    into samples; and one uniform key per event, kept when key >= fraction, makes the kept sets of one random stream
    nested across fractions (what survives at 0.5 survives at 0.2), a monotone family for an accuracy-versus-level
    curve. The realised fraction has a binomial spread, sqrt(fraction * (1 - fraction) / N).
    """
    fraction = _checked_fraction(fraction, "fraction")
    validate_events(events, source="events")
    keys = _generator(rng_or_seed).random(events.size)  # uniform in [0, 1)
    return events[keys >= fraction]


def corruption_seed(seed: int, index: int, corruption: Corruption) -> int:
    """The 64-bit seed for corrupting sample ``index`` with ``corruption``, derived from the evaluation's ``seed``.

    It is the state of the ``SeedSequence`` child of ``seed`` with spawn key (index, kind), so every (sample, kind)
    gets an independent stream however samples are ordered or shared among workers.
    The level is deliberately not in the key: all levels of one kind reuse a sample's stream (common random
    numbers), which removes the between-level sampling noise from the accuracy-versus-level curve and makes drops
    nested across fractions.
    """
    seed = _checked_non_negative_int(seed, "seed")
    index = _checked_non_negative_int(index, "index")
    key = (index, CORRUPTION_KINDS.index(corruption.kind))
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])


def apply_corruption(
    events: np.ndarray, sensor_size: tuple[int, int], corruption: Corruption, seed: RngOrSeed
) -> np.ndarray:
    """Apply ``corruption`` to one sample's events; ``seed`` typically from ``corruption_seed``.

    sensor_size: (height, width) pixels, where the noise lands (unused by ``"drop"``). Shot noise covers the span of
    the sample's events. Returns a new ``EVENT_DTYPE`` array sorted by t.
    """
    if corruption.kind == "shot_noise":
        return add_shot_noise(events, sensor_size, corruption.level, seed)
    return drop_events(events, corruption.level, seed)


def _generator(rng_or_seed) -> np.random.Generator:
    # None (fresh OS entropy) is refused: a corruption must be reproducible.
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return np.random.default_rng(rng_or_seed)
    if isinstance(rng_or_seed, Integral) and not isinstance(rng_or_seed, bool) and rng_or_seed >= 0:
        return np.random.default_rng(int(rng_or_seed))
    raise ValueError(
        f"rng_or_seed: expected a numpy Generator, a SeedSequence or a non-negative integer seed, got {rng_or_seed!r}"
    )


def _checked_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite shot-noise rate >= 0 (events per pixel per second), got {value!r}")
    return float(value)


def _checked_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:  # NaN fails the comparison
        raise ValueError(f"{name}: expected a drop fraction in [0, 1], got {value!r}")
    return float(value)


def _checked_non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def _checked_sensor_size(sensor_size) -> tuple[int, int]:
    valid = (
        isinstance(sensor_size, tuple | list)
        and len(sensor_size) == 2
        and all(isinstance(s, Integral) and not isinstance(s, bool) and 1 <= s <= _MAX_SIDE for s in sensor_size)
    )
    if not valid:
        raise ValueError(
            f"sensor_size: expected (height, width) in pixels, integers in [1, {_MAX_SIDE}], got {sensor_size!r}"
        )
    return int(sensor_size[0]), int(sensor_size[1])


def _checked_window(window_us) -> tuple[int, int]:
    valid = (
        isinstance(window_us, tuple | list)
        and len(window_us) == 2
        and all(isinstance(t, Integral) and not isinstance(t, bool) for t in window_us)
        and window_us[0] <= window_us[1]
    )
    if not valid:
        raise ValueError(f"window_us: expected (t0, t1) in whole microseconds with t0 <= t1, got {window_us!r}")
    return int(window_us[0]), int(window_us[1])
