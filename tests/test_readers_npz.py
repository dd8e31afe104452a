"""N-ImageNet and ES-ImageNet .npz readers, against archives written here in each dataset's layout."""

import numpy as np
import pytest
from event_testing import read_or_format_error
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import read_es_imagenet, read_n_imagenet, read_recording

N_IMAGENET_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])


def n_imagenet_npz(path, x, y, t, p, *, layout="event_data"):
    """An N-ImageNet sample: a structured 'event_data' array, or the older four column arrays."""
    if layout == "event_data":
        table = np.zeros(len(t), N_IMAGENET_DTYPE)
        table["x"], table["y"], table["t"], table["p"] = x, y, t, p
        np.savez_compressed(path, event_data=table)
    else:
        np.savez(
            path,
            x_pos=np.asarray(x, np.uint16),
            y_pos=np.asarray(y, np.uint16),
            timestamp=np.asarray(t),
            polarity=np.asarray(p),
        )


def es_imagenet_npz(path, pos, neg):
    """An ES-ImageNet sample: uint8 (N, 3) rows of (row, column, step) for ON ('pos') and OFF ('neg') events."""
    np.savez_compressed(
        path, pos=np.asarray(pos, np.uint8).reshape(-1, 3), neg=np.asarray(neg, np.uint8).reshape(-1, 3)
    )


# --- N-ImageNet ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["event_data", "columns"])
def test_n_imagenet_layouts_give_microsecond_events(tmp_path, layout):
    path = tmp_path / "n01440764_10026.npz"
    n_imagenet_npz(path, [10, 639, 3], [0, 479, 5], [250, 100, 100], [True, False, True], layout=layout)
    recording = read_recording(path)
    assert recording.events.tolist() == [(100, 639, 479, -1), (100, 3, 5, 1), (250, 10, 0, 1)]
    assert recording.sensor_size == (480, 640)


def test_n_imagenet_accepts_signed_polarity_and_whole_float_timestamps(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(
        path, x_pos=np.array([1, 2]), y_pos=np.array([3, 4]), timestamp=np.array([5.0, 6.0]), polarity=np.array([-1, 1])
    )
    assert read_n_imagenet(path).events.tolist() == [(5, 1, 3, -1), (6, 2, 4, 1)]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"events": np.zeros(3)}, r"holds arrays \['events'\], expected 'event_data'"),
        ({"event_data": np.zeros(3)}, r"'event_data' has dtype float64"),
        (
            {"x_pos": np.array([1]), "y_pos": np.array([1]), "timestamp": np.array([0.5]), "polarity": np.array([1])},
            r"event 0 has timestamp 0.5, expected whole microseconds",
        ),
        (
            {"x_pos": np.array([640]), "y_pos": np.array([1]), "timestamp": np.array([1]), "polarity": np.array([1])},
            r"event 0 has x=640, expected 0 <= x < 640",
        ),
        (
            {"x_pos": np.array([1]), "y_pos": np.array([1]), "timestamp": np.array([1]), "polarity": np.array([2])},
            r"event 0 has polarity 2",
        ),
    ],
)
def test_n_imagenet_rejects_foreign_content(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(EventFormatError, match=r"bad\.npz: " + message):
        read_n_imagenet(path)


def test_npz_readers_reject_non_archives(tmp_path):
    path = tmp_path / "plain.npz"
    with open(path, "wb") as file:
        np.save(file, np.zeros(2))
    with pytest.raises(EventFormatError, match="found a single .npy array"):
        read_n_imagenet(path)
    path.write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(EventFormatError, match="not a readable .npz archive"):
        read_es_imagenet(path)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_n_imagenet_round_trip(tmp_path_factory, data):
    n = data.draw(st.integers(0, 40))
    t = np.sort(data.draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 639), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 479), min_size=n, max_size=n))
    p = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    path = tmp_path_factory.mktemp("nin") / "s.npz"
    n_imagenet_npz(path, x, y, t, p)
    events = read_n_imagenet(path).events
    assert events.tolist() == [(int(a), b, c, 1 if d else -1) for a, b, c, d in zip(t, x, y, p, strict=True)]


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=4))
def test_npz_truncated_or_corrupt_raise_format_error_or_read(tmp_path_factory, cut, flips):
    folder = tmp_path_factory.mktemp("npz")
    n_imagenet_npz(folder / "valid.npz", np.arange(20), np.arange(20), np.arange(20) * 3, np.arange(20) % 2 == 0)
    blob = bytearray((folder / "valid.npz").read_bytes())
    for position, value in flips:
        if position < len(blob):
            blob[position] = value
    path = folder / "c.npz"
    path.write_bytes(bytes(blob[: len(blob) - cut]))
    read_or_format_error(read_n_imagenet, path)
    read_or_format_error(read_es_imagenet, path)


