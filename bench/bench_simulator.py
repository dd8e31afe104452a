"""Simulator throughput against eventify-dvs on the same frames, side by side in one run, single thread.

A real photograph (scikit-image's ``camera``) translates by a sub-pixel step per frame at a DAVIS346 resolution
(346 x 260); every simulator turns the same frames into events at contrast threshold 0.2. Ours is timed with the
noise off (signal events only, still with threshold mismatch and refractory period) and with its default noise
(shot noise and leak, merged by time), each twice: the current ``simulate`` and "ours, before", a frozen copy of
the simulator as it was before the fused kernels (below, unchanged but for ``_before`` names). The two must give
the same events, event for event, and the same difference maps; the script checks that first. eventify-dvs (a
frame-difference simulator: no per-pixel reference, events not sorted by time) gets the frames in its native
0-255 scale. Rendering and the numba compilation are outside the timing; each simulator runs ``--repeats`` times,
interleaved, and the best run counts. Times are the process's CPU time (user + system, page faults included), not
wall time: every simulator here is single-threaded, and on a shared machine CPU time leaves out the waits for a
core that other jobs cause. Prints frames/s (input frames), M events/s and the ratios to eventify-dvs.

Run: .venv/bin/python bench/bench_simulator.py [--frames 120] [--repeats 5]
"""

from __future__ import annotations

import os

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # single thread: set before numpy and numba load

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from numbers import Real  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from eventify import frame_to_event_tuples  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage import data  # noqa: E402

from evpretrain.events.contract import EVENT_DTYPE  # noqa: E402
from evpretrain.events.simulator import SimulationResult, simulate  # noqa: E402
from evpretrain.events.simulator_config import SimulatorConfig  # noqa: E402

HEIGHT, WIDTH = 260, 346
CONTRAST = 0.2


def translating_frames(num_frames: int, step_px: tuple[float, float]) -> np.ndarray:
    """(T, 260, 346) float32 in [0, 1]: the camera photograph shifted by ``step_px`` (dy, dx) per frame."""
    image = data.camera().astype(np.float32) / 255
    top, left = (image.shape[0] - HEIGHT) // 2, (image.shape[1] - WIDTH) // 2
    frames = np.empty((num_frames, HEIGHT, WIDTH), dtype=np.float32)
    for n in range(num_frames):
        shifted = ndimage.shift(image, (step_px[0] * n, step_px[1] * n), order=1, mode="reflect")
        frames[n] = shifted[top : top + HEIGHT, left : left + WIDTH]
    return np.clip(frames, 0.0, 1.0)


def run_ours(simulator, frames, timestamps, config) -> int:
    return len(simulator(frames, timestamps, contrast=CONTRAST, seed=0, config=config).events)


def run_eventify(frames_255, timestamps) -> int:
    pairs = zip(frames_255[:-1], frames_255[1:], timestamps[:-1], timestamps[1:])
    chunks = [frame_to_event_tuples(a, b, int(t_a), int(t_b), c_thresh=CONTRAST) for a, b, t_a, t_b in pairs]
    return len(np.concatenate(chunks))


