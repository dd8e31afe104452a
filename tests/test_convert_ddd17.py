"""DDD17 (ESS release) -> labelled event windows, on tiny copies written here in the release's real layout."""

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evpretrain.config import ConfigError
from evpretrain.data.registry import convert_sequences, get_dataset
from evpretrain.data.sequences.ddd17 import CLASS_NAMES, convert, last_events_in_crop
from evpretrain.data.store import EventStore
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import Ddd17Events

FOLDERS = {"dir0": 0, "dir1": 1, "dir3": 3, "dir4": 4, "dir5": 5, "dir6": 6, "dir7": 7}
OUTSIDE = (3, 7)  # events (file rows) that fall in the cut bottom rows (y = 250)
# a row a frame: (t_ns, event_index, event_index_before) for the 50 ms and the 10 ms index
INDEX_50 = [(1_000, 0, 0), (5_500, 5, 2), (10_500, 10, 6), (12_500, 12, 9)]
INDEX_10 = [(t, end, end - 1) for t, end, _ in INDEX_50]
LABELLED_FRAMES = (2, 4)  # 1-based frame numbers with a mask


def write_sequence(folder, number, *, frames=LABELLED_FRAMES):
    """One ESS sequence of 12 events: row k at t = k + 1 us (ns + 7 below), x = k + 10 number, y = k (250 OUTSIDE)."""
    k = np.arange(12)
    (folder / "index").mkdir(parents=True)
    (folder / "segmentation_masks").mkdir()
    ((k + 1) * 1000 + 7).astype("<i8").tofile(folder / "events.dat.t")
    y = np.where(np.isin(k, OUTSIDE), 250, k)
    np.stack([k + 10 * number, y, k % 2], axis=1).astype("<i2").tofile(folder / "events.dat.xyp")
    np.save(folder / "index" / "index_50ms.npy", np.array(INDEX_50, dtype=np.int64))
    np.save(folder / "index" / "index_10ms.npy", np.array(INDEX_10, dtype=np.int64))
    for frame in frames:
        write_mask(folder / "segmentation_masks" / f"segmentation_{frame:08d}.png", label_of(number, frame))


def label_of(number, frame):
    """A mask that says which sequence and frame it belongs to; its corner is the ignore label."""
    mask = np.full((200, 346), (number + frame) % 6, np.uint8)
    mask[-1, -1] = 255
    return mask


def write_mask(path, mask):
    Image.fromarray(mask).save(path)


@pytest.fixture
def ddd17_root(tmp_path):
    root = tmp_path / "ddd17_seg"
    for folder, number in FOLDERS.items():
        write_sequence(root / folder, number)
    return root


def run(root, out, **settings):
    return convert(root, out, settings, workers=1, progress=False)


def rows_as_events(number, rows):
    """The stored form of file rows ``rows`` of sequence ``number`` (see ``write_sequence``)."""
    return [(k + 1, k + 10 * number, k, 1 if k % 2 else -1) for k in rows]


def test_count_windows_hold_the_last_events_inside_the_crop_before_each_frame(ddd17_root, tmp_path):
    train, test = run(ddd17_root, tmp_path / "out", num_events=3)
    with EventStore(test) as store:
        assert store.names == ["dir1/segmentation_00000002", "dir1/segmentation_00000004"]
        # frame 2 ends at row 5: rows 0-4 minus row 3 (outside) -> the last three are 1, 2, 4
        assert store.events(0).tolist() == rows_as_events(1, [1, 2, 4])
        # frame 4 ends at row 12: rows 9, 10, 11
        assert store.events(1).tolist() == rows_as_events(1, [9, 10, 11])
        assert store.sensor_size == (200, 346)
        assert store.attrs["class_names"] == list(CLASS_NAMES)
        assert store.attrs["split"] == "test"
        assert "the last 3 events with y < 200" in store.attrs["window_convention"]
    with EventStore(train) as store:
        assert store.events(2).tolist() == rows_as_events(3, [1, 2, 4])


