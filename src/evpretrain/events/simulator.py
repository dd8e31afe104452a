"""Frames to events: a v2e/ESIM-style DVS simulator with a compiled per-frame-pair kernel.

The model, per pixel:

- Response: ``L = lin_log(I)``. Frames ``I`` are linear intensity in [0, 1] (1 = full scale). Above
  ``linear_threshold`` (default 20/255, v2e's 20 of 255 digital numbers) ``L = ln(I)``; below it ``L`` is the tangent
  line of ``ln`` at the junction, ``ln(I_lin) + (I - I_lin) / I_lin``, so ``L`` is continuous with a continuous slope
  and finite at ``I = 0``. This is how a photoreceptor with a dark current behaves, ``ln(I + I_dark)``: linear in the
  dark, logarithmic in the light. v2e uses the same junction but draws the line through the origin in 8-bit units,
  which makes its slope ``ln(20) / 20`` per digital number, three times the slope of ``ln`` at the junction: a kink
  that over-weights dark pixels and depends on the 8-bit scale. ``L`` is in natural-log units (nepers).
- Reference: ``ref`` starts at ``L`` of the first frame. Between frames ``L`` moves linearly in time; every time it
  reaches ``ref + k * C_on`` (ON) or ``ref - k * C_off`` (OFF), the pixel emits an event at the linearly interpolated
  instant (rounded to the microsecond) and the reference moves to that level. After frame ``n`` the pixel has emitted
  every crossing, so ``-C_off < L_n - ref < C_on``; with ``C_on = C_off = C`` the count of pair ``n`` is
  ``floor(|L_n - ref_(n-1)| / C)``, which equals ``floor(|L_n - L_(n-1)| / C)`` for the first pair only (the remainder
  carries over).
- Thresholds: ``C_on`` and ``C_off`` are drawn per pixel from Gaussians around ``pos_threshold`` and ``neg_threshold``
  (standard deviation ``threshold_sigma``, nepers) and clipped below at ``min_threshold``.
- Refractory period: a crossing less than ``refractory_us`` after the pixel's last emitted event is dropped; as in v2e
  the reference still moves, so the lost change is not emitted later.
- Shot noise: a Poisson process per pixel, ``shot_noise_rate_hz`` events per second, polarity ON or OFF with
  probability 1/2, times uniform over the recording.
- Leak: ON events at a steady per-pixel rate, as a reference that slowly drifts down (v2e): pixel ``i`` fires at
  ``(phase_i + k) / rate_i`` seconds after the first frame, phase uniform in [0, 1), ``rate_i = leak_rate_hz *
  max(0, 1 + leak_rate_jitter * N(0, 1))``.

``clean_events`` are the signal events: threshold crossings of the frames with the threshold mismatch and the
refractory period applied. ``events`` are the same signal events plus the shot-noise and leak events, merged by time.
Noise and leak do not move the reference and bypass the refractory period (v2e resets the reference of a pixel
that fires a shot-noise event and models leak as a drift of the reference), so
``clean_events`` is exactly the signal part of ``events``: the subset a denoiser should keep. Thresholds, shot noise
and leak draw from independent streams of the seed, so changing a noise rate leaves ``clean_events`` unchanged.

Not modelled: the photoreceptor's low-pass filter (v2e's ``cutoff_hz``), intensity-dependent shot noise, and
temporal noise of the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Real

import numba
import numpy as np

from evpretrain.events.contract import EVENT_DTYPE
from evpretrain.events.simulator_config import SimulatorConfig

_NEVER_US = -(2**62)  # "last event" of a pixel that has not fired: any refractory period has passed
_MAX_SIDE = int(np.iinfo(np.uint16).max) + 1  # event coordinates are uint16


@dataclass(frozen=True)
class SimulationResult:
    """Simulator output. Event arrays follow the contract (``EVENT_DTYPE``, sorted by t, microseconds).

    ``events``: signal + shot noise + leak. ``clean_events``: the signal events alone (see the module docstring);
    the two share memory when no noise is configured. ``diff_maps``: (T-1, H, W) float32,
    ``lin_log(frames[n]) - lin_log(frames[n-1])`` in nepers.
    """

    events: np.ndarray
    clean_events: np.ndarray
    diff_maps: np.ndarray


def lin_log(intensity: np.ndarray, linear_threshold: float = 20 / 255) -> np.ndarray:
    """Log response with a linear toe: ``ln(I)`` above ``linear_threshold``, its tangent line below; nepers.

    ``intensity`` in [0, 1], any shape; returns float32 of the same shape. Single precision resolves about 1e-7
    nepers, six orders of magnitude below a contrast threshold, at three times the speed of double precision.
    """
    threshold = np.float32(linear_threshold)
    # Branch-free so that numpy's vectorised log does the work: ln(max(I, I_lin)) + min(I - I_lin, 0) / I_lin.
    response = np.log(np.maximum(intensity, threshold, dtype=np.float32))
    toe = np.minimum(intensity, threshold, dtype=np.float32)
    toe -= threshold
    toe /= threshold
    response += toe
    return response


def simulate(
    frames: np.ndarray,
    timestamps_us: np.ndarray,
    *,
    contrast: float | None = None,
    seed: int = 0,
    config: SimulatorConfig | None = None,
) -> SimulationResult:
    """Simulate a DVS watching ``frames``.

    frames: (T, H, W), T >= 2, linear intensity in [0, 1]. timestamps_us: (T,) strictly increasing whole
    microseconds, one per frame. contrast: when given, both thresholds (nepers), overriding ``config``'s.
    seed: non-negative integer; the output is a deterministic function of the inputs and the seed.
    Events lie in [timestamps_us[0], timestamps_us[-1]].
    """
    config = SimulatorConfig() if config is None else config
    if contrast is not None:
        if isinstance(contrast, bool) or not isinstance(contrast, Real) or not np.isfinite(contrast) or contrast <= 0:
            raise ValueError(f"contrast: expected a finite number > 0 (nepers), got {contrast!r}")
        config = replace(config, pos_threshold=float(contrast), neg_threshold=float(contrast))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    frames = _checked_frames(frames)
    timestamps = _checked_timestamps(timestamps_us, len(frames))
    shape = frames.shape[1:]

    threshold_rng, shot_rng, leak_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    pos_threshold, neg_threshold = _pixel_thresholds(config, shape, threshold_rng)
    signal, diff_maps = _signal_columns(frames, timestamps, pos_threshold, neg_threshold, config)

    start, end = int(timestamps[0]), int(timestamps[-1])
    noise = _merge_columns(
        _shot_noise_columns(config.shot_noise_rate_hz, shape, start, end, shot_rng),
        _leak_columns(config.leak_rate_hz, config.leak_rate_jitter, shape, start, end, leak_rng),
    )
    clean_events = _to_events(signal)
    events = _to_events(signal, noise) if len(noise[0]) else clean_events
    return SimulationResult(events=events, clean_events=clean_events, diff_maps=diff_maps)


def _checked_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < 2 or 0 in frames.shape:
        raise ValueError(f"frames: expected shape (T, H, W) with T >= 2 and H, W >= 1, got {frames.shape}")
    real = np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)
    if frames.dtype == np.bool_ or not real:
        raise ValueError(f"frames: expected real numbers (linear intensity in [0, 1]), got dtype {frames.dtype}")
    if max(frames.shape[1:]) > _MAX_SIDE:
        raise ValueError(
            f"frames: expected H and W of at most {_MAX_SIDE} (uint16 event coordinates), got {frames.shape[1:]}"
        )
    finite = np.isfinite(frames)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"frames: expected finite values in [0, 1], got {frames[where]} at (t, y, x) = {where}")
    low, high = frames.min(), frames.max()
    if low < 0 or high > 1:
        raise ValueError(
            f"frames: expected linear intensity in [0, 1], got values in [{low}, {high}] (scale 8-bit frames by 1/255)"
        )
    return frames


def _checked_timestamps(timestamps_us, num_frames: int) -> np.ndarray:
    timestamps = np.asarray(timestamps_us)
    if timestamps.shape != (num_frames,):
        raise ValueError(f"timestamps_us: expected shape ({num_frames},), one per frame, got {timestamps.shape}")
    if np.issubdtype(timestamps.dtype, np.floating):
        whole = np.isfinite(timestamps) & (timestamps == np.round(timestamps))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise ValueError(f"timestamps_us: expected whole microseconds, got {timestamps[i]} at index {i}")
    elif timestamps.dtype == np.bool_ or not np.issubdtype(timestamps.dtype, np.integer):
        raise ValueError(f"timestamps_us: expected integers (microseconds), got dtype {timestamps.dtype}")
    timestamps = timestamps.astype(np.int64)
    not_increasing = np.flatnonzero(np.diff(timestamps) <= 0)
    if not_increasing.size:
        i = int(not_increasing[0]) + 1
        raise ValueError(
            f"timestamps_us: expected strictly increasing values, got {timestamps[i]} at index {i} "
            f"after {timestamps[i - 1]}"
        )
    return timestamps


def _pixel_thresholds(config: SimulatorConfig, shape: tuple[int, int], rng: np.random.Generator):
    """Per-pixel (ON, OFF) thresholds, (H, W) float64 nepers, mismatched and clipped at ``min_threshold``."""
    thresholds = []
    for nominal in (config.pos_threshold, config.neg_threshold):
        drawn = nominal + config.threshold_sigma * rng.standard_normal(shape)
        thresholds.append(np.maximum(drawn, config.min_threshold))
    return thresholds


def _signal_columns(frames, timestamps, pos_threshold, neg_threshold, config: SimulatorConfig):
    """Threshold crossings of all frame pairs as (t, x, y, p) columns sorted by t; the (T-1, H, W) difference maps."""
    num_frames, height, width = frames.shape
    diff_maps = np.empty((num_frames - 1, height, width), dtype=np.float32)
    log_prev = lin_log(frames[0], config.linear_threshold)
    reference = log_prev.astype(np.float64)  # accumulates many threshold steps: double precision
    last_event_us = np.full((height, width), _NEVER_US, dtype=np.int64)
    pairs = []
    for n in range(1, num_frames):
        log_next = lin_log(frames[n], config.linear_threshold)
        np.subtract(log_next, log_prev, out=diff_maps[n - 1])
        pairs.append(
            _frame_pair_events(
                log_prev, log_next, reference, last_event_us, pos_threshold, neg_threshold,
                int(timestamps[n - 1]), int(timestamps[n]), int(config.refractory_us),
            )
        )  # fmt: skip
        log_prev = log_next
    # Each pair's events are sorted and pairs follow each other in time: the concatenation is sorted.
    return tuple(np.concatenate([pair[k] for pair in pairs]) for k in range(4)), diff_maps


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _frame_pair_events(
    log_prev, log_next, reference, last_event_us, pos_threshold, neg_threshold, t_prev, t_next, refractory_us
):
    """Events of one frame pair as (t, x, y, p) columns sorted by t; updates ``reference`` and ``last_event_us``.

    log_prev, log_next: (H, W) float32 nepers; reference, thresholds: (H, W) float64 nepers;
    last_event_us: (H, W) int64; times in microseconds.
    """
    height, width = log_next.shape
    # Pass 1: signed crossings per pixel, to size the output. The reference moves by every crossing, emitted or
    # dropped by the refractory period (as in v2e), so the counts do not depend on the refractory period.
    crossings = np.empty((height, width), dtype=np.int64)
    total = 0
    for y in range(height):
        for x in range(width):
            change = log_next[y, x] - reference[y, x]
            if change > 0.0:
                k = int(np.floor(change / pos_threshold[y, x]))
            else:
                k = -int(np.floor(-change / neg_threshold[y, x]))
            crossings[y, x] = k
            total += abs(k)

    # Pass 2: each crossing at the instant the linear path log_prev -> log_next reaches its level, in pixel order.
    span = t_next - t_prev
    offsets = np.empty(total, dtype=np.int64)  # t - t_prev
    xs = np.empty(total, dtype=np.uint16)
    ys = np.empty(total, dtype=np.uint16)
    ps = np.empty(total, dtype=np.int8)
    n = 0
    for y in range(height):
        for x in range(width):
            k = crossings[y, x]
            if k == 0:
                continue
            if k > 0:
                step, polarity, count = pos_threshold[y, x], 1, k
            else:
                step, polarity, count = -neg_threshold[y, x], -1, -k
            begin = log_prev[y, x]
            rise = log_next[y, x] - begin
            # The crossing's fraction of the interval lies in (0, 1] by the invariant
            # -C_off < log_prev - reference < C_on; clipped against rounding.
            scale = span / rise if rise != 0.0 else 0.0
            level = reference[y, x]
            last = last_event_us[y, x]
            for j in range(1, count + 1):
                offset = int(np.rint(min(max((level + j * step - begin) * scale, 0.0), span)))
                if t_prev + offset - last >= refractory_us:
                    offsets[n] = offset
                    xs[n] = x
                    ys[n] = y
                    ps[n] = polarity
                    n += 1
                    last = t_prev + offset
            last_event_us[y, x] = last
            reference[y, x] = level + count * step

    # Stable sort by time: a counting sort over the microseconds of the interval is linear; a long interval with
    # few events falls back to a merge sort.
    if span + 1 > 4 * n + 65536:
        order = np.argsort(offsets[:n], kind="mergesort")
        return t_prev + offsets[order], xs[order], ys[order], ps[order]
    first_slot = np.zeros(span + 2, dtype=np.int64)
    for i in range(n):
        first_slot[offsets[i] + 1] += 1
    for b in range(1, span + 2):
        first_slot[b] += first_slot[b - 1]
    t_sorted = np.empty(n, dtype=np.int64)
    x_sorted = np.empty(n, dtype=np.uint16)
    y_sorted = np.empty(n, dtype=np.uint16)
    p_sorted = np.empty(n, dtype=np.int8)
    for i in range(n):
        k = first_slot[offsets[i]]
        first_slot[offsets[i]] += 1
        t_sorted[k] = t_prev + offsets[i]
        x_sorted[k] = xs[i]
        y_sorted[k] = ys[i]
        p_sorted[k] = ps[i]
    return t_sorted, x_sorted, y_sorted, p_sorted


def _shot_noise_columns(rate_hz: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
    """Poisson shot noise at ``rate_hz`` per pixel over [start_us, end_us], as (t, x, y, p) columns sorted by t."""
    height, width = shape
    count = rng.poisson(rate_hz * height * width * (end_us - start_us) * 1e-6)
    # Per-pixel Poisson processes make one process over the sensor at the summed rate, pixels uniform and
    # independent of time. Sorted uniform times without a sort: normalised cumulative sums of count + 1
    # exponential gaps are the order statistics of count uniforms on [0, 1).
    arrivals = np.cumsum(rng.standard_exponential(count + 1))
    t = start_us + (arrivals[:-1] * ((end_us - start_us + 1) / arrivals[-1])).astype(np.int64)
    y, x = np.divmod(rng.integers(0, height * width, size=count), width)
    p = np.where(rng.random(count) < 0.5, -1, 1).astype(np.int8)
    return np.minimum(t, end_us), x.astype(np.uint16), y.astype(np.uint16), p


def _leak_columns(rate_hz: float, jitter: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
    """Periodic ON leak events, random phase and rate per pixel, over [start_us, end_us]; (t, x, y, p) sorted by t."""
    height, width = shape
    rates = rate_hz * np.maximum(1.0 + jitter * rng.standard_normal(height * width), 0.0)
    phases = rng.random(height * width)  # in periods
    periods_in_window = rates * (end_us - start_us) * 1e-6
    fires = (rates > 0) & (periods_in_window >= phases)
    counts = np.zeros(height * width, dtype=np.int64)
    counts[fires] = np.floor(periods_in_window[fires] - phases[fires]).astype(np.int64) + 1
    pixel = np.repeat(np.arange(height * width), counts)
    cycle = np.arange(len(pixel)) - np.repeat(np.cumsum(counts) - counts, counts)
    t = start_us + np.rint((phases[pixel] + cycle) / rates[pixel] * 1e6).astype(np.int64)
    order = np.argsort(t, kind="stable")
    y, x = np.divmod(pixel[order], width)
    return np.minimum(t[order], end_us), x.astype(np.uint16), y.astype(np.uint16), np.ones(len(t), dtype=np.int8)


def _merge_columns(first, second):
    """Merge two time-sorted (t, x, y, p) column tuples into new columns; at equal t, ``first`` comes first."""
    n = len(first[0]) + len(second[0])
    merged = np.empty(n, np.int64), np.empty(n, np.uint16), np.empty(n, np.uint16), np.empty(n, np.int8)
    _merge_kernel(*first, *second, *merged)
    return merged


def _to_events(first, second=None) -> np.ndarray:
    """A new ``EVENT_DTYPE`` array from time-sorted columns; with ``second``, both merged as ``_merge_columns`` does."""
    events = np.empty(len(first[0]) + (0 if second is None else len(second[0])), dtype=EVENT_DTYPE)
    fields = events["t"], events["x"], events["y"], events["p"]  # views: writing them writes the events
    if second is None:
        for field, column in zip(fields, first):
            field[...] = column
    else:
        _merge_kernel(*first, *second, *fields)
    return events


@numba.njit(cache=True, nogil=True)
def _merge_kernel(t1, x1, y1, p1, t2, x2, y2, p2, t_out, x_out, y_out, p_out):
    i = j = 0
    for k in range(len(t1) + len(t2)):
        if j == len(t2) or (i < len(t1) and t1[i] <= t2[j]):
            t_out[k], x_out[k], y_out[k], p_out[k] = t1[i], x1[i], y1[i], p1[i]
            i += 1
        else:
            t_out[k], x_out[k], y_out[k], p_out[k] = t2[j], x2[j], y2[j], p2[j]
            j += 1
