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
    frames = _checked_frames(frames)  # the values are checked in the compiled pass over each frame
    timestamps = _checked_timestamps(timestamps_us, len(frames))
    shape = frames.shape[1:]

    threshold_rng, shot_rng, leak_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    pos_threshold, neg_threshold = _pixel_thresholds(config, shape, threshold_rng)
    start, end = int(timestamps[0]), int(timestamps[-1])
    noise = _to_events(
        _shot_noise_columns(config.shot_noise_rate_hz, shape, start, end, shot_rng),
        _leak_columns(config.leak_rate_hz, config.leak_rate_jitter, shape, start, end, leak_rng),
    )
    clean_events, events, diff_maps = _signal_events(frames, timestamps, pos_threshold, neg_threshold, config, noise)
    return SimulationResult(events=events, clean_events=clean_events, diff_maps=diff_maps)


def _checked_frames(frames) -> np.ndarray:
    """``frames`` as an array after the checks of shape and dtype; ``_bad_values_error`` describes bad values."""
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
    return frames


def _bad_values_error(frames: np.ndarray) -> ValueError:
    """The error for frames with a value outside [0, 1]: the first non-finite value, else the range of values."""
    finite = np.isfinite(frames)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        return ValueError(f"frames: expected finite values in [0, 1], got {frames[where]} at (t, y, x) = {where}")
    return ValueError(
        f"frames: expected linear intensity in [0, 1], got values in [{frames.min()}, {frames.max()}] "
        "(scale 8-bit frames by 1/255)"
    )


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


def _signal_events(frames, timestamps, pos_threshold, neg_threshold, config: SimulatorConfig, noise: np.ndarray):
    """Signal events, and signal events merged with ``noise``, as ``EVENT_DTYPE`` sorted by t; the diff maps.

    noise: ``EVENT_DTYPE`` sorted by t within [timestamps[0], timestamps[-1]]; when empty, the merged array is the
    signal array. Returns (clean_events, events, diff_maps), diff_maps (T-1, H, W) float32 nepers.
    Frame by frame: numpy takes the log (its float32 log, which a compiled log does not match bit for bit); one
    compiled pass over the frame finishes ``lin_log`` and emits the pair's events in pixel order; a counting sort
    writes them straight into a growing packed array, and the merge with the noise reads them back while they are
    in cache.
    """
    num_frames, height, width = frames.shape
    linear_threshold = np.float32(config.linear_threshold)
    diff_maps = np.empty((num_frames - 1, height, width), dtype=np.float32)
    log_prev, log_next = np.empty((2, height, width), dtype=np.float32)
    np.log(np.maximum(frames[0], linear_threshold, dtype=np.float32, out=log_prev), out=log_prev)
    if not _finish_lin_log(frames[0], linear_threshold, log_prev):
        raise _bad_values_error(frames)
    reference = log_prev.astype(np.float64)  # accumulates many threshold steps: double precision
    last_event_us = np.full((height, width), _NEVER_US, dtype=np.int64)
    scratch = np.empty(0, dtype=EVENT_DTYPE)  # one pair's events in pixel order, reused
    # Noise events before each pair's end go with that pair; at equal t signal events come first, so a noise event
    # at a frame's time follows the next pair's events at that time too.
    noise_bounds = np.searchsorted(noise["t"], timestamps, side="left")  # pair n: noise_bounds[n - 1 : n + 1]
    noise_bounds[-1] = len(noise)
    clean = events = None
    num_clean = num_events = 0
    for n in range(1, num_frames):
        t_prev, t_next = int(timestamps[n - 1]), int(timestamps[n])
        np.log(np.maximum(frames[n], linear_threshold, dtype=np.float32, out=log_next), out=log_next)
        count, scratch = _pair_events(
            frames[n], linear_threshold, log_prev, log_next, diff_maps[n - 1], reference, last_event_us,
            pos_threshold, neg_threshold, t_prev, t_next, int(config.refractory_us), scratch,
        )  # fmt: skip
        if count < 0:
            raise _bad_values_error(frames)
        if clean is None:  # room for twice as many events per pair as the first pair has; untouched memory is free
            clean = np.empty(2 * (num_frames - 1) * count + 1024, dtype=EVENT_DTYPE)
            events = np.empty(len(clean) + len(noise), dtype=EVENT_DTYPE) if len(noise) else None
        elif num_clean + count > len(clean):
            clean = _resized(clean, max(2 * len(clean), num_clean + count))
            events = _resized(events, len(clean) + len(noise)) if len(noise) else None
        new_clean = _sorted_into(scratch[:count], t_prev, t_next, clean, num_clean)
        if events is not None:
            pair_noise = noise[noise_bounds[n - 1] : noise_bounds[n]]
            num_events = _merge_into(clean[num_clean:new_clean], pair_noise, events, num_events)
        num_clean = new_clean
        log_prev, log_next = log_next, log_prev
    clean = _resized(clean, num_clean)
    events = clean if events is None else _resized(events, num_events)
    return clean, events, diff_maps


