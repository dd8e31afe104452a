"""The demo and EF-ImageNet builders: real images in, complete and deterministic stores out."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from evpretrain.data.config import DemoConfig, EFConfig
from evpretrain.data.demo import (
    build_demo,
    load_background,
    load_digits_split,
    render_sample,
    saccade_path,
)
from evpretrain.data.ef import build_ef, list_images, merge_ef
from evpretrain.data.store import EventStore, StoreError

SMALL_DEMO = DemoConfig(samples={"train": 6, "val": 2, "test": 2}, image_size=48, digit_size=20, num_frames=5)


def test_render_sample_moves_digit_and_background_as_the_flow_says():
    config = SMALL_DEMO
    (images, labels) = load_digits_split(0)["train"]
    background = load_background("brick", (0.05, 0.5))
    sample = render_sample(images[0], int(labels[0]), background, config, np.random.default_rng(1))
    assert sample.frames.shape == (5, 48, 48) and sample.frames.min() >= 0 and sample.frames.max() <= 1
    assert sample.timestamps_us.tolist() == [round(n * 1e6 / 120) for n in range(5)]
    assert set(np.unique(sample.mask)) == {0, int(labels[0]) + 1}
    # Two motions: background pixels share one displacement, digit pixels another.
    flows = {tuple(np.round(v, 4)) for v in sample.flow.reshape(2, -1).T}
    assert len(flows) == 2
    # Warping the first frame by the background flow reproduces the last frame away from the digit.
    dx, dy = sample.flow[:, 0, 0]
    from scipy import ndimage

    warped = ndimage.shift(sample.frames[0], (dy, dx), order=1)
    far = (ndimage.distance_transform_edt(sample.mask == 0) > 6) & (
        ndimage.distance_transform_edt(np.ones_like(sample.mask)) > 0
    )
    far[:6] = far[-6:] = False
    far[:, :6] = far[:, -6:] = False
    assert np.abs(warped - sample.frames[-1])[far].mean() < 0.02


@given(legs=st.integers(1, 3), frames=st.integers(4, 9), seed=st.integers(0, 2**32 - 1))
def test_a_saccade_runs_its_legs_at_one_speed_turning_120_degrees(legs, frames, seed):
    config = replace(SMALL_DEMO, num_frames=frames, saccade_legs=legs, pan_speed_px_per_frame=(0.5, 1.0))
    pan, digit = saccade_path(config, np.random.default_rng(seed))
    assert pan.shape == digit.shape == (frames, 2) and not pan[0].any() and not digit[0].any()
    velocity = np.diff(pan, axis=0)
    speed = np.linalg.norm(velocity, axis=1)
    assert np.allclose(speed, speed[0]) and 0.5 <= speed[0] <= 1.0
    angles = np.arctan2(velocity[:, 1], velocity[:, 0])
    leg_of_step = np.arange(frames - 1) * legs // (frames - 1)
    turns = np.angle(np.exp(1j * (angles - angles[0])))  # wrapped to (-pi, pi]
    assert np.allclose(np.exp(1j * turns), np.exp(1j * leg_of_step * 2 * np.pi / 3))
    assert len(set(leg_of_step)) == legs  # every leg gets steps
    drift = np.diff(digit - pan, axis=0)  # the digit's own motion: one constant drift
    assert np.allclose(drift, drift[0]) and np.linalg.norm(drift[0]) == pytest.approx(config.digit_drift_px_per_frame)


def test_demo_config_rejects_more_legs_than_steps():
    with pytest.raises(ValueError, match="saccade_legs"):
        replace(SMALL_DEMO, num_frames=3, saccade_legs=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"frame_rate_hz": 0.0}, "frame_rate_hz must lie in (0, 1e6], got 0.0"),
        ({"frame_rate_hz": 2e6}, "frame_rate_hz must lie in (0, 1e6], got 2000000.0"),  # frames < 1 us apart
        ({"digit_intensity": 2.0}, "digit_intensity must lie in [0, 1], got 2.0"),
        ({"background_intensity": (0.5, 0.1)}, "background_intensity must be [low, high] with 0 <= low <= high <= 1"),
        ({"background_intensity": (0.5, 1.5)}, "background_intensity must be [low, high] with 0 <= low <= high <= 1"),
        ({"digit_drift_px_per_frame": -0.1}, "digit_drift_px_per_frame must be >= 0, got -0.1"),
    ],
)
def test_demo_config_rejects_values_the_builder_would_fail_on_or_render_as_nonsense(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(SMALL_DEMO, **change)


def _digit_path_midpoints(config, seeds):
    """(len(seeds), 2) midpoints (x, y) of one digit's path: its last-frame ink centroid minus half its travel."""
    (images, labels) = load_digits_split(0)["train"]
    background = load_background("brick", (0.05, 0.5))
    midpoints = []
    for seed in seeds:
        sample = render_sample(images[0], int(labels[0]), background, config, np.random.default_rng(seed))
        rows, cols = np.nonzero(sample.mask)  # the digit at the last frame
        # The flow holds two displacements; the digit's (dx, dy) since the first frame covers fewer pixels.
        values, counts = np.unique(sample.flow.reshape(2, -1).T, axis=0, return_counts=True)
        travel = values[counts.argmin()]
        midpoints.append((cols.mean() - travel[0] / 2, rows.mean() - travel[1] / 2))
    return np.array(midpoints)


