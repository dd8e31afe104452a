"""jAER AEDAT 2.0 and iniVation AEDAT 3.1 files: CIFAR10-DVS (figshare, AEDAT 2.0), DVS128 Gesture (AEDAT 3.1).

Both open with text header lines that start with ``#`` and end with ``\\r\\n``, the first ``#!AER-DAT2.0`` or
``#!AER-DAT3.1``. AEDAT 4.0 is read through faery (``faery_formats``); AEDAT 1.0 and 3.0 are not read.

AEDAT 2.0 (jAER). The header ends after a ``#!END-HEADER`` line, or else at the first line that does not start with
``#``. Then 8-byte events, big-endian: uint32 address, uint32 timestamp (microseconds). What an address means depends
on the camera, which the file names only in an optional ``# AEChip: <java class>`` line. This reader decodes the
DVS128 (Tmpdiff128) address, the camera of CIFAR10-DVS, and refuses files whose AEChip line names another camera:

    bit 0        polarity: 0 = ON, 1 = OFF (as jAER's DVS128 extractor and libcaer's DVS128 driver read it)
    bits 1..7    column, counted from the right edge of the image
    bits 8..14   row, counted from the bottom edge
    bit 15, 31   external sync input / jAER special event: not pixel events, skipped (``metadata["special_events"]``)
    bits 16..30  always 0 in a DVS128 address: an address with any of them set is refused

Orientation: libcaer's DVS128 driver converts the address to the top-left image convention as
``x = 127 - column bits``, ``y = 127 - row bits`` ("to correct for flipped camera", "to convert to CG format"); jAER
mirrors x the same way and draws y upward from the bottom. This reader does what libcaer does, so row 0 is the top row
as in every other reader here, and a DVS128 recording comes out the same way up from AEDAT 2.0 and AEDAT 3.1 (whose
addresses libcaer has already converted). Other CIFAR10-DVS loaders swap the axes: spikingjelly takes
``x = 127 - row bits, y = 127 - column bits`` (the transpose of this image), tonic's ``read_dvs_128``
``x = row bits, y = column bits``; no real CIFAR10-DVS file was at hand to see which of them shows the objects upright.
The 32-bit timestamp wraps every 2^32 us (71.6 min): a backward jump of more than 2^31 us is taken as a wrap and
2^32 us added from there on; smaller backward steps are kept and the events sorted by time (stable).

AEDAT 3.1 (iniVation cAER). The header ends with a ``#!END-HEADER`` line; it names the data format
(``#Format: RAW``, the only one read here) and the event sources (``#Source 1: DVS128``). Then packets, each a
28-byte little-endian header::

    int16 eventType, int16 eventSource, int32 eventSize, eventTSOffset, eventTSOverflow,
    int32 eventCapacity, eventNumber, eventValid

followed by ``eventNumber`` events of ``eventSize`` bytes (``eventCapacity`` equals ``eventNumber`` in files). Polarity
packets (type 1) hold 8-byte events: uint32 data (bit 0 valid, bit 1 polarity with 1 = ON, bits 2..16 y, bits 17..31
x, with (0, 0) the top-left pixel) and int32 timestamp (microseconds, 31 bits); the event time is
``eventTSOverflow << 31 | timestamp``. Events whose valid bit is 0 were deleted by a filter before the file was
written and are skipped (``metadata["invalid_events"]``), as are packets of every other type (special, frame, IMU,
...; ``metadata["skipped_packets"]`` counts them by type). Polarity events from more than one source (a stereo rig)
are refused rather than merged into one image.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import Source, first_index, make_recording

MAGIC = b"#!AER-DAT"
END_HEADER = "!END-HEADER"

# --- AEDAT 2.0, DVS128 addresses ---
AEDAT2_EVENT_BYTES = 8
DVS128_SIZE = (128, 128)  # (height, width)
DVS128_CHIPS = {"DVS128", "Tmpdiff128"}  # jAER AEChip class names that write the DVS128 address
SPECIAL_BITS = 0x8000_8000  # bit 31 jAER special event, bit 15 external sync input
FOREIGN_BITS = 0x7FFF_0000  # bits 16..30: never set by a DVS128
TIMESTAMP_WRAP_US = 1 << 32

# --- AEDAT 3.1 packets ---
PACKET_HEADER = struct.Struct("<hhiiiiii")
POLARITY_TYPE = 1
POLARITY_EVENT_BYTES = 8
POLARITY_TIMESTAMP_OFFSET = 4
POLARITY_EVENT_DTYPE = np.dtype([("data", "<u4"), ("timestamp", "<i4")])
TS_OVERFLOW_SHIFT = 31
PACKET_TYPE_NAMES = {0: "special", 1: "polarity", 2: "frame", 3: "imu6", 4: "imu9", 5: "sample", 6: "ear"}
# Cameras a '#Source <id>: <name>' line may name -> (height, width)
AEDAT3_SENSOR_SIZES = {
    "DVS128": (128, 128),
    "DAVIS128": (128, 128),
    "DAVIS240A": (180, 240),
    "DAVIS240B": (180, 240),
    "DAVIS240C": (180, 240),
    "DAVIS346A": (260, 346),
    "DAVIS346B": (260, 346),
    "DAVIS346Cbsi": (260, 346),
    "DAVIS640": (480, 640),
}


@dataclass(frozen=True)
class AedatHeader:
    """The ``#`` lines (without ``#`` and line ending), their byte offsets, whether ``#!END-HEADER`` closed them, and
    the header's length in bytes (where the data start)."""

    lines: tuple[str, ...]
    offsets: tuple[int, ...]
    closed: bool
    size: int

    @property
    def version(self) -> str:
        """The version of the ``#!AER-DAT<version>`` first line, e.g. ``"2.0"``."""
        return self.lines[0][len(MAGIC) - 1 :].strip()

    def field(self, key: str) -> tuple[str, int] | None:
        """The value and byte offset of the first ``#<key>: <value>`` line (spaces around the key ignored), or None."""
        for line, offset in zip(self.lines, self.offsets):
            name, colon, value = line.partition(":")
            if colon and name.strip() == key:
                return value.strip(), offset
        return None

    def sources(self) -> dict[int, str]:
        """``#Source <id>: <description>`` lines (AEDAT 3.1) as ``{id: description}``."""
        sources = {}
        for line in self.lines:
            name, colon, value = line.partition(":")
            words = name.split()
            if colon and len(words) == 2 and words[0] == "Source" and words[1].isdigit():
                sources[int(words[1])] = value.strip()
        return sources


