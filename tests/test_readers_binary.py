"""N-MNIST/N-Caltech101 .bin and Prophesee DAT readers, against bytes encoded here from the formats' specifications."""

import numpy as np
import pytest
from event_testing import read_or_format_error
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import read_atis_bin, read_prophesee_dat, read_recording, stream_recording
from evpretrain.events.readers.prophesee_dat import iter_prophesee_dat

# --- spec-level encoders -------------------------------------------------------------------------------------


def encode_bin(x, y, p, t) -> bytes:
    """N-MNIST .bin: x (8 bits), y (8 bits), polarity bit + 23-bit us timestamp, most significant byte first."""
    x, y, p, t = (np.asarray(v, np.int64) for v in (x, y, p, t))
    rows = np.stack([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF], axis=1)
    return rows.astype(np.uint8).tobytes()


def encode_dat(t, x, y, p, *, header=b"% Version 2\n% Width 640\n% Height 480\n", event_type=0x0C, version=2) -> bytes:
    """Prophesee DAT: text header, type byte, size byte, then little-endian (uint32 t, uint32 packed x/y/p)."""
    x, y, p = (np.asarray(v, np.uint32) for v in (x, y, p))
    packed = x | y << 14 | p << 28 if version == 2 else x | y << 9 | p << 17
    words = np.stack([np.asarray(t, np.uint32), packed], axis=1).astype("<u4")
    return header + bytes([event_type, 8]) + words.tobytes()


# --- N-MNIST / N-Caltech101 .bin ------------------------------------------------------------------------------


def test_bin_decodes_hand_checked_events(tmp_path):
    path = tmp_path / "00002.bin"
    # x=5 y=10 ON t=7 | x=33 y=0 OFF t=0x010203 | overflow marker (y=240) | x=1 y=2 ON t=5 after one wrap
    path.write_bytes(b"\x05\x0a\x80\x00\x07\x21\x00\x01\x02\x03\x00\xf0\x00\x00\x00\x01\x02\x80\x00\x05")
    recording = read_recording(path)
    assert recording.events.tolist() == [(7, 5, 10, 1), (66051, 33, 0, -1), ((1 << 23) + 5, 1, 2, 1)]
    assert recording.sensor_size is None and recording.metadata["overflow_markers"] == 1


