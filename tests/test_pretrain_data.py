"""The pre-training dataset (voxel grids, targets, density, time flip, workers) and the stage-1 masks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from evpretrain.data.batch_views import apply_views, event_density_batch, pack_events
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.resize import as_size, resize_maps
from evpretrain.data.store import EventStore, EventStoreWriter, StoreError
from evpretrain.data.view import apply_view, view_crop_box
from evpretrain.events.contract import EVENT_DTYPE
from evpretrain.events.representations import voxel_grid
from evpretrain.events.simulator import lin_log
from evpretrain.pretrain.config import PretrainAugment
from evpretrain.pretrain.data import (
    PretrainDataset,
    View,
    collate,
    event_density,
    time_flip,
    view_tokens,
)
from evpretrain.pretrain.masking import (
    make_mask,
    normalized_patch_target,
    num_masked,
    patch_abs_sum,
    patch_density,
    patchify,
    unpatchify,
)

TINY_DEMO = DemoConfig(samples={"train": 6}, image_size=48, digit_size=20, num_frames=4)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_demo(TINY_DEMO, tmp_path_factory.mktemp("demo"), workers=1, progress=False)["train"]


def random_events(rng, n, height, width, t_max=50_000):
    events = np.empty(n, EVENT_DTYPE)
    events["t"] = np.sort(rng.integers(0, t_max, n))
    events["x"] = rng.integers(0, width, n)
    events["y"] = rng.integers(0, height, n)
    events["p"] = rng.choice(np.array([-1, 1], np.int8), n)
    return events


def reversed_in_time(events):
    """The same events played backwards: times mirrored in the window, order reversed, polarity flipped."""
    out = events[::-1].copy()
    out["t"] = events["t"][0] + events["t"][-1] - out["t"]
    out["p"] = -out["p"]
    return out


# --- the dataset ------------------------------------------------------------------------------------------------


def test_sample_fields_shapes_and_dtypes(store_path):
    dataset = PretrainDataset(store_path, with_image=True, image_size=(40, 56))
    sample = dataset[2]
    assert len(dataset) == 6
    expected = {
        "voxel": ((5, 48, 48), torch.float32),
        "target_difference": ((1, 48, 48), torch.float32),
        "target_frame": ((1, 48, 48), torch.float32),
        "density": ((48, 48), torch.float32),
        "label": ((), torch.int64),
        "index": ((), torch.int64),
        "image": ((3, 40, 56), torch.float32),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in sample.items()} == expected
    with EventStore(store_path) as store:
        events, frames = store.events(2), store.dense("frames", 2)
        assert int(sample["label"]) == int(store.labels[2]) and int(sample["index"]) == 2
    np.testing.assert_array_equal(sample["voxel"].numpy(), voxel_grid(events, 5, height=48, width=48))
    np.testing.assert_array_equal(sample["target_frame"][0].numpy(), frames[-1])
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    assert torch.equal(sample["image"][0], sample["image"][2])  # grey in three channels


def test_target_difference_is_the_log_intensity_change_over_the_window(store_path):
    dataset = PretrainDataset(store_path)
    with EventStore(store_path) as store:
        threshold = store.attrs["builder_config"]["simulator"]["linear_threshold"]
        for index in range(len(store)):
            frames = store.dense("frames", index)
            expected = lin_log(frames[-1], threshold) - lin_log(frames[0], threshold)
            np.testing.assert_allclose(dataset[index]["target_difference"][0].numpy(), expected, atol=1e-5)


def test_density_counts_every_event_at_its_pixel(store_path):
    dataset = PretrainDataset(store_path)
    with EventStore(store_path) as store:
        for index in range(len(store)):
            events = store.events(index)
            density = dataset[index]["density"].numpy()
            assert density.sum() == len(events) > 0
            pixels = np.unique(np.stack([events["y"], events["x"]], axis=1), axis=0)
            np.testing.assert_array_equal(np.argwhere(density > 0), pixels)


def test_resized_input_interpolates_the_maps_and_keeps_the_event_count(store_path):
    native = PretrainDataset(store_path)
    for size in [(32, 24), (64, 64)]:
        resized = PretrainDataset(store_path, input_size=size)
        a, b = native[1], resized[1]
        assert b["voxel"].shape == (5, *size) and b["density"].shape == size and b["target_frame"].shape == (1, *size)
        for key in ("voxel", "target_difference", "target_frame"):
            expected = F.interpolate(a[key][None], size=size, mode="bilinear", antialias=True)[0]
            torch.testing.assert_close(b[key], expected)
        assert float(b["density"].sum()) == float(a["density"].sum())
        flipped = PretrainDataset(store_path, input_size=size, augment=PretrainAugment(time_flip_p=1.0))[1]
        torch.testing.assert_close(flipped["voxel"], time_flip(b["voxel"]))


def test_event_density_maps_sensor_pixels_onto_the_grid():
    events = np.zeros(4, EVENT_DTYPE)
    events["x"] = [0, 1, 2, 5]
    events["y"] = [0, 0, 3, 3]
    density = event_density(events, sensor_size=(4, 6), size=(2, 3))
    np.testing.assert_array_equal(density, [[2, 0, 0], [0, 1, 1]])


def test_resized_maps_keep_per_pixel_values_and_sizes_read_as_pairs():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    assert resize_maps(maps, (4, 4)) is maps
    torch.testing.assert_close(resize_maps(torch.full((2, 4, 6), 3.0), (2, 3)), torch.full((2, 2, 3), 3.0))
    assert resize_maps(maps, (8, 8)).shape == (1, 8, 8)
    assert as_size(5) == (5, 5) and as_size([3, 4]) == (3, 4)
    with pytest.raises(ValueError, match="expected a positive size"):
        as_size((0, 4))


def test_time_flip_reverses_bins_and_negates_voxel_and_difference(store_path):
    plain = PretrainDataset(store_path, with_image=True, image_size=48)
    flipped = PretrainDataset(store_path, augment=PretrainAugment(time_flip_p=1.0), with_image=True, image_size=48)
    with EventStore(store_path) as store:
        for index in range(len(store)):
            a, b = plain[index], flipped[index]
            assert flipped.is_flipped(index) and not plain.is_flipped(index)
            torch.testing.assert_close(b["voxel"], time_flip(a["voxel"]))
            # The flipped grid is the grid of the window played backwards with flipped polarity.
            backwards = voxel_grid(reversed_in_time(store.events(index)), 5, height=48, width=48)
            np.testing.assert_allclose(b["voxel"].numpy(), backwards, atol=1e-5)
            torch.testing.assert_close(b["target_difference"], -a["target_difference"])
            np.testing.assert_array_equal(b["target_frame"][0].numpy(), store.dense("frames", index)[0])
            for key in ("density", "image", "label", "index"):
                assert torch.equal(a[key], b[key])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(2, 400), bins=st.integers(2, 7))
def test_time_flip_equals_voxel_grid_of_reversed_events(seed, count, bins):
    events = random_events(np.random.default_rng(seed), count, height=7, width=9)
    grid = torch.from_numpy(voxel_grid(events, bins, height=7, width=9))
    backwards = voxel_grid(reversed_in_time(events), bins, height=7, width=9)
    np.testing.assert_allclose(time_flip(grid).numpy(), backwards, atol=1e-5)
    assert torch.equal(time_flip(time_flip(grid)), grid)


def test_time_flips_are_deterministic_per_seed_epoch_and_index(store_path):
    def draws(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset.is_flipped(i) for i in range(len(dataset))]

    a = PretrainDataset(store_path, augment=PretrainAugment(time_flip_p=0.5), seed=3)
    b = PretrainDataset(store_path, augment=PretrainAugment(time_flip_p=0.5), seed=3)
    epochs = [draws(a, e) for e in range(8)]
    assert epochs == [draws(b, e) for e in range(8)]
    assert len({tuple(e) for e in epochs}) > 1  # the epoch changes the draws
    assert epochs != [
        draws(PretrainDataset(store_path, augment=PretrainAugment(time_flip_p=0.5), seed=4), e) for e in range(8)
    ]
    assert 0.2 < np.mean(epochs) < 0.8
    a.set_epoch(5)
    sample = a[4]
    assert torch.equal(sample["voxel"], a[4]["voxel"])
    plain = PretrainDataset(store_path)[4]["voxel"]
    torch.testing.assert_close(sample["voxel"], time_flip(plain) if a.is_flipped(4) else plain)


def test_views_are_deterministic_per_seed_epoch_and_index(store_path):
    augment = PretrainAugment(crop_scale=(0.5, 1.0), hflip_p=0.5, time_flip_p=0.5)

    def views(seed):
        dataset = PretrainDataset(store_path, window="interval", augment=augment, seed=seed)
        out = []
        for epoch in range(4):
            dataset.set_epoch(epoch)
            out.append([dataset.view(i) for i in range(len(dataset))])
        return out, dataset

    first, dataset = views(3)
    assert first == views(3)[0] and first != views(4)[0]
    assert len({v.crop for e in first for v in e}) > 10 and {v.interval for e in first for v in e} == {0, 1, 2}
    sample = dataset[2]  # epoch 3
    assert all(torch.equal(sample[k], dataset[2][k]) for k in sample)


def test_data_loader_workers_give_the_in_process_batches(store_path):
    augment = PretrainAugment(crop_scale=(0.5, 1.0), hflip_p=0.5, time_flip_p=0.5)
    dataset = PretrainDataset(store_path, window="interval", augment=augment, seed=1)
    dataset[0]  # an open handle in the parent must not leak into the workers
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate, persistent_workers=True)
    draws = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        draws.append([dataset.view(i) for i in range(len(dataset))])
    assert draws[0] != draws[1]  # else a stale epoch in the workers would go unnoticed
    for epoch in range(2):
        dataset.set_epoch(epoch)  # reaches the persistent workers through shared memory
        batches = list(loader)
        expected = [collate([dataset[i] for i in range(s, s + 3)]) for s in (0, 3)]
        assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
        assert batches[0]["voxel"].shape == (3, 5, 48, 48) and batches[0]["target_difference"].shape == (3, 1, 48, 48)
        for got, want in zip(batches, expected):
            assert got.keys() == want.keys()
            for key in got:
                assert torch.equal(got[key], want[key]), (epoch, key)


def test_store_without_frames_or_labels(tmp_path):
    path = tmp_path / "bare.h5"
    rng = np.random.default_rng(0)
    with EventStoreWriter(path, sensor_size=(16, 16), source="test") as writer:
        writer.add_sample(random_events(rng, 50, 16, 16), diff_maps=np.zeros((2, 16, 16), np.float16))
    sample = PretrainDataset(path)[0]
    assert set(sample) == {"voxel", "target_difference", "density", "label", "index"}
    assert int(sample["label"]) == -1 and sample["target_difference"].dtype == torch.float32
    with pytest.raises(StoreError, match="needs frames"):
        PretrainDataset(path, with_image=True)
    with pytest.raises(IndexError):
        PretrainDataset(path)[1]


def test_uint8_frames_as_ef_stores_keep_them(tmp_path):
    path = tmp_path / "ef.h5"
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    with EventStoreWriter(path, sensor_size=(16, 16), source="test") as writer:
        writer.add_sample(random_events(rng, 50, 16, 16), label=7, frames=frames)
    sample = PretrainDataset(path, with_image=True, image_size=16, augment=PretrainAugment(time_flip_p=1.0))[0]
    assert int(sample["label"]) == 7 and "target_difference" not in sample
    torch.testing.assert_close(sample["target_frame"][0], torch.from_numpy(frames[0] / 255.0).float())
    torch.testing.assert_close(sample["image"][1], torch.from_numpy(frames[-1] / 255.0).float())


# --- the device path: workers read, the device transforms ------------------------------------------------------


def assert_same_batch(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        # The voxel grids differ by float32 rounding (numba's float64 bin position, another order of additions);
        # everything else is the same operations on the same values.
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("augment", [PretrainAugment(), PretrainAugment((0.3, 0.9), hflip_p=0.5, time_flip_p=0.5)])
@pytest.mark.parametrize("window", ["clip", "interval"])
@pytest.mark.parametrize(
    "resize, target_resize", [("nearest", "bicubic"), ("bilinear", "bilinear"), ("scale_events", "bicubic")]
)
def test_device_transforms_give_the_worker_batch(store_path, resize, target_resize, window, augment, size):
    options = dict(
        input_size=size,
        window=window,
        augment=augment,
        resize=resize,
        target_resize=target_resize,
        with_image=True,
        image_size=40,
        seed=3,
    )
    worker = PretrainDataset(store_path, **options)
    device = PretrainDataset(store_path, transforms="device", **options)
    for epoch in range(2):  # several draws of every flip and crop
        worker.set_epoch(epoch), device.set_epoch(epoch)
        want = collate([worker[i] for i in range(len(worker))])
        assert_same_batch(device.batch_views()(collate([device[i] for i in range(len(device))])), want)


def test_device_parts_are_the_raw_reads_and_collate_packs_the_events(tmp_path):
    events, diff_maps, frames = interval_store(tmp_path / "s.h5")
    dataset = PretrainDataset(
        tmp_path / "s.h5",
        window="interval",
        transforms="device",
        with_image=True,
        augment=PretrainAugment(time_flip_p=1),
    )
    view = dataset.view(0)
    parts = dataset[0]
    assert set(parts) == {"events", "view", "label", "index", "difference", "frame", "image_frame"}
    assert parts["view"].tolist() == [0, 0, 6, 8, 0, 1]
    np.testing.assert_array_equal(parts["difference"].numpy(), diff_maps[view.interval][None])  # one map, not negated
    np.testing.assert_array_equal(parts["frame"].numpy(), frames[view.interval])  # time-flipped: the window's start
    np.testing.assert_array_equal(parts["image_frame"].numpy(), frames[view.interval + 1])
    window = events[(events["y"] == PIXELS[view.interval][0]) & (events["x"] == PIXELS[view.interval][1])]
    np.testing.assert_array_equal(parts["events"], window)
    batch = collate([parts, dataset[0]])
    packed = batch["events"]
    assert packed["count"].tolist() == [len(window)] * 2
    assert packed["x"].dtype == torch.int16 and packed["p"].dtype == torch.int8
    assert packed["t"].tolist() == window["t"].tolist() * 2 and packed["y"].tolist() == window["y"].tolist() * 2
    assert batch["view"].shape == (2, 6) and batch["difference"].shape == (2, 1, 6, 8)


def test_device_transforms_on_an_ef_store_and_teacher_tokens_pass_through(tmp_path):
    path = tmp_path / "ef.h5"
    rng = np.random.default_rng(2)
    with EventStoreWriter(path, sensor_size=(16, 20), source="test", attrs={"frame_rate_hz": 100.0}) as writer:
        for label in range(3):
            writer.add_sample(
                random_events(rng, 80, 16, 20),
                label=label,
                frames=rng.integers(0, 256, (3, 16, 20), dtype=np.uint8),
                diff_maps=rng.normal(size=(2, 16, 20)).astype(np.float16),
            )
    options = dict(input_size=32, augment=PretrainAugment((0.5, 0.9), 0.5, 0.5), with_image=True, image_size=24)
    worker, device = PretrainDataset(path, **options), PretrainDataset(path, transforms="device", **options)
    teacher = torch.randn(3, 4, 8)
    want = collate([worker[i] | {"teacher": teacher[i]} for i in range(3)])
    got = device.batch_views()(collate([device[i] | {"teacher": teacher[i]} for i in range(3)]))
    assert collate([device[0]])["frame"].dtype == torch.uint8  # read as stored; converted on the device
    assert_same_batch(got, want)


def test_batched_views_and_density_equal_the_per_sample_ones():
    rng = np.random.default_rng(4)
    maps = torch.randn(5, 2, 12, 16)
    crops = [(0, 0, 12, 16), (1, 2, 6, 9), (3, 4, 6, 9), (2, 0, 10, 5), (0, 0, 12, 16)]  # two pairs of equal sizes
    hflips = torch.tensor([False, True, False, True, True])
    for mode in ("nearest", "bilinear", "bicubic"):
        got = apply_views(maps, crops, hflips, (7, 20), mode)
        for i, crop in enumerate(crops):
            torch.testing.assert_close(
                got[i], apply_view(maps[i], crop, (7, 20), bool(hflips[i]), mode), rtol=0, atol=0
            )
    samples = [random_events(rng, n, 12, 16) for n in (30, 0, 50, 40, 20)]
    density = event_density_batch(
        pack_events(samples), (12, 16), (8, 8), (24, 32), [(c[0] * 2, c[1] * 2, *c[2:]) for c in crops]
    )
    for i, events in enumerate(samples):
        crop = (crops[i][0] * 2, crops[i][1] * 2, *crops[i][2:])
        expected = event_density(events, (12, 16), (8, 8), grid_size=(24, 32), crop=crop)
        np.testing.assert_array_equal(density[i].numpy(), expected)
    assert density.sum() < sum(map(len, samples))  # some events fall outside their crops: left out


def test_device_transforms_need_int16_pixels(tmp_path):
    path = tmp_path / "wide.h5"
    with EventStoreWriter(path, sensor_size=(2, 40000), source="test") as writer:
        writer.add_sample(random_events(np.random.default_rng(0), 5, 2, 40000))
    with pytest.raises(StoreError, match="int16"):
        PretrainDataset(path, transforms="device")
    with pytest.raises(ValueError, match="transforms must be one of"):
        PretrainDataset(path, transforms="gpu")


# --- masks and patches ------------------------------------------------------------------------------------------


def test_patch_density_sums_each_patch():
    density = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    per_patch = patch_density(density, 2)
    assert per_patch.shape == (2, 6)
    assert per_patch[0, 0] == 0 + 1 + 6 + 7 and per_patch[0, 5] == 16 + 17 + 22 + 23
    assert torch.equal(per_patch.sum(1), density.sum((1, 2)))
    with pytest.raises(ValueError, match="does not split"):
        patch_density(density, 4)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["random", "densest", "sparsest"]),
    batch=st.integers(1, 4),
    patches=st.integers(1, 50),
    ratio=st.floats(0, 1),
    levels=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_masks_hide_exactly_their_share_and_the_right_patches(kind, batch, patches, ratio, levels, seed):
    # Few distinct levels: many ties between equal densities.
    density = torch.randint(0, levels, (batch, patches), generator=torch.Generator().manual_seed(seed)).float()
    mask = make_mask(kind, density, ratio, torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool and mask.shape == (batch, patches)
    assert (mask.sum(1) == num_masked(patches, ratio)).all()
    for row, hidden in zip(density, mask):
        if hidden.all() or not hidden.any():
            continue
        if kind == "densest":
            assert row[hidden].min() >= row[~hidden].max()
        elif kind == "sparsest":
            assert row[hidden].max() <= row[~hidden].min()


def test_mask_ties_are_random_but_reproducible():
    flat = torch.zeros(64, 100)
    first = make_mask("densest", flat, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(first, make_mask("densest", flat, 0.5, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, make_mask("densest", flat, 0.5, torch.Generator().manual_seed(1)))
    # Over many rows every patch is masked about half the time: no position is preferred.
    frequency = first.float().mean(0)
    assert 0.2 < float(frequency.min()) and float(frequency.max()) < 0.8
    # The densest of a real density: the masked patches are those with the most events.
    density = torch.tensor([[5.0, 0, 9, 1, 9, 2]])
    assert make_mask("densest", density, 0.5).tolist() == [[True, False, True, False, True, False]]
    assert make_mask("sparsest", density, 0.5).tolist() == [[False, True, False, True, False, True]]


def test_patch_abs_sum_is_the_papers_score_where_on_and_off_cancel():
    voxel = torch.zeros(1, 2, 4, 4)  # 2 bins, 2x2 patches of 2x2 pixels
    voxel[0, :, 0, 0] = torch.tensor([1.0, -1.0])  # as many ON as OFF: |sum| 0
    voxel[0, :, 0, 1] = torch.tensor([2.0, 1.0])  # 3
    voxel[0, :, 1, 0] = torch.tensor([-1.0, -1.0])  # 2
    voxel[0, :, 2, 0] = torch.tensor([0.5, 0.0])  # 0.5, patch (1, 0)
    voxel[0, :, 3, 3] = torch.tensor([-3.0, 1.0])  # 2, patch (1, 1)
    voxel[0, :, 2, 2] = torch.tensor([1.0, 1.0])  # 2
    score = patch_abs_sum(voxel, 2)
    assert score.tolist() == [[(0 + 3 + 2 + 0) / 4, 0.0, 0.5 / 4, (2 + 2) / 4]]
    with pytest.raises(ValueError, match="does not split"):
        patch_abs_sum(voxel, 3)


def their_density_mask(voxel: torch.Tensor, patch_size: int, ratio: float, strategy: str) -> torch.Tensor:
    """BIT-Vision/EventPretrain model/backbone/vit.py:72-105 (random_masking, density strategies), transcribed."""
    batch, _, height, width = voxel.shape
    num_patches = (height // patch_size) * (width // patch_size)
    len_keep = int(num_patches * (1 - ratio))
    sum_events = abs(torch.sum(voxel, dim=1))
    density = torch.nn.AvgPool2d(patch_size, patch_size)(sum_events).flatten(1)
    noise = density if strategy == "density" else -density
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones([batch, num_patches])
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore).bool()


@pytest.mark.parametrize("kind, strategy", [("densest", "density"), ("sparsest", "anti-density")])
def test_argsort_ties_mask_what_the_papers_code_masks(kind, strategy):
    # Sparse grids with cancelling polarities: most patches score 0 and their order is torch.argsort's.
    generator = torch.Generator().manual_seed(0)
    voxel = torch.randint(-1, 2, (4, 3, 16, 16), generator=generator).float()
    voxel *= torch.rand(4, 1, 16, 16, generator=generator) < 0.05
    score = patch_abs_sum(voxel, 4)
    assert (score == 0).sum() > 16  # many ties
    mask = make_mask(kind, score, 0.5, ties="argsort")
    assert torch.equal(mask, their_density_mask(voxel, 4, 0.5, strategy))
    assert torch.equal(mask, make_mask(kind, score, 0.5, ties="argsort"))  # no draw: the same every time


def test_make_mask_rejects_unknown_kind_and_ratio():
    with pytest.raises(ValueError, match="mask kind"):
        make_mask("dense", torch.zeros(1, 4), 0.5)
    with pytest.raises(ValueError, match="mask ratio"):
        make_mask("random", torch.zeros(1, 4), 1.5)
    with pytest.raises(ValueError, match="ties must be 'random' or 'argsort', got 'stable'"):
        make_mask("densest", torch.zeros(1, 4), 0.5, ties="stable")


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), channels=st.integers(1, 5), p=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4)
)
def test_patchify_round_trip(batch, channels, p, h, w):
    images = torch.randn(batch, channels, h * p, w * p)
    patches = patchify(images, p)
    assert patches.shape == (batch, h * w, p * p * channels)
    assert torch.equal(unpatchify(patches, p, (h, w)), images)


def test_patchify_layout_is_maes():
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(images, 2)
    # Patch 1 is the top-right 2x2 block; its vector runs over rows, then columns, then channels.
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    assert torch.equal(unpatchify(patches, 2), images)


def test_normalized_patch_target_standardises_each_patch():
    target = torch.randn(2, 1, 8, 8) * 3 + 5
    target[0, 0, :4, :4] = 2.0  # a constant patch
    normalised = normalized_patch_target(target, 4)
    assert normalised.shape == (2, 4, 16) and normalised.dtype == torch.float32
    assert torch.equal(normalised[0, 0], torch.zeros(16))
    torch.testing.assert_close(normalised[:, 1:].mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised[:, 1:].var(-1), torch.ones(2, 3), atol=1e-3, rtol=0)


# --- windows, views and resizing (the paper's sample) -------------------------------------------------------------


class LegacyRng:
    """numpy's global random state behind a Generator's method names: the stream the paper's code draws from."""

    def uniform(self, low, high):
        return np.random.uniform(low, high)

    def integers(self, low, high):
        return np.random.randint(low, high)


