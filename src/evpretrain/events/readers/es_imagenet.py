"""ES-ImageNet ``.npz`` samples (Lin et al., 2021): ImageNet images turned into 8 steps of ODG events.

Each file holds ``pos`` and ``neg``, uint8 arrays of shape (N, 3) with rows ``(row, column, step)``: the dataset's
generator stores ``torch.nonzero`` of an (H, W) image, so column 0 is the image row (our y) and column 1 the image
column (our x), although the dataset's loader names them x and y. ``step`` runs 1..8 and has no physical clock;
here step s becomes ``t = (s - 1) * step_us`` microseconds, with ``step_us`` an explicit keyword.

Coordinates: the generator keeps events with 16 < row, column < 240 in a canvas whose longer side is the image's
254 px. The dataset's loader then shifts each sample by ``((254 - a) // 2, (254 - b) // 2)``, where ``a`` and ``b``
are the resized image height and width listed per sample in ``trainlabel.txt`` / ``vallabel.txt``, and crops rows
and columns 16..239, giving 224x224. Pass ``image_size=(a, b)`` to reproduce that exactly (events falling outside
the crop are dropped, as the crop drops them). Without it the shift is taken as 0, which is the loader's shift
along the image's longer side (where a or b is 254) and leaves the shorter side uncentred; every event then lies
inside the crop, and one that does not is an error.
"""

from __future__ import annotations

import os

import numpy as np

from evpretrain.events.contract import EventFormatError, Recording
from evpretrain.events.readers._columns import first_index, make_recording
from evpretrain.events.readers._io import load_npz

SENSOR_SIZE = (224, 224)
CANVAS_SIDE = 254  # the generator resizes each image's longer side to this
CROP_START = 16  # the loader crops rows and columns 16..239
NUM_STEPS = 8
DEFAULT_STEP_US = 1000


def read_es_imagenet(
    path: str | os.PathLike, *, step_us: int = DEFAULT_STEP_US, image_size: tuple[int, int] | None = None
) -> Recording:
    """Read an ES-ImageNet ``.npz`` sample as 224x224 events (see the module docstring).

    ``step_us``: microseconds per time step (steps 1..8 map to 0, step_us, ..., 7 * step_us). ``image_size``:
    the sample's resized ``(height, width)`` from the dataset's label file, to centre it as the dataset's loader does.
    Within a step, ON events come before OFF events.
    """
    if step_us <= 0:
        raise ValueError(f"step_us must be positive, got {step_us}")
    arrays = load_npz(path)
    if "pos" not in arrays or "neg" not in arrays:
        raise EventFormatError(path, f"holds arrays {sorted(arrays)}, expected 'pos' and 'neg' (an ES-ImageNet sample)")
    for name in ("pos", "neg"):
        array = arrays[name]
        if array.ndim != 2 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.integer):
            raise EventFormatError(
                path, f"'{name}' has shape {array.shape} and dtype {array.dtype}, expected (N, 3) integers"
            )
    rows = np.concatenate([arrays["pos"], arrays["neg"]]).astype(np.int64)
    polarity = np.repeat(np.array([1, -1], np.int8), [len(arrays["pos"]), len(arrays["neg"])])
    step = rows[:, 2]
    i = first_index((step < 1) | (step > NUM_STEPS))
    if i is not None:
        raise EventFormatError(
            path, f"event {i} (counting 'pos' then 'neg') has time step {step[i]}, expected 1..{NUM_STEPS}"
        )
    shift_y, shift_x = (0, 0) if image_size is None else ((CANVAS_SIDE - side) // 2 for side in image_size)
    y = rows[:, 0] + shift_y - CROP_START
    x = rows[:, 1] + shift_x - CROP_START
    height, width = SENSOR_SIZE
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    if image_size is None and not inside.all():
        i = first_index(~inside)
        raise EventFormatError(
            path,
            f"event {i} (counting 'pos' then 'neg') is at row {rows[i, 0]}, column {rows[i, 1]}, outside the "
            f"generator's window {CROP_START} < row, column < {CROP_START + height}",
        )
    metadata = {
        "format": "es_imagenet",
        "step_us": step_us,
        "image_size": image_size,
        "events_outside_crop": int((~inside).sum()),
    }
    t = (step[inside] - 1) * step_us
    return make_recording(
        t, x[inside], y[inside], polarity[inside], source=path, sensor_size=SENSOR_SIZE, metadata=metadata
    )
