"""DSEC and MVSEC readers, against small HDF5 files written here in the layout of the real datasets."""

import h5py
import hdf5plugin
import numpy as np
import pytest
from event_testing import read_or_format_error
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import DsecEvents, detect_format, read_dsec, read_mvsec, read_recording

T_OFFSET = 1_650_000_000_000_000  # an absolute DSEC-like start, microseconds


def ms_to_idx_of(t_rel):
    """DSEC's index: for each millisecond m, the first event with t >= 1000 m (one entry past the last event's ms)."""
    last_ms = int(t_rel[-1]) // 1000 + 1 if len(t_rel) else 1
    return np.searchsorted(t_rel, np.arange(last_ms + 1) * 1000, side="left").astype(np.uint64)


def write_dsec(path, t_rel, x, y, p, *, t_offset=T_OFFSET, ms_to_idx=None, drop=()):
    """An events.h5 as DSEC ships it: Blosc-compressed events/{x,y,t,p}, ms_to_idx, t_offset."""
    t_rel = np.asarray(t_rel, np.uint32)
    blosc = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
    columns = {
        "events/x": np.asarray(x, np.uint16),
        "events/y": np.asarray(y, np.uint16),
        "events/t": t_rel,
        "events/p": np.asarray(p, np.uint8),
        "ms_to_idx": ms_to_idx_of(t_rel) if ms_to_idx is None else np.asarray(ms_to_idx, np.uint64),
    }
    with h5py.File(path, "w") as file:
        for key, data in columns.items():
            if key not in drop:
                file.create_dataset(key, data=data, chunks=True if len(data) else None, **blosc)
        if "t_offset" not in drop:
            file.create_dataset("t_offset", data=np.int64(t_offset))


def write_mvsec(path, rows, *, camera="left"):
    """A <sequence>_data.hdf5 as MVSEC ships it: davis/<camera>/events, (N, 4) float64 rows of x, y, t (s), p."""
    with h5py.File(path, "w") as file:
        file.create_dataset(f"davis/{camera}/events", data=np.asarray(rows, np.float64).reshape(-1, 4))


# --- DSEC ------------------------------------------------------------------------------------------------------


def test_dsec_index_matches_its_definition():
    # t = 0, 999 fall in ms 0; the first t >= 1000 is event 2; the first t >= 2000 is event 3
    assert ms_to_idx_of(np.array([0, 999, 1000, 2500])).tolist() == [0, 2, 3, 4]


def test_dsec_reads_absolute_microseconds_and_polarity(tmp_path):
    path = tmp_path / "events.h5"
    write_dsec(path, [0, 999, 1000, 2500], [0, 639, 5, 6], [0, 479, 7, 8], [1, 0, 0, 1])
    recording = read_recording(path)
    assert recording.events.tolist() == [
        (T_OFFSET, 0, 0, 1),
        (T_OFFSET + 999, 639, 479, -1),
        (T_OFFSET + 1000, 5, 7, -1),
        (T_OFFSET + 2500, 6, 8, 1),
    ]
    assert recording.sensor_size == (480, 640) and recording.metadata["t_offset"] == T_OFFSET
    assert detect_format(path) == "dsec"


def test_dsec_window_is_half_open_and_absolute(tmp_path):
    path = tmp_path / "events.h5"
    write_dsec(path, [0, 999, 1000, 2500], [1, 2, 3, 4], [0, 0, 0, 0], [1, 1, 1, 1])
    with DsecEvents(path) as events:
        assert events.window(T_OFFSET + 999, T_OFFSET + 2500)["x"].tolist() == [2, 3]
        assert events.window(T_OFFSET - 5000, T_OFFSET + 1)["x"].tolist() == [1]
        assert events.window(T_OFFSET + 2500, T_OFFSET + 10**9)["x"].tolist() == [4]
        assert len(events.window(T_OFFSET + 10, T_OFFSET + 10)) == 0
        assert events.time_span_us == (T_OFFSET, T_OFFSET + 2500)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_dsec_windows_equal_filtering_the_whole_file(tmp_path_factory, data):
    n = data.draw(st.integers(0, 80))
    t_rel = np.sort(data.draw(st.lists(st.integers(0, 20_000), min_size=n, max_size=n)))
    path = tmp_path_factory.mktemp("dsec") / "events.h5"
    write_dsec(path, t_rel, np.arange(n) % 640, np.arange(n) % 480, np.arange(n) % 2)
    start = T_OFFSET + data.draw(st.integers(-3000, 23_000))
    end = start + data.draw(st.integers(0, 12_000))
    with DsecEvents(path) as events:
        every = events.read_all()
        window = events.window(start, end)
    assert window.tolist() == every[(every["t"] >= start) & (every["t"] < end)].tolist()


