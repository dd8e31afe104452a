"""jAER AEDAT 2.0 and iniVation AEDAT 3.1 readers, against bytes encoded here from the formats' specifications."""

import struct

import numpy as np
import pytest
from event_testing import read_or_format_error
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers import detect_format, read_aedat2, read_aedat3, read_recording

# --- spec-level encoders -------------------------------------------------------------------------------------

AEDAT2_HEADER = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Timestamps tick is 1 us\r\n"
AEDAT3_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#Start-Time: 2017-01-01 12:00:00 (TZ+0000)\r\n"
END_HEADER = b"#!END-HEADER\r\n"


def dvs128_address(x, y, on):
    """A DVS128 address for image pixel (x, y), row 0 at the top: column bits 1..7 and row bits 8..14 count from the
    far edges (libcaer: x = 127 - column, y = 127 - row), bit 0 is 0 for ON."""
    x, y, on = (np.asarray(v, np.uint32) for v in (x, y, on))
    return (127 - x) << 1 | (127 - y) << 8 | (1 - on)


def encode_aedat2(addresses, timestamps, *, header=AEDAT2_HEADER) -> bytes:
    """AEDAT 2.0: '#' header lines, then big-endian (uint32 address, uint32 timestamp) pairs."""
    words = np.stack([np.asarray(addresses, np.uint32), np.asarray(timestamps, np.uint32)], axis=1)
    return header + words.astype(">u4").tobytes()


def packet(
    event_type, events: bytes, *, source=1, size=8, ts_offset=4, overflow=0, number=None, capacity=None, valid=None
) -> bytes:
    """AEDAT 3.1 packet: 28-byte little-endian header (int16 type, int16 source, int32 size, ts offset, ts overflow,
    capacity, number, valid), then the events."""
    number = len(events) // size if number is None else number
    capacity = number if capacity is None else capacity
    valid = number if valid is None else valid
    return struct.pack("<hhiiiiii", event_type, source, size, ts_offset, overflow, capacity, number, valid) + events


def polarity_events(x, y, on, timestamps, *, valid=None) -> bytes:
    """AEDAT 3.1 polarity events: uint32 data (bit 0 valid, bit 1 polarity, y bits 2..16, x bits 17..31), int32 t."""
    x, y, on = (np.asarray(v, np.uint32) for v in (x, y, on))
    valid = np.ones_like(x) if valid is None else np.asarray(valid, np.uint32)
    data = valid | on << 1 | y << 2 | x << 17
    rows = np.empty(len(x), dtype=[("data", "<u4"), ("timestamp", "<i4")])
    rows["data"], rows["timestamp"] = data, np.asarray(timestamps, np.int64)
    return rows.tobytes()


