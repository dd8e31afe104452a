from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, make_events, validate_events
from evpretrain.events.corruption import (
    CORRUPTION_KINDS,
    Corruption,
    add_shot_noise,
    apply_corruption,
    corruption_seed,
    drop_events,
)
from evpretrain.events.simulator import _shot_noise_columns

# A bound that a correct implementation exceeds with probability about 1e-9: with fixed seeds the tests are
# deterministic, and the bound keeps them passing under any correct change of the random streams.
SIGMAS = 6.0


def random_events(seed: int, num_events: int, sensor_size: tuple[int, int], span_us: int) -> np.ndarray:
    """Events sorted by t in [0, span_us], uniform over the sensor; a short span forces equal timestamps."""
    rng = np.random.default_rng(seed)
    height, width = sensor_size
    t = np.sort(rng.integers(0, span_us + 1, num_events))
    return make_events(t, rng.integers(0, width, num_events), rng.integers(0, height, num_events),
                       rng.choice(np.array([-1, 1], np.int8), num_events))  # fmt: skip


@st.composite
def recordings(draw, min_events: int = 0):
    sensor_size = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    events = random_events(
        draw(st.integers(0, 2**32)), draw(st.integers(min_events, 300)), sensor_size, draw(st.integers(0, 20_000))
    )
    return events, sensor_size


def is_subsequence(part: np.ndarray, whole: np.ndarray) -> bool:
    remaining = iter(whole.tolist())
    return all(event in remaining for event in part.tolist())


def noise_array(columns) -> np.ndarray:
    noise = np.empty(len(columns[0]), EVENT_DTYPE)
    for name, column in zip("txyp", columns):
        noise[name] = column
    return noise


# --- shot noise ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(recordings(min_events=1), st.floats(0.0, 5_000.0), st.integers(0, 2**32))
def test_shot_noise_is_the_input_stably_merged_with_the_simulators_noise(recording, rate_hz, seed):
    events, sensor_size = recording
    before = events.copy()
    out = add_shot_noise(events, sensor_size, rate_hz, seed)

    validate_events(out, sensor_size=sensor_size)
    np.testing.assert_array_equal(events, before)
    assert not np.shares_memory(out, events)
    assert Counter(out.tolist()) >= Counter(events.tolist())
    # Oracle: the same noise stream, concatenated after the input and stably sorted (input first at equal t).
    window = int(events["t"][0]), int(events["t"][-1])
    noise = noise_array(_shot_noise_columns(rate_hz, sensor_size, *window, np.random.default_rng(seed)))
    joined = np.concatenate([events, noise])
    np.testing.assert_array_equal(out, joined[np.argsort(joined["t"], kind="stable")])
    assert ((noise["t"] >= window[0]) & (noise["t"] <= window[1])).all()


def test_input_events_come_before_noise_at_equal_timestamps():
    events = make_events([0, 0, 1, 1, 1], [0, 1, 2, 3, 0], [0, 0, 1, 1, 0], [1, -1, 1, -1, 1])
    out = add_shot_noise(events, (4, 4), 2e6, 3, window_us=(0, 1))  # ~64 noise events on two microseconds
    assert len(out) > 2 * len(events)
    for t in (0, 1):
        originals = events[events["t"] == t]
        np.testing.assert_array_equal(out[out["t"] == t][: len(originals)], originals)


def test_noise_count_pixels_polarity_and_times_follow_the_poisson_model():
    sensor_size, rate_hz, window = (8, 10), 50.0, (1_000, 1_001_000)  # 80 pixels for one second: mean 4000 a draw
    empty = np.empty(0, EVENT_DTYPE)
    draws = [add_shot_noise(empty, sensor_size, rate_hz, seed, window_us=window) for seed in range(100)]
    noise = np.concatenate(draws)

    expected = len(draws) * rate_hz * 80 * (window[1] - window[0]) * 1e-6
    assert abs(len(noise) - expected) < SIGMAS * np.sqrt(expected)
    counts = np.array([len(d) for d in draws])
    assert abs(counts.var(ddof=1) / counts.mean() - 1) < SIGMAS * np.sqrt(2 / (len(draws) - 1))  # Poisson: var = mean
    assert abs((noise["p"] == 1).sum() - len(noise) / 2) < SIGMAS * np.sqrt(len(noise) / 4)
    per_pixel = np.bincount(noise["y"].astype(int) * 10 + noise["x"], minlength=80)
    assert stats.chisquare(per_pixel).pvalue > 1e-9
    duration = window[1] - window[0]
    mean_offset = (noise["t"] - window[0]).mean()
    assert abs(mean_offset - duration / 2) < SIGMAS * duration / np.sqrt(12 * len(noise))
    assert noise["t"].min() >= window[0] and noise["t"].max() <= window[1]


