"""The DVS simulator's settings (``evpretrain.events.simulator``, the model in its docstring), apart from the compiled
simulator: a study's data sections are checked when the pipeline is planned, where numba is not imported."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SimulatorConfig"]


@dataclass(frozen=True)
class SimulatorConfig:
    """Sensor settings. Thresholds in nepers (natural-log intensity units), times in microseconds, rates in Hz."""

    pos_threshold: float = 0.2  # ON contrast threshold, mean over pixels
    neg_threshold: float = 0.2  # OFF contrast threshold, mean over pixels
    threshold_sigma: float = 0.03  # per-pixel standard deviation of both thresholds (fixed-pattern mismatch)
    min_threshold: float = 0.01  # mismatched thresholds are clipped below at this value
    linear_threshold: float = 20 / 255  # intensity (frames' units, [0, 1]) below which the response is linear
    refractory_us: int = 100  # per pixel: no event within this time after the previous one
    shot_noise_rate_hz: float = 1.0  # per pixel, ON or OFF with equal probability
    leak_rate_hz: float = 0.1  # per pixel, ON events
    leak_rate_jitter: float = 0.1  # relative standard deviation of the per-pixel leak rate

    def __post_init__(self) -> None:
        for name in ("pos_threshold", "neg_threshold", "min_threshold"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.linear_threshold <= 1:
            raise ValueError(f"linear_threshold must lie in (0, 1] (frames' units), got {self.linear_threshold!r}")
        for name in ("threshold_sigma", "refractory_us", "shot_noise_rate_hz", "leak_rate_hz", "leak_rate_jitter"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