def test_a_count_window_keeps_every_event_when_the_recording_has_fewer(ddd17_root, tmp_path):
    _, test = run(ddd17_root, tmp_path / "out", num_events=100)
    with EventStore(test) as store:
        assert store.events(0).tolist() == rows_as_events(1, [0, 1, 2, 4])
        assert store.events(1).tolist() == rows_as_events(1, [0, 1, 2, 4, 5, 6, 8, 9, 10, 11])


@pytest.mark.parametrize(("duration_ms", "frame2", "frame4"), [(50, [2, 4], [9, 10, 11]), (10, [4], [11])])
def test_duration_windows_follow_the_index_file(ddd17_root, tmp_path, duration_ms, frame2, frame4):
    _, test = run(ddd17_root, tmp_path / "out", window="duration", duration_ms=duration_ms)
    with EventStore(test) as store:
        assert store.events(0).tolist() == rows_as_events(1, frame2)  # rows [before, event_index) in the crop
        assert store.events(1).tolist() == rows_as_events(1, frame4)
        assert f"in the {duration_ms} ms before" in store.attrs["window_convention"]


def test_splits_labels_and_names_follow_the_papers_folders(ddd17_root, tmp_path):
    paths = run(ddd17_root, tmp_path / "out")
    assert [p.name for p in paths] == ["train.h5", "test.h5"]
    expected = {"train.h5": ["dir0", "dir3", "dir4", "dir6", "dir7"], "test.h5": ["dir1"]}  # dir5 is in neither
    for path in paths:
        with EventStore(path) as store:
            folders = expected[path.name]
            assert store.names == [f"{d}/segmentation_{f:08d}" for d in folders for f in LABELLED_FRAMES]
            assert store.attrs["sequences"] == folders
            for i, (folder, frame) in enumerate((d, f) for d in folders for f in LABELLED_FRAMES):
                mask = store.dense("masks", i)
                assert mask.dtype == np.uint8
                np.testing.assert_array_equal(mask, label_of(FOLDERS[folder], frame))


def test_masks_are_sorted_by_frame_number_not_by_name(tmp_path):
    root = tmp_path / "root"
    write_sequence(root / "dir1", 1, frames=())
    for frame, name in ((4, "segmentation_4.png"), (2, "segmentation_00002.png")):
        write_mask(root / "dir1" / "segmentation_masks" / name, label_of(1, frame))
    (test,) = run(root, tmp_path / "out", splits={"test": ["dir1"]})
    with EventStore(test) as store:
        assert store.names == ["dir1/segmentation_00002", "dir1/segmentation_4"]
        np.testing.assert_array_equal(store.dense("masks", 1), label_of(1, 4))


def test_worker_processes_write_the_same_stores(ddd17_root, tmp_path):
    one = run(ddd17_root, tmp_path / "one", num_events=4)
    two = convert(ddd17_root, tmp_path / "two", {"num_events": 4}, workers=2, progress=False)
    for a, b in zip(one, two):
        with EventStore(a) as left, EventStore(b) as right:
            assert left.attrs["content_sha256"] == right.attrs["content_sha256"]
            assert len(left) == {"train.h5": 10, "test.h5": 2}[a.name]


def test_a_rerun_replaces_the_stores(ddd17_root, tmp_path):
    out = tmp_path / "out"
    run(ddd17_root, out, num_events=1)
    _, test = run(ddd17_root, out, num_events=2)
    with EventStore(test) as store:
        assert store.event_counts.tolist() == [2, 2]
    assert sorted(p.name for p in out.iterdir()) == ["test.h5", "train.h5"]