def test_default_window_is_the_span_of_the_events():
    events = make_events([5_000, 7_000, 405_000], [0, 1, 2], [0, 0, 0], [1, 1, -1])
    out = add_shot_noise(events, (16, 16), 1_000.0, 0)  # mean 102 400 noise events
    assert out["t"].min() == 5_000 and out["t"].max() == 405_000
    assert len(out) - len(events) > 100_000


def test_same_seed_gives_the_same_noise_and_another_seed_differs():
    events = random_events(0, 500, (20, 30), 100_000)
    first = add_shot_noise(events, (20, 30), 100.0, 7)
    np.testing.assert_array_equal(first, add_shot_noise(events, (20, 30), 100.0, 7))
    np.testing.assert_array_equal(first, add_shot_noise(events, (20, 30), 100.0, np.random.default_rng(7)))
    assert not np.array_equal(first, add_shot_noise(events, (20, 30), 100.0, 8))


def test_rate_zero_returns_a_copy_even_of_an_empty_input():
    events = random_events(1, 50, (4, 4), 1_000)
    out = add_shot_noise(events, (4, 4), 0.0, 0)
    np.testing.assert_array_equal(out, events)
    assert not np.shares_memory(out, events)
    assert add_shot_noise(np.empty(0, EVENT_DTYPE), (4, 4), 0, 0).dtype == EVENT_DTYPE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_hz": -1.0}, "rate_hz: expected a finite shot-noise rate >= 0"),
        ({"rate_hz": float("nan")}, "rate_hz"),
        ({"rate_hz": True}, "rate_hz"),
        ({"sensor_size": (0, 4)}, r"sensor_size: expected \(height, width\)"),
        ({"sensor_size": (4,)}, "sensor_size"),
        ({"window_us": (10, 5)}, r"window_us: expected \(t0, t1\)"),
        ({"window_us": (0.5, 5)}, "window_us"),
        ({"rng_or_seed": None}, "rng_or_seed: expected a numpy Generator"),
        ({"rng_or_seed": -3}, "rng_or_seed"),
    ],
)
def test_shot_noise_rejects_bad_arguments_by_name(kwargs, message):
    arguments = {"events": random_events(0, 5, (4, 4), 100), "sensor_size": (4, 4), "rate_hz": 1.0, "rng_or_seed": 0}
    with pytest.raises(ValueError, match=message):
        add_shot_noise(**(arguments | kwargs))


def test_shot_noise_on_empty_events_needs_a_window():
    empty = np.empty(0, EVENT_DTYPE)
    with pytest.raises(ValueError, match=r"events: empty.*window_us"):
        add_shot_noise(empty, (4, 4), 1.0, 0)
    assert len(add_shot_noise(empty, (4, 4), 1e6, 0, window_us=(0, 100))) > 0


def test_shot_noise_rejects_events_outside_the_sensor_or_unsorted():
    events = make_events([0, 1], [5, 0], [0, 0], [1, 1])
    with pytest.raises(EventFormatError, match="events: event 0 has x=5, outside the sensor"):
        add_shot_noise(events, (4, 4), 1.0, 0)
    with pytest.raises(EventFormatError, match="events: timestamps not sorted"):
        add_shot_noise(events[::-1].copy(), (8, 8), 1.0, 0)


# --- drops ---------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(recordings(), st.floats(0.0, 1.0), st.integers(0, 2**32))
def test_drop_keeps_a_subsequence_of_the_input(recording, fraction, seed):
    events, _ = recording
    before = events.copy()
    out = drop_events(events, fraction, seed)

    validate_events(out)
    np.testing.assert_array_equal(events, before)
    assert not np.shares_memory(out, events)
    assert is_subsequence(out, events)
    np.testing.assert_array_equal(out, drop_events(events, fraction, seed))


def test_drop_fraction_zero_keeps_all_and_one_keeps_none():
    events = random_events(2, 1_000, (8, 8), 10_000)
    np.testing.assert_array_equal(drop_events(events, 0.0, 0), events)
    dropped_all = drop_events(events, 1.0, 0)
    assert dropped_all.dtype == EVENT_DTYPE and dropped_all.size == 0
    assert drop_events(np.empty(0, EVENT_DTYPE), 0.5, 0).size == 0


