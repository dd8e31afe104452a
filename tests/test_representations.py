import numba
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, make_events
from evpretrain.events.paper_reference import as_paper_array, paper_voxel_grid
from evpretrain.events.representations import (
    EventTensors,
    histogram_ecdp,
    histogram_mem,
    voxel_grid,
    voxel_grid_batch,
    voxel_grid_many,
)

# --- references, written the way the source papers' code is ------------------------------------------------------


def ecdp_reference(events: np.ndarray, height: int, width: int, clip_hot_pixels: bool) -> torch.Tensor:
    """ECDP (Yan98/Event-Camera-Data-Pre-training): reshape_then_acc_count_pol, remove_hot_pixels, /(amax + 1)."""
    tensor = torch.from_numpy(as_paper_array(events))
    pos, neg = tensor[tensor[:, 3] > 0], tensor[tensor[:, 3] <= 0]
    pos_count = torch.bincount(pos[:, 0].long() + pos[:, 1].long() * width, minlength=height * width)
    neg_count = torch.bincount(neg[:, 0].long() + neg[:, 1].long() * width, minlength=height * width)
    x = torch.stack([pos_count, neg_count]).view(2, height, width).float()
    if clip_hot_pixels:
        x = torch.clip(x, max=x[x > 0.1].mean())
    return x / (x.amax([1, 2], True) + 1)


def mem_reference(events: np.ndarray, height: int, width: int, num_stds: float, time_surface: bool) -> torch.Tensor:
    """MEM (tum-vision/mem): EventArrToImg (float counts, no uint8 wrap), RemoveHotPixels, NormalizeEvent."""
    xs, ys, ts, ps = events["x"].astype(int), events["y"].astype(int), events["t"], events["p"]
    pos, tss, neg = (np.zeros(height * width) for _ in range(3))
    np.add.at(pos, xs[ps == 1] + width * ys[ps == 1], 1)
    np.add.at(neg, xs[ps == -1] + width * ys[ps == -1], 1)
    if time_surface:
        span = max(ts[-1] - ts[0], 1)
        tss[xs + ys * width] = (ts - ts[0]) / span  # last write wins: each pixel's latest event
    x = torch.from_numpy(np.stack([pos, tss, neg]).reshape(3, height, width)).float()
    flat = x[0::2].flatten()
    threshold = torch.mean(x[0::2]) + num_stds * torch.std(x[0::2])
    hot = torch.atleast_1d(torch.squeeze(torch.argwhere(flat > threshold)))
    hot_2d = np.asarray(np.unravel_index(hot.numpy(), x.shape)).T
    x[0::2, hot_2d[:, 1], hot_2d[:, 2]] = 0
    if x[0::2].max() != 0:
        x[0::2] = x[0::2] * (1.0 / x[0::2].max())
    return x


# --- event strategies ---------------------------------------------------------------------------------------------


@st.composite
def event_windows(draw, max_events=60):
    """(events, num_bins, height, width): small grids so that pixels collect many events; times drawn from a few
    values so that equal timestamps and events on bin borders are common."""
    num_bins = draw(st.integers(1, 6))
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    n = draw(st.integers(1, max_events))
    step = draw(st.sampled_from([1, 3, 1000, 10**9]))
    t = np.sort(np.array(draw(st.lists(st.integers(0, 4 * (num_bins - 1) + 1), min_size=n, max_size=n)))) * step
    t += draw(st.integers(0, 2**40))
    x = draw(st.lists(st.integers(0, width - 1), min_size=n, max_size=n))
    y = draw(st.lists(st.integers(0, height - 1), min_size=n, max_size=n))
    p = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    return make_events(t, x, y, p), num_bins, height, width


def random_events(n: int, height: int, width: int, seed: int = 0, duration_us: int = 50_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, n))
    return make_events(t, rng.integers(0, width, n), rng.integers(0, height, n), rng.choice([-1, 1], n))


