"""One entry point for every supported file: pick the reader by name, magic bytes or suffix."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from evpretrain.config import ConfigError
from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers import ddd17
from evpretrain.events.readers.aedat_legacy import read_aedat2, read_aedat3
from evpretrain.events.readers.atis_bin import read_atis_bin
from evpretrain.events.readers.ddd17 import read_ddd17
from evpretrain.events.readers.dsec import read_dsec
from evpretrain.events.readers.es_imagenet import read_es_imagenet
from evpretrain.events.readers.faery_formats import read_with_faery
from evpretrain.events.readers.mvsec import read_mvsec
from evpretrain.events.readers.n_imagenet import read_n_imagenet
from evpretrain.events.readers.prophesee_dat import read_prophesee_dat


@dataclass(frozen=True)
class EventFormat:
    reader: Callable[..., Recording]
    description: str


FORMATS: dict[str, EventFormat] = {
    "bin": EventFormat(read_atis_bin, "N-MNIST / N-Caltech101 .bin: ATIS events, 5 bytes each"),
    "dat": EventFormat(read_prophesee_dat, "Prophesee DAT v1/v2 .dat: N-Cars, Gen1/Gen4 automotive, Metavision"),
    "n_imagenet": EventFormat(read_n_imagenet, "N-ImageNet .npz (event_data, or x_pos/y_pos/timestamp/polarity)"),
    "es_imagenet": EventFormat(read_es_imagenet, "ES-ImageNet .npz (pos/neg rows; options step_us=, image_size=)"),
    "dsec": EventFormat(read_dsec, "DSEC events.h5, 640x480 (option rectify_map= for rectify_map.h5)"),
    "ddd17": EventFormat(read_ddd17, "DDD17 as repackaged by ESS: folder with events.dat.t/.xyp, 346x260"),
    "mvsec": EventFormat(read_mvsec, "MVSEC <sequence>_data.hdf5, 346x260 (option camera=left|right)"),
    "aedat2": EventFormat(read_aedat2, "jAER AEDAT 2.0 .aedat of a DVS128: CIFAR10-DVS (option sensor_size=)"),
    "aedat3": EventFormat(read_aedat3, "iniVation AEDAT 3.1 .aedat polarity events: DVS Gesture (option sensor_size=)"),
    "raw": EventFormat(partial(read_with_faery, file_type="raw"), "Prophesee RAW .raw, EVT 2.0/2.1/3.0 (faery)"),
    "aedat4": EventFormat(partial(read_with_faery, file_type="aedat4"), "AEDAT4 .aedat4 (faery)"),
    "es": EventFormat(partial(read_with_faery, file_type="es"), "Event Stream .es (faery)"),
    "dat_faery": EventFormat(
        partial(read_with_faery, file_type="dat"), "Prophesee DAT decoded by faery (checks 'dat')"
    ),
}

SUFFIXES = {".bin": "bin", ".dat": "dat", ".raw": "raw", ".evt": "raw", ".aedat4": "aedat4", ".es": "es"}
AEDAT_VERSIONS = {"2.0": "aedat2", "3.1": "aedat3", "4.0": "aedat4"}  # '#!AER-DAT<version>' -> format
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def supported_formats() -> dict[str, str]:
    """Format name -> one-line description, for ``read_recording(format=...)`` and the CLI."""
    return {name: entry.description for name, entry in FORMATS.items()}


def read_recording(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    time_origin: Literal["file", "first_event"] = "file",
    **options,
) -> Recording:
    """Read any supported file into a validated ``Recording`` (events sorted by t, microseconds).

    ``format``: a name from ``supported_formats()`` (another name raises ConfigError), or None to detect it
    (``detect_format``; a file it cannot tell raises EventFormatError).
    ``time_origin``: ``"file"`` keeps the timestamps as the file stores them; ``"first_event"`` shifts them so that
    the first event is at t = 0 (``metadata["time_shift_us"]`` records the shift). Exports of one recording may
    count from different clock origins (a Metavision DAT export and its EVT 3.0 RAW differ by a constant that neither
    file records), so compare recordings from different files with ``"first_event"``.
    ``options`` go to the format's reader (e.g. ``step_us`` for ES-ImageNet, ``rectify_map`` for DSEC, ``camera``
    for MVSEC).
    """
    name = detect_format(path) if format is None else format
    if name not in FORMATS:
        # A misspelt name is a bad option, not a bad file: ConfigError, like every name registry.
        raise ConfigError(f"{path}: unknown format {name!r}; supported: {', '.join(FORMATS)}")
    if time_origin not in ("file", "first_event"):
        raise ValueError(f"time_origin must be 'file' or 'first_event', got {time_origin!r}")
    try:
        recording = FORMATS[name].reader(path, **options)
    except MemoryError as error:
        # The readers check claimed sizes against the file's bytes; this is the last line for what slips past them.
        raise EventFormatError(path, f"reading it as {name} needs more memory than is free ({error})") from error
    if time_origin == "first_event" and recording.events.size:
        shift = int(recording.events["t"][0])
        recording.events["t"] -= shift
        recording.metadata["time_shift_us"] = -shift
    return recording


def read_events(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    time_origin: Literal["file", "first_event"] = "file",
    **options,
) -> np.ndarray:
    """``read_recording(path, ...).events``: an ``EVENT_DTYPE`` array."""
    return read_recording(path, format=format, time_origin=time_origin, **options).events


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its magic bytes, what an HDF5/npz file holds, or its suffix."""
    found = known_format(path)
    if found is None:
        raise EventFormatError(
            path, f"cannot tell the format from its first bytes or suffix; pass format=, one of: {', '.join(FORMATS)}"
        )
    return found


