"""DDD17 semantic segmentation (EV-SegNet labels, ESS event release) -> one labelled event window a label image.

Source layout (``ddd17_seg.tar.gz`` of github.com/uzh-rpg/ess, read by its ``datasets/ddd17_events_loader.py``)::

    <root>/dir<N>/events.dat.t, events.dat.xyp     all events of the recording (see readers/ddd17.py)
    <root>/dir<N>/index/index_{10,50,250}ms.npy     a row per video frame: (t_ns, event_index, event_index_before)
    <root>/dir<N>/segmentation_masks/*_<k>.png      EV-SegNet label of frame k (1-based: index row k - 1)

Protocol (the paper's code, github.com/BIT-Vision/EventPretrain ``dataset/finetune_semseg/ft_ddd17_dataset.py``,
which follows ESS):

- One sample a label image. Its events end at the frame: file rows before ``event_index`` of its index row.
- ``window="count"`` (default): the last ``num_events`` of those events inside the label's crop.
  ``window="duration"``: rows ``[event_index_before, event_index)`` of ``index_<duration_ms>ms.npy`` (ESS's
  ``fixed_duration`` mode; EV-SegNet's 50 ms windows), inside the crop.
- Crop: the labels cover rows 0-199 of the 346x260 sensor (EV-SegNet cut the bottom 60 rows, the car bonnet; ESS
  drops them with ``[:, :-60, :]``), so events with y >= 200 are dropped and the stores' sensor size is (200, 346).
- Masks as stored: 6 classes (ids 0-5, ``CLASS_NAMES``), 255 = ignore.
- Splits by folder: train dir0, dir3, dir4, dir6, dir7; test dir1 (the paper's code by name; ESS's loader picks the
  same folders by sorted position and reports on dir1, its "valid" split).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evpretrain.config import from_mapping, to_mapping
from evpretrain.data.config import DDD17_LABEL_SIZE as LABEL_SIZE
from evpretrain.data.config import Ddd17ConvertConfig
from evpretrain.data.store import EventStoreWriter
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, validate_events
from evpretrain.events.readers.ddd17 import SENSOR_SIZE, T_FILE, XYP_FILE, Ddd17Events
from evpretrain.workers import worker_pool

# Class ids 0-5 as ESS names them (config/settings.py); EV-SegNet's README: flat, construction+sky, object,
# nature, human, vehicle.
CLASS_NAMES = ("flat", "background", "object", "vegetation", "human", "vehicle")
IGNORE_LABEL = 255
MASK_DIR = "segmentation_masks"
WINDOWS_PER_JOB = 32  # label images a worker task cuts: enough to amortise the hand-off, small enough to balance


@dataclass(frozen=True)
class LabelImage:
    """One label mask and the index row of its frame: (t_ns, event_index, event_index_before)."""

    mask: Path
    index_row: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.mask.parent.parent.name}/{self.mask.stem}"


def frame_number(mask: Path) -> int:
    """The 1-based frame number a mask is named after (``segmentation_00000123.png`` -> 123), as ESS parses it."""
    digits = mask.stem.rsplit("_", 1)[-1]
    if not digits.isdigit() or int(digits) < 1:
        raise EventFormatError(mask, "expected a label file named <prefix>_<frame number from 1>.png")
    return int(digits)


def label_images(directory: Path, config: Ddd17ConvertConfig) -> list[LabelImage]:
    """A sequence's label masks in frame order, each with its index row; checks the index against the events."""
    mask_dir = directory / MASK_DIR
    if not mask_dir.is_dir():
        hint = f" (unzip {MASK_DIR}.zip there)" if (directory / f"{MASK_DIR}.zip").exists() else ""
        raise FileNotFoundError(f"{mask_dir}: missing; expected the EV-SegNet label masks *_<frame>.png{hint}")
    masks = sorted(mask_dir.glob("*.png"), key=frame_number)
    if not masks:
        raise FileNotFoundError(f"{mask_dir}: no *.png label masks")
    index_path = directory / "index" / config.index_file
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: missing; expected the ESS frame index (t_ns, event_index, before)")
    sequence = Ddd17Events(directory)
    index, num_events = sequence.image_index(config.index_ms), sequence.num_events
    images = []
    for mask in masks:
        row = frame_number(mask) - 1
        if row >= len(index):
            raise EventFormatError(index_path, f"has {len(index)} rows, none for frame {row + 1} of {mask.name}")
        t_ns, end, start = (int(v) for v in index[row])
        if not 0 <= end <= num_events or (config.window == "duration" and start > end):
            raise EventFormatError(
                index_path,
                f"row {row} (for {mask.name}) is (t_ns, event_index, event_index_before) = {(t_ns, end, start)}, "
                f"expected 0 <= event_index <= {num_events} (the events in {T_FILE}) and before <= event_index",
            )
        images.append(LabelImage(mask, (t_ns, end, start)))
    return images