# --- voxel grid ----------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(event_windows())
def test_voxel_grid_equals_paper_code(window):
    events, num_bins, height, width = window
    expected = paper_voxel_grid(as_paper_array(events), num_bins, height, width).numpy()
    grid = voxel_grid(events, num_bins, height=height, width=width)
    assert grid.dtype == np.float32 and grid.shape == (num_bins, height, width)
    np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-5)
    tensors = voxel_grid(EventTensors.from_numpy(events), num_bins, height=height, width=width)
    np.testing.assert_allclose(tensors.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_voxel_grid_equals_paper_code_on_many_events():
    events = random_events(20_000, 24, 32)
    expected = paper_voxel_grid(as_paper_array(events), 5, 24, 32).numpy()
    np.testing.assert_allclose(voxel_grid(events, 5, height=24, width=32), expected, rtol=1e-5, atol=1e-5)
    tensors = voxel_grid(EventTensors.from_numpy(events), 5, height=24, width=32).numpy()
    np.testing.assert_allclose(tensors, expected, rtol=1e-5, atol=1e-5)


def test_voxel_grid_edge_cases():
    # One event, and events sharing one timestamp: no span, everything in bin 0.
    single = make_events([7], [2], [1], [-1])
    assert voxel_grid(single, 3, height=2, width=3)[0, 1, 2] == -1
    assert np.count_nonzero(voxel_grid(single, 3, height=2, width=3)) == 1
    same_t = make_events([5, 5, 5], [0, 1, 1], [0, 0, 0], [1, 1, -1])
    np.testing.assert_array_equal(voxel_grid(same_t, 2, height=1, width=2), [[[1, 0]], [[0, 0]]])
    # Events exactly on the bin borders t = 0, 10, 20, 30 of 4 bins: each lands whole in its bin.
    borders = make_events([0, 10, 20, 30], [0, 1, 2, 3], [0, 0, 0, 0], [1, -1, 1, 1])
    np.testing.assert_array_equal(voxel_grid(borders, 4, height=1, width=4)[:, 0], np.diag([1, -1, 1, 1]))
    # Half way between two borders: split evenly.
    middle = make_events([0, 5, 10], [0, 1, 0], [0, 0, 0], [1, 1, 1])
    np.testing.assert_array_equal(voxel_grid(middle, 2, height=1, width=2)[:, 0], [[1, 0.5], [1, 0.5]])
    # No events: zeros of the right shape, numpy and torch.
    empty = np.empty(0, EVENT_DTYPE)
    np.testing.assert_array_equal(voxel_grid(empty, 5, height=3, width=4), np.zeros((5, 3, 4), np.float32))
    assert torch.equal(voxel_grid(EventTensors.from_numpy(empty), 5, height=3, width=4), torch.zeros(5, 3, 4))


@settings(max_examples=60, deadline=None)
@given(event_windows())
def test_voxel_grid_keeps_net_polarity_and_time_flip_negates_reversed_bins(window):
    events, num_bins, height, width = window
    grid = voxel_grid(events, num_bins, height=height, width=width)
    net = np.zeros((height, width))
    np.add.at(net, (events["y"], events["x"]), events["p"])
    np.testing.assert_allclose(grid.sum(0), net, atol=1e-4)
    assume(events["t"][-1] > events["t"][0])  # with no span every event sits in bin 0, flipped or not
    flipped = events[::-1].copy()
    flipped["t"] = events["t"][-1] - flipped["t"]
    flipped["p"] = -flipped["p"]
    np.testing.assert_allclose(voxel_grid(flipped, num_bins, height=height, width=width), -grid[::-1], atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(event_windows(max_events=20), min_size=1, max_size=4), st.integers(1, 5))
def test_batched_voxel_grid_equals_one_grid_per_sample(windows, num_bins):
    height = max(w[2] for w in windows)
    width = max(w[3] for w in windows)
    samples = [w[0] for w in windows] + [np.empty(0, EVENT_DTYPE)]  # an empty sample at the end gives zeros
    grids = voxel_grid(EventTensors.collate(samples), num_bins, height=height, width=width)
    assert grids.shape == (len(samples), num_bins, height, width)
    for events, grid in zip(samples, grids):
        np.testing.assert_allclose(grid.numpy(), voxel_grid(events, num_bins, height=height, width=width), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(event_windows(max_events=20), st.none()), max_size=5), st.integers(1, 5))
def test_voxel_grid_many_equals_voxel_grid_per_sample(windows, num_bins):
    # None stands for an empty sample; an empty list for an empty batch.
    height = max((w[2] for w in windows if w is not None), default=2)
    width = max((w[3] for w in windows if w is not None), default=3)
    samples = [np.empty(0, EVENT_DTYPE) if w is None else w[0] for w in windows]
    grids = voxel_grid_many(samples, num_bins, height=height, width=width)
    assert grids.dtype == np.float32 and grids.shape == (len(samples), num_bins, height, width)
    for events, grid in zip(samples, grids):
        np.testing.assert_array_equal(grid, voxel_grid(events, num_bins, height=height, width=width))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_voxel_grid_many_gives_the_same_grids_on_one_and_two_threads():
    sizes = [3000, 1, 0, 500, 2000, 7] * 3
    samples = [random_events(n, 24, 32, seed) for seed, n in enumerate(sizes)]
    samples[1].flags.writeable = False  # read-only and strided arrays are taken as well
    samples.append(random_events(900, 24, 32, seed=99)[::3])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = voxel_grid_many(samples, 5, height=24, width=32)
        numba.set_num_threads(2)
        out = np.full((len(samples), 5, 24, 32), np.nan, np.float32)  # a reused buffer: every value is overwritten
        two = voxel_grid_many(samples, 5, height=24, width=32, out=out)
    finally:
        numba.set_num_threads(threads)
    assert two is out
    np.testing.assert_array_equal(one, two)
    for events, grid in zip(samples, two):
        np.testing.assert_array_equal(grid, voxel_grid(events, 5, height=24, width=32))