def read_aedat_header(data: bytes, *, source: Source = None) -> AedatHeader:
    """Parse the ``#`` header lines at the start of ``data``; the data start at ``AedatHeader.size``."""
    if not data.startswith(MAGIC):
        raise EventFormatError(
            source, f"expected an AEDAT file starting with '#!AER-DAT', found {data[:12]!r}", offset=0
        )
    lines: list[str] = []
    offsets: list[int] = []
    position = 0
    closed = False
    while not closed and position < len(data) and data[position] == ord("#"):
        end = data.find(b"\n", position)
        if end < 0:
            raise EventFormatError(
                source, "header line starting with '#' is not terminated by a newline", offset=position
            )
        lines.append(data[position + 1 : end].rstrip(b"\r").decode("latin-1"))
        offsets.append(position)
        position = end + 1
        closed = lines[-1] == END_HEADER
    return AedatHeader(lines=tuple(lines), offsets=tuple(offsets), closed=closed, size=position)


# --- AEDAT 2.0 ---------------------------------------------------------------------------------------------------


def decode_aedat2(data: bytes, *, source: Source = None, sensor_size: tuple[int, int] = DVS128_SIZE) -> Recording:
    """Decode the bytes of a jAER AEDAT 2.0 file of DVS128 addresses (layout in the module docstring).

    ``sensor_size`` ``(height, width)``, at most the DVS128's 128x128, bounds the coordinates (the file does not say
    it). Returns events in microseconds, sorted by t; ``metadata`` holds the header lines and the skipped events.
    """
    height, width = _checked_sensor_size(sensor_size, limit=DVS128_SIZE)
    header = _versioned_header(data, "2.0", source)
    chip = header.field("AEChip")
    if chip is not None and chip[0].rsplit(".", 1)[-1] not in DVS128_CHIPS:
        raise EventFormatError(
            source,
            f"header names AEChip {chip[0]}, expected a camera with the DVS128 address layout "
            f"({', '.join(sorted(DVS128_CHIPS))})",
            offset=chip[1],
        )
    body = memoryview(data)[header.size :]
    if len(body) % AEDAT2_EVENT_BYTES:
        complete = len(body) - len(body) % AEDAT2_EVENT_BYTES
        raise EventFormatError(
            source,
            f"truncated event: {len(body) - complete} bytes left after the last complete "
            f"{AEDAT2_EVENT_BYTES}-byte event",
            offset=header.size + complete,
        )
    words = np.frombuffer(body, dtype=">u4").reshape(-1, 2)
    address = words[:, 0]
    special = (address & SPECIAL_BITS) != 0
    i = first_index(~special & ((address & FOREIGN_BITS) != 0))
    if i is not None:
        raise EventFormatError(
            source,
            f"event {i} has address 0x{int(address[i]):08X} with bits 16..30 set, expected a DVS128 address "
            "(polarity bit 0, x bits 1..7, y bits 8..14)",
            offset=header.size + AEDAT2_EVENT_BYTES * i,
        )
    t = _unwrap_32_bit(words[:, 1])
    kept = np.flatnonzero(~special)
    address = address[kept]
    # Both raw fields count from the far edge of the image (module docstring: libcaer's DVS128 conversion).
    x = (DVS128_SIZE[1] - 1 - ((address >> 1) & 0x7F)).astype(np.uint16)
    y = (DVS128_SIZE[0] - 1 - ((address >> 8) & 0x7F)).astype(np.uint16)
    i = first_index((x >= width) | (y >= height))
    if i is not None:
        raise EventFormatError(
            source,
            f"event {kept[i]} has x={x[i]}, y={y[i]}, outside the {width}x{height} sensor_size",
            offset=header.size + AEDAT2_EVENT_BYTES * int(kept[i]),
        )
    p = np.where(address & 1, np.int8(-1), np.int8(1))
    metadata = {
        "format": "aedat2",
        "version": header.version,
        "header": list(header.lines),
        "special_events": int(special.sum()),
        "sensor": "DVS128",
    }
    return make_recording(t[kept], x, y, p, source=source, sensor_size=(height, width), metadata=metadata)


