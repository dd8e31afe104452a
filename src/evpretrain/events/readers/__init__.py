"""Event readers: every supported file format -> the event contract (``evpretrain.events.contract``).

``read_recording(path)`` / ``read_events(path)`` pick the format by magic bytes, content or suffix; the per-format
functions below document each layout, its units and its checks; ``stream_recording(path)`` reads a long
recording chunk by chunk, ``iter_aedat4_frames(path, sensor_size)`` an AEDAT4 file's intensity frames. Bad input
raises ``EventFormatError`` naming the file, the byte offset where one applies and what was expected. h5py,
hdf5plugin and faery load on first use.
"""

from evpretrain.events.readers.aedat_legacy import decode_aedat2, decode_aedat3, read_aedat2, read_aedat3
from evpretrain.events.readers.atis_bin import decode_atis_bin, read_atis_bin
from evpretrain.events.readers.ddd17 import Ddd17Events, read_ddd17
from evpretrain.events.readers.dispatch import detect_format, read_events, read_recording, supported_formats
from evpretrain.events.readers.dsec import DsecEvents, load_rectify_map, read_dsec
from evpretrain.events.readers.es_imagenet import read_es_imagenet
from evpretrain.events.readers.faery_formats import (
    iter_aedat4_frames,
    read_aedat4,
    read_event_stream,
    read_prophesee_raw,
    read_with_faery,
)
from evpretrain.events.readers.mvsec import MvsecEvents, read_mvsec
from evpretrain.events.readers.n_imagenet import read_n_imagenet
from evpretrain.events.readers.prophesee_dat import read_prophesee_dat
from evpretrain.events.readers.streaming import EventStream, stream_recording

__all__ = [
    "Ddd17Events",
    "DsecEvents",
    "EventStream",
    "MvsecEvents",
    "decode_aedat2",
    "decode_aedat3",
    "decode_atis_bin",
    "detect_format",
    "iter_aedat4_frames",
    "load_rectify_map",
    "read_aedat2",
    "read_aedat3",
    "read_aedat4",
    "read_atis_bin",
    "read_ddd17",
    "read_dsec",
    "read_es_imagenet",
    "read_event_stream",
    "read_events",
    "read_mvsec",
    "read_n_imagenet",
    "read_prophesee_dat",
    "read_prophesee_raw",
    "read_recording",
    "read_with_faery",
    "stream_recording",
    "supported_formats",
]
