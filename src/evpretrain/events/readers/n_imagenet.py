"""N-ImageNet ``.npz`` samples (Kim et al., ICCV 2021), recorded with a 640x480 event camera.

Two layouts exist, as in the dataset's own loader (``load_event`` in 82magnolia/n_imagenet):
- ``event_data``: a structured array with fields ``x``, ``y``, ``t``, ``p`` (the distributed, "compressed" files);
- ``x_pos``, ``y_pos``, ``timestamp``, ``polarity``: four 1-D arrays (the older layout).

Timestamps are integer microseconds: the dataset's loader divides them by ``TIME_SCALE = 1e6`` to get seconds and
multiplies back by 1e6 to recover integer ticks. Polarity is stored as {0, 1} (bool) or {-1, +1}.
"""

from __future__ import annotations

import os

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, make_recording, signed_polarity
from evpretrain.events.readers._io import load_npz

SENSOR_SIZE = (480, 640)  # (height, width), the dataset loader's SENSOR_H, SENSOR_W
STRUCTURED_FIELDS = ("x", "y", "t", "p")
COLUMN_KEYS = ("x_pos", "y_pos", "timestamp", "polarity")


def read_n_imagenet(path: str | os.PathLike) -> Recording:
    """Read an N-ImageNet ``.npz`` sample (either layout of the module docstring); t in microseconds."""
    arrays = load_npz(path)
    if "event_data" in arrays:
        table = arrays["event_data"]
        missing = [name for name in STRUCTURED_FIELDS if table.dtype.names is None or name not in table.dtype.names]
        if missing or table.ndim != 1:
            raise EventFormatError(
                path,
                f"'event_data' has dtype {table.dtype} and shape {table.shape}, expected a 1-D structured array "
                f"with fields {STRUCTURED_FIELDS} (missing {missing})",
            )
        x, y, t, p = (table[name] for name in STRUCTURED_FIELDS)
        layout = "event_data"
    elif all(key in arrays for key in COLUMN_KEYS):
        x, y, t, p = (arrays[key] for key in COLUMN_KEYS)
        shapes = {key: arrays[key].shape for key in COLUMN_KEYS}
        if any(len(shape) != 1 or shape != shapes["timestamp"] for shape in shapes.values()):
            raise EventFormatError(path, f"columns have shapes {shapes}, expected equal 1-D shapes")
        layout = "x_pos/y_pos/timestamp/polarity"
    else:
        raise EventFormatError(
            path,
            f"holds arrays {sorted(arrays)}, expected 'event_data' or {list(COLUMN_KEYS)} (an N-ImageNet sample)",
        )
    return make_recording(
        _microseconds(t, path),
        x,
        y,
        signed_polarity(p, source=path),
        source=path,
        sensor_size=SENSOR_SIZE,
        metadata={"format": "n_imagenet", "layout": layout},
    )


def _microseconds(t: np.ndarray, source) -> np.ndarray:
    """Integer microsecond timestamps as int64; floats are accepted only where they hold whole numbers."""
    if np.issubdtype(t.dtype, np.integer):
        if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
            raise EventFormatError(source, f"timestamp {t.max()} does not fit int64 microseconds")
        return t.astype(np.int64)
    if np.issubdtype(t.dtype, np.floating):
        i = first_index(~(np.isfinite(t) & (t == np.round(t)) & (np.abs(t) < 2.0**62)))
        if i is None:
            return t.astype(np.int64)
        raise EventFormatError(source, f"event {i} has timestamp {t[i]}, expected whole microseconds")
    raise EventFormatError(source, f"timestamps have dtype {t.dtype}, expected integer microseconds")
