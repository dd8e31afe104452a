"""DSEC-Semantic -> labelled event windows, against tiny copies written here in the dataset's real layout.

Every sequence below holds 100 events, k = 0..99, at t = T_OFFSET + 100 k us, raw pixel (x, y) = (k, 2k + 250),
polarity + for odd k. Label j is stamped T_OFFSET + 1000 j + 50 us, so the events before it are k <= 10 j. The
rectification map sends (x, y) to (639.2 - x, y + 30.7): floor -> (639 - k, 2k + 280), nearest -> (639 - k, 2k + 281);
the 440-row crop keeps k < 80 either way.
"""

from dataclasses import replace

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_readers_hdf5 import T_OFFSET, write_dsec

from evpretrain.config import ConfigError
from evpretrain.data.registry import Expectation, convert_sequences, get_dataset, verify_dataset
from evpretrain.data.sequences.dsec_semantic import CLASS_NAMES, LABEL_LAYOUTS, convert, locate_sequence
from evpretrain.data.store import EventStore
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import DsecEvents

K = np.arange(100)


def label_image(j, height=440):
    """Label j: class j % 11 everywhere, with an ignore (255) block in the top-left corner."""
    mask = np.full((height, 640), j % 11, np.uint8)
    mask[:10, :20] = 255
    return mask


def write_sequence(split_dir, name, *, n_labels=10, layout=LABEL_LAYOUTS[0], label_height=440):
    """One sequence as the downloads unpack (or in another of LABEL_LAYOUTS); returns its folder."""
    folder = split_dir / name
    events_dir = folder / "events" / "left"
    events_dir.mkdir(parents=True)
    write_dsec(events_dir / "events.h5", 100 * K, K, 2 * K + 250, K % 2)
    columns, rows = np.meshgrid(np.arange(640.0), np.arange(480.0))
    with h5py.File(events_dir / "rectify_map.h5", "w") as file:
        file.create_dataset("rectify_map", data=np.stack([639.2 - columns, rows + 30.7], axis=-1).astype(np.float32))
    labels_dir, timestamps = folder / layout[0], folder / layout[1].format(sequence=name)
    labels_dir.mkdir(parents=True)
    for j in range(n_labels):
        Image.fromarray(label_image(j, label_height), mode="L").save(labels_dir / f"{j:06d}.png")
    timestamps.write_text("".join(f"{T_OFFSET + 1000 * j + 50}\n" for j in range(n_labels)))
    return folder


def expected_events(ks, *, rounding="floor"):
    ks = np.asarray(ks)
    y = 2 * ks + (280 if rounding == "floor" else 281)
    return [(T_OFFSET + 100 * k, 639 - k, yk, 1 if k % 2 else -1) for k, yk in zip(ks.tolist(), y.tolist())]


def run(root, out, workers=1, **settings):
    settings.setdefault("sequences", {"train": ["zurich_city_00_a"], "test": ["zurich_city_13_a"]})
    return convert(root, out, settings, workers=workers, progress=False)


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "dsec"
    write_sequence(root / "train", "zurich_city_00_a", n_labels=10)
    write_sequence(root / "test", "zurich_city_13_a", n_labels=8)
    return root


def test_windows_hold_the_last_events_before_each_label_rectified_and_cropped(copy, tmp_path):
    settings = {"num_events": 4, "sequences": {"train": ["zurich_city_00_a"], "test": ["zurich_city_13_a"]}}
    written = convert_sequences(
        get_dataset("dsec-semantic"), copy, tmp_path / "out", settings=settings, workers=1, progress=False
    )
    assert [p.name for p in written] == ["train.h5", "test.h5"]
    with EventStore(tmp_path / "out" / "train.h5") as store:
        # labels 6 and 8 (skip 6, every second); label 8's window loses k = 80 to the crop (row 440)
        assert store.names == ["zurich_city_00_a/000006", "zurich_city_00_a/000008"]
        assert store.events(0).tolist() == expected_events([57, 58, 59, 60])
        assert store.events(1).tolist() == expected_events([77, 78, 79])
        np.testing.assert_array_equal(store.dense("masks", 0), label_image(6))
        np.testing.assert_array_equal(store.dense("masks", 1), label_image(8))
        assert store.sensor_size == (440, 640)
        attrs = store.attrs
        assert attrs["split"] == "train" and attrs["class_names"] == list(CLASS_NAMES) and attrs["ignore_label"] == 255
        assert attrs["sequences"] == ["zurich_city_00_a"]
        assert "train/zurich_city_00_a/events/left/events.h5" in attrs["source_files"]
        assert "last 4 events with t < T" in attrs["window_convention"]
        store.verify()
    with EventStore(tmp_path / "out" / "test.h5") as store:
        assert store.names == ["zurich_city_13_a/000006"] and store.attrs["split"] == "test"
        assert store.events(0).tolist() == expected_events([57, 58, 59, 60])


