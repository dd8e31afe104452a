"""DSEC-Semantic (Sun et al., ECCV 2022) -> labelled event windows, cut as the paper's code and ESS cut them.

Sources read: the paper's loader (github BIT-Vision/EventPretrain: dataset/finetune_semseg/ft_dsec_dataset.py, its
defaults in main_finetune_semseg.py) and the ESS loader it adapts (github uzh-rpg/ess: DSEC/dataset/sequence.py,
DSEC/dataset/provider.py, DSEC/utils/eventslicer.py, config/settings.py).

Layout of a copy, per split folder ``train`` and ``test`` (train_events.zip / test_events.zip merged with
train_semantic_segmentation.zip / test_semantic_segmentation.zip as downloaded):
  <root>/<split>/<sequence>/events/left/events.h5 and rectify_map.h5
  <root>/<split>/<sequence>/11classes/000000.png ...          640x440 8-bit, class ids 0-10, 255 = ignore
  <root>/<split>/<sequence>/<sequence>_semantic_timestamps.txt  one integer a label, microseconds, the event clock
ESS's README and the paper's code move the labels under ``semantic/``; those layouts are read too (LABEL_LAYOUTS).

Protocol per sequence (the defaults of ``DsecSemanticSettings``):
- label images sorted by name pair with the lines of the timestamps file; the first 6 are dropped (ESS: too few
  events before them) and every second one after that is kept (ESS and the paper read label ``2 * index``);
- the window of a label at time T holds the last 200,000 events with t < T, counted in the file before
  rectification (the paper's ``fix_events_num``, ESS's ``get_events_fixed_num``); ``window="time"`` takes
  T - window_us <= t < T instead (ESS's ``fixed_duration``);
- events move to their rectified pixel (floor(x'), floor(y')) from rectify_map.h5: the paper keeps
  0 <= x' < 640, 0 <= y' < 440 and casts to integers with ``.long()``; rows 440-479 are removed from events and
  labels alike (ESS: "remove 40 bottom rows", the car's hood; the published labels are already 440 rows);
- splits are the dataset's folders: train = zurich_city_00_a ... 08_a (8 sequences), test = 13_a, 14_c, 15_a.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evpretrain.config import from_mapping, to_mapping
from evpretrain.data.config import DsecSemanticSettings
from evpretrain.data.store import EventStoreWriter
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers.dsec import SENSOR_SIZE, DsecEvents
from evpretrain.workers import worker_pool

# ESS config/settings.py, semseg_num_classes == 11; the label PNGs hold these ids as they are.
CLASS_NAMES = (
    "background",
    "building",
    "fence",
    "person",
    "pole",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)
IGNORE_LABEL = 255
# (label folder, timestamps file) relative to a sequence folder, tried in order; {sequence} is its name.
LABEL_LAYOUTS = (
    ("11classes", "{sequence}_semantic_timestamps.txt"),  # as downloaded
    ("semantic/left/11classes", "semantic/left/{sequence}_semantic_timestamps.txt"),  # the paper's code
    ("semantic/11classes/data", "semantic/timestamps.txt"),  # ESS's code
    ("semantic/left/11classes/data", "semantic/timestamps.txt"),  # ESS's README
)
WINDOWS_PER_JOB = 8  # windows a worker cuts per events.h5 opening: about 25 MB of results at 200k events each


@dataclass(frozen=True)
class SequenceFiles:
    """One sequence's files: events, rectification map, label images (sorted) and their timestamps (us)."""

    name: str
    events: Path
    rectify_map: Path
    labels: tuple[Path, ...]
    timestamps_file: Path
    timestamps_us: tuple[int, ...]

    def selected(self, settings: DsecSemanticSettings) -> list[tuple[Path, int]]:
        """(label image, timestamp in us) of the labels that get a window, in time order."""
        keep = range(settings.skip_first_labels, len(self.labels), settings.label_stride)
        return [(self.labels[i], self.timestamps_us[i]) for i in keep]