def _resized(events: np.ndarray, size: int) -> np.ndarray:
    """``events`` reallocated to ``size`` records in place (large arrays grow and shrink without a copy).

    The caller must hold no view of ``events``: numpy's reference check is off because it counts the caller's own
    name and the call's arguments too.
    """
    events.resize(size, refcheck=False)
    return events


@numba.njit(cache=True, nogil=True, inline="always")
def _toe(value, linear_threshold):
    """``lin_log``'s linear toe, ``min(I - I_lin, 0) / I_lin``, in float32 in its order of operations."""
    return (min(np.float32(value), linear_threshold) - linear_threshold) / linear_threshold


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _finish_lin_log(frame, linear_threshold, response):
    """Add the toe to ``response`` = ln(max(I, I_lin)), making it ``lin_log(frame)`` bit for bit, in place.

    frame: (H, W) intensity; response: (H, W) float32; linear_threshold: float32. Returns False when the
    frame has a value outside [0, 1] (NaN included).
    """
    height, width = frame.shape
    inside = True
    for y in range(height):
        for x in range(width):
            inside &= (frame[y, x] >= 0.0) & (frame[y, x] <= 1.0)  # no early exit: it would stop vectorisation
            response[y, x] += _toe(frame[y, x], linear_threshold)
    return inside


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pair_events(
    frame, linear_threshold, log_prev, log_next, diff_map, reference, last_event_us, pos_threshold, neg_threshold,
    t_prev, t_next, refractory_us, scratch,
):  # fmt: skip
    """One pass over frame n, row by row: finish its ``lin_log``, its difference map, and the pair's events.

    frame: (H, W) intensity. log_next: ln(max(I, I_lin)) on entry, ``lin_log(frame)`` on return; log_prev: the
    previous frame's; diff_map: written, float32 nepers; reference, thresholds: (H, W) float64 nepers, reference
    updated; last_event_us: (H, W) int64, updated; times in microseconds. Returns (count, scratch): the pair's
    ``count`` events in pixel order in ``scratch[:count]`` (``EVENT_DTYPE``, grown when too small), or count -1
    when the frame has a value outside [0, 1] (NaN included). A row's crossings are counted and emitted while the
    row is in cache.
    """
    height, width = frame.shape
    span = t_next - t_prev
    row_crossings = np.empty(width, dtype=np.int64)
    inside = True
    n = 0
    for y in range(height):
        row_total = 0
        for x in range(width):
            inside &= (frame[y, x] >= 0.0) & (frame[y, x] <= 1.0)  # an early exit here takes ten times longer
            log_next[y, x] += _toe(frame[y, x], linear_threshold)
            diff_map[y, x] = log_next[y, x] - log_prev[y, x]
            # The reference moves by every crossing, emitted or dropped by the refractory period (as in v2e), so
            # the counts do not depend on the refractory period.
            change = log_next[y, x] - reference[y, x]
            if change > 0.0:
                k = int(np.floor(change / pos_threshold[y, x]))
            else:
                k = -int(np.floor(-change / neg_threshold[y, x]))
            row_crossings[x] = k
            row_total += abs(k)
        if n + row_total > len(scratch):
            grown = np.empty(max(2 * len(scratch), n + row_total), dtype=scratch.dtype)
            grown[:n] = scratch[:n]
            scratch = grown
        # Each crossing at the instant the linear path log_prev -> log_next reaches its level.
        for x in range(width):
            k = row_crossings[x]
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
                t = t_prev + int(np.rint(min(max((level + j * step - begin) * scale, 0.0), span)))
                if t - last >= refractory_us:
                    scratch[n].t = t
                    scratch[n].x = x
                    scratch[n].y = y
                    scratch[n].p = polarity
                    n += 1
                    last = t
            last_event_us[y, x] = last
            reference[y, x] = level + count * step
    return (n if inside else -1), scratch


@numba.njit(cache=True, nogil=True)
def _sorted_into(events, t_prev, t_next, out, start):
    """Write ``events`` (one pair's, times in [t_prev, t_next]) stably sorted by t to ``out[start:]``; return the
    new end. A counting sort over the microseconds of the interval is linear; a long interval with few events falls
    back to a merge sort."""
    n = len(events)
    span = t_next - t_prev
    if span + 1 > 4 * n + 65536:
        order = np.argsort(events.t, kind="mergesort")
        for k in range(n):
            out[start + k] = events[order[k]]
        return start + n
    first_slot = np.zeros(span + 2, dtype=np.int64)
    for i in range(n):
        first_slot[events[i].t - t_prev + 1] += 1
    for b in range(1, span + 2):
        first_slot[b] += first_slot[b - 1]
    for i in range(n):
        offset = events[i].t - t_prev
        out[start + first_slot[offset]] = events[i]
        first_slot[offset] += 1
    return start + n