def test_default_protocol_takes_every_event_before_labels_6_8_10(tmp_path):
    write_sequence(tmp_path / "train", "zurich_city_00_a", n_labels=11)
    run(tmp_path, tmp_path / "out", sequences={"train": ["zurich_city_00_a"]})
    with EventStore(tmp_path / "out" / "train.h5") as store:
        assert store.names == [f"zurich_city_00_a/{j:06d}" for j in (6, 8, 10)]
        # fewer than 200,000 events before each label: all of them, k <= 10 j, then the crop keeps k < 80
        assert store.events(0).tolist() == expected_events(range(61))
        assert store.events(1).tolist() == expected_events(range(80))
        assert store.events(2).tolist() == expected_events(range(80))


def test_time_window_keeps_window_us_before_the_label(copy, tmp_path):
    run(copy, tmp_path / "out", window="time", window_us=250)
    with EventStore(tmp_path / "out" / "train.h5") as store:
        # label 6 at t_rel = 6050: 5800 <= t_rel < 6050 holds k = 58, 59, 60
        assert store.events(0).tolist() == expected_events([58, 59, 60])
        assert store.events(1).tolist() == expected_events([78, 79])


def test_nearest_rounding_and_raw_pixels(copy, tmp_path):
    run(copy, tmp_path / "nearest", num_events=4, rounding="nearest")
    with EventStore(tmp_path / "nearest" / "train.h5") as store:
        assert store.events(1).tolist() == expected_events([77, 78, 79], rounding="nearest")
    run(copy, tmp_path / "raw", num_events=4, rectify=False)
    with EventStore(tmp_path / "raw" / "train.h5") as store:
        # raw rows 2k + 250 < 440 for every k <= 94: nothing cropped
        assert store.events(1).tolist() == [
            (T_OFFSET + 100 * k, k, 2 * k + 250, 1 if k % 2 else -1) for k in range(77, 81)
        ]
        assert "raw sensor pixels" in store.attrs["window_convention"]


def test_full_height_labels_are_cropped_like_the_events(tmp_path):
    write_sequence(tmp_path / "train", "zurich_city_00_a", n_labels=7, label_height=480)
    run(tmp_path, tmp_path / "out", num_events=4, sequences={"train": ["zurich_city_00_a"]})
    with EventStore(tmp_path / "out" / "train.h5") as store:
        np.testing.assert_array_equal(store.dense("masks", 0), label_image(6, 480)[:440])


@pytest.mark.parametrize("layout", LABEL_LAYOUTS, ids=[layout[0] for layout in LABEL_LAYOUTS])
def test_every_label_layout_is_found_and_passes_the_registry_checks(tmp_path, layout):
    for split, name in (("train", "zurich_city_00_a"), ("test", "zurich_city_13_a")):
        folder = write_sequence(tmp_path / split, name, n_labels=3, layout=layout)
        files = locate_sequence(tmp_path / split, name)
        assert files.labels == tuple(sorted((folder / layout[0]).glob("*.png")))
        assert files.timestamps_us == tuple(T_OFFSET + 1000 * j + 50 for j in range(3))
    entry = get_dataset("dsec-semantic")
    small = replace(entry, expect=[Expectation(e.glob, 1) for e in entry.expect])
    report = verify_dataset(small, tmp_path)
    assert report.ok, report.format()