def locate_sequence(split_dir: Path, name: str) -> SequenceFiles:
    """Find a sequence's files in any of ``LABEL_LAYOUTS``; a missing file raises naming what was looked for."""
    folder = split_dir / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: sequence folder missing (expected DSEC-Semantic sequence {name!r})")
    events_dir = folder / "events" / "left"
    for path in (events_dir / "events.h5", events_dir / "rectify_map.h5"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (each sequence needs events/left/events.h5 and rectify_map.h5)")
    for labels_pattern, timestamps_pattern in LABEL_LAYOUTS:
        labels_dir = folder / labels_pattern
        timestamps_file = folder / timestamps_pattern.format(sequence=name)
        if labels_dir.is_dir() and timestamps_file.is_file():
            labels = tuple(sorted(labels_dir.glob("*.png")))
            timestamps_us = read_label_timestamps(timestamps_file)
            if len(timestamps_us) != len(labels):
                raise EventFormatError(
                    timestamps_file,
                    f"{len(timestamps_us)} timestamps for {len(labels)} label images in {labels_dir}; "
                    "expected one line per image",
                )
            return SequenceFiles(
                name,
                events_dir / "events.h5",
                events_dir / "rectify_map.h5",
                labels,
                timestamps_file,
                tuple(timestamps_us.tolist()),
            )
    tried = "; ".join(f"{d}/*.png with {t.format(sequence=name)}" for d, t in LABEL_LAYOUTS)
    raise FileNotFoundError(f"{folder}: no 11-class labels with their timestamps file; looked for {tried}")


def read_label_timestamps(path: Path) -> np.ndarray:
    """A ``*_semantic_timestamps.txt``: one integer a line, microseconds, increasing -> (N,) int64."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise EventFormatError(path, f"not a text file ({error}); expected one integer timestamp a line") from error
    values = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise EventFormatError(
                path, f"line {number} is {line.strip()[:40]!r}, expected an integer timestamp in microseconds"
            ) from None
    timestamps = np.asarray(values, dtype=np.int64)
    not_increasing = np.flatnonzero(np.diff(timestamps) <= 0)
    if not_increasing.size:
        i = int(not_increasing[0])
        raise EventFormatError(
            path, f"timestamp {i + 2} ({timestamps[i + 1]}) does not follow {timestamps[i]}; expected increasing times"
        )
    return timestamps


def read_label(path: Path, crop_height: int) -> np.ndarray:
    """A label PNG -> (crop_height, 640) uint8 class ids (0-10, 255 = ignore); taller images lose their bottom rows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            mask = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise EventFormatError(path, f"not a readable PNG label image ({error})") from error
    if mode not in ("L", "P") or mask.ndim != 2:
        raise EventFormatError(path, f"label image has mode {mode} and shape {mask.shape}, expected one 8-bit channel")
    height, width = mask.shape
    if width != SENSOR_SIZE[1] or not crop_height <= height <= SENSOR_SIZE[0]:
        raise EventFormatError(
            path,
            f"label image is {width}x{height}, expected {SENSOR_SIZE[1]} wide and {crop_height} to {SENSOR_SIZE[0]} "
            f"tall (crop_height {crop_height})",
        )
    unknown = np.setdiff1d(np.unique(mask), [*range(len(CLASS_NAMES)), IGNORE_LABEL])
    if unknown.size:
        raise EventFormatError(
            path, f"label ids {unknown[:5].tolist()} are neither classes 0-{len(CLASS_NAMES) - 1} nor {IGNORE_LABEL}"
        )
    return np.ascontiguousarray(mask[:crop_height], dtype=np.uint8)


def cut_window(events: DsecEvents, t_end_us: int, settings: DsecSemanticSettings) -> np.ndarray:
    """The (rectified) events of the window ending at ``t_end_us``, cropped to ``settings.crop_height`` rows."""
    if settings.window == "events":
        window = events.last_events(t_end_us, settings.num_events)
    else:
        window = events.window(t_end_us - settings.window_us, t_end_us)
    return window[window["y"] < settings.crop_height]


def describe_window(settings: DsecSemanticSettings) -> str:
    """The window convention in words, for the store's attributes."""
    if settings.window == "events":
        which = f"the last {settings.num_events} events with t < T (counted before rectification)"
    else:
        which = f"the events with T - {settings.window_us} us <= t < T"
    if settings.rectify:
        pixels = f"moved to the {settings.rounding} of their rectified position (rectify_map.h5)"
    else:
        pixels = "at their raw sensor pixels (not rectified)"
    return (
        f"T = the label's timestamp (us); {which}, {pixels}; rows >= {settings.crop_height} removed from events and "
        f"masks; labels {settings.skip_first_labels}, {settings.skip_first_labels + settings.label_stride}, ... "
        "of each sequence"
    )


@dataclass(frozen=True)
class _Job:
    """Consecutive windows (label image, end time in us) of one sequence, cut with one open events.h5."""

    sequence: str
    events: Path
    rectify_map: Path | None
    windows: tuple[tuple[Path, int], ...]
    settings: DsecSemanticSettings


def _cut_windows(job: _Job) -> list[dict[str, Any]]:
    settings = job.settings
    samples = []
    with DsecEvents(job.events, rectify_map=job.rectify_map, rounding=settings.rounding) as events:
        for label_path, t_end_us in job.windows:
            samples.append(
                dict(
                    events=cut_window(events, t_end_us, settings),
                    masks=read_label(label_path, settings.crop_height),
                    name=f"{job.sequence}/{label_path.stem}",
                )
            )
    return samples


def _jobs(sequences: Iterable[SequenceFiles], settings: DsecSemanticSettings) -> Iterator[_Job]:
    for sequence in sequences:
        rectify_map = sequence.rectify_map if settings.rectify else None
        windows = sequence.selected(settings)
        for start in range(0, len(windows), WINDOWS_PER_JOB):
            chunk = tuple(windows[start : start + WINDOWS_PER_JOB])
            yield _Job(sequence.name, sequence.events, rectify_map, chunk, settings)


def _bounded_map(pool: Executor, fn: Callable, jobs: Iterable, max_pending: int) -> Iterator:
    """``pool.map`` with at most ``max_pending`` jobs in flight, so cut windows never pile up in memory."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= max_pending:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def convert(root: Path, out: Path, settings: Mapping[str, Any] | None, *, workers: int, progress: bool) -> list[Path]:
    """Cut ``root`` (a DSEC-Semantic copy, module docstring) into ``out/<split>.h5``; return the written paths.

    Every sequence is located and its timestamps read before any window is cut, so a missing file stops the run
    early. The stores do not depend on ``workers`` (1 runs in-process); a rerun replaces each store atomically.
    """
    from tqdm import tqdm

    config = from_mapping(DsecSemanticSettings, settings, "data.convert.dsec-semantic")
    root, out = Path(root), Path(out)
    splits = {split: [locate_sequence(root / split, n) for n in names] for split, names in config.sequences.items()}
    total = sum(len(s.selected(config)) for sequences in splits.values() for s in sequences)
    written = []
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers)) if workers > 1 else None
        bar = stack.enter_context(tqdm(total=total, desc="dsec-semantic", unit="window", disable=not progress))
        for split, sequences in splits.items():
            jobs = _jobs(sequences, config)
            results = map(_cut_windows, jobs) if pool is None else _bounded_map(pool, _cut_windows, jobs, 2 * workers)
            path = out / f"{split}.h5"
            sources = [
                str(f.relative_to(root)) for s in sequences for f in (s.events, s.rectify_map, s.timestamps_file)
            ]
            attrs = {
                "split": split,
                "dataset": "dsec-semantic",
                "class_names": list(CLASS_NAMES),
                "ignore_label": IGNORE_LABEL,
                "mask_convention": f"(H, W) uint8 class ids of the label at the window's end, {IGNORE_LABEL} = ignore",
                "window_convention": describe_window(config),
                "sequences": [s.name for s in sequences],
                "source_files": sources,
            }
            with EventStoreWriter(
                path,
                sensor_size=config.sensor_size,
                source=f"DSEC-Semantic (Sun et al., ECCV 2022); converted from {root.resolve()}",
                builder_config={"dataset": "dsec-semantic", "split": split, **to_mapping(config)},
                attrs=attrs,
                compression=config.compression,
            ) as writer:
                for samples in results:
                    for sample in samples:
                        writer.add_sample(**sample)
                    bar.update(len(samples))
            written.append(path)
    return written