@pytest.mark.parametrize("jitter", [0.0, 2.0])
def test_digit_jitter_bounds_where_the_digit_path_lies(jitter):
    seeds = range(12)
    spread = np.ptp(_digit_path_midpoints(replace(SMALL_DEMO, digit_jitter_px=jitter), seeds), axis=0)
    assert (spread <= 2 * jitter + 1).all(), spread  # 1 px: the mask's threshold moves the ink centroid
    anywhere = np.ptp(_digit_path_midpoints(SMALL_DEMO, seeds), axis=0)
    assert (anywhere > 2 * 2.0 + 1).all(), anywhere  # without a jitter the digit goes anywhere in the frame


def test_build_demo_is_complete_and_deterministic(tmp_path):
    a = build_demo(SMALL_DEMO, tmp_path / "a", workers=2, progress=False)
    b = build_demo(SMALL_DEMO, tmp_path / "b", workers=1, progress=False)
    assert sorted(a) == ["test", "train", "val"]
    for split in a:
        with EventStore(a[split]) as sa, EventStore(b[split]) as sb:
            assert sa.attrs["content_sha256"] == sb.attrs["content_sha256"]  # worker count does not matter
            sa.verify()
            assert len(sa) == SMALL_DEMO.samples[split]
            assert set(sa.fields) >= {"labels", "clean_events", "frames", "diff_maps", "flow", "masks"}
            s = sa.sample(0)
            assert s["frames"].shape == (5, 48, 48) and s["diff_maps"].shape == (4, 48, 48)
            assert s["flow"].shape == (2, 48, 48) and s["masks"].shape == (48, 48)
            assert len(s["events"]) >= len(s["clean_events"]) > 0
            assert sa.attrs["builder_config"]["samples"] == SMALL_DEMO.samples


def test_demo_config_rejects_a_digit_that_cannot_fit():
    with pytest.raises(ValueError, match="does not fit"):
        replace(SMALL_DEMO, image_size=32, digit_size=24)