def read_aedat2(path: str | os.PathLike, *, sensor_size: tuple[int, int] = DVS128_SIZE) -> Recording:
    """Read a jAER AEDAT 2.0 file of DVS128 addresses (CIFAR10-DVS); see ``decode_aedat2``. t in microseconds."""
    return decode_aedat2(Path(path).read_bytes(), source=path, sensor_size=sensor_size)


def _unwrap_32_bit(timestamps: np.ndarray) -> np.ndarray:
    """uint32 microseconds -> int64, adding 2^32 after every backward jump of more than 2^31."""
    t = timestamps.astype(np.int64)
    if t.size > 1:
        wraps = np.diff(t) < -(TIMESTAMP_WRAP_US // 2)
        if wraps.any():
            t[1:] += np.cumsum(wraps, dtype=np.int64) * TIMESTAMP_WRAP_US
    return t


# --- AEDAT 3.1 ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolarityPackets:
    """Where the polarity packets of an AEDAT 3.1 file lie: payload offsets, event counts, overflows, source ids."""

    starts: np.ndarray
    counts: np.ndarray
    overflows: np.ndarray
    source_ids: np.ndarray
    skipped: dict[str, int]

    def event_offsets(self) -> np.ndarray:
        """Byte offset of every polarity event in file order, (N,) int64."""
        first = np.cumsum(self.counts) - self.counts
        within = np.arange(int(self.counts.sum()), dtype=np.int64) - np.repeat(first, self.counts)
        return np.repeat(self.starts, self.counts) + POLARITY_EVENT_BYTES * within


def decode_aedat3(data: bytes, *, source: Source = None, sensor_size: tuple[int, int] | None = None) -> Recording:
    """Decode the bytes of an iniVation AEDAT 3.1 file's polarity events (layout in the module docstring).

    ``sensor_size`` ``(height, width)``: given, or the camera a ``#Source`` line names (``AEDAT3_SENSOR_SIZES``), or
    None. Returns events in microseconds, sorted by t; ``metadata`` holds the header lines, the sources and what was
    skipped.
    """
    if sensor_size is not None:
        sensor_size = _checked_sensor_size(sensor_size, limit=(1 << 15, 1 << 15))
    header = _versioned_header(data, "3.1", source)
    if not header.closed:
        raise EventFormatError(source, "expected a '#!END-HEADER' line before the data (AEDAT 3.1)", offset=header.size)
    data_format = header.field("Format")
    if data_format is not None and data_format[0] != "RAW":
        raise EventFormatError(
            source,
            f"header '#Format: {data_format[0]}', expected RAW (compressed packets are not read)",
            offset=data_format[1],
        )
    packets = _scan_packets(data, header.size, source)
    sources = header.sources()
    # The camera that the polarity packets' source names, else the file's only source.
    only_camera = next(iter(sources.values())) if len(sources) == 1 else ""
    camera = sources.get(_single_source(packets, source), only_camera)
    if sensor_size is None:
        sensor_size = AEDAT3_SENSOR_SIZES.get(camera.partition(" ")[0])
    offsets = packets.event_offsets()
    raw = _records_at(data, offsets)
    valid = np.flatnonzero(raw["data"] & 1)
    timestamp = raw["timestamp"][valid]
    i = first_index(timestamp < 0)
    if i is not None:
        raise EventFormatError(
            source,
            f"polarity event has timestamp {timestamp[i]}, expected 0 <= timestamp < 2^31 us",
            offset=int(offsets[valid[i]]) + POLARITY_TIMESTAMP_OFFSET,
        )
    word = raw["data"][valid]
    x = ((word >> 17) & 0x7FFF).astype(np.uint16)
    y = ((word >> 2) & 0x7FFF).astype(np.uint16)
    if sensor_size is not None:
        height, width = sensor_size
        i = first_index((x >= width) | (y >= height))
        if i is not None:
            raise EventFormatError(
                source,
                f"polarity event has x={x[i]}, y={y[i]}, outside the {width}x{height} sensor",
                offset=int(offsets[valid[i]]),
            )
    overflow = np.repeat(packets.overflows, packets.counts)[valid]
    t = timestamp.astype(np.int64) + (overflow << TS_OVERFLOW_SHIFT)
    p = np.where(word & 2, np.int8(1), np.int8(-1))
    metadata = {
        "format": "aedat3",
        "version": header.version,
        "header": list(header.lines),
        "sources": {str(key): value for key, value in sources.items()},
        "invalid_events": int(raw.size - valid.size),
        "skipped_packets": packets.skipped,
    }
    return make_recording(t, x, y, p, source=source, sensor_size=sensor_size, metadata=metadata)


def read_aedat3(path: str | os.PathLike, *, sensor_size: tuple[int, int] | None = None) -> Recording:
    """Read the polarity events of an iniVation AEDAT 3.1 file (DVS128 Gesture); see ``decode_aedat3``. t in us."""
    return decode_aedat3(Path(path).read_bytes(), source=path, sensor_size=sensor_size)


def _scan_packets(data: bytes, start: int, source: Source) -> PolarityPackets:
    """Walk the packet headers from ``start`` to the end of ``data``, checking each; note the polarity packets."""
    starts, counts, overflows, source_ids = [], [], [], []
    skipped: Counter[str] = Counter()
    position = start
    while position < len(data):
        left = len(data) - position
        if left < PACKET_HEADER.size:
            raise EventFormatError(
                source, f"truncated packet header: {left} bytes left, expected {PACKET_HEADER.size}", offset=position
            )
        event_type, event_source, size, ts_offset, overflow, capacity, number, valid = PACKET_HEADER.unpack_from(
            data, position
        )
        problem = None
        if event_type < 0:
            problem = f"eventType 0x{event_type & 0xFFFF:04X} has bit 15 set (a compressed packet), expected RAW"
        elif min(size, ts_offset, overflow, capacity, number, valid) < 0:
            problem = (
                f"negative packet header field (eventSize {size}, eventTSOffset {ts_offset}, eventTSOverflow "
                f"{overflow}, eventCapacity {capacity}, eventNumber {number}, eventValid {valid})"
            )
        elif event_type == POLARITY_TYPE and (size, ts_offset) != (POLARITY_EVENT_BYTES, POLARITY_TIMESTAMP_OFFSET):
            problem = (
                f"polarity packet with eventSize {size} and eventTSOffset {ts_offset}, "
                f"expected {POLARITY_EVENT_BYTES} and {POLARITY_TIMESTAMP_OFFSET}"
            )
        elif ts_offset + 4 > size:
            problem = f"eventSize {size} bytes cannot hold a 4-byte timestamp at eventTSOffset {ts_offset}"
        elif capacity != number:
            problem = f"eventCapacity {capacity} differs from eventNumber {number} (they are equal in files)"
        elif valid > number:
            problem = f"eventValid {valid} exceeds eventNumber {number}"
        if problem is not None:
            raise EventFormatError(source, problem, offset=position)
        payload = number * size
        if payload > left - PACKET_HEADER.size:
            raise EventFormatError(
                source,
                f"truncated packet: {number} events of {size} bytes need {payload} bytes, "
                f"{left - PACKET_HEADER.size} are left",
                offset=position,
            )
        if event_type == POLARITY_TYPE:
            starts.append(position + PACKET_HEADER.size)
            counts.append(number)
            overflows.append(overflow)
            source_ids.append(event_source)
        else:
            skipped[PACKET_TYPE_NAMES.get(event_type, f"type {event_type}")] += 1
        position += PACKET_HEADER.size + payload
    return PolarityPackets(
        starts=np.asarray(starts, dtype=np.int64),
        counts=np.asarray(counts, dtype=np.int64),
        overflows=np.asarray(overflows, dtype=np.int64),
        source_ids=np.asarray(source_ids, dtype=np.int64),
        skipped=dict(skipped),
    )


def _single_source(packets: PolarityPackets, source: Source) -> int | None:
    """The one source id of the polarity packets (None without any); events of several cameras are refused."""
    ids = np.unique(packets.source_ids)
    if ids.size > 1:
        second = int(np.flatnonzero(packets.source_ids != packets.source_ids[0])[0])
        raise EventFormatError(
            source,
            f"polarity packets come from sources {ids.tolist()}: one camera per file is read, not merged",
            offset=int(packets.starts[second]) - PACKET_HEADER.size,
        )
    return int(ids[0]) if ids.size else None


def _records_at(data: bytes, offsets: np.ndarray) -> np.ndarray:
    """The 8-byte ``POLARITY_EVENT_DTYPE`` records that start at ``offsets`` in ``data``, gathered in one step.

    A view whose records start at every byte (stride 1) makes the gather one fancy index, whatever the packets'
    alignment; one ``frombuffer`` per packet costs about 5 us, which dominates files of small packets.
    """
    if len(data) < POLARITY_EVENT_BYTES:
        return np.empty(0, dtype=POLARITY_EVENT_DTYPE)
    every_byte = np.ndarray(
        shape=(len(data) - POLARITY_EVENT_BYTES + 1,), dtype=POLARITY_EVENT_DTYPE, buffer=data, strides=(1,)
    )
    return every_byte[offsets]


# --- shared ------------------------------------------------------------------------------------------------------


def _versioned_header(data: bytes, version: str, source: Source) -> AedatHeader:
    header = read_aedat_header(data, source=source)
    if header.version != version:
        raise EventFormatError(
            source, f"header '#!AER-DAT{header.version}', expected AEDAT {version} ('#!AER-DAT{version}')", offset=0
        )
    return header


def _checked_sensor_size(sensor_size, *, limit: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` as ints in [1, limit]; anything else is the caller's mistake (ValueError)."""
    try:
        height, width = (int(v) for v in sensor_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"sensor_size must be (height, width), got {sensor_size!r}") from error
    if not (1 <= height <= limit[0] and 1 <= width <= limit[1]):
        raise ValueError(f"sensor_size {sensor_size!r} must lie within (1, 1) .. {limit}")
    return height, width