def encode_aedat3(x, y, on, t, *, header=AEDAT3_HEADER, events_per_packet=3) -> bytes:
    """Events (t in us, any size) as polarity packets, split where t >> 31 (the packet's eventTSOverflow) changes."""
    x, y, on, t = (np.asarray(v, np.int64) for v in (x, y, on, t))
    packets = []
    for overflow in np.unique(t >> 31):
        (members,) = np.nonzero(t >> 31 == overflow)
        for chunk in np.array_split(members, max(1, -(-len(members) // events_per_packet))):
            events = polarity_events(x[chunk], y[chunk], on[chunk], t[chunk] & 0x7FFFFFFF)
            packets.append(packet(1, events, overflow=int(overflow)))
    return header + END_HEADER + b"".join(packets)


# --- AEDAT 2.0 -----------------------------------------------------------------------------------------------------


def test_aedat2_decodes_hand_checked_events_and_skips_special_ones(tmp_path):
    path = tmp_path / "cifar10_airplane_0.aedat"
    path.write_bytes(
        AEDAT2_HEADER
        + bytes.fromhex("00000A0B 00000007")  # column 5, row 10, bit 0 set (OFF) -> x 122, y 117
        + bytes.fromhex("00008000 00000008")  # external sync input (bit 15)
        + bytes.fromhex("80001234 00000009")  # jAER special event (bit 31)
        + bytes.fromhex("00000000 0000000A")  # column 0, row 0, ON -> the bottom-right corner of the image
        + bytes.fromhex("00007FFE 0000000B")  # column 127, row 127, ON -> the top-left corner
    )
    recording = read_recording(path)
    assert recording.events.tolist() == [(7, 122, 117, -1), (10, 127, 127, 1), (11, 0, 0, 1)]
    assert recording.sensor_size == (128, 128)
    assert recording.metadata["special_events"] == 2
    assert recording.metadata["header"][0] == "!AER-DAT2.0"


def test_aedat2_unwraps_32_bit_timestamps_and_sorts_stably(tmp_path):
    path = tmp_path / "wrap.aedat"
    path.write_bytes(encode_aedat2(dvs128_address([1, 2, 3, 4], [0, 0, 0, 0], [1, 1, 1, 1]), [2**32 - 10, 5, 3, 5]))
    events = read_aedat2(path).events
    assert events["t"].tolist() == [2**32 - 10, 2**32 + 3, 2**32 + 5, 2**32 + 5]
    assert events["x"].tolist() == [1, 3, 2, 4]


def test_aedat2_header_may_name_the_dvs128_and_close_with_end_header(tmp_path):
    path = tmp_path / "named.aedat"
    header = b"#!AER-DAT2.0\r\n# AEChip: ch.unizh.ini.jaer.chip.retina.DVS128\r\n" + END_HEADER
    path.write_bytes(encode_aedat2(dvs128_address([9], [4], [0]), [12], header=header))
    assert read_aedat2(path).events.tolist() == [(12, 9, 4, -1)]


def test_aedat2_sensor_size_bounds_the_coordinates(tmp_path):
    path = tmp_path / "crop.aedat"
    path.write_bytes(encode_aedat2(dvs128_address([10, 100], [5, 20], [1, 1]), [1, 2]))
    recording = read_recording(path, sensor_size=(64, 120))
    assert recording.sensor_size == (64, 120) and len(recording.events) == 2
    offset = len(AEDAT2_HEADER) + 8
    with pytest.raises(EventFormatError, match=rf"at byte offset {offset}: event 1 has x=100, y=20, outside the 90x64"):
        read_aedat2(path, sensor_size=(64, 90))
    with pytest.raises(ValueError, match="sensor_size"):
        read_aedat2(path, sensor_size=(256, 256))


H2 = len(b"#!AER-DAT2.0\r\n")


@pytest.mark.parametrize(
    "payload, message",
    [
        (encode_aedat2([0], [1], header=b"#!AER-DAT2.0\r\n") + b"\x00\x01\x02", rf"{H2 + 8}: truncated event: 3 bytes"),
        (
            encode_aedat2([0, 0x0001_0002], [1, 2], header=b"#!AER-DAT2.0\r\n"),
            rf"{H2 + 8}: event 1 has address 0x00010002 with bits 16..30 set, expected a DVS128 address",
        ),
        (
            b"#!AER-DAT2.0\r\n# AEChip: eu.seebetter.ini.chips.davis.DAVIS240C\r\n" + bytes(8),
            rf"{H2}: header names AEChip eu\.seebetter\.ini\.chips\.davis\.DAVIS240C, expected a camera with the "
            r"DVS128 address layout \(DVS128, Tmpdiff128\)",
        ),
        (b"#!AER-DAT3.1\r\n" + END_HEADER, r"0: header '#!AER-DAT3\.1', expected AEDAT 2\.0"),
        (bytes(16), r"0: expected an AEDAT file starting with '#!AER-DAT'"),
        (b"#!AER-DAT2.0", r"0: header line starting with '#' is not terminated"),
        (b"#!AER-DAT2.0\r\n# created today", rf"{H2}: header line starting with '#' is not terminated"),
    ],
)
def test_aedat2_rejects_bad_files_naming_the_offset(tmp_path, payload, message):
    path = tmp_path / "bad.aedat"
    path.write_bytes(payload)
    with pytest.raises(EventFormatError, match=r"bad\.aedat: at byte offset " + message):
        read_aedat2(path)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_aedat2_round_trip(tmp_path_factory, data):
    n = data.draw(st.integers(0, 60))
    t = np.sort(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 127), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 127), min_size=n, max_size=n))
    on = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    addresses, timestamps = list(dvs128_address(x, y, on)), list(t)
    for _ in range(data.draw(st.integers(0, 5))):  # special events, at the time of the event before them
        i = data.draw(st.integers(0, len(addresses)))
        special = data.draw(st.sampled_from([0x8000, 0x8000_0000, 0x8000_7FFF, 0xFFFF_FFFF]))
        addresses.insert(i, special)
        timestamps.insert(i, timestamps[i - 1] if i else 0)
    path = tmp_path_factory.mktemp("aedat2") / "s.aedat"
    path.write_bytes(encode_aedat2(addresses, timestamps))
    events = read_aedat2(path).events
    assert events["t"].tolist() == t.tolist()
    assert events["x"].tolist() == x and events["y"].tolist() == y
    assert events["p"].tolist() == [2 * v - 1 for v in on]


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 250), noise=st.binary(max_size=64))
def test_aedat2_truncated_or_random_bytes_raise_format_error_or_read(tmp_path_factory, cut, noise):
    valid = encode_aedat2(dvs128_address(np.arange(12), np.arange(12), np.arange(12) % 2), np.arange(12) * 7)
    path = tmp_path_factory.mktemp("aedat2") / "c.aedat"
    path.write_bytes(valid[:cut] + noise)
    read_or_format_error(read_aedat2, path)