def _image_folder(root, per_class=3):
    import skimage.data

    sources = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    for name, image in sources.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            crop = image[k * 20 : k * 20 + 200, k * 30 : k * 30 + 260]
            Image.fromarray(crop).save(root / name / f"{name}_{k}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


EF_SMALL = EFConfig(image_size=32, num_frames=4, shard_size=2, keep_frames=True)


def test_build_ef_writes_labelled_samples_and_resumes(tmp_path):
    images = _image_folder(tmp_path / "images")
    paths, labels, classes = list_images(images)
    assert classes == ["cat", "coffee"] and labels == [0, 0, 0, 1, 1, 1] and len(paths) == 6

    first = build_ef(EF_SMALL, images, tmp_path / "a.h5", workers=2, progress=False)
    with EventStore(first) as store:
        store.verify()
        assert len(store) == 6 and store.labels.tolist() == labels
        assert store.names[0] == "cat/cat_0.png"
        sample = store.sample(5)
        assert sample["frames"].dtype == np.uint8 and sample["frames"].shape == (4, 32, 32)
        assert sample["diff_maps"].dtype == np.float16 and len(sample["events"]) > 0
        checksum = store.attrs["content_sha256"]
    assert not (tmp_path / "a.h5.shards").exists()

    # An interrupted build: a finished shard survives, a rerun builds the rest and gives the same store.
    shards = tmp_path / "b.h5.shards"
    import evpretrain.data.ef as ef

    calls = []
    real_job = ef._shard_job

    def crash_after_first(*args):
        if calls:
            raise KeyboardInterrupt("cancelled")
        calls.append(args)
        return real_job(*args)

    ef._shard_job = crash_after_first  # workers=1 runs shards in-process, so the patch applies
    try:
        with pytest.raises(KeyboardInterrupt):
            build_ef(EF_SMALL, images, tmp_path / "b.h5", workers=1, progress=False)
    finally:
        ef._shard_job = real_job
    assert (shards / "shard-000000.h5").exists() and not (tmp_path / "b.h5").exists()
    rebuilt = []
    ef._shard_job = lambda *args: rebuilt.append(args[3]) or real_job(*args)
    try:
        build_ef(EF_SMALL, images, tmp_path / "b.h5", workers=1, progress=False)
    finally:
        ef._shard_job = real_job
    assert rebuilt == [2, 4]  # the finished shard (first image 0) was not built again
    with EventStore(tmp_path / "b.h5") as store:
        assert store.attrs["content_sha256"] == checksum


def _h5_contents(path):
    """{dataset name: array} and {attribute: value} of an HDF5 file, read without the store's reader."""
    import h5py

    arrays = {}

    def read(name, node):  # visititems stops at the first callback that returns something
        if isinstance(node, h5py.Dataset):
            arrays[name] = node[()]

    with h5py.File(path, "r") as f:
        f.visititems(read)
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return arrays, attrs


def test_a_build_split_into_parts_and_merged_is_the_single_build(tmp_path):
    images = _image_folder(tmp_path / "images")  # 6 images: 3 blocks of shard_size 2
    whole_arrays, whole_attrs = _h5_contents(
        build_ef(EF_SMALL, images, tmp_path / "whole.h5", workers=1, progress=False)
    )
    config = replace(EF_SMALL, shards=4)  # how the build is split is not part of the content
    for num_shards, sizes in ((2, [2, 4]), (4, [0, 2, 2, 2])):  # blocks split 1 + 2, and 0 + 1 + 1 + 1
        parts = [
            build_ef(
                config,
                images,
                tmp_path / f"p{num_shards}.{i}.h5",
                shard=i,
                num_shards=num_shards,
                workers=1,
                progress=False,
            )
            for i in range(num_shards)
        ]
        for i, part in enumerate(parts):
            with EventStore(part) as store:
                assert len(store) == sizes[i] and store.attrs["first_index"] == sum(sizes[:i])
        merged = merge_ef(config, parts[::-1], tmp_path / f"merged{num_shards}.h5")  # any order
        arrays, attrs = _h5_contents(merged)
        assert attrs == whole_attrs
        assert arrays.keys() == whole_arrays.keys() and "diff_maps" in arrays and "samples/name" in arrays
        for name, array in arrays.items():
            assert array.dtype == whole_arrays[name].dtype, name
            np.testing.assert_array_equal(array, whole_arrays[name], err_msg=name)

    with pytest.raises(StoreError, match=r"needs parts 0..1 .* got shards \[0, 2\]"):
        merge_ef(config, [tmp_path / "p4.0.h5", tmp_path / "p4.2.h5"], tmp_path / "bad.h5")
    with pytest.raises(StoreError, match="a part of 4 parts, not of the 2 given"):
        merge_ef(config, [tmp_path / "p4.0.h5", tmp_path / "p2.1.h5"], tmp_path / "bad.h5")
    with pytest.raises(StoreError, match="other data.ef settings"):
        merge_ef(replace(config, seed=1), [tmp_path / "p2.0.h5", tmp_path / "p2.1.h5"], tmp_path / "bad.h5")
    with pytest.raises(ValueError, match=r"shard must be in \[0, num_shards = 2\), got 2"):
        build_ef(config, images, tmp_path / "x.h5", shard=2, num_shards=2, workers=1, progress=False)
    assert not (tmp_path / "bad.h5").exists()


def test_build_ef_keeps_the_colour_source_as_clip_preprocesses_it(tmp_path):
    import open_clip
    from torchvision.transforms import Compose

    from evpretrain.teachers import Teacher

    images = _image_folder(tmp_path / "images", per_class=1)
    config = EFConfig(image_size=32, num_frames=3, shard_size=2, keep_rgb=True, rgb_size=24)
    out = build_ef(config, images, tmp_path / "ef.h5", workers=1, progress=False)
    # CLIP's own evaluation transform: Resize(24, bicubic) on the shorter side, CenterCrop(24), ToTensor, Normalize.
    clip_transform = open_clip.image_transform(24, is_train=False)
    normalise = Teacher(
        input_size=(24, 24),
        grid_size=(1, 1),
        embed_dim=1,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        resize_mode="bicubic",
    )
    with EventStore(out) as store:
        assert "rgb" in store.fields and "frames" not in store.fields
        for i, name in enumerate(store.names):
            rgb = store.dense("rgb", i)
            assert rgb.shape == (3, 24, 24) and rgb.dtype == np.uint8
            with Image.open(images / name) as source:
                expected = clip_transform(source)
                unnormalised = Compose(clip_transform.transforms[:-1])(source)  # all but Normalize: [0, 1]
            np.testing.assert_array_equal(rgb, np.round(unnormalised.numpy() * 255).astype(np.uint8))
            image = torch.from_numpy(rgb.astype(np.float32) / 255)[None]
            torch.testing.assert_close(normalise.preprocess(image)[0], expected, atol=1e-5, rtol=0)


def test_build_ef_refuses_to_mix_shards_of_another_config(tmp_path):
    images = _image_folder(tmp_path / "images", per_class=1)
    shards = tmp_path / "c.h5.shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"config": {}, "images": "x", "num_images": 2}')
    with pytest.raises(StoreError, match="another config or image list"):
        build_ef(EF_SMALL, images, tmp_path / "c.h5", workers=1, progress=False)


def test_list_images_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        list_images(tmp_path / "empty")
