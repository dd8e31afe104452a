"""File access shared by the readers: every low-level decoding failure becomes an ``EventFormatError``.

A missing or unreadable file stays an ``OSError`` (``FileNotFoundError``, ``PermissionError``): that is not bad
event data. h5py is imported here, on first use, because importing it (and hdf5plugin) costs about 0.4 s (2 s).

Sizes an HDF5 dataset or a ``.npy`` header claims are checked against the bytes that hold them before anything is
allocated: a few kilobytes claiming 10^12 events must be refused, not make numpy ask for terabytes. Compressed data
may expand by at most ``MAX_COMPRESSION_RATIO``.
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evpretrain.events.contract import EventFormatError

if TYPE_CHECKING:
    import h5py

# What numpy, zipfile and h5py raise on corrupt or foreign bytes (EventFormatError is a ValueError, so code
# that raises it must stay outside the ``try`` blocks that catch these).
# zipfile raises NotImplementedError for an unknown compression method and RuntimeError for an "encrypted" flag,
# both of which a flipped bit in a member header produces.
_NPZ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)
_H5_ERRORS = (KeyError, OSError, ValueError, RuntimeError, TypeError)
# numpy parses a .npy header's dict with the tokenizer and ast: corrupt bytes there raise these as well.
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own limit (np.load's max_header_size)
_NPY_HEADER_ERRORS = (
    struct.error,
    ValueError,
    EOFError,
    OSError,
    SyntaxError,
    tokenize.TokenError,
    zlib.error,
    zipfile.BadZipFile,
)
# Deflate (zip, HDF5 gzip) cannot expand data more than 1032-fold; event columns (DSEC's Blosc-compressed ones
# included) compress far less. A claim beyond this ratio of the stored bytes is a corrupt or hostile size.
MAX_COMPRESSION_RATIO = 1100
NPY_MAGIC = b"\x93NUMPY"


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive, loaded eagerly (no pickles); each member's claimed size is checked first."""
    size = file_size(path)
    with open(path, "rb") as file:
        if file.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise EventFormatError(
                path, "expected an .npz archive of named arrays, found a single .npy array", offset=0
            )
        file.seek(0)
        try:
            with zipfile.ZipFile(file) as archive:
                return {
                    info.filename.removesuffix(".npy"): _zip_member(archive, info, size, path)
                    for info in archive.infolist()
                }
        except EventFormatError:
            raise
        except _NPZ_ERRORS as error:
            raise EventFormatError(path, f"not a readable .npz archive ({type(error).__name__}: {error})") from error


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_bytes: int, source) -> np.ndarray:
    """One ``.npy`` member; its header's shape must fit the member's sizes in the zip's central directory."""
    where = f"member '{info.filename}'"
    if info.header_offset + info.compress_size > archive_bytes:
        raise EventFormatError(
            source,
            f"{where} claims {info.compress_size} compressed bytes, past the end of the {archive_bytes}-byte file",
            offset=info.header_offset,
        )
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_COMPRESSION_RATIO
    if info.file_size > ratio * max(info.compress_size, 1):
        raise EventFormatError(
            source,
            f"{where} claims {info.file_size} bytes uncompressed from {info.compress_size} stored bytes "
            f"(expected at most {ratio}x)",
            offset=info.header_offset,
        )
    with archive.open(info) as member:
        shape, dtype, header_bytes = _npy_header(member, source, where, offset=info.header_offset)
        _check_claim(shape, dtype, info.file_size - header_bytes, source, where, offset=info.header_offset)
    with archive.open(info) as member:
        return _read_npy(member, source, where)


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """The array of a ``.npy`` file (no pickles); the shape its header claims must fit the file's size."""
    with open(path, "rb") as file:
        shape, dtype, header_bytes = _npy_header(file, path, "the .npy file")
        _check_claim(shape, dtype, file_size(path) - header_bytes, path, "the .npy file", offset=header_bytes)
        file.seek(0)
        return _read_npy(file, path, "the .npy file")


