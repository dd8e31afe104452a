from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evpretrain.events.contract import EVENT_DTYPE, validate_events
from evpretrain.events.simulator import (
    SimulationResult,
    _leak_columns,
    _pixel_thresholds,
    _shot_noise_columns,
    lin_log,
    simulate,
)
from evpretrain.events.simulator_config import SimulatorConfig

# No mismatch, no refractory period, no noise: the events are a pure function of the frames.
IDEAL = SimulatorConfig(threshold_sigma=0.0, refractory_us=0, shot_noise_rate_hz=0.0, leak_rate_hz=0.0)
NOISE_OFF = SimulatorConfig(shot_noise_rate_hz=0.0, leak_rate_hz=0.0)


def crossing_model(frames: np.ndarray, contrast: float) -> list[np.ndarray]:
    """Signed crossings per pixel for each frame pair, by the stated model in double precision.

    ``ref`` starts at L(frame 0); pair n emits k = floor((L_n - ref) / C) ON or floor((ref - L_n) / C) OFF events
    and moves ``ref`` by k * C.
    """
    log = lin_log(frames).astype(np.float64)
    reference = log[0].copy()
    per_pair = []
    for n in range(1, len(frames)):
        change = log[n] - reference
        k = np.where(change > 0, np.floor(change / contrast), -np.floor(-change / contrast)).astype(np.int64)
        reference = reference + k * contrast
        per_pair.append(k)
    return per_pair


def pixel_counts(events: np.ndarray, shape, polarity: int) -> np.ndarray:
    chosen = events[events["p"] == polarity]
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, (chosen["y"], chosen["x"]), 1)
    return counts


def as_multiset(events: np.ndarray) -> Counter:
    return Counter(events.tolist())


def moving_texture(seed: int = 0, shape=(24, 32), num_frames: int = 6, step_px: int = 2) -> np.ndarray:
    """(T, H, W) frames in [0.02, 1]: a random texture shifted by ``step_px`` columns per frame."""
    texture = np.random.default_rng(seed).uniform(0.02, 1.0, size=(shape[0], shape[1] + step_px * num_frames))
    return np.stack([texture[:, n * step_px : n * step_px + shape[1]] for n in range(num_frames)]).astype(np.float32)


frame_stacks = st.tuples(st.integers(2, 5), st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda shape: hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0))
)


frame_pairs = hnp.arrays(
    np.float64, st.tuples(st.just(2), st.integers(1, 6), st.integers(1, 6)), elements=st.floats(0.0, 1.0)
)


@st.composite
def timestamps_for(draw, num_frames: int) -> np.ndarray:
    # Intervals from 1 us (crossings collide) to 1000 s (the merge-sort path of the kernel).
    start = draw(st.integers(0, 10**12))
    steps = draw(st.lists(st.integers(1, 10**9), min_size=num_frames - 1, max_size=num_frames - 1))
    return start + np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


# ---------------------------------------------------------------- response


def test_lin_log_is_log_above_the_junction_and_its_tangent_below():
    junction = 20 / 255
    bright = np.array([0.1, 0.5, 1.0], dtype=np.float32)
    np.testing.assert_allclose(lin_log(bright), np.log(bright), rtol=1e-6)
    dark = np.array([0.0, 0.25 * junction, junction], dtype=np.float32)
    np.testing.assert_allclose(lin_log(dark), np.log(junction) + (dark - junction) / junction, rtol=1e-6)
    # Continuous value and slope (1 / I_lin) across the junction.
    h = 1e-3 * junction
    below, at, above = lin_log(np.array([junction - h, junction, junction + h]))
    assert (at - below) / h == pytest.approx(1 / junction, rel=2e-3)
    assert (above - at) / h == pytest.approx(1 / junction, rel=2e-3)
    assert lin_log(np.zeros(2, np.float32)).dtype == np.float32


# ---------------------------------------------------------------- signal events


