"""DDD17 (as repackaged by ESS) reader, against sequence folders written here in the ESS layout."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EventFormatError, validate_events
from evpretrain.events.readers import Ddd17Events, detect_format, read_ddd17, read_recording


def write_sequence(folder, t_ns, x, y, p, *, index=None):
    """An ESS DDD17 sequence: headerless int64 ns timestamps, int16 (x, y, p) rows, optional index/index_50ms.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(t_ns, "<i8").tofile(folder / "events.dat.t")
    np.stack([x, y, p], axis=1).astype("<i2").reshape(-1, 3).tofile(folder / "events.dat.xyp")
    if index is not None:
        (folder / "index").mkdir(exist_ok=True)
        np.save(folder / "index" / "index_50ms.npy", np.asarray(index))
    return folder


def test_ddd17_reads_nanoseconds_as_floored_microseconds(tmp_path):
    folder = write_sequence(
        tmp_path / "dir0", [999, 1_000, 1_999, 2_000_500], [0, 345, 3, 4], [0, 259, 6, 7], [1, 0, 0, 1]
    )
    for path in (folder, folder / "events.dat.t", folder / "events.dat.xyp"):
        assert detect_format(path) == "ddd17"
        recording = read_recording(path)
        assert recording.events.tolist() == [(0, 0, 0, 1), (1, 345, 259, -1), (1, 3, 6, -1), (2000, 4, 7, 1)]
        assert recording.sensor_size == (260, 346)


def test_ddd17_window_and_image_index(tmp_path):
    index = [(1_000, 1, 0), (2_000_000, 3, 1)]  # (t_ns, event_index, event_index_before) a row an image
    folder = write_sequence(
        tmp_path / "dir1", [999, 1_000, 1_999, 2_000_500], [1, 2, 3, 4], [0, 0, 0, 0], [1] * 4, index=index
    )
    events = Ddd17Events(folder)
    assert events.window(1, 2)["x"].tolist() == [2, 3]
    assert events.window(0, 1)["x"].tolist() == [1]
    assert events.window(3, 2000)["x"].tolist() == []
    assert events.image_index(50).tolist() == [[1_000, 1, 0], [2_000_000, 3, 1]]
    assert read_ddd17(folder).metadata["index_files"] == ["index_50ms.npy"]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_ddd17_windows_equal_filtering_the_whole_sequence(tmp_path_factory, data):
    n = data.draw(st.integers(0, 60))
    t_ns = np.sort(data.draw(st.lists(st.integers(0, 10**8), min_size=n, max_size=n)))
    folder = write_sequence(
        tmp_path_factory.mktemp("ddd17") / "dir0", t_ns, np.arange(n) % 346, np.arange(n) % 260, np.arange(n) % 2
    )
    start = data.draw(st.integers(-10, 10**5 + 10))
    end = start + data.draw(st.integers(0, 10**5))
    events = Ddd17Events(folder)
    every = events.read_all()
    assert every["t"].tolist() == (t_ns // 1000).tolist()
    assert events.window(start, end).tolist() == every[(every["t"] >= start) & (every["t"] < end)].tolist()


def test_ddd17_rejects_mismatched_files_naming_file_and_offset(tmp_path):
    folder = write_sequence(tmp_path / "dir0", [1, 2], [1, 2], [1, 2], [0, 1])
    with open(folder / "events.dat.xyp", "ab") as file:
        file.write(b"\x00\x00")
    with pytest.raises(EventFormatError, match=r"events\.dat\.xyp: at byte offset 12: size 14 bytes, expected 12"):
        Ddd17Events(folder)
    with open(folder / "events.dat.t", "ab") as file:
        file.write(b"\x00\x00\x00")
    with pytest.raises(
        EventFormatError, match=r"events\.dat\.t: at byte offset 16: size 19 bytes is not a multiple of 8"
    ):
        Ddd17Events(folder)


def test_ddd17_rejects_foreign_values(tmp_path):
    folder = write_sequence(tmp_path / "a", [1, 2], [1, 346], [1, 2], [0, 1])
    with pytest.raises(EventFormatError, match="event 1 has x=346, expected 0 <= x < 346"):
        read_ddd17(folder)
    folder = write_sequence(tmp_path / "b", [1, 2], [1, 2], [1, 2], [0, 2])
    with pytest.raises(EventFormatError, match="event 1 has polarity 2"):
        read_ddd17(folder)
    folder = write_sequence(tmp_path / "c", [5000, 1000], [1, 2], [1, 2], [0, 1])
    assert read_ddd17(folder).events["x"].tolist() == [2, 1]  # a whole read sorts
    with pytest.raises(
        EventFormatError, match=r"at byte offset 8: timestamps not sorted: event 1 comes before event 0"
    ):
        Ddd17Events(folder).window(0, 10)  # a window found by binary search needs a sorted file


def test_ddd17_folder_without_events_is_refused(tmp_path):
    with pytest.raises(EventFormatError, match="holds no events.dat.t"):
        read_recording(tmp_path)


@settings(max_examples=40, deadline=None)
@given(t_blob=st.binary(max_size=80), xyp_blob=st.binary(max_size=60))
def test_ddd17_random_bytes_raise_format_error_or_read(tmp_path_factory, t_blob, xyp_blob):
    folder = tmp_path_factory.mktemp("ddd17")
    (folder / "events.dat.t").write_bytes(t_blob)
    (folder / "events.dat.xyp").write_bytes(xyp_blob)
    try:
        recording = read_ddd17(folder)
    except EventFormatError:
        return
    validate_events(recording.events, sensor_size=recording.sensor_size)