def _npy_header(file, source, where: str, *, offset: int = 0) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length in bytes) of the ``.npy`` data at the start of ``file`` (``offset`` in the file)."""
    try:
        version = np.lib.format.read_magic(file)
        # numpy reads the header's claimed length (a uint32 from version 2 on) before it checks it: check it first.
        length_format = "<H" if version == (1, 0) else "<I"
        start = file.tell()
        (length,) = struct.unpack(length_format, file.read(struct.calcsize(length_format)))
        if length > MAX_NPY_HEADER_BYTES:
            raise EventFormatError(
                source, f"{where} has a {length}-byte header, expected at most {MAX_NPY_HEADER_BYTES}", offset=offset
            )
        file.seek(start)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(file)
    except EventFormatError:
        raise
    except _NPY_HEADER_ERRORS as error:
        raise EventFormatError(
            source, f"{where} is not a readable .npy array ({type(error).__name__}: {error})", offset=offset
        ) from error
    return shape, dtype, file.tell()


def _check_claim(shape, dtype: np.dtype, available: int, source, where: str, *, offset: int) -> None:
    """Refuse a header whose shape needs more bytes than ``available`` (checked before numpy allocates them)."""
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > available:
        raise EventFormatError(
            source,
            f"{where} claims shape {shape} of {dtype} ({claimed} bytes), but only {max(available, 0)} bytes follow "
            "its header",
            offset=offset,
        )


def _read_npy(file, source, where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(file, allow_pickle=False)
    except _NPZ_ERRORS as error:
        raise EventFormatError(
            source, f"{where} is not a readable .npy array ({type(error).__name__}: {error})"
        ) from error
    except MemoryError as error:
        raise EventFormatError(source, f"{where} needs more memory than is free ({error})") from error


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only; foreign or truncated bytes raise ``EventFormatError``."""
    import h5py

    os.stat(path)  # a missing file is FileNotFoundError, not a format error
    try:
        return h5py.File(path, "r")
    except _H5_ERRORS as error:
        raise EventFormatError(path, f"not a readable HDF5 file ({error})") from error


def h5_dataset(file: h5py.File, key: str, *, source: str | os.PathLike) -> h5py.Dataset:
    """The dataset at ``key``; a missing key or a group in its place raises naming the key."""
    import h5py

    try:
        node = file.get(key)
    except _H5_ERRORS as error:
        raise EventFormatError(source, f"cannot open HDF5 object '{key}' ({error})") from error
    if not isinstance(node, h5py.Dataset):
        found = "nothing" if node is None else type(node).__name__
        raise EventFormatError(source, f"expected an HDF5 dataset '{key}', found {found}")
    _check_h5_size(node, key, source)
    return node


def _check_h5_size(dataset: h5py.Dataset, key: str, source) -> None:
    """Refuse a dataset whose shape claims more bytes than its stored chunks can hold (module docstring).

    Unwritten chunks read as the fill value, so a file of a few kilobytes may claim any shape: reading it would
    allocate the whole claim.
    """
    try:
        claimed = dataset.size * dataset.dtype.itemsize
        stored = dataset.id.get_storage_size()
        filters = dataset.id.get_create_plist().get_nfilters()
    except _H5_ERRORS as error:
        raise EventFormatError(source, f"cannot inspect HDF5 dataset '{key}' ({error})") from error
    ratio = MAX_COMPRESSION_RATIO if filters else 1
    if claimed > ratio * stored:
        raise EventFormatError(
            source,
            f"HDF5 dataset '{key}' claims shape {dataset.shape} of {dataset.dtype} ({claimed} bytes), but the file "
            f"stores {stored} bytes of it" + (f" (compressed: expected at most {ratio}x)" if filters else ""),
        )


def h5_read(dataset: h5py.Dataset, selection: Any = (), *, source: str | os.PathLike) -> np.ndarray:
    """``dataset[selection]``; corrupt chunks or a missing compression filter raise ``EventFormatError``."""
    try:
        return np.asarray(dataset[selection])
    except _H5_ERRORS as error:
        raise EventFormatError(source, f"cannot read HDF5 dataset '{dataset.name}' ({error})") from error
    except MemoryError as error:
        raise EventFormatError(
            source, f"HDF5 dataset '{dataset.name}' of shape {dataset.shape} needs more memory than is free ({error})"
        ) from error


def file_size(path: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    return Path(path).stat().st_size