def check_same_output(frames, timestamps, configs) -> None:
    """Raise unless the current simulator and the frozen copy give identical results on every config."""
    for config in configs:
        new = simulate(frames, timestamps, contrast=CONTRAST, seed=0, config=config)
        old = before_simulate(frames, timestamps, contrast=CONTRAST, seed=0, config=config)
        for name in ("events", "clean_events", "diff_maps"):
            a, b = getattr(new, name), getattr(old, name)
            if a.dtype != b.dtype or not np.array_equal(a, b):
                raise AssertionError(f"{name} differ from the frozen copy's with {config}")
    print(f"current == before, event for event (events, clean_events, diff_maps), on {len(configs)} configs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--frame-rate-hz", type=float, default=30.0)
    parser.add_argument("--step", type=float, nargs=2, default=(0.6, 0.8), metavar=("DY", "DX"), help="px per frame")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    frames = translating_frames(args.frames, tuple(args.step))
    frames_255 = frames * np.float32(255)
    timestamps = np.round(np.arange(args.frames) * 1e6 / args.frame_rate_hz).astype(np.int64)
    noise_off = SimulatorConfig(shot_noise_rate_hz=0.0, leak_rate_hz=0.0)
    noisy = SimulatorConfig()
    check_same_output(frames, timestamps, [noise_off, noisy])
    runs = {
        "ours, clean (no noise)": lambda: run_ours(simulate, frames, timestamps, noise_off),
        "ours before, clean": lambda: run_ours(before_simulate, frames, timestamps, noise_off),
        "ours, noisy (defaults)": lambda: run_ours(simulate, frames, timestamps, noisy),
        "ours before, noisy": lambda: run_ours(before_simulate, frames, timestamps, noisy),
        "eventify-dvs 0.2.0": lambda: run_eventify(frames_255, timestamps),
    }
    run_eventify(frames_255[:3], timestamps[:3])  # warm-up (numba compilation or cache load is in the check above)

    best = {name: np.inf for name in runs}
    counts = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.process_time()
            counts[name] = run()
            best[name] = min(best[name], time.process_time() - start)

    print(
        f"{args.frames} frames of {WIDTH}x{HEIGHT} at {args.frame_rate_hz:g} Hz, step {args.step} px/frame, "
        f"contrast {CONTRAST}, single thread, best CPU time of {args.repeats}, load {os.getloadavg()[0]:.1f}"
    )
    reference = "eventify-dvs 0.2.0"
    header = ("frames/s", 9), ("M ev/s", 8), ("events", 10), ("ev/pair", 8), ("x frames/s", 11), ("x ev/s", 7)
    print(f"{'simulator':24s} " + " ".join(f"{label:>{width}s}" for label, width in header))
    for name, seconds in best.items():
        fps, rate = args.frames / seconds, counts[name] / seconds / 1e6
        reference_rate = counts[reference] / best[reference] / 1e6
        print(
            f"{name:24s} {fps:9.0f} {rate:8.2f} {counts[name]:10,d} {counts[name] / (args.frames - 1):8.0f} "
            f"{best[reference] / seconds:11.2f} {rate / reference_rate:7.2f}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# "ours, before": a frozen copy of evpretrain/events/simulator.py at commit 531e46b, before the fused kernels, with its
# functions renamed ``_before_*`` (``simulate`` as ``before_simulate``). Kept here, not imported from git, so that the
# comparison survives later changes to the module. Do not edit.

_BEFORE_NEVER_US = -(2**62)
_BEFORE_MAX_SIDE = int(np.iinfo(np.uint16).max) + 1


def _before_lin_log(intensity: np.ndarray, linear_threshold: float = 20 / 255) -> np.ndarray:
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


def before_simulate(
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
    frames = _before_checked_frames(frames)
    timestamps = _before_checked_timestamps(timestamps_us, len(frames))
    shape = frames.shape[1:]

    threshold_rng, shot_rng, leak_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    pos_threshold, neg_threshold = _before_pixel_thresholds(config, shape, threshold_rng)
    signal, diff_maps = _before_signal_columns(frames, timestamps, pos_threshold, neg_threshold, config)

    start, end = int(timestamps[0]), int(timestamps[-1])
    noise = _before_merge_columns(
        _before_shot_noise_columns(config.shot_noise_rate_hz, shape, start, end, shot_rng),
        _before_leak_columns(config.leak_rate_hz, config.leak_rate_jitter, shape, start, end, leak_rng),
    )
    clean_events = _before_to_events(signal)
    events = _before_to_events(signal, noise) if len(noise[0]) else clean_events
    return SimulationResult(events=events, clean_events=clean_events, diff_maps=diff_maps)


def _before_checked_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < 2 or 0 in frames.shape:
        raise ValueError(f"frames: expected shape (T, H, W) with T >= 2 and H, W >= 1, got {frames.shape}")
    real = np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)
    if frames.dtype == np.bool_ or not real:
        raise ValueError(f"frames: expected real numbers (linear intensity in [0, 1]), got dtype {frames.dtype}")
    if max(frames.shape[1:]) > _BEFORE_MAX_SIDE:
        raise ValueError(
            f"frames: expected H and W of at most {_BEFORE_MAX_SIDE} (uint16 event coordinates), got {frames.shape[1:]}"
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


def _before_checked_timestamps(timestamps_us, num_frames: int) -> np.ndarray:
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


def _before_pixel_thresholds(config: SimulatorConfig, shape: tuple[int, int], rng: np.random.Generator):
    """Per-pixel (ON, OFF) thresholds, (H, W) float64 nepers, mismatched and clipped at ``min_threshold``."""
    thresholds = []
    for nominal in (config.pos_threshold, config.neg_threshold):
        drawn = nominal + config.threshold_sigma * rng.standard_normal(shape)
        thresholds.append(np.maximum(drawn, config.min_threshold))
    return thresholds


def _before_signal_columns(frames, timestamps, pos_threshold, neg_threshold, config: SimulatorConfig):
    """Threshold crossings of all frame pairs as (t, x, y, p) columns sorted by t; the (T-1, H, W) difference maps."""
    num_frames, height, width = frames.shape
    diff_maps = np.empty((num_frames - 1, height, width), dtype=np.float32)
    log_prev = _before_lin_log(frames[0], config.linear_threshold)
    reference = log_prev.astype(np.float64)  # accumulates many threshold steps: double precision
    last_event_us = np.full((height, width), _BEFORE_NEVER_US, dtype=np.int64)
    pairs = []
    for n in range(1, num_frames):
        log_next = _before_lin_log(frames[n], config.linear_threshold)
        np.subtract(log_next, log_prev, out=diff_maps[n - 1])
        pairs.append(
            _before_frame_pair_events(
                log_prev, log_next, reference, last_event_us, pos_threshold, neg_threshold,
                int(timestamps[n - 1]), int(timestamps[n]), int(config.refractory_us),
            )
        )  # fmt: skip
        log_prev = log_next
    # Each pair's events are sorted and pairs follow each other in time: the concatenation is sorted.
    return tuple(np.concatenate([pair[k] for pair in pairs]) for k in range(4)), diff_maps


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _before_frame_pair_events(
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


def _before_shot_noise_columns(rate_hz: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
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


def _before_leak_columns(rate_hz: float, jitter: float, shape, start_us: int, end_us: int, rng: np.random.Generator):
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


def _before_merge_columns(first, second):
    """Merge two time-sorted (t, x, y, p) column tuples into new columns; at equal t, ``first`` comes first."""
    n = len(first[0]) + len(second[0])
    merged = np.empty(n, np.int64), np.empty(n, np.uint16), np.empty(n, np.uint16), np.empty(n, np.int8)
    _before_merge_kernel(*first, *second, *merged)
    return merged


def _before_to_events(first, second=None) -> np.ndarray:
    """A new ``EVENT_DTYPE`` array from time-sorted columns; with ``second``, both merged as ``_merge_columns`` does."""
    events = np.empty(len(first[0]) + (0 if second is None else len(second[0])), dtype=EVENT_DTYPE)
    fields = events["t"], events["x"], events["y"], events["p"]  # views: writing them writes the events
    if second is None:
        for field, column in zip(fields, first):
            field[...] = column
    else:
        _before_merge_kernel(*first, *second, *fields)
    return events


@numba.njit(cache=True, nogil=True)
def _before_merge_kernel(t1, x1, y1, p1, t2, x2, y2, p2, t_out, x_out, y_out, p_out):
    i = j = 0
    for k in range(len(t1) + len(t2)):
        if j == len(t2) or (i < len(t1) and t1[i] <= t2[j]):
            t_out[k], x_out[k], y_out[k], p_out[k] = t1[i], x1[i], y1[i], p1[i]
            i += 1
        else:
            t_out[k], x_out[k], y_out[k], p_out[k] = t2[j], x2[j], y2[j], p2[j]
            j += 1


if __name__ == "__main__":
    main()