# --- ES-ImageNet -----------------------------------------------------------------------------------------------


def test_es_imagenet_maps_rows_columns_and_steps(tmp_path):
    path = tmp_path / "class0_1.npz"
    # (row, column, step): rows are y, columns x; the generator's window starts after row/column 16
    es_imagenet_npz(path, pos=[(17, 30, 2), (239, 17, 1)], neg=[(20, 40, 1)])
    recording = read_recording(path, step_us=500)
    assert recording.events.tolist() == [(0, 1, 223, 1), (0, 24, 4, -1), (500, 14, 1, 1)]
    assert recording.sensor_size == (224, 224) and recording.metadata["step_us"] == 500


def test_es_imagenet_image_size_centres_like_the_dataset_loader(tmp_path):
    path = tmp_path / "s.npz"
    es_imagenet_npz(path, pos=[(17, 20, 1), (150, 20, 8)], neg=[])
    # a 254x100 (height x width) image: the loader shifts columns by (254 - 100) // 2 = 77, rows by 0
    recording = read_es_imagenet(path, step_us=1, image_size=(254, 100))
    assert recording.events.tolist() == [(0, 81, 1, 1), (7, 81, 134, 1)]
    # a 60x254 image shifts rows by 97: row 150 lands at 231, outside the crop, and is dropped as the loader drops it
    recording = read_es_imagenet(path, step_us=1, image_size=(60, 254))
    assert recording.events.tolist() == [(0, 4, 98, 1)] and recording.metadata["events_outside_crop"] == 1


@pytest.mark.parametrize(
    "pos, message",
    [
        ([(20, 20, 0)], r"event 0 \(counting 'pos' then 'neg'\) has time step 0, expected 1..8"),
        ([(20, 20, 9)], r"has time step 9, expected 1..8"),
        ([(20, 250, 1)], r"event 0 .* is at row 20, column 250, outside the generator's window"),
    ],
)
def test_es_imagenet_rejects_values_the_generator_cannot_make(tmp_path, pos, message):
    path = tmp_path / "bad.npz"
    es_imagenet_npz(path, pos=pos, neg=[])
    with pytest.raises(EventFormatError, match=message):
        read_es_imagenet(path)


def test_es_imagenet_rejects_missing_arrays(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pos=np.zeros((2, 3), np.uint8))
    with pytest.raises(EventFormatError, match=r"holds arrays \['pos'\], expected 'pos' and 'neg'"):
        read_es_imagenet(path)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_es_imagenet_round_trip(tmp_path_factory, data):
    rows = st.tuples(st.integers(17, 239), st.integers(17, 239), st.integers(1, 8))
    pos = data.draw(st.lists(rows, max_size=30))
    neg = data.draw(st.lists(rows, max_size=30))
    path = tmp_path_factory.mktemp("es") / "s.npz"
    es_imagenet_npz(path, pos, neg)
    events = read_es_imagenet(path, step_us=1000).events
    expected = [((s - 1) * 1000, c - 16, r - 16, 1) for r, c, s in pos] + [
        ((s - 1) * 1000, c - 16, r - 16, -1) for r, c, s in neg
    ]
    assert events.tolist() == sorted(expected, key=lambda event: event[0])  # stable: ON before OFF within a step