def test_bin_sorts_and_rejects_truncation_and_foreign_coordinates(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(encode_bin([1, 2], [3, 4], [1, 0], [90, 10]))
    assert read_atis_bin(path).events["t"].tolist() == [10, 90]
    path.write_bytes(encode_bin([1, 2], [3, 4], [1, 0], [10, 90])[:-2])
    with pytest.raises(EventFormatError, match=r"a\.bin: at byte offset 5: truncated event.*8 bytes"):
        read_atis_bin(path)
    path.write_bytes(encode_bin([1, 250], [3, 241], [1, 0], [10, 90]))
    with pytest.raises(EventFormatError, match=r"at byte offset 5: event 1 has x=250, y=241, outside the 304x240"):
        read_atis_bin(path)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_bin_round_trip(tmp_path_factory, data):
    n = data.draw(st.integers(0, 60))
    t = np.sort(data.draw(st.lists(st.integers(0, (1 << 23) - 1), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 239), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 179), min_size=n, max_size=n))
    p = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    path = tmp_path_factory.mktemp("bin") / "s.bin"
    path.write_bytes(encode_bin(x, y, p, t))
    events = read_atis_bin(path).events
    assert events["t"].tolist() == t.tolist()
    assert events["x"].tolist() == x and events["y"].tolist() == y
    assert events["p"].tolist() == [2 * v - 1 for v in p]


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200))
def test_bin_random_bytes_raise_format_error_or_read(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("bin") / "r.bin"
    path.write_bytes(blob)
    read_or_format_error(read_atis_bin, path)


# --- Prophesee DAT ---------------------------------------------------------------------------------------------


def test_dat_decodes_hand_checked_event(tmp_path):
    path = tmp_path / "cars.dat"
    # t=100, x=3, y=2, ON: packed word 3 | 2 << 14 | 1 << 28 = 0x10008003
    path.write_bytes(b"% Version 2\n% Width 120\n% Height 100\n\x0c\x08" + bytes.fromhex("64000000 03800010"))
    recording = read_recording(path)
    assert recording.events.tolist() == [(100, 3, 2, 1)]
    assert recording.sensor_size == (100, 120)
    assert recording.metadata["header"] == {"Version": "2", "Width": "120", "Height": "100"}
    assert recording.metadata["event_type"] == "EventCD"


def test_dat_version_1_layout_and_event2d_type(tmp_path):
    path = tmp_path / "v1.dat"
    # Version 1 packs x in bits 0..8, y in 9..16, polarity in 17..20: x=300, y=200, OFF
    path.write_bytes(encode_dat([5], [300], [200], [0], header=b"% Version 1\n", event_type=0x00, version=1))
    recording = read_prophesee_dat(path)
    assert recording.events.tolist() == [(5, 300, 200, -1)]
    assert recording.sensor_size is None and recording.metadata["event_type"] == "Event2D"


def test_dat_unwraps_32_bit_timestamps_and_adds_t0(tmp_path):
    path = tmp_path / "wrap.dat"
    path.write_bytes(encode_dat([2**32 - 10, 5, 7], [0, 1, 2], [0, 0, 0], [1, 1, 1], header=b"% T0 1000\n"))
    assert read_prophesee_dat(path).events["t"].tolist() == [1000 + 2**32 - 10, 1000 + 2**32 + 5, 1000 + 2**32 + 7]


@pytest.mark.parametrize("chunk_events", [1, 2, 3, 100])
def test_dat_streamed_in_chunks_equals_the_whole_read_wraps_carried_across_chunks(tmp_path, chunk_events):
    path = tmp_path / "wrap.dat"
    # Two wraps: one between events 1 and 2, one between 3 and 4 (chunk edges for chunk_events 1 and 2 and 3).
    t = [2**32 - 10, 2**32 - 3, 5, 2**32 - 1, 4, 9]
    path.write_bytes(encode_dat(t, [0, 1, 2, 3, 4, 5], [0] * 6, [1, 0, 1, 0, 1, 0], header=b"% T0 1000\n"))
    assert [len(c) for c in iter_prophesee_dat(path, chunk_events)] == [
        min(chunk_events, 6 - i) for i in range(0, 6, chunk_events)
    ]
    stream = stream_recording(path, chunk_events=chunk_events)
    chunks = list(stream.chunks())
    expected = [1000 + v for v in (2**32 - 10, 2**32 - 3, 2**32 + 5, 2 * 2**32 - 1, 2 * 2**32 + 4, 2 * 2**32 + 9)]
    assert np.concatenate(chunks)["t"].tolist() == expected
    assert np.array_equal(np.concatenate(chunks), read_prophesee_dat(path).events)
    shifted = stream_recording(path, chunk_events=chunk_events, time_origin="first_event")
    assert np.concatenate(list(shifted.chunks()))["t"].tolist() == [v - expected[0] for v in expected]
    assert shifted.metadata["time_shift_us"] == -expected[0]
    assert stream.sensor_size is None and stream.metadata["version"] == 2


def test_dat_streamed_in_chunks_names_the_offset_of_a_bad_event_in_a_later_chunk(tmp_path):
    path = tmp_path / "bad.dat"
    path.write_bytes(encode_dat([1, 2, 3], [0, 0, 700], [0, 0, 0], [1, 1, 1]))
    chunks = iter_prophesee_dat(path, chunk_events=2)
    assert len(next(chunks)) == 2  # the first chunk is fine; the error comes with the chunk that holds it
    with pytest.raises(EventFormatError, match=r"bad\.dat: at byte offset 55: event 2 has x=700"):
        next(chunks)


@pytest.mark.parametrize(
    "payload, message",
    [
        (encode_dat([1, 2], [0, 0], [0, 0], [1, 1])[:-3], r"at byte offset 47: truncated event: 5 bytes left"),
        (b"% Version 2\n\x0e\x08" + bytes(8), r"at byte offset 12: event type 0x0E is not a CD event type"),
        (b"% Version 2\n\x0c\x10" + bytes(16), r"at byte offset 13: event size 16 bytes, expected 8"),
        (b"% Version 2\n\x0c", r"at byte offset 12: file ends before the event type and size bytes"),
        (b"% Version 3\n\x0c\x08", r"at byte offset 0: DAT version '3' is not supported"),
        (b"% Date x\n% T0 1.5\n\x0c\x08", r"at byte offset 9: header 'T0 1\.5' is not a whole number"),
        # Geometry is bounded (x and y are uint16): a corrupt header must not claim a 10^20-pixel-wide sensor.
        (b"% Height 10\n% Width " + b"1" * 21 + b"\n\x0c\x08", r"at byte offset 12: header 'width' gives a 1{21}x10 "),
        (b"% geometry 0x480\n\x0c\x08", r"at byte offset 0: header 'geometry' gives a 0x480 sensor, expected width"),
        (
            b"% Width 640\n% Height 65537\n\x0c\x08",
            r"at byte offset 12: header 'height' gives a 640x65537 .* in 1\.\.65536",
        ),
        (bytes(16), r"at byte offset 0: expected a '%' text header"),
        (b"% Width 640", r"at byte offset 0: header line starting with '%' is not terminated"),
        (encode_dat([1], [700], [0], [1]), r"at byte offset 39: event 0 has x=700, y=0, outside the 640x480 sensor"),
        (encode_dat([1, 2], [0, 0], [0, 0], [1, 3]), r"at byte offset 47: event 1 has polarity field 3"),
    ],
)
def test_dat_rejects_bad_files_naming_the_offset(tmp_path, payload, message):
    """Offsets: encode_dat's default header is 37 bytes, then type and size, so its events start at byte 39."""
    path = tmp_path / "bad.dat"
    path.write_bytes(payload)
    with pytest.raises(EventFormatError, match=r"bad\.dat: " + message):
        read_prophesee_dat(path)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dat_round_trip(tmp_path_factory, data):
    n = data.draw(st.integers(0, 60))
    t = np.sort(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 639), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 479), min_size=n, max_size=n))
    p = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    path = tmp_path_factory.mktemp("dat") / "s.dat"
    path.write_bytes(encode_dat(t, x, y, p))
    events = read_prophesee_dat(path).events
    assert events["t"].tolist() == t.tolist()
    assert events["x"].tolist() == x and events["y"].tolist() == y
    assert events["p"].tolist() == [2 * v - 1 for v in p]


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 200), noise=st.binary(max_size=64), keep_header=st.booleans())
def test_dat_truncated_or_random_bytes_raise_format_error_or_read(tmp_path_factory, cut, noise, keep_header):
    valid = encode_dat(np.arange(12) * 7, np.arange(12), np.arange(12), np.arange(12) % 2)
    blob = valid[:cut] + noise if keep_header else noise
    path = tmp_path_factory.mktemp("dat") / "c.dat"
    path.write_bytes(blob)
    read_or_format_error(read_prophesee_dat, path)