# --- AEDAT 3.1 -----------------------------------------------------------------------------------------------------


def test_aedat3_decodes_hand_checked_packets_skipping_invalid_events_and_other_types(tmp_path):
    path = tmp_path / "user01_fluorescent.aedat"
    # x=3, y=2, ON, valid: 1 | 1 << 1 | 2 << 2 | 3 << 17 = 0x0006000B; t = 100 + (1 << 31); then a deleted event
    polarity = bytes.fromhex("0B000600 64000000") + bytes.fromhex("0A000600 65000000")
    special = bytes.fromhex("00000000 00000000")
    path.write_bytes(
        AEDAT3_HEADER + END_HEADER + packet(0, special) + packet(1, polarity, overflow=1, valid=1) + packet(1, b"")
    )
    recording = read_recording(path)
    assert recording.events.tolist() == [(2**31 + 100, 3, 2, 1)]
    assert recording.sensor_size == (128, 128)  # from '#Source 1: DVS128'
    assert recording.metadata["invalid_events"] == 1
    assert recording.metadata["skipped_packets"] == {"special": 1}
    assert recording.metadata["sources"] == {"1": "DVS128"}


def test_aedat3_without_a_known_camera_has_no_sensor_size_unless_given(tmp_path):
    path = tmp_path / "other.aedat"
    header = b"#!AER-DAT3.1\r\n#Source 2: Prototype\r\n"
    path.write_bytes(encode_aedat3([500], [300], [0], [9], header=header))
    assert read_aedat3(path).sensor_size is None
    assert read_aedat3(path).events.tolist() == [(9, 500, 300, -1)]
    assert read_aedat3(path, sensor_size=(400, 600)).sensor_size == (400, 600)
    with pytest.raises(EventFormatError, match=r"x=500, y=300, outside the 480x400 sensor"):
        read_aedat3(path, sensor_size=(400, 480))


def test_aedat2_and_aedat3_give_the_same_image_of_a_dvs128_scene(tmp_path):
    """The AEDAT 2.0 address is the DVS128's raw one; AEDAT 3.1 stores libcaer's top-left coordinates."""
    rng = np.random.default_rng(0)
    x, y, on = rng.integers(0, 128, 200), rng.integers(0, 128, 200), rng.integers(0, 2, 200)
    t = np.sort(rng.integers(0, 10**6, 200))
    (tmp_path / "a.aedat").write_bytes(encode_aedat2(dvs128_address(x, y, on), t))
    (tmp_path / "b.aedat").write_bytes(encode_aedat3(x, y, on, t))
    first, second = read_recording(tmp_path / "a.aedat"), read_recording(tmp_path / "b.aedat")
    assert np.array_equal(first.events, second.events) and first.sensor_size == second.sensor_size


H3 = len(AEDAT3_HEADER + END_HEADER)
ONE_EVENT = polarity_events([1], [1], [1], [5])


