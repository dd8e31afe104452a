"""File access shared by the readers: every low-level decoding failure becomes an ``EventFormatError``.

A missing or unreadable file stays an ``OSError`` (``FileNotFoundError``, ``PermissionError``): that is not bad
event data. h5py is imported here, on first use, because importing it (and hdf5plugin) costs about 0.4 s (2 s).
"""

from __future__ import annotations

import os
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


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive, loaded eagerly (no pickles)."""
    with open(path, "rb") as file:
        try:
            archive = np.load(file, allow_pickle=False)
            if isinstance(archive, np.lib.npyio.NpzFile):
                with archive:
                    return {name: archive[name] for name in archive.files}
        except _NPZ_ERRORS as error:
            raise EventFormatError(path, f"not a readable .npz archive ({type(error).__name__}: {error})") from error
    raise EventFormatError(path, "expected an .npz archive of named arrays, found a single .npy array")


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
    return node


def h5_read(dataset: h5py.Dataset, selection: Any = (), *, source: str | os.PathLike) -> np.ndarray:
    """``dataset[selection]``; corrupt chunks or a missing compression filter raise ``EventFormatError``."""
    try:
        return np.asarray(dataset[selection])
    except _H5_ERRORS as error:
        raise EventFormatError(source, f"cannot read HDF5 dataset '{dataset.name}' ({error})") from error


def file_size(path: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    return Path(path).stat().st_size