def read_label_mask(path: Path) -> np.ndarray:
    """An EV-SegNet mask as (200, 346) uint8 class ids; raises unless every value is 0-5 or 255."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mask = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as error:  # what Pillow raises on foreign or truncated bytes
        raise EventFormatError(path, f"not a readable PNG label image ({error})") from error
    if mask.ndim == 3 and (mask[..., :3] == mask[..., :1]).all():  # grey stored as RGB(A): one channel holds it
        mask = mask[..., 0]
    if mask.shape != LABEL_SIZE:
        raise EventFormatError(path, f"label image has shape {mask.shape}, expected {LABEL_SIZE} (H, W) class ids")
    bad = np.argwhere((mask > len(CLASS_NAMES) - 1) & (mask != IGNORE_LABEL))
    if bad.size:
        row, col = bad[0]
        raise EventFormatError(
            path, f"pixel (row {row}, col {col}) holds {mask[row, col]}, expected a class id 0-5 or {IGNORE_LABEL}"
        )
    return mask.astype(np.uint8)


def last_events_in_crop(sequence: Ddd17Events, end: int, count: int, height: int = LABEL_SIZE[0]) -> np.ndarray:
    """The last ``count`` events with ``y < height`` among file rows ``[0, end)``, oldest first (fewer if the
    recording has fewer). Reads backwards from ``end``, sizing each read by the share of rows found inside so far,
    so a window costs about one read."""
    chunks, found, stop = [], 0, end
    step = count + count // 8 + 1  # the cut bottom rows (the bonnet) hold a small share of the events
    while found < count and stop > 0:
        start = max(stop - step, 0)
        chunk = sequence.rows(start, stop)
        chunk = chunk[chunk["y"] < height]
        chunks.append(chunk)
        found, stop = found + len(chunk), start
        share = found / (end - stop)
        step = int((count - found) / share * 1.125) + 1 if share > 0 else 2 * step
    if len(chunks) == 1:  # the usual case; concatenating 13-byte records costs as much as reading them
        events = chunks[0]
    else:
        events = np.concatenate(chunks[::-1]) if chunks else np.empty(0, EVENT_DTYPE)
    events = events[max(len(events) - count, 0) :]
    # Each read is checked for order; this catches a step backwards where two reads meet.
    return validate_events(events, source=sequence.directory / T_FILE)


def window_events(sequence: Ddd17Events, image: LabelImage, config: Ddd17ConvertConfig) -> np.ndarray:
    """The events of one label image's window (``config.window``), inside the crop, sorted; t in microseconds."""
    _, end, start = image.index_row
    if config.window == "count":
        return last_events_in_crop(sequence, end, config.num_events)
    events = sequence.rows(max(start, 0), end)
    return events[events["y"] < LABEL_SIZE[0]]


@dataclass(frozen=True)
class _Job:
    directory: Path
    images: tuple[LabelImage, ...]
    config: Ddd17ConvertConfig


def _cut(job: _Job) -> list[dict[str, Any]]:
    sequence = Ddd17Events(job.directory)
    return [
        {"events": window_events(sequence, image, job.config), "masks": read_label_mask(image.mask), "name": image.name}
        for image in job.images
    ]


def _ordered_map(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, jobs)`` in order; with ``workers > 1`` in processes, at most ``2 * workers`` results held at once
    (a plain ``Executor.map`` submits every job and would buffer a whole dataset behind a slow writer)."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    with worker_pool(workers) as pool:
        pending: deque[Future] = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _source_files(folders: list[str], config: Ddd17ConvertConfig) -> list[str]:
    names = (T_FILE, XYP_FILE, f"index/{config.index_file}", f"{MASK_DIR}/*.png")
    return [f"{folder}/{name}" for folder in folders for name in names]


def convert(root: Path, out: Path, settings: Mapping[str, Any] | None, *, workers: int, progress: bool) -> list[Path]:
    """Write ``out/<split>.h5`` (one window a label image, ``masks`` (200, 346) uint8) for each configured split.

    Every folder, index row and mask name is checked before the first window is cut, so a broken copy fails fast.
    """
    from tqdm import tqdm

    config = from_mapping(Ddd17ConvertConfig, settings or {}, "data.convert.ddd17")
    root = Path(root)
    plan: dict[str, list[list[LabelImage]]] = {}
    for split, folders in config.splits.items():
        for folder in folders:
            if not (root / folder).is_dir():
                raise FileNotFoundError(f"{root / folder}: missing; split {split!r} expects this sequence folder")
        plan[split] = [label_images(root / folder, config) for folder in folders]
    written = []
    for split, folders in config.splits.items():
        jobs = [
            _Job(root / folder, tuple(images[i : i + WINDOWS_PER_JOB]), config)
            for folder, images in zip(folders, plan[split])
            for i in range(0, len(images), WINDOWS_PER_JOB)
        ]
        total = sum(len(images) for images in plan[split])
        path = Path(out) / f"{split}.h5"
        attrs = {
            "split": split,
            "dataset": "ddd17",
            "class_names": list(CLASS_NAMES),
            "ignore_label": IGNORE_LABEL,
            "window_convention": config.describe_window(),
            "mask_convention": (
                f"the label of the window's last frame (segmentation_masks/*_<k>.png is frame k, index row k - 1); "
                f"class ids 0-{len(CLASS_NAMES) - 1}, {IGNORE_LABEL} = ignore"
            ),
            "crop": f"rows 0-{LABEL_SIZE[0] - 1} of the {SENSOR_SIZE[1]}x{SENSOR_SIZE[0]} sensor (the labels' extent)",
            "sequences": list(folders),
            "source_files": _source_files(folders, config),
        }
        with (
            EventStoreWriter(
                path,
                sensor_size=LABEL_SIZE,
                source=f"DDD17 semantic segmentation (EV-SegNet labels, ESS release); converted from {root.resolve()}",
                builder_config={"dataset": "ddd17", "split": split, **to_mapping(config)},
                attrs=attrs,
                compression=config.compression,
            ) as writer,
            tqdm(total=total, desc=f"ddd17/{split}", unit="window", disable=not progress) as bar,
        ):
            for samples in _ordered_map(_cut, jobs, workers):
                for sample in samples:
                    writer.add_sample(**sample)
                bar.update(len(samples))
        written.append(path)
    return written