def test_drop_keeps_each_event_with_probability_one_minus_fraction():
    events = random_events(3, 1_000_000, (32, 32), 10_000_000)
    for fraction in (0.1, 0.5, 0.9):
        kept = len(drop_events(events, fraction, 11))
        expected = (1 - fraction) * len(events)
        assert abs(kept - expected) < SIGMAS * np.sqrt(len(events) * fraction * (1 - fraction))
    # Independence: the first and second halves keep the same share, within the binomial spread of each.
    kept = drop_events(events, 0.5, 12)
    first_half = (kept["t"] < np.median(events["t"])).sum()
    assert abs(first_half - len(kept) / 2) < SIGMAS * np.sqrt(len(events) / 8)


@pytest.mark.parametrize("fraction", [-0.1, 1.1, float("nan"), "0.5", None])
def test_drop_rejects_a_fraction_outside_zero_one(fraction):
    with pytest.raises(ValueError, match=r"fraction: expected a drop fraction in \[0, 1\]"):
        drop_events(random_events(0, 5, (4, 4), 100), fraction, 0)


# --- corruptions over an evaluation --------------------------------------------------------------------------------


def test_corruption_validates_kind_and_level():
    assert Corruption("shot_noise", 1e4).level == 1e4
    with pytest.raises(ValueError, match=r"kind: expected one of \('shot_noise', 'drop'\), got 'blur'"):
        Corruption("blur", 0.1)
    with pytest.raises(ValueError, match="level: expected a finite shot-noise rate >= 0"):
        Corruption("shot_noise", -2.0)
    with pytest.raises(ValueError, match=r"level: expected a drop fraction in \[0, 1\]"):
        Corruption("drop", 1.5)


def test_apply_corruption_dispatches_on_kind():
    events, sensor_size = random_events(4, 200, (6, 7), 50_000), (6, 7)
    noise = Corruption("shot_noise", 300.0)
    drop = Corruption("drop", 0.4)
    np.testing.assert_array_equal(
        apply_corruption(events, sensor_size, noise, 5), add_shot_noise(events, sensor_size, 300.0, 5)
    )
    np.testing.assert_array_equal(apply_corruption(events, sensor_size, drop, 5), drop_events(events, 0.4, 5))
    for kind in CORRUPTION_KINDS:
        np.testing.assert_array_equal(apply_corruption(events, sensor_size, Corruption(kind, 0.0), 5), events)


def test_corruption_seed_is_distinct_per_sample_and_kind_and_shared_across_levels():
    seeds = {
        corruption_seed(seed, index, Corruption(kind, 0.5))
        for seed in range(4)
        for index in range(250)
        for kind in CORRUPTION_KINDS
    }
    assert len(seeds) == 4 * 250 * len(CORRUPTION_KINDS)
    assert all(0 <= s < 2**64 for s in seeds)
    assert corruption_seed(0, 3, Corruption("drop", 0.1)) == corruption_seed(0, 3, Corruption("drop", 0.9))
    with pytest.raises(ValueError, match="index: expected a non-negative integer"):
        corruption_seed(0, -1, Corruption("drop", 0.1))
    with pytest.raises(ValueError, match="seed: expected a non-negative integer"):
        corruption_seed(1.5, 0, Corruption("drop", 0.1))


def evaluate(samples, sensor_size, corruption, seed, order):
    """What an evaluation loop does, visiting samples in ``order``; returns outputs by sample index."""
    return {
        i: apply_corruption(samples[i], sensor_size, corruption, corruption_seed(seed, i, corruption)) for i in order
    }


@pytest.mark.parametrize("corruption", [Corruption("shot_noise", 500.0), Corruption("drop", 0.3)])
def test_corrupted_samples_do_not_depend_on_evaluation_order(corruption):
    samples = [random_events(i, 100, (5, 5), 20_000) for i in range(8)]
    forward = evaluate(samples, (5, 5), corruption, 42, range(8))
    shuffled = evaluate(samples, (5, 5), corruption, 42, [5, 2, 7, 0, 3, 6, 1, 4])
    for i in range(8):
        np.testing.assert_array_equal(forward[i], shuffled[i])
    assert not np.array_equal(forward[0], evaluate(samples, (5, 5), corruption, 43, [0])[0])


def test_drops_at_increasing_levels_are_nested_for_one_sample():
    events = make_events(np.arange(2_000), np.zeros(2_000), np.zeros(2_000), np.ones(2_000))  # t identifies an event
    kept = [
        set(apply_corruption(events, (1, 1), c, corruption_seed(9, 17, c))["t"].tolist())
        for c in (Corruption("drop", f) for f in (0.1, 0.3, 0.6, 0.9))
    ]
    assert all(later < earlier for earlier, later in zip(kept, kept[1:]))