def test_dsec_rectification_rounds_to_nearest_and_drops_events_leaving_the_frame(tmp_path):
    path = tmp_path / "events.h5"
    write_dsec(path, [10, 20, 30, 40], [0, 100, 639, 7], [0, 200, 479, 7], [1, 0, 1, 1])
    rectify_map = np.stack(np.meshgrid(np.arange(640.0), np.arange(480.0)), axis=-1)  # identity: [y, x] -> (x, y)
    rectify_map[200, 100] = (100.5, 199.49)  # halves round up, below-halves down
    rectify_map[479, 639] = (640.2, 10.0)  # rounds to x = 640: outside, dropped
    rectify_map[7, 7] = (np.nan, 3.0)  # no rectified position: dropped
    with h5py.File(tmp_path / "rectify_map.h5", "w") as file:
        file.create_dataset("rectify_map", data=rectify_map)
    recording = read_dsec(path, rectify_map=tmp_path / "rectify_map.h5")
    assert recording.events.tolist() == [(T_OFFSET + 10, 0, 0, 1), (T_OFFSET + 20, 101, 199, -1)]
    assert recording.metadata["rectified"] is True


@pytest.mark.parametrize("missing", ["ms_to_idx", "events/p"])
def test_dsec_missing_key_is_named(tmp_path, missing):
    path = tmp_path / "events.h5"
    write_dsec(path, [1, 2], [1, 2], [1, 2], [0, 1], drop=(missing,))
    with pytest.raises(EventFormatError, match=f"expected an HDF5 dataset '{missing}', found nothing"):
        DsecEvents(path)


def test_dsec_rejects_inconsistent_index_and_coordinates(tmp_path):
    path = tmp_path / "events.h5"
    write_dsec(path, [1, 2], [1, 2], [1, 2], [0, 1], ms_to_idx=[0, 5])
    with pytest.raises(EventFormatError, match="'ms_to_idx' is not a non-decreasing index into the 2 events"):
        DsecEvents(path)
    write_dsec(path, [1, 2], [1, 640], [1, 2], [0, 1])
    with pytest.raises(EventFormatError, match="event 1 has x=640, y=2, outside the 640x480 sensor"):
        read_dsec(path)
    write_dsec(path, [1, 2], [1, 2], [1, 2], [0, 3])
    with pytest.raises(EventFormatError, match="event 1 has polarity 3"):
        read_dsec(path)


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(1, 10_000), noise=st.binary(max_size=64))
def test_truncated_or_foreign_hdf5_raise_format_error(tmp_path_factory, cut, noise):
    folder = tmp_path_factory.mktemp("h5")
    write_dsec(folder / "valid.h5", np.arange(50) * 40, np.arange(50), np.arange(50), np.arange(50) % 2)
    blob = (folder / "valid.h5").read_bytes()
    (folder / "cut.h5").write_bytes(blob[: max(len(blob) - cut, 0)])
    (folder / "noise.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + noise)
    for name in ("cut.h5", "noise.h5"):
        read_or_format_error(read_dsec, folder / name)
        read_or_format_error(read_mvsec, folder / name)


# --- MVSEC -----------------------------------------------------------------------------------------------------


def test_mvsec_converts_seconds_to_rounded_microseconds(tmp_path):
    path = tmp_path / "indoor_flying1_data.hdf5"
    write_mvsec(path, [(5, 7, 1504645177.123456, 1), (345, 259, 1504645177.000001, -1)])
    recording = read_recording(path)
    assert recording.events.tolist() == [(1504645177000001, 345, 259, -1), (1504645177123456, 5, 7, 1)]
    assert recording.sensor_size == (260, 346) and detect_format(path) == "mvsec"


def test_mvsec_reads_the_right_camera_and_names_missing_keys(tmp_path):
    path = tmp_path / "s_data.hdf5"
    write_mvsec(path, [(1, 2, 3.0, 1)], camera="right")
    assert read_mvsec(path, camera="right").events.tolist() == [(3_000_000, 1, 2, 1)]
    with pytest.raises(EventFormatError, match="expected an HDF5 dataset 'davis/left/events', found nothing"):
        read_mvsec(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ((1.5, 2, 3.0, 1), r"event 0 has x=1.5, expected an integer pixel coordinate"),
        ((1, 260, 3.0, 1), r"event 0 has y=260.0, expected 0 <= y < 260"),
        ((1, 2, 3.0, 0.5), r"event 0 has polarity 0.5"),
        ((1, 2, np.nan, 1), r"event 0 has t=nan, expected a finite time in seconds"),
    ],
)
def test_mvsec_rejects_values_a_davis_cannot_produce(tmp_path, row, message):
    path = tmp_path / "bad_data.hdf5"
    write_mvsec(path, [row])
    with pytest.raises(EventFormatError, match=message):
        read_mvsec(path)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_mvsec_round_trip(tmp_path_factory, data):
    n = data.draw(st.integers(0, 50))
    t_us = 1_504_645_177_000_000 + np.sort(data.draw(st.lists(st.integers(0, 10**10), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 345), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 259), min_size=n, max_size=n))
    p = data.draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    path = tmp_path_factory.mktemp("mvsec") / "s_data.hdf5"
    write_mvsec(path, np.stack([x, y, t_us / 1e6, p], axis=1) if n else [])
    events = read_mvsec(path).events
    assert events.tolist() == list(zip(t_us.tolist(), x, y, p, strict=True))