def test_voxel_grid_many_errors_name_the_first_bad_sample_and_a_wrong_out():
    good = make_events([0, 1], [0, 2], [0, 1], [1, -1])
    outside_x = make_events([0, 1, 2], [0, 3, 1], [0, 0, 1], [1, 1, 1])
    outside_y = make_events([0, 1], [0, 0], [0, 2], [1, 1])
    samples = [good, np.empty(0, EVENT_DTYPE), outside_x, outside_y]
    with pytest.raises(EventFormatError, match=r"sample 2: event 1 has x=3, y=0, outside the 2x3 \(HxW\) grid"):
        voxel_grid_many(samples, height=2, width=3)
    with pytest.raises(EventFormatError, match=r"sample 1: event 1 has x=0, y=2, outside the 2x3 \(HxW\) grid"):
        voxel_grid_many([good, outside_y], height=2, width=3)
    with pytest.raises(EventFormatError, match="expected a 1-D array of dtype"):
        voxel_grid_many([good, np.zeros((3, 4))], height=2, width=3)
    with pytest.raises(ValueError, match=r"out must be .* shape \(1, 5, 2, 3\), got non-contiguous float32"):
        voxel_grid_many([good], height=2, width=3, out=np.zeros((1, 5, 2, 6), np.float32)[..., ::2])