@numba.njit(cache=True, nogil=True)
def _merge_into(first, second, out, start):
    """Merge two time-sorted ``EVENT_DTYPE`` arrays into ``out[start:]``; return the new end. At equal t, ``first``
    comes first."""
    i = j = 0
    for k in range(start, start + len(first) + len(second)):
        if j == len(second) or (i < len(first) and first[i].t <= second[j].t):
            out[k] = first[i]
            i += 1
        else:
            out[k] = second[j]
            j += 1
    return start + len(first) + len(second)


def _shot_noise_columns(rate_hz: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
    """Poisson shot noise at ``rate_hz`` per pixel over [start_us, end_us], as (t, x, y, p) columns sorted by t."""
    height, width = shape
    count = rng.poisson(rate_hz * height * width * (end_us - start_us) * 1e-6)
    # Per-pixel Poisson processes make one process over the sensor at the summed rate, pixels uniform and
    # independent of time. Sorted uniform times without a sort: normalised cumulative sums of count + 1
    # exponential gaps are the order statistics of count uniforms on [0, 1).
    gaps = rng.standard_exponential(count + 1)
    pixels = rng.integers(0, height * width, size=count)
    coins = rng.random(count)
    return _shot_noise_kernel(gaps, pixels, coins, start_us, end_us, width)


@numba.njit(cache=True, nogil=True)
def _shot_noise_kernel(gaps, pixels, coins, start_us, end_us, width):
    """Shot-noise columns from the draws: time = start + the gaps' normalised cumulative sum truncated to whole
    microseconds (at most end), pixel index -> (x, y), polarity -1 where the coin is below 1/2."""
    arrival = 0.0
    for gap in gaps:  # the cumulative sum in order, as np.cumsum adds: the same last value
        arrival += gap
    scale = (end_us - start_us + 1) / arrival
    count = len(pixels)
    t, x, y, p = (np.empty(count, np.int64), np.empty(count, np.uint16), np.empty(count, np.uint16),
                  np.empty(count, np.int8))  # fmt: skip
    arrival = 0.0
    for i in range(count):
        arrival += gaps[i]
        t[i] = min(start_us + int(arrival * scale), end_us)
        y[i] = pixels[i] // width
        x[i] = pixels[i] - pixels[i] // width * width
        p[i] = -1 if coins[i] < 0.5 else 1
    return t, x, y, p


def _leak_columns(rate_hz: float, jitter: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
    """Periodic ON leak events, random phase and rate per pixel, over [start_us, end_us]; (t, x, y, p) sorted by t."""
    height, width = shape
    normals = rng.standard_normal(height * width)
    phases = rng.random(height * width)  # in periods
    return _leak_kernel(rate_hz, jitter, normals, phases, start_us, end_us, width)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _leak_kernel(rate_hz, jitter, normals, phases, start_us, end_us, width):
    """Leak columns from the draws: pixel i fires at (phases[i] + k) / rate_i seconds after start_us, k = 0, 1, ...,
    rate_i = rate_hz * max(0, 1 + jitter * normals[i]); stably sorted by time (pixel order at equal t)."""
    rates = np.empty(len(normals))
    counts = np.zeros(len(normals), dtype=np.int64)
    for i in range(len(normals)):
        rates[i] = rate_hz * max(1.0 + jitter * normals[i], 0.0)
        periods_in_window = rates[i] * (end_us - start_us) * 1e-6
        if rates[i] > 0 and periods_in_window >= phases[i]:
            counts[i] = int(np.floor(periods_in_window - phases[i])) + 1
    times = np.empty(counts.sum(), dtype=np.int64)
    pixels = np.empty(len(times), dtype=np.int64)
    n = 0
    for i in range(len(normals)):
        for cycle in range(counts[i]):
            times[n] = start_us + int(np.rint((phases[i] + cycle) / rates[i] * 1e6))
            pixels[n] = i
            n += 1
    order = np.argsort(times, kind="mergesort")
    t, x, y, p = (np.empty(n, np.int64), np.empty(n, np.uint16), np.empty(n, np.uint16), np.ones(n, np.int8))
    for k in range(n):
        t[k] = min(times[order[k]], end_us)
        y[k] = pixels[order[k]] // width
        x[k] = pixels[order[k]] - pixels[order[k]] // width * width
    return t, x, y, p


def _to_events(first, second=None) -> np.ndarray:
    """A new ``EVENT_DTYPE`` array from time-sorted (t, x, y, p) columns; with ``second``, both merged by t (at equal
    t, ``first`` comes first)."""
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