def _damage(root, what):
    sequence = root / "train" / "zurich_city_00_a"
    labels, timestamps = sequence / "11classes", sequence / "zurich_city_00_a_semantic_timestamps.txt"
    if what == "sequence":
        return {"sequences": {"train": ["zurich_city_99_a"]}}
    if what == "rectify_map":
        (sequence / "events" / "left" / "rectify_map.h5").unlink()
    elif what == "timestamps":
        timestamps.unlink()
    elif what == "count":
        timestamps.write_text("".join(timestamps.read_text().splitlines(keepends=True)[:-1]))
    elif what == "text":
        lines = timestamps.read_text().splitlines(keepends=True)
        timestamps.write_text("".join(lines[:2] + ["12.5e3\n"] + lines[3:]))
    elif what == "order":
        lines = timestamps.read_text().splitlines(keepends=True)
        timestamps.write_text("".join(lines[:3] + [lines[4], lines[3]] + lines[5:]))
    elif what == "class":
        mask = label_image(8)
        mask[5, 5] = 11
        Image.fromarray(mask, mode="L").save(labels / "000008.png")
    elif what == "rgb":
        Image.fromarray(np.zeros((440, 640, 3), np.uint8)).save(labels / "000006.png")
    elif what == "size":
        Image.fromarray(np.zeros((440, 600), np.uint8), mode="L").save(labels / "000006.png")
    elif what == "png":
        (labels / "000008.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return {}


@pytest.mark.parametrize(
    "what, error, message",
    [
        ("sequence", FileNotFoundError, r"zurich_city_99_a: sequence folder missing"),
        ("rectify_map", FileNotFoundError, r"rectify_map\.h5: missing"),
        (
            "timestamps",
            FileNotFoundError,
            r"zurich_city_00_a: no 11-class labels .* 11classes/\*\.png with "
            r"zurich_city_00_a_semantic_timestamps\.txt",
        ),
        ("count", EventFormatError, r"_semantic_timestamps\.txt: 9 timestamps for 10 label images"),
        ("text", EventFormatError, r"_semantic_timestamps\.txt: line 3 is '12\.5e3', expected an integer"),
        ("order", EventFormatError, r"_semantic_timestamps\.txt: timestamp 5 .* expected increasing"),
        ("class", EventFormatError, r"000008\.png: label ids \[11\] are neither classes 0-10 nor 255"),
        ("rgb", EventFormatError, r"000006\.png: label image has mode RGB .* expected one 8-bit channel"),
        ("size", EventFormatError, r"000006\.png: label image is 600x440, expected 640 wide"),
        ("png", EventFormatError, r"000008\.png: not a readable PNG"),
    ],
)
def test_bad_or_missing_files_name_the_file_and_leave_no_store(copy, tmp_path, what, error, message):
    run(copy, tmp_path / "out", num_events=4)
    before = (tmp_path / "out" / "train.h5").read_bytes()
    overrides = _damage(copy, what)
    with pytest.raises(error, match=message):
        run(copy, tmp_path / "out", num_events=5, **overrides)
    assert (tmp_path / "out" / "train.h5").read_bytes() == before  # the previous store is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.h5", "train.h5"]  # no temporary left


def test_workers_do_not_change_the_stores_and_a_rerun_replaces_them(copy, tmp_path):
    run(copy, tmp_path / "one", num_events=4, workers=1)
    run(copy, tmp_path / "two", num_events=4, workers=2)
    for split in ("train", "test"):
        with EventStore(tmp_path / "one" / f"{split}.h5") as one, EventStore(tmp_path / "two" / f"{split}.h5") as two:
            assert one.attrs["content_sha256"] == two.attrs["content_sha256"]
    run(copy, tmp_path / "one", num_events=2, workers=1)
    with EventStore(tmp_path / "one" / "train.h5") as store:
        assert store.events(0).tolist() == expected_events([59, 60])
        assert store.attrs["builder_config"]["num_events"] == 2


@pytest.mark.parametrize(
    "settings_, message",
    [
        ({"window_size": 4}, r"data\.convert\.dsec-semantic: unknown key\(s\) \['window_size'\]"),
        ({"crop_height": 0}, r"crop_height 0 must lie in \[1, 480\]"),
        ({"window": "frames"}, r"data\.convert\.dsec-semantic\.window: expected one of \['events', 'time'\]"),
        ({"sequences": {"train": []}}, r"non-empty list of sequence names"),
    ],
)
def test_settings_are_checked(copy, tmp_path, settings_, message):
    with pytest.raises(ConfigError, match=message):
        convert(copy, tmp_path / "out", settings_, workers=1, progress=False)


# --- the DsecEvents additions the converter uses -------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 1500), min_size=0, max_size=60),
    end=st.integers(-1000, 60_000),
    count=st.integers(0, 70),
)
def test_last_events_equal_the_last_count_of_the_events_before_the_end(tmp_path_factory, gaps, end, count):
    path = tmp_path_factory.mktemp("dsec") / "events.h5"
    t_rel = np.cumsum(gaps, dtype=np.int64)
    n = len(t_rel)
    write_dsec(path, t_rel, np.arange(n) % 640, np.arange(n) % 480, np.arange(n) % 2)
    with DsecEvents(path) as events:
        every = events.read_all()
        before = every[every["t"] < T_OFFSET + end]
        assert (
            events.last_events(T_OFFSET + end, count).tolist()
            == before[len(before) - min(count, len(before)) :].tolist()
        )


def test_floor_rounding_keeps_exactly_the_positions_inside_the_frame(tmp_path):
    write_dsec(tmp_path / "events.h5", [1, 2, 3, 4], [0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 1, 1])
    rectify_map = np.zeros((480, 640, 2))
    rectify_map[0, :4] = [(-0.2, 5.0), (0.0, 5.9), (639.99, 479.99), (640.0, 3.0)]
    with DsecEvents(tmp_path / "events.h5", rectify_map=rectify_map, rounding="floor") as events:
        assert events.read_all()[["x", "y"]].tolist() == [(0, 5), (639, 479)]
    with DsecEvents(tmp_path / "events.h5", rectify_map=rectify_map) as events:  # nearest stays the default
        assert events.read_all()[["x", "y"]].tolist() == [(0, 5), (0, 6)]