@settings(max_examples=150, deadline=None)
@given(frames=frame_stacks, data=st.data(), contrast=st.floats(0.05, 1.0))
def test_ideal_pixel_emits_every_threshold_crossing(frames, data, contrast):
    timestamps = data.draw(timestamps_for(len(frames)))
    result = simulate(frames, timestamps, contrast=contrast, seed=0, config=IDEAL)
    shape = frames.shape[1:]
    events = validate_events(result.events, source="simulate", sensor_size=shape)
    assert events.dtype == EVENT_DTYPE and result.events is result.clean_events
    assert events["t"].min(initial=timestamps[0]) >= timestamps[0]
    assert events["t"].max(initial=timestamps[-1]) <= timestamps[-1]

    per_pair = crossing_model(frames, contrast)
    expected_on = sum(np.maximum(k, 0) for k in per_pair)
    expected_off = sum(np.maximum(-k, 0) for k in per_pair)
    np.testing.assert_array_equal(pixel_counts(events, shape, +1), expected_on)
    np.testing.assert_array_equal(pixel_counts(events, shape, -1), expected_off)
    # The reference carries over: after the last frame every pixel is within one threshold of its reference.
    net = expected_on - expected_off
    log = lin_log(frames).astype(np.float64)
    assert np.all(np.abs(log[-1] - (log[0] + contrast * net)) < contrast + 1e-9)


@settings(max_examples=100, deadline=None)
@given(frames=frame_pairs)
def test_single_pair_count_is_floor_of_log_change_over_contrast(frames):
    result = simulate(frames, [0, 10_000], contrast=0.2, seed=0, config=IDEAL)
    change = lin_log(frames[1]).astype(np.float64) - lin_log(frames[0]).astype(np.float64)
    expected = np.floor(np.abs(change) / 0.2).astype(np.int64)
    shape = frames.shape[1:]
    np.testing.assert_array_equal(pixel_counts(result.events, shape, +1), np.where(change > 0, expected, 0))
    np.testing.assert_array_equal(pixel_counts(result.events, shape, -1), np.where(change < 0, expected, 0))


@pytest.mark.parametrize("polarity", [+1, -1])
def test_crossings_are_timed_by_linear_interpolation(polarity):
    # ln I rises (or falls) by 0.5 over [1000, 2000] us: crossings of 0.2 and 0.4 at 40% and 80% of the interval.
    levels = np.array([0.5, 0.5 * np.exp(0.5)])[::polarity].reshape(2, 1, 1)
    result = simulate(levels, [1000, 2000], contrast=0.2, config=IDEAL)
    assert result.events["t"].tolist() == [1400, 1800]
    assert result.events["p"].tolist() == [polarity, polarity]


def test_reference_carries_over_between_pairs():
    # ln I steps by +0.15 twice: no pair alone reaches 0.2, together they cross it once, a third of the way into
    # the second interval. So per pair the count is floor(|L_n - ref| / C), not floor(|L_n - L_(n-1)| / C).
    frames = (0.3 * np.exp([0.0, 0.15, 0.30])).reshape(3, 1, 1)
    events = simulate(frames, [0, 1000, 2000], contrast=0.2, config=IDEAL).events
    assert events.tolist() == [(1333, 0, 0, 1)]


def test_events_of_several_pixels_and_pairs_come_out_in_time_order():
    # ln I per pixel (y, x) over frames at 0, 1000, 2000 us, contrast 0.2, crossings by linear interpolation:
    # (0, 0) rises 0.5 in pair 1: ON at 0.2 / 0.5 and 0.4 / 0.5 of it, 400 and 800 us; then flat, 0.1 short of 0.6.
    # (0, 1) falls 0.3 in pair 1: OFF at 0.2 / 0.3 of it, 666.7 -> 667 us; then flat.
    # (1, 0) is flat, then rises 0.25 in pair 2: ON at 0.2 / 0.25 of it, 1800 us.
    # (1, 1) never changes. Pixel order would put (0, 0)'s two events first; time order interleaves them.
    log_change = np.array([[[0.0, 0.0], [0.0, 0.0]], [[0.5, -0.3], [0.0, 0.0]], [[0.5, -0.3], [0.25, 0.0]]])
    frames = 0.5 * np.exp(log_change)
    events = simulate(frames, [0, 1000, 2000], contrast=0.2, config=IDEAL).events
    assert events.tolist() == [(400, 0, 0, 1), (667, 1, 0, -1), (800, 0, 0, 1), (1800, 0, 1, 1)]