def test_voxel_grid_batch_takes_flat_tensors_and_a_batch_size():
    events = random_events(500, 4, 5)
    t, x, y, p = EventTensors.from_numpy(events)[:4]
    batch = torch.zeros(len(events), dtype=torch.int64)
    grids = voxel_grid_batch(t, x, y, p, batch, num_bins=3, height=4, width=5, batch_size=2)
    assert grids.shape == (2, 3, 4, 5) and not grids[1].any()
    np.testing.assert_allclose(grids[0].numpy(), voxel_grid(events, 3, height=4, width=5), atol=1e-5)
    # {0, 1} polarity counts 0 as OFF, as the paper's code does.
    zero_one = voxel_grid_batch(t, x, y, (p > 0).to(torch.uint8), num_bins=3, height=4, width=5)
    torch.testing.assert_close(zero_one[0], grids[0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_torch_inputs_of_any_integer_type_are_left_unchanged(dtype):
    events = random_events(300, 4, 5)
    t, x, y, p = EventTensors.from_numpy(events)[:4]
    given_events = EventTensors(t, x.to(dtype), y.to(dtype), p.to(torch.int64), torch.zeros_like(t))
    copies = [column.clone() for column in given_events[:5]]
    grids = voxel_grid(given_events, 3, height=4, width=5)
    histogram_ecdp(given_events, height=4, width=5)
    histogram_mem(given_events, height=4, width=5, time_surface=True)
    for column, copy in zip(given_events[:5], copies):
        assert torch.equal(column, copy)
    np.testing.assert_allclose(grids[0].numpy(), voxel_grid(events, 3, height=4, width=5), atol=1e-5)


# --- histograms ----------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(event_windows(), st.booleans())
def test_ecdp_histogram_equals_ecdp_code(window, clip_hot_pixels):
    events, _, height, width = window
    expected = ecdp_reference(events, height, width, clip_hot_pixels).numpy()
    for given_events in (events, EventTensors.from_numpy(events)):
        histogram = histogram_ecdp(given_events, height=height, width=width, clip_hot_pixels=clip_hot_pixels)
        np.testing.assert_allclose(np.asarray(histogram), expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(event_windows(), st.sampled_from([0.5, 1.0, 2.0, 10.0]), st.booleans())
def test_mem_histogram_equals_mem_code(window, num_stds, time_surface):
    events, _, height, width = window
    expected = mem_reference(events, height, width, num_stds, time_surface).numpy()
    for given_events in (events, EventTensors.from_numpy(events)):
        histogram = histogram_mem(
            given_events, height=height, width=width, hot_pixel_stds=num_stds, time_surface=time_surface
        )
        np.testing.assert_allclose(np.asarray(histogram), expected, rtol=1e-6, atol=1e-6)


def test_histogram_channels_by_hand():
    # Pixel (0, 0): 3 ON, 1 OFF; pixel (0, 1): 1 OFF at the end of the window; pixel (1, 2): 40 ON (a hot pixel).
    t = [0, 1, 2, 3, 4] + [5] * 40
    x = [0, 0, 0, 0, 1] + [2] * 40
    y = [0, 0, 0, 0, 0] + [1] * 40
    p = [1, 1, -1, 1, -1] + [1] * 40
    events = make_events(t, x, y, p)
    counts = histogram_ecdp(events, height=2, width=3, normalize=False)
    np.testing.assert_array_equal(counts, [[[3, 0, 0], [0, 0, 40]], [[1, 1, 0], [0, 0, 0]]])
    normalized = histogram_ecdp(events, height=2, width=3)
    np.testing.assert_allclose(normalized[:, 0, 0], [3 / 41, 1 / 2])
    clipped = histogram_ecdp(events, height=2, width=3, clip_hot_pixels=True, normalize=False)
    assert clipped.max() == pytest.approx((3 + 40 + 1 + 1) / 4)  # the mean of the active values
    mem = histogram_mem(events, height=2, width=3, hot_pixel_stds=2.0, time_surface=True)
    np.testing.assert_allclose(mem[0], [[1, 0, 0], [0, 0, 0]])  # hot pixel zeroed, then divided by the max, 3
    np.testing.assert_allclose(mem[2], [[1 / 3, 1 / 3, 0], [0, 0, 0]])
    np.testing.assert_allclose(mem[1], [[3 / 5, 4 / 5, 0], [0, 0, 1]])  # time of each pixel's latest event
    assert not histogram_mem(events, height=2, width=3)[1].any()


@settings(max_examples=30, deadline=None)
@given(st.lists(event_windows(max_events=20), min_size=1, max_size=3), st.booleans())
def test_batched_histograms_equal_one_per_sample(windows, time_surface):
    height = max(w[2] for w in windows)
    width = max(w[3] for w in windows)
    samples = [w[0] for w in windows]
    batch = EventTensors.collate(samples)
    ecdp = histogram_ecdp(batch, height=height, width=width, clip_hot_pixels=True)
    mem = histogram_mem(batch, height=height, width=width, hot_pixel_stds=1.0, time_surface=time_surface)
    for i, events in enumerate(samples):
        expected = histogram_ecdp(events, height=height, width=width, clip_hot_pixels=True)
        np.testing.assert_allclose(ecdp[i].numpy(), expected, atol=1e-6)
        expected = histogram_mem(events, height=height, width=width, hot_pixel_stds=1.0, time_surface=time_surface)
        np.testing.assert_allclose(mem[i].numpy(), expected, atol=1e-6)


def test_empty_histograms_are_zero():
    empty = np.empty(0, EVENT_DTYPE)
    for given_events in (empty, EventTensors.from_numpy(empty)):
        assert not np.asarray(histogram_ecdp(given_events, height=2, width=3, clip_hot_pixels=True)).any()
        assert np.asarray(histogram_mem(given_events, height=2, width=3, time_surface=True)).shape == (3, 2, 3)
        assert not np.asarray(histogram_mem(given_events, height=2, width=3, time_surface=True)).any()


# --- errors and devices --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("representation", [voxel_grid, histogram_ecdp, histogram_mem])
def test_events_outside_the_grid_raise(representation):
    events = make_events([0, 1, 2], [0, 3, 1], [0, 0, 2], [1, 1, 1])
    with pytest.raises(EventFormatError, match=r"event 1 has x=3, y=0, outside the 2x3 \(HxW\) grid"):
        representation(events, height=2, width=3)
    with pytest.raises(EventFormatError, match=r"x spans \[0, 3\], expected values in \[0, 3\)"):
        representation(EventTensors.from_numpy(events), height=3, width=3)
    with pytest.raises(EventFormatError, match="expected a 1-D array of dtype"):
        representation(np.zeros((3, 4)), height=2, width=3)


def test_float_times_raise():
    t, x, y, p = EventTensors.from_numpy(make_events([0, 1], [0, 1], [0, 0], [1, -1]))[:4]
    with pytest.raises(EventFormatError, match="t is torch.float32, expected integer microseconds"):
        voxel_grid(EventTensors(t / 1e6, x, y, p), height=1, width=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    samples = [random_events(5_000, 48, 64, seed) for seed in range(3)]
    batch = EventTensors.collate(samples)
    on_gpu = EventTensors.collate(samples, device="cuda")
    grids = voxel_grid(on_gpu, 5, height=48, width=64)
    assert grids.device.type == "cuda"
    torch.testing.assert_close(grids.cpu(), voxel_grid(batch, 5, height=48, width=64), atol=1e-5, rtol=1e-5)
    for representation in (histogram_ecdp, histogram_mem):
        expected = representation(batch, height=48, width=64)
        torch.testing.assert_close(representation(on_gpu, height=48, width=64).cpu(), expected)