def their_view_crop(view, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
    """BIT-Vision/EventPretrain dataset/augmentation/view_augment.py:9-33, verbatim but for names."""
    sensor_h, sensor_w = view.shape[1], view.shape[2]
    area = sensor_w * sensor_h
    for _ in range(10):
        target_area = np.random.uniform(*scale) * area
        aspect_ratio = np.random.uniform(sensor_w / sensor_h * ratio[0], sensor_w / sensor_h * ratio[1])
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if np.random.randint(0, 10) < 5:
            crop_width, crop_height = crop_height, crop_width
        if crop_width < sensor_w and crop_height < sensor_h:
            crop_start_x = np.random.randint(0, sensor_w - crop_width)
            crop_start_y = np.random.randint(0, sensor_h - crop_height)
            view = view[:, crop_start_y : crop_start_y + crop_height, crop_start_x : crop_start_x + crop_width]
            break
    return view


@pytest.mark.parametrize("size, scale", [((48, 64), (0.8, 1.0)), ((30, 30), (0.3, 0.6)), ((20, 50), (0.5, 1.0))])
def test_crop_box_draws_the_paper_crop(size, scale):
    view = torch.arange(size[0] * size[1]).reshape(1, *size)  # every pixel its own value: a crop shows where it is
    for seed in range(200):
        np.random.seed(seed)
        expected = their_view_crop(view, scale)
        np.random.seed(seed)
        top, left, height, width = view_crop_box(size, scale, LegacyRng())
        assert torch.equal(view[:, top : top + height, left : left + width], expected)
    assert view_crop_box(size, (1.0, 1.0), np.random.default_rng(0)) == (0, 0, *size)


def test_resize_nearest_takes_pixel_floor_of_the_scaled_index():
    maps = torch.arange(8.0).reshape(1, 2, 4)
    assert resize_maps(maps, (1, 2), "nearest").tolist() == [[[0.0, 2.0]]]
    assert resize_maps(maps, (4, 8), "nearest")[0, :, :3].tolist() == [[0, 0, 1], [0, 0, 1], [4, 4, 5], [4, 4, 5]]
    with pytest.raises(ValueError, match="resize mode must be one of"):
        resize_maps(maps, (1, 2), "area")


def interval_store(path, rate_hz=1000.0):
    """Sensor 6x8, 4 frames 1 ms apart: interval i's events sit at pixel PIXELS[i] only (one at each boundary)."""
    rng = np.random.default_rng(0)
    times = [np.r_[0, rng.integers(1, 1000, 9)], np.r_[1000, rng.integers(1001, 2000, 6)], np.r_[3000, 2000, 2500]]
    events = np.zeros(sum(map(len, times)), EVENT_DTYPE)
    events["t"] = np.concatenate(times)
    events["y"], events["x"] = np.repeat(np.array(PIXELS).T, [len(t) for t in times], axis=1)
    events["p"] = rng.choice(np.array([-1, 1], np.int8), len(events))
    events = events[np.argsort(events["t"], kind="stable")]
    diff_maps = rng.normal(size=(3, 6, 8)).astype(np.float32)
    frames = rng.uniform(size=(4, 6, 8)).astype(np.float32)
    attrs = {} if rate_hz is None else {"frame_rate_hz": rate_hz}
    with EventStoreWriter(path, sensor_size=(6, 8), source="test", attrs=attrs) as writer:
        writer.add_sample(events, label=3, diff_maps=diff_maps, frames=frames)
    return events, diff_maps, frames


PIXELS = [(1, 1), (2, 5), (4, 6)]


def test_interval_window_gives_one_intervals_grid_and_targets(tmp_path):
    events, diff_maps, frames = interval_store(tmp_path / "s.h5")
    dataset = PretrainDataset(tmp_path / "s.h5", num_bins=3, window="interval")
    flipped = PretrainDataset(tmp_path / "s.h5", num_bins=3, window="interval", augment=PretrainAugment(time_flip_p=1))
    assert dataset.num_intervals == 3
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        flipped.set_epoch(epoch)
        i = dataset.view(0).interval
        seen.add(i)
        inside = (events["t"] >= 1000 * i) & ((events["t"] < 1000 * (i + 1)) | (i == 2))
        assert set(zip(events["y"][inside], events["x"][inside])) == {PIXELS[i]}
        sample = dataset[0]
        np.testing.assert_array_equal(sample["voxel"].numpy(), voxel_grid(events[inside], 3, height=6, width=8))
        np.testing.assert_array_equal(sample["target_difference"][0].numpy(), diff_maps[i])
        np.testing.assert_array_equal(sample["target_frame"][0].numpy(), frames[i + 1])
        assert sample["density"][PIXELS[i]] == inside.sum() == sample["density"].sum()
        reverse = flipped[0]  # the same interval, played backwards: it ends at the interval's first frame
        assert flipped.view(0).interval == i
        torch.testing.assert_close(reverse["voxel"], time_flip(sample["voxel"]))
        np.testing.assert_array_equal(reverse["target_difference"][0].numpy(), -diff_maps[i])
        np.testing.assert_array_equal(reverse["target_frame"][0].numpy(), frames[i])
    assert seen == {0, 1, 2}


def test_interval_window_needs_the_frame_rate(tmp_path):
    interval_store(tmp_path / "s.h5", rate_hz=None)
    with pytest.raises(StoreError, match="pretrain.data.window: interval needs the frame times"):
        PretrainDataset(tmp_path / "s.h5", window="interval")
    with pytest.raises(ValueError, match=r"pretrain.data.resize must be one of \['nearest'"):
        PretrainDataset(tmp_path / "s.h5", resize="area")


def polarity_sum_store(path, size=(12, 16)):
    """One bin's voxel grid is each pixel's polarity sum: a store whose difference map is exactly that sum."""
    rng = np.random.default_rng(5)
    events = random_events(rng, 400, *size)
    total = np.zeros(size, np.float32)
    np.add.at(total, (events["y"], events["x"]), events["p"])
    with EventStoreWriter(path, sensor_size=size, source="test", attrs={"frame_rate_hz": 20.0}) as writer:
        writer.add_sample(events, diff_maps=total[None])
    return events, total


def test_one_view_moves_grid_target_and_density_alike(tmp_path):
    events, total = polarity_sum_store(tmp_path / "s.h5")
    augment = PretrainAugment(crop_scale=(0.3, 0.9), hflip_p=0.5, time_flip_p=0.5)
    dataset = PretrainDataset(tmp_path / "s.h5", num_bins=1, input_size=(9, 10), augment=augment)
    views = []
    for epoch in range(16):
        dataset.set_epoch(epoch)
        view, sample = dataset.view(0), dataset[0]
        views.append(view)
        torch.testing.assert_close(sample["voxel"], sample["target_difference"])  # the same map, moved alike
        top, left, height, width = view.crop
        assert (height, width) != (12, 16)
        expected = F.interpolate(
            torch.from_numpy(total[top : top + height, left : left + width])[None, None],
            size=(9, 10),
            mode="bilinear",
            antialias=True,
        )[0]
        expected = expected.flip(-1) if view.hflip else expected
        torch.testing.assert_close(sample["target_difference"], -expected if view.time_flip else expected)
        inside = (
            (events["y"] >= top) & (events["y"] < top + height) & (events["x"] >= left) & (events["x"] < left + width)
        )
        assert float(sample["density"].sum()) == inside.sum()
        column = np.flatnonzero(sample["density"].sum(0).numpy())
        first = (events["x"][inside].min() - left) * 10 // width
        assert (column.max() == 9 - first) if view.hflip else (column.min() == first)
    assert {v.hflip for v in views} == {True, False} and {v.time_flip for v in views} == {True, False}


def test_nearest_and_scale_events_resizing(tmp_path):
    events, _ = polarity_sum_store(tmp_path / "s.h5")
    sensor = torch.from_numpy(voxel_grid(events, 2, height=12, width=16))
    nearest = PretrainDataset(tmp_path / "s.h5", num_bins=2, input_size=(5, 7), resize="nearest")[0]["voxel"]
    rows, cols = np.arange(5) * 12 // 5, np.arange(7) * 16 // 7
    torch.testing.assert_close(nearest, sensor[:, rows][:, :, cols])
    # Event coordinates halved before the grid: each input pixel sums its 2x2 sensor pixels.
    scaled = PretrainDataset(tmp_path / "s.h5", num_bins=2, input_size=(6, 8), resize="scale_events")[0]
    torch.testing.assert_close(scaled["voxel"], F.avg_pool2d(sensor, 2) * 4)
    assert scaled["target_difference"].shape == (1, 6, 8)


def test_event_density_inside_a_crop():
    events = np.zeros(5, EVENT_DTYPE)
    events["x"] = [0, 2, 3, 5, 7]
    events["y"] = [1, 1, 2, 3, 0]
    # Crop rows 1-3, columns 2-5 of an 4x8 sensor onto a 3x2 grid: x in {2, 3} -> column 0, {4, 5} -> column 1.
    density = event_density(events, (4, 8), (3, 2), crop=(1, 2, 3, 4))
    np.testing.assert_array_equal(density, [[1, 0], [1, 0], [0, 1]])
    # On a grid half the sensor's (scale_events): sensor (y, x) (2, 3) -> (1, 1) and (3, 5) -> (1, 2), the only two in
    # the crop of row 1, columns 1-2; (1, 2) -> (0, 1) is not.
    np.testing.assert_array_equal(event_density(events, (4, 8), (1, 2), grid_size=(2, 4), crop=(1, 1, 1, 2)), [[1, 1]])


def test_view_tokens_follow_crop_and_flip():
    # 4x4 tokens over a 16x16 view; token (i, j) holds its centre's pixel coordinates (y, x).
    centres = (torch.arange(4.0) + 0.5) * 4
    tokens = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(16, 2)
    same = View(None, (0, 0, 16, 16), False, True)
    assert torch.equal(view_tokens(tokens, (4, 4), same, (16, 16)), tokens)
    mirrored = view_tokens(tokens, (4, 4), View(None, (0, 0, 16, 16), True, False), (16, 16)).reshape(4, 4, 2)
    assert torch.equal(mirrored, tokens.reshape(4, 4, 2).flip(1))
    # The crop rows 2-10, columns 4-12: its cells' centres, where linear values interpolate exactly.
    cropped = view_tokens(tokens, (4, 4), View(None, (2, 4, 8, 8), False, False), (16, 16)).reshape(4, 4, 2)
    torch.testing.assert_close(cropped[:, 0, 0], torch.tensor([3.0, 5.0, 7.0, 9.0]))
    torch.testing.assert_close(cropped[0, :, 1], torch.tensor([5.0, 7.0, 9.0, 11.0]))