def test_noisy_events_are_the_signal_and_the_noise_stably_merged_at_frame_boundaries_too():
    # Intervals of a few microseconds and dense noise: many noise events share a frame's timestamp with signal
    # events of the pairs on both sides of it. At equal t: signal first (pixel order), then shot noise, then leak.
    frames = moving_texture(shape=(12, 16), num_frames=5)
    timestamps = np.array([0, 3, 4, 9, 12])
    config = replace(NOISE_OFF, shot_noise_rate_hz=100_000.0, leak_rate_hz=200_000.0, leak_rate_jitter=0.3)
    result = simulate(frames, timestamps, seed=6, config=config)
    # The noise from the simulator's own streams: threshold, shot and leak draws are children 0, 1, 2 of the seed.
    _, shot_rng, leak_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(6).spawn(3))
    shot = _shot_noise_columns(100_000.0, (12, 16), 0, 12, shot_rng)
    leak = _leak_columns(200_000.0, 0.3, (12, 16), 0, 12, leak_rng)
    parts = [result.clean_events]
    for t, x, y, p in (shot, leak):
        part = np.empty(len(t), dtype=EVENT_DTYPE)
        part["t"], part["x"], part["y"], part["p"] = t, x, y, p
        parts.append(part)
    joined = np.concatenate(parts)
    expected = joined[np.argsort(joined["t"], kind="stable")]
    assert len(parts[1]) > 100 and len(parts[2]) > 100 and len(result.clean_events) > 100
    shared = set(result.clean_events["t"].tolist()) & set(parts[1]["t"].tolist()) & set(parts[2]["t"].tolist())
    assert {3, 4} <= shared  # ties of all three kinds at the boundaries between pairs
    np.testing.assert_array_equal(result.events, expected)
    assert np.all(np.diff(result.events["t"]) >= 0)


def test_ties_keep_pixel_order_and_events_stay_in_their_interval():
    frames = np.stack([np.full((2, 3), 0.2), np.full((2, 3), 0.9)])
    events = simulate(frames, [0, 1], contrast=0.2, config=IDEAL).events  # 1 us: every crossing at t = 0 or 1
    assert set(events["t"].tolist()) <= {0, 1}
    for t in (0, 1):
        same_time = events[events["t"] == t]
        pixel = same_time["y"].astype(int) * 3 + same_time["x"]
        assert np.all(np.diff(pixel) >= 0)


def test_contrast_overrides_both_thresholds_of_the_config():
    frames = moving_texture()
    timestamps = np.arange(len(frames)) * 10_000
    shortcut = simulate(frames, timestamps, contrast=0.35, seed=3, config=IDEAL)
    explicit = simulate(frames, timestamps, seed=3, config=replace(IDEAL, pos_threshold=0.35, neg_threshold=0.35))
    assert np.array_equal(shortcut.events, explicit.events) and len(shortcut.events) > 0


def test_pixel_thresholds_are_gaussian_around_nominal_and_clipped():
    rng = np.random.default_rng(0)
    on, off = _pixel_thresholds(SimulatorConfig(pos_threshold=0.2, neg_threshold=0.3), (200, 200), rng)
    # 40,000 draws: the mean is within 5 standard errors (5 * 0.03 / 200), the sd within 2 %.
    assert on.mean() == pytest.approx(0.2, abs=8e-4) and off.mean() == pytest.approx(0.3, abs=8e-4)
    assert on.std() == pytest.approx(0.03, rel=0.02) and not np.array_equal(on, off)
    wide = SimulatorConfig(threshold_sigma=0.2, min_threshold=0.05)
    on, _ = _pixel_thresholds(wide, (200, 200), rng)
    assert on.min() == 0.05
    # P(0.2 + 0.2 Z < 0.05) = Phi(-0.75) = 0.2266; 5 binomial standard errors are 0.0105.
    assert np.mean(on == 0.05) == pytest.approx(0.2266, abs=0.0105)


def test_refractory_period_is_honoured_per_pixel_and_only_drops_events():
    frames = np.random.default_rng(1).uniform(0.05, 1.0, size=(8, 12, 12)).astype(np.float32)
    timestamps = np.arange(8) * 1000  # up to 15 crossings per ms: many closer than the refractory period
    free = simulate(frames, timestamps, seed=5, config=replace(NOISE_OFF, refractory_us=0)).events
    limited = simulate(frames, timestamps, seed=5, config=replace(NOISE_OFF, refractory_us=300)).events
    pixel = limited["y"].astype(np.int64) * 12 + limited["x"]
    order = np.argsort(pixel, kind="stable")  # per pixel, still in time order
    same_pixel = np.diff(pixel[order]) == 0
    assert np.all(np.diff(limited["t"][order])[same_pixel] >= 300)
    # The reference moves by dropped crossings too (v2e): the limited events are a subset, nothing comes late.
    assert not as_multiset(limited) - as_multiset(free)
    assert len(limited) < len(free)