def test_the_registry_dispatches_to_this_converter(ddd17_root, tmp_path):
    paths = convert_sequences(
        get_dataset("ddd17"), ddd17_root, tmp_path / "out", settings={"num_events": 2}, workers=1, progress=False
    )
    assert [p.name for p in paths] == ["train.h5", "test.h5"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"windw": "count"}, r"data\.convert\.ddd17: unknown key\(s\) \['windw'\]"),
        ({"duration_ms": 20}, r"data\.convert\.ddd17\.duration_ms: expected one of \[10, 50, 250\]"),
        ({"num_events": 0}, "num_events must be >= 1"),
        ({"splits": {"train": ["dir0"], "test": ["dir0"]}}, r"\['dir0'\] appear more than once"),
    ],
)
def test_bad_settings_are_refused(ddd17_root, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        run(ddd17_root, tmp_path / "out", **settings)


def _break(root, what):
    masks = root / "dir1" / "segmentation_masks"
    if what == "value":
        bad = label_of(1, 2)
        bad[5, 7] = 7
        write_mask(masks / "segmentation_00000002.png", bad)
    elif what == "shape":
        write_mask(masks / "segmentation_00000002.png", np.zeros((260, 346), np.uint8))
    elif what == "colour":
        rgb = np.zeros((200, 346, 3), np.uint8)
        rgb[..., 0] = 1
        write_mask(masks / "segmentation_00000002.png", rgb)
    elif what == "bytes":
        (masks / "segmentation_00000002.png").write_bytes(b"\x89PNG not really")
    elif what == "name":
        write_mask(masks / "label.png", label_of(1, 2))
    elif what == "frame":
        write_mask(masks / "segmentation_00000009.png", label_of(1, 2))
    elif what == "index":
        np.save(root / "dir1" / "index" / "index_50ms.npy", np.array([*INDEX_50[:3], (12_500, 13, 9)]))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("value", r"segmentation_00000002\.png: pixel \(row 5, col 7\) holds 7, expected a class id 0-5 or 255"),
        ("shape", r"segmentation_00000002\.png: label image has shape \(260, 346\), expected \(200, 346\)"),
        ("colour", r"segmentation_00000002\.png: label image has shape \(200, 346, 3\)"),
        ("bytes", r"segmentation_00000002\.png: not a readable PNG label image"),
        ("name", r"label\.png: expected a label file named <prefix>_<frame number from 1>\.png"),
        ("frame", r"index_50ms\.npy: has 4 rows, none for frame 9 of segmentation_00000009\.png"),
        ("index", r"index_50ms\.npy: row 3 \(for segmentation_00000004\.png\) is .* expected 0 <= event_index <= 12"),
    ],
)
def test_bad_files_are_named_with_what_was_expected(ddd17_root, tmp_path, what, message):
    _break(ddd17_root, what)
    with pytest.raises(EventFormatError, match=message):
        run(ddd17_root, tmp_path / "out")


def test_missing_files_are_named_before_anything_is_written(ddd17_root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"dir9: missing; split 'test' expects this sequence folder"):
        run(ddd17_root, out, splits={"train": ["dir0"], "test": ["dir9"]})
    with pytest.raises(FileNotFoundError, match=r"index_250ms\.npy: missing; expected the ESS frame index"):
        run(ddd17_root, out, window="duration", duration_ms=250)
    masks = ddd17_root / "dir1" / "segmentation_masks"
    shutil.make_archive(str(masks), "zip", root_dir=masks.parent, base_dir=masks.name)  # as ESS ships some copies
    shutil.rmtree(masks)
    with pytest.raises(
        FileNotFoundError, match=r"segmentation_masks: missing; .* \(unzip segmentation_masks\.zip there\)"
    ):
        run(ddd17_root, out)
    assert not out.exists() or not list(out.iterdir())


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_last_events_in_crop_equals_filtering_the_whole_recording(tmp_path_factory, data):
    n = data.draw(st.integers(0, 80))
    folder = tmp_path_factory.mktemp("seq")
    ys = np.asarray(data.draw(st.lists(st.integers(0, 259), min_size=n, max_size=n)), dtype=np.int64)
    (np.arange(n, dtype="<i8") * 1000).tofile(folder / "events.dat.t")
    np.stack([np.arange(n) % 346, ys, np.arange(n) % 2], axis=1).astype("<i2").reshape(-1, 3).tofile(
        folder / "events.dat.xyp"
    )
    end = data.draw(st.integers(0, n))
    count = data.draw(st.integers(1, 30))
    height = data.draw(st.integers(1, 260))
    sequence = Ddd17Events(folder)
    every = sequence.read_all()[:end]
    inside = every[every["y"] < height]
    expected = inside[max(len(inside) - count, 0) :]
    assert last_events_in_crop(sequence, end, count, height).tolist() == expected.tolist()