def known_format(path: str | os.PathLike) -> str | None:
    """``detect_format``'s answer, or None for a file no reader claims (a README beside recordings); a claimed file
    that cannot be read as its format (an AEDAT version we do not read, a damaged HDF5 file) still raises."""
    path = Path(path)
    if path.is_dir() or path.name in (ddd17.T_FILE, ddd17.XYP_FILE):
        if (ddd17.sequence_dir(path) / ddd17.T_FILE).is_file():
            return "ddd17"
        raise EventFormatError(path, f"a folder is read only as a DDD17 sequence, and it holds no {ddd17.T_FILE}")
    with open(path, "rb") as file:
        magic = file.read(16)
    if magic.startswith(b"#!AER-DAT"):
        version = magic[len(b"#!AER-DAT") :].split(b"\r")[0].split(b"\n")[0].decode("latin-1")
        if version in AEDAT_VERSIONS:
            return AEDAT_VERSIONS[version]
        raise EventFormatError(
            path, f"AEDAT {version} is not supported (2.0, 3.1 and 4.0 are): convert it to AEDAT4 (dv, faery)", offset=0
        )
    if magic.startswith(b"Event Stream"):
        return "es"
    if magic.startswith(HDF5_MAGIC):
        return _hdf5_format(path)
    if magic.startswith(ZIP_MAGIC):
        return _npz_format(path)
    return SUFFIXES.get(path.suffix.lower())


def _hdf5_format(path: Path) -> str:
    from evpretrain.events.readers._io import open_h5

    with open_h5(path) as file:
        if "events" in file and "ms_to_idx" in file:
            return "dsec"
        if "davis" in file:
            return "mvsec"
        keys = sorted(file.keys())
    raise EventFormatError(
        path, f"HDF5 file with top-level keys {keys} is neither DSEC (events, ms_to_idx) nor MVSEC (davis)"
    )


def _npz_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = {Path(name).stem for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise EventFormatError(path, f"not a readable .npz archive ({error})") from error
    if "event_data" in names or "x_pos" in names:
        return "n_imagenet"
    if {"pos", "neg"} <= names:
        return "es_imagenet"
    raise EventFormatError(
        path, f"npz archive with arrays {sorted(names)} is neither N-ImageNet (event_data) nor ES-ImageNet (pos, neg)"
    )