# ---------------------------------------------------------------- noise and determinism


def static_scene(seconds: float = 2.0, shape=(50, 50)):
    return np.full((2, *shape), 0.5, dtype=np.float32), np.array([0, int(seconds * 1e6)])


def test_shot_noise_rate_and_polarity_balance():
    frames, timestamps = static_scene()
    config = replace(NOISE_OFF, shot_noise_rate_hz=5.0)
    result = simulate(frames, timestamps, seed=11, config=config)
    events = result.events
    assert len(result.clean_events) == 0  # a static scene has no signal
    # Counts are Poisson(2,500 px * 5 Hz * 2 s = 25,000): 5 standard deviations are 791 events.
    expected = 2500 * 5.0 * 2.0
    assert abs(len(events) - expected) < 5 * np.sqrt(expected)
    # Polarity and time halves are fair coins: within 5 binomial standard errors of 1/2.
    half_width = 5 * 0.5 / np.sqrt(len(events))
    assert abs(np.mean(events["p"] == 1) - 0.5) < half_width
    assert abs(np.mean(events["t"] < 1_000_000) - 0.5) < half_width
    # Per-pixel counts are Poisson(10): dispersion (variance / mean) 1, standard error about 0.03.
    counts = pixel_counts(events, (50, 50), 1) + pixel_counts(events, (50, 50), -1)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


def test_leak_is_periodic_on_events_with_a_per_pixel_phase():
    frames, timestamps = static_scene()
    config = replace(NOISE_OFF, leak_rate_hz=2.0, leak_rate_jitter=0.0)
    events = simulate(frames, timestamps, seed=2, config=config).events
    assert np.all(events["p"] == 1)
    # Period 0.5 s over 2 s with phase in [0, 1): exactly 4 events per pixel, 500,000 us apart (+-1 us rounding).
    assert np.all(pixel_counts(events, (50, 50), 1) == 4)
    pixel = events["y"].astype(np.int64) * 50 + events["x"]
    order = np.argsort(pixel, kind="stable")
    times = events["t"][order].reshape(2500, 4)
    assert np.all(np.abs(np.diff(times, axis=1) - 500_000) <= 1)
    first = times[:, 0] / 500_000
    assert first.min() < 0.01 and first.max() > 0.99  # phases spread over the whole period
    jittered = simulate(frames, timestamps, seed=2, config=replace(config, leak_rate_jitter=0.1)).events
    assert len(jittered) == pytest.approx(2500 * 4, rel=0.02)


def test_clean_events_are_the_signal_part_of_the_noisy_events():
    frames = moving_texture()
    timestamps = np.arange(len(frames)) * 20_000
    noisy = simulate(frames, timestamps, seed=4, config=replace(SimulatorConfig(), shot_noise_rate_hz=50.0))
    quiet = simulate(frames, timestamps, seed=4, config=NOISE_OFF)
    assert np.array_equal(noisy.clean_events, quiet.clean_events)  # noise draws do not touch the signal
    assert quiet.events is quiet.clean_events
    noise = as_multiset(noisy.events) - as_multiset(noisy.clean_events)
    assert sum(noise.values()) == len(noisy.events) - len(noisy.clean_events) > 0
    validate_events(noisy.events, sensor_size=frames.shape[1:])


def test_same_seed_same_output_other_seed_other_output():
    frames = moving_texture()
    timestamps = np.arange(len(frames)) * 20_000
    config = replace(SimulatorConfig(), shot_noise_rate_hz=20.0)
    first, again, other = (simulate(frames, timestamps, seed=s, config=config) for s in (7, 7, 8))
    assert isinstance(first, SimulationResult)
    assert np.array_equal(first.events, again.events) and np.array_equal(first.clean_events, again.clean_events)
    assert not np.array_equal(first.events, other.events)
    assert not np.array_equal(first.clean_events, other.clean_events)  # other threshold mismatch


# ---------------------------------------------------------------- difference maps


