"""Users' own recordings through ``faery``: AEDAT4, Prophesee RAW (EVT 2.0/2.1/3.0), Event Stream, DAT.

faery decodes; this module turns its output (``t`` uint64 us, ``x``, ``y`` uint16, ``on`` bool) into the event
contract and its errors into ``EventFormatError``.

- RAW: ``sensor_size`` from the ``%`` header (``prophesee_header``), including the legacy plugins whose headers
  have no geometry (e.g. Gen3 EVT 2.0, 640x480); None when nothing tells. Header fields go to ``metadata``.
  A file without a header naming its encoding (``% evt 3.0`` or ``% format EVT3``, which every RAW file written by
  Prophesee's software carries) is refused: faery would decode any bytes as events. DAT needs a header too.
- Event Stream: faery flips y so that row 0 is the top, as in every other format here.
- AEDAT4: faery 0.7.1 can abort the interpreter (a Rust panic inside a destructor) on some corrupt AEDAT4 headers,
  e.g. a byte that is not UTF-8 in its XML description. The header is therefore opened first in a child process
  (0.3 to 1.5 s, mostly importing faery there); only a header that opens cleanly is decoded here. Before that, the
  sizes that the file claims (the header's length, every packet's length) are checked against its bytes: faery
  allocates a claimed size before reading it, so one flipped bit could make a 4 KB file cost 1.5 GB.

AEDAT4 intensity frames (DAVIS APS): ``iter_aedat4_frames`` decodes the first frame stream with faery's
``aedat.Decoder`` (after the same preflight), as greyscale uint8 frames with their timestamps.

AEDAT4 layout (iniVation; faery's ``aedat/decoder.rs``): ``#!AER-DAT4.0\r\n``, a uint32 length and that many bytes of
``IOHeader`` FlatBuffer (compression, ``file_data_position`` int64 or -1, XML description); then packets, each a
int32 stream id, a uint32 length and that many bytes, up to ``file_data_position`` (a table of contents) or the end.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import pack_events
from evpretrain.events.readers._io import file_size
from evpretrain.events.readers.prophesee_header import read_prophesee_header

FILE_TYPES = {"aedat4": "aedat", "raw": "evt", "es": "es", "dat": "dat"}  # our name -> faery's
# Larger than any EVT 2/3 (11-bit) or DAT (14-bit) coordinate: faery rejects events outside the dimensions it is
# given, and a header without geometry must not make valid events fail.
UNBOUNDED_DIMENSIONS = (1 << 14, 1 << 14)
HEADER_PROBE_TIMEOUT_S = 120
_HEADER_PROBE = "import sys, faery; faery.events_stream_from_file(sys.argv[1], file_type=sys.argv[2])"
AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"
RAW_ENCODING_KEYS = ("evt", "format")
# faery's frame formats -> weights of their channels for the grey value (ITU-R 601-2 luma, as PIL's "L" conversion)
# and the scale to 0-255.
FRAME_GREY = {"L": ((1.0,), 1.0), "I;16": ((1.0,), 255 / 65535), "RGB": ((0.299, 0.587, 0.114), 1.0)}
FRAME_GREY["RGBA"] = ((0.299, 0.587, 0.114, 0.0), 1.0)


def read_with_faery(path: str | os.PathLike, file_type: str) -> Recording:
    """Read ``path`` with faery as ``file_type`` (``"aedat4"``, ``"raw"``, ``"es"`` or ``"dat"``); t in us."""
    metadata, sensor_size = faery_preflight(path, file_type)
    with _faery_errors(path, FILE_TYPES[file_type]):
        events = _open(path, FILE_TYPES[file_type]).to_array()
    return Recording(_contract(events, path, sensor_size), sensor_size, metadata)


def iter_with_faery(
    path: str | os.PathLike, file_type: str, chunk_events: int, sensor_size: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """``path`` decoded by faery packet by packet (faery's packets hold about 10^4 to 10^5 events), gathered into
    ``EVENT_DTYPE`` chunks of at least ``chunk_events`` events (the last may hold fewer), each sorted and checked as
    ``read_with_faery`` checks its events against ``sensor_size`` (``faery_preflight``'s). Memory: one chunk,
    whatever the file's length. Call ``faery_preflight`` first: it refuses the files faery must not be given."""
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    faery_type = FILE_TYPES[file_type]
    with _faery_errors(path, faery_type):
        packets = iter(_open(path, faery_type))
    gathered, count = [], 0
    while True:
        with _faery_errors(path, faery_type):
            packet = next(packets, None)
        if packet is None:
            break
        gathered.append(packet)
        count += len(packet)
        if count >= chunk_events:
            yield _contract(np.concatenate(gathered), path, sensor_size)
            gathered, count = [], 0
    if count:
        yield _contract(np.concatenate(gathered), path, sensor_size)


def iter_aedat4_frames(path: str | os.PathLike, sensor_size: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    """The intensity frames of an AEDAT4 file's first frame stream, in file order: (t, frame) pairs, t the frame's
    timestamp in microseconds (int; the exposure's midpoint in iniVation's Frame schema), frame (H, W) uint8 grey
    (colour and 16-bit frames converted, ``FRAME_GREY``). Raises EventFormatError naming the file if it has no frame
    stream, or a frame is not the whole ``sensor_size`` (H, W) sensor (the events' geometry). Call
    ``faery_preflight`` first. Memory: one packet."""
    from faery import aedat

    with _faery_errors(path, "aedat"):
        decoder = aedat.Decoder(Path(path))
        tracks = [track.id for track in decoder.tracks() if track.data_type == "frame"]
    if not tracks:
        raise EventFormatError(path, "the recording holds no intensity frames (no frame stream): use events:N or ms:T")
    with decoder:
        while True:
            with _faery_errors(path, "aedat"):
                item = next(decoder, None)
            if item is None:
                return
            track, frame = item
            if track.id == tracks[0]:
                yield int(frame.t), _grey_frame(frame, path, sensor_size)


def _grey_frame(frame, path, sensor_size: tuple[int, int]) -> np.ndarray:
    """A faery ``aedat.Frame`` as (H, W) uint8 grey, checked to cover the whole sensor."""
    pixels = frame.pixels
    if (frame.offset_y, frame.offset_x) != (0, 0) or tuple(pixels.shape[:2]) != tuple(sensor_size):
        raise EventFormatError(
            path,
            f"an intensity frame at t={frame.t} us is {pixels.shape[0]}x{pixels.shape[1]} (HxW) at offset "
            f"({frame.offset_y}, {frame.offset_x}), but the events' sensor is {sensor_size[0]}x{sensor_size[1]}: "
            "frames must cover the whole sensor",
        )
    if frame.format not in FRAME_GREY:
        raise EventFormatError(path, f"intensity frame format {frame.format!r} is not one of {list(FRAME_GREY)}")
    if frame.format == "L":
        return np.ascontiguousarray(pixels.reshape(sensor_size), dtype=np.uint8)
    weights, scale = FRAME_GREY[frame.format]
    grey = pixels.reshape(*sensor_size, len(weights)).astype(np.float32) @ np.asarray(weights, np.float32)
    return np.clip(np.round(grey * scale), 0, 255).astype(np.uint8)


def faery_preflight(path: str | os.PathLike, file_type: str) -> tuple[dict, tuple[int, int] | None]:
    """The checks before faery decodes ``path`` (module docstring); return its metadata and sensor size (H, W): a
    RAW or DAT file's from its header (None when the header gives none), an AEDAT4 or ES file's from faery's
    decoder, which reads it from the file's header."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {sorted(FILE_TYPES)}, got {file_type!r}")
    os.stat(path)  # a missing file is FileNotFoundError, not a format error
    metadata: dict = {"format": file_type, "decoder": "faery"}
    sensor_size = None
    if file_type in ("raw", "dat"):
        with open(path, "rb") as file:
            header = read_prophesee_header(file, source=path)
        if not header.fields:
            raise EventFormatError(path, f"expected a '%' text header (a Prophesee {file_type.upper()} file)", offset=0)
        if file_type == "raw" and not any(header.get(key) for key in RAW_ENCODING_KEYS):
            raise EventFormatError(
                path,
                "the '%' header has no 'evt <version>' or 'format <encoding>' line, which every Prophesee RAW file "
                "carries",
                offset=header.size,
            )
        sensor_size = header.geometry(source=path)
        metadata["header"] = dict(header.fields)
    if file_type == "aedat4":
        check_aedat4_sizes(path)
        _probe_header_in_child(path, FILE_TYPES[file_type])
    if file_type in ("aedat4", "es"):
        with _faery_errors(path, FILE_TYPES[file_type]):
            width, height = _open(path, FILE_TYPES[file_type]).dimensions()
        sensor_size = (height, width)
    return metadata, sensor_size


def _contract(events: np.ndarray, path, sensor_size: tuple[int, int] | None) -> np.ndarray:
    """faery's events (``t`` uint64, ``x``, ``y``, ``on``) as a checked ``EVENT_DTYPE`` array."""
    t = events["t"]
    if t.size and t.max() > np.iinfo(np.int64).max:
        raise EventFormatError(path, f"timestamp {t.max()} us does not fit int64")
    polarity = np.where(events["on"], np.int8(1), np.int8(-1))
    return pack_events(t.astype(np.int64), events["x"], events["y"], polarity, source=path, sensor_size=sensor_size)


def read_aedat4(path: str | os.PathLike) -> Recording:
    """Read an AEDAT4 file (the first event stream) through faery."""
    return read_with_faery(path, "aedat4")


def read_prophesee_raw(path: str | os.PathLike) -> Recording:
    """Read a Prophesee RAW file (EVT 2.0, 2.1 or 3.0, version from its header) through faery."""
    return read_with_faery(path, "raw")


def read_event_stream(path: str | os.PathLike) -> Recording:
    """Read an Event Stream (``.es``) file of DVS or ATIS events through faery."""
    return read_with_faery(path, "es")


def check_aedat4_sizes(path: str | os.PathLike) -> None:
    """Check the IOHeader length and every packet length of an AEDAT4 file against its bytes (module docstring)."""
    size = file_size(path)
    start = len(AEDAT4_MAGIC) + 4
    if size < start:
        raise EventFormatError(path, f"file of {size} bytes ends within the AEDAT4 magic and header length", offset=0)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[: len(AEDAT4_MAGIC)] != AEDAT4_MAGIC:
            raise EventFormatError(path, f"expected {AEDAT4_MAGIC!r}, found {data[: len(AEDAT4_MAGIC)]!r}", offset=0)
        (length,) = struct.unpack_from("<I", data, len(AEDAT4_MAGIC))
        if length > size - start:
            raise EventFormatError(
                path, f"IOHeader claims {length} bytes, {size - start} follow", offset=len(AEDAT4_MAGIC)
            )
        position = start + length
        table = _file_data_position(data[start:position], path, start)
        if table != -1 and not position <= table <= size:
            raise EventFormatError(
                path, f"IOHeader puts the file data table at byte {table}, outside the packets ({position}..{size})"
            )
        stop = size if table == -1 else table
        while position < stop:
            if stop - position < 8:
                if table == -1:
                    break  # a partial packet header at the end of an unfinished file: faery stops there too
                raise EventFormatError(path, "truncated packet header before the file data table", offset=position)
            stream, length = struct.unpack_from("<iI", data, position)
            if length > stop - position - 8:
                raise EventFormatError(
                    path,
                    f"packet of stream {stream} claims {length} bytes, {stop - position - 8} are left"
                    + ("" if table == -1 else " before the file data table"),
                    offset=position,
                )
            position += 8 + length


def _file_data_position(header: bytes, source, offset: int) -> int:
    """``file_data_position`` of the IOHeader FlatBuffer (field 1, int64, default -1); bounds-checked reads."""

    def read(fmt: str, at: int):
        if not 0 <= at <= len(header) - struct.calcsize(fmt):
            raise EventFormatError(source, f"IOHeader FlatBuffer points outside its {len(header)} bytes", offset=offset)
        return struct.unpack_from(fmt, header, at)[0]

    table = read("<I", 0)
    vtable = table - read("<i", table)
    entry = 4 + 2 * 1  # vtable: uint16 vtable size, uint16 table size, then one uint16 field offset per field
    if entry + 2 > read("<H", vtable):
        return -1
    field = read("<H", vtable + entry)
    return -1 if field == 0 else read("<q", table + field)


def _open(path: str | os.PathLike, faery_type: str):
    import faery

    return faery.events_stream_from_file(Path(path), file_type=faery_type, dimensions_fallback=UNBOUNDED_DIMENSIONS)


@contextlib.contextmanager
def _faery_errors(path, faery_type: str) -> Iterator[None]:
    """Any failure of faery inside the block becomes EventFormatError; KeyboardInterrupt and the like pass.
    faery raises bare Exception/RuntimeError, and pyo3's PanicException (a BaseException) on Rust panics."""
    try:
        yield
    except BaseException as error:
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        raise EventFormatError(path, f"faery could not decode it as {faery_type}: {error}") from error


def _probe_header_in_child(path: str | os.PathLike, faery_type: str) -> None:
    """Open the file's header with faery in a child process, so that an abort there cannot take us down."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _HEADER_PROBE, os.fspath(path), faery_type],
            capture_output=True,
            text=True,
            timeout=HEADER_PROBE_TIMEOUT_S,
            env={**os.environ, "RUST_BACKTRACE": "0"},
        )
    except subprocess.TimeoutExpired as error:
        raise EventFormatError(path, f"faery did not open its {faery_type} header within {error.timeout} s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise EventFormatError(path, f"faery could not open its {faery_type} header: {reason}")