@pytest.mark.parametrize(
    "body, message",
    [
        (bytes(10), rf"{H3}: truncated packet header: 10 bytes left, expected 28"),
        (packet(1, ONE_EVENT, number=2), rf"{H3}: truncated packet: 2 events of 8 bytes need 16 bytes, 8 are left"),
        (
            packet(1, ONE_EVENT * 2, size=16),
            rf"{H3}: polarity packet with eventSize 16 and eventTSOffset 4, expected 8 and 4",
        ),
        (packet(1, ONE_EVENT, ts_offset=0), rf"{H3}: polarity packet with eventSize 8 and eventTSOffset 0"),
        (packet(2, bytes(4), size=2, ts_offset=0), rf"{H3}: eventSize 2 bytes cannot hold a 4-byte timestamp"),
        (packet(1, ONE_EVENT, capacity=3), rf"{H3}: eventCapacity 3 differs from eventNumber 1"),
        (packet(1, ONE_EVENT, valid=2), rf"{H3}: eventValid 2 exceeds eventNumber 1"),
        (packet(-32767, ONE_EVENT), rf"{H3}: eventType 0x8001 has bit 15 set \(a compressed packet\)"),
        (packet(5, b"", size=8, overflow=-1), rf"{H3}: negative packet header field"),
        (
            packet(5, bytes(16)) + packet(1, polarity_events([1, 2], [1, 1], [1, 1], [5, -5])),
            rf"{H3 + 44 + 28 + 8 + 4}: polarity event has timestamp -5, expected 0 <= timestamp < 2\^31",
        ),
        (
            packet(1, ONE_EVENT) + packet(1, polarity_events([0, 200], [0, 3], [1, 1], [6, 7])),
            rf"{H3 + 36 + 28 + 8}: polarity event has x=200, y=3, outside the 128x128 sensor",
        ),
        (
            packet(1, ONE_EVENT, source=1) + packet(1, ONE_EVENT, source=2),
            rf"{H3 + 36}: polarity packets come from sources \[1, 2\]",
        ),
    ],
)
def test_aedat3_rejects_bad_packets_naming_the_offset(tmp_path, body, message):
    path = tmp_path / "bad.aedat"
    path.write_bytes(AEDAT3_HEADER + END_HEADER + body)
    with pytest.raises(EventFormatError, match=r"bad\.aedat: at byte offset " + message):
        read_aedat3(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"#!AER-DAT3.1\r\n" + packet(1, ONE_EVENT), r"14: expected a '#!END-HEADER' line before the data"),
        (
            b"#!AER-DAT3.1\r\n#Format: SerializedTS\r\n" + END_HEADER,
            r"14: header '#Format: SerializedTS', expected RAW \(compressed packets are not read\)",
        ),
        (AEDAT2_HEADER + bytes(8), r"0: header '#!AER-DAT2\.0', expected AEDAT 3\.1"),
    ],
)
def test_aedat3_rejects_bad_headers_naming_the_offset(tmp_path, payload, message):
    path = tmp_path / "bad.aedat"
    path.write_bytes(payload)
    with pytest.raises(EventFormatError, match=r"bad\.aedat: at byte offset " + message):
        read_aedat3(path)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_aedat3_round_trip_across_overflows_invalid_events_and_other_packets(tmp_path_factory, data):
    n = data.draw(st.integers(0, 50))
    t = np.sort(data.draw(st.lists(st.integers(0, 2**34), min_size=n, max_size=n)))
    x = data.draw(st.lists(st.integers(0, 345), min_size=n, max_size=n))
    y = data.draw(st.lists(st.integers(0, 259), min_size=n, max_size=n))
    on = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    packets = encode_aedat3(x, y, on, t, header=b"", events_per_packet=data.draw(st.integers(1, 7)))
    packets = packets[len(END_HEADER) :]
    # Splice in a frame-like packet and a packet of deleted polarity events at packet boundaries.
    boundaries, position = [0], 0
    while position < len(packets):
        position += 28 + 8 * struct.unpack_from("<i", packets, position + 20)[0]  # eventNumber 8-byte events
        boundaries.append(position)
    cut = data.draw(st.sampled_from(boundaries))
    deleted = polarity_events([7, 8], [9, 10], [1, 0], [3, 4], valid=[0, 0])
    extra = packet(2, data.draw(st.binary(min_size=24, max_size=24)), size=12, ts_offset=8) + packet(1, deleted)
    path = tmp_path_factory.mktemp("aedat3") / "s.aedat"
    path.write_bytes(b"#!AER-DAT3.1\r\n#Source 1: DAVIS346B\r\n" + END_HEADER + packets[:cut] + extra + packets[cut:])
    recording = read_aedat3(path)
    assert recording.sensor_size == (260, 346)
    assert recording.events["t"].tolist() == t.tolist()
    assert recording.events["x"].tolist() == x and recording.events["y"].tolist() == y
    assert recording.events["p"].tolist() == [2 * v - 1 for v in on]
    assert recording.metadata["invalid_events"] == 2 and recording.metadata["skipped_packets"] == {"frame": 1}


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 400), noise=st.binary(max_size=64))
def test_aedat3_truncated_or_random_bytes_raise_format_error_or_read(tmp_path_factory, cut, noise):
    valid = encode_aedat3(np.arange(12), np.arange(12), np.arange(12) % 2, np.arange(12) * (2**30))
    path = tmp_path_factory.mktemp("aedat3") / "c.aedat"
    path.write_bytes(valid[:cut] + noise)
    read_or_format_error(read_aedat3, path)


# --- detection ---------------------------------------------------------------------------------------------------


def test_aedat_versions_are_told_apart_by_their_first_line(tmp_path):
    (tmp_path / "v2.aedat").write_bytes(encode_aedat2([0], [1]))
    (tmp_path / "v3.aedat").write_bytes(encode_aedat3([0], [0], [1], [1]))
    assert detect_format(tmp_path / "v2.aedat") == "aedat2"
    assert detect_format(tmp_path / "v3.aedat") == "aedat3"
    assert read_recording(tmp_path / "v2.aedat", sensor_size=(128, 128)).events.tolist() == [(1, 127, 127, 1)]
    for version in (b"1.0", b"3.0"):
        (tmp_path / "old.aedat").write_bytes(b"#!AER-DAT" + version + b"\r\n" + bytes(8))
        with pytest.raises(EventFormatError, match=rf"at byte offset 0: AEDAT {version.decode()} is not supported"):
            read_recording(tmp_path / "old.aedat")