def test_diff_maps_are_consecutive_log_differences():
    frames = moving_texture(num_frames=4)
    diff_maps = simulate(frames, [0, 1, 2, 3], config=NOISE_OFF).diff_maps
    assert diff_maps.shape == (3, *frames.shape[1:]) and diff_maps.dtype == np.float32
    np.testing.assert_array_equal(diff_maps, lin_log(frames[1:]) - lin_log(frames[:-1]))
    bright = (frames[1:] > 0.08) & (frames[:-1] > 0.08)
    np.testing.assert_allclose(diff_maps[bright], np.log(frames[1:] / frames[:-1])[bright], atol=1e-5)
    dark = np.array([[[0.01]], [[0.03]]])  # below the junction: linear, (I1 - I0) / I_lin
    assert simulate(dark, [0, 1]).diff_maps[0, 0, 0] == pytest.approx(0.02 / (20 / 255), rel=1e-5)


# ---------------------------------------------------------------- bad input


GOOD_FRAMES = np.full((3, 2, 2), 0.5)
GOOD_TIMES = np.array([0, 10, 20])
NAN_AT_1_0_1 = np.where(np.arange(12) == 5, np.nan, 0.5).reshape(3, 2, 2)


@pytest.mark.parametrize(
    "frames, timestamps, match",
    [
        (np.full((2, 2), 0.5), [0, 10], r"frames: expected shape \(T, H, W\) with T >= 2"),
        (np.full((1, 2, 2), 0.5), [0], r"frames: expected shape \(T, H, W\) with T >= 2"),
        (np.full((3, 2, 2), 0.5 + 0j), GOOD_TIMES, "frames: expected real numbers"),
        (NAN_AT_1_0_1, GOOD_TIMES, r"frames: expected finite values in \[0, 1\], got nan at \(t, y, x\) = \(1, 0, 1\)"),
        (np.full((3, 2, 2), 255.0), GOOD_TIMES, r"frames: expected linear intensity in \[0, 1\], got .*\[255.0"),
        (np.full((3, 2, 2), -0.1), GOOD_TIMES, r"frames: expected linear intensity in \[0, 1\]"),
        (GOOD_FRAMES, [0, 10], r"timestamps_us: expected shape \(3,\), one per frame, got \(2,\)"),
        (GOOD_FRAMES, [0, 10, 10], "timestamps_us: expected strictly increasing values, got 10 at index 2 after 10"),
        (GOOD_FRAMES, [0, 20, 10], "timestamps_us: expected strictly increasing values, got 10 at index 2 after 20"),
        (GOOD_FRAMES, [0.0, 10.5, 20.0], "timestamps_us: expected whole microseconds, got 10.5 at index 1"),
        (GOOD_FRAMES, [0.0, np.nan, 20.0], "timestamps_us: expected whole microseconds, got nan at index 1"),
        (GOOD_FRAMES, ["0", "1", "2"], "timestamps_us: expected integers"),
    ],
)
def test_bad_input_names_the_argument_and_what_was_expected(frames, timestamps, match):
    with pytest.raises(ValueError, match=match):
        simulate(frames, timestamps)


@pytest.mark.parametrize("contrast", [0, -0.2, float("nan"), float("inf"), True, "0.2"])
def test_bad_contrast(contrast):
    with pytest.raises(ValueError, match="contrast: expected a finite number > 0"):
        simulate(GOOD_FRAMES, GOOD_TIMES, contrast=contrast)


def test_bad_seed_and_config():
    with pytest.raises(ValueError, match="seed: expected a non-negative integer, got -1"):
        simulate(GOOD_FRAMES, GOOD_TIMES, seed=-1)
    with pytest.raises(ValueError, match="pos_threshold must be a finite number > 0"):
        SimulatorConfig(pos_threshold=0.0)
    with pytest.raises(ValueError, match="refractory_us must be a finite number >= 0"):
        SimulatorConfig(refractory_us=-1)
    with pytest.raises(ValueError, match=r"linear_threshold must lie in \(0, 1\]"):
        SimulatorConfig(linear_threshold=2.0)


def test_float_timestamps_holding_whole_microseconds_are_accepted():
    integral = simulate(moving_texture(num_frames=3), [0, 500, 1000], config=NOISE_OFF)
    floating = simulate(moving_texture(num_frames=3), np.array([0.0, 500.0, 1000.0]), config=NOISE_OFF)
    assert np.array_equal(integral.events, floating.events)
