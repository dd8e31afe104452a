"""Import a folder of the user's own recordings into event stores, one a split (``evpretrain data import``).

Layouts (``ImportConfig.layout``):

- ``class_folders``: ``root/<class>/<files>``; each file is one labelled sample, or one per window with ``window``.
  Class names are the sorted folder names, label i the i-th; the stores keep them as the attribute ``class_names``.
- ``recordings``: ``root/<files>``, unlabelled long recordings cut into windows (``window`` required).

Files and folders whose names start with ``.`` are ignored. Every file is read in any format that
``evpretrain data formats`` lists, detected per file or forced by ``format``, and streamed (``stream_recording``):
windows are cut as the chunks arrive (``evpretrain.events.windows``: ``events:N``, ``ms:T`` or ``frames:K``, complete
windows only, t in microseconds as the file gives them) and written as each completes. Memory per process is
O(chunk_events + one window + the writer's flush buffer, 2^20 events), whatever the recording's length; without
``window`` a sample is a whole file, held in memory.

Splits are drawn by recording, never by window: windows of one recording are strongly correlated (the same scene
moments apart), so windows of it in two splits would leak the training data into the evaluation. A seeded random
permutation of the sorted files is cut by the ``split`` fractions (largest remainder), or ``split_map`` (a YAML or
JSON file ``{relative path: split}``) assigns each file. A sample is named ``<relative path>@<start>:<end>`` (its
window's span in microseconds; a whole file's first event to its last + 1).

Work is parallel over files (``worker_pool``) and resumable: each file becomes a part store in
``out/.import-parts/``, keyed by the file (path, size, modification time) and the settings, written whole; a rerun
after an interruption keeps the finished parts and converts the rest, and gives the same stores as an uninterrupted
run. The split stores are then assembled in file order, each written whole (``EventStoreWriter``), and the parts
removed. A bad file stops the import with an error naming it before any split store is written (``skip_bad``: list
it and go on).

Intensity frames (DAVIS APS frames of AEDAT4 recordings) are imported with ``window: frames:K``: a sample is K + 1
consecutive frames and the events between the first and the last (``evpretrain.events.windows.frame_windows``), and
keeps ``frames`` (K + 1, H, W) uint8 and ``diff_maps`` (K, H, W) float32, ``lin_log(f_(n+1)) - lin_log(f_n)`` of the
frames in [0, 1], the EF and demo stores' difference maps (``evpretrain.events.simulator.lin_log``). Real frames come
at irregular times, so the store sets no ``frame_rate_hz``: its samples pre-train with ``window: clip`` (the whole
window's events; the summed difference maps telescope to ``lin_log(f_K) - lin_log(f_0)``). A file of another format,
or an AEDAT4 file without a frame stream, is refused under ``frames:K`` naming it. With the other windows a store
holds events only, and ``plan_study`` refuses the pre-training that needs frames (``evpretrain.pipeline.plan``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evpretrain.config import ConfigError, to_mapping
from evpretrain.data.config import ImportConfig
from evpretrain.data.store import EventStore, EventStoreWriter
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError
from evpretrain.events.readers.dispatch import known_format
from evpretrain.events.readers.faery_formats import iter_aedat4_frames
from evpretrain.events.readers.streaming import stream_recording
from evpretrain.events.windows import Windower, frame_windows
from evpretrain.workers import worker_pool

__all__ = ["assign_splits", "difference_maps", "find_recordings", "import_recordings"]

log = logging.getLogger(__name__)
PARTS = ".import-parts"


@dataclass(frozen=True)
class _FileTask:
    """One file to convert into the part store ``part``."""

    path: Path
    name: str  # relative to the root
    label: int | None
    part: Path
    config: ImportConfig


@dataclass(frozen=True)
class _PartResult:
    name: str
    part: Path | None  # None: the file failed (its error)
    sensor_size: tuple[int, int] | None = None
    samples: int = 0
    events: int = 0
    # EventFormatError's (path, reason, offset): the exception itself does not pickle back from a worker
    error: tuple[str | None, str, int | None] | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise EventFormatError(*self.error)


def find_recordings(config: ImportConfig) -> tuple[list[tuple[Path, int | None]], list[str] | None]:
    """The files to import, sorted, with their labels (None for ``recordings``), and the class names (sorted folder
    names; None for ``recordings``)."""
    root = Path(config.root)
    if not root.is_dir():
        raise FileNotFoundError(f"import root {root} does not exist or is not a folder")

    def visible(folder: Path, dirs: bool) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() if dirs else p.is_file())
        )

    if config.layout == "recordings":
        files: list[tuple[Path, int | None]] = [(f, None) for f in visible(root, False)]
        classes = None
    else:
        classes = [folder.name for folder in visible(root, True)]
        files = [(f, label) for label, name in enumerate(classes) for f in visible(root / name, False)]
    if config.format is None:  # a README or notes beside the recordings: no reader's magic bytes or suffix
        others = [f for f, _ in files if known_format(f) is None]
        if others:
            log.info("import root %s: left out %d file(s) of no event format: %s", root, len(others), others)
            files = [(f, label) for f, label in files if f not in others]
    if classes is not None:
        empty = [name for name in classes if not any(f.parent.name == name for f, _ in files)]
        if empty:
            raise ConfigError(f"import root {root}: class folder(s) {empty} hold no recording")
    if not files:
        where = "no file" if config.layout == "recordings" else "no class folder"
        raise ConfigError(f"import root {root} holds {where} (layout {config.layout})")
    return files, classes


def assign_splits(names: list[str], config: ImportConfig) -> dict[str, str]:
    """Recording name (path relative to the root) -> split: from ``split_map``, or a ``seed``ed permutation cut by
    the ``split`` fractions, largest remainder first (ties to the earlier split)."""
    if config.split_map is not None:
        return _read_split_map(Path(config.split_map), names, config)
    fractions = np.array(list(config.split.values()), dtype=np.float64)
    exact = fractions * len(names)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(names) - counts.sum()]:
        counts[i] += 1
    empty = [split for split, count in zip(config.split, counts) if count == 0]
    if empty:
        raise ConfigError(
            f"split {config.split}: {len(names)} recording(s) leave split(s) {empty} without any; a split takes "
            "whole recordings (so that no window of one recording is in two splits): use fewer splits, larger "
            "fractions, more recordings or a split_map"
        )
    order = np.random.default_rng(config.seed).permutation(len(names))
    splits = np.repeat(list(config.split), counts)
    return {names[i]: str(splits[rank]) for rank, i in enumerate(order)}


def _read_split_map(path: Path, names: list[str], config: ImportConfig) -> dict[str, str]:
    try:
        mapping = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"split_map {path}: cannot read it as YAML or JSON ({error})") from error
    if not isinstance(mapping, Mapping) or not all(isinstance(v, str) for v in mapping.values()):
        raise ConfigError(f"split_map {path}: expected a mapping of recording path (relative to the root) -> split")
    mapping = {str(k): v for k, v in mapping.items()}
    missing = [n for n in names if n not in mapping]
    unknown = sorted(set(mapping) - set(names))
    if missing or unknown:
        raise ConfigError(
            f"split_map {path}: "
            + "; ".join(
                part
                for part in (
                    f"{len(missing)} recording(s) have no split, e.g. {missing[:3]}" if missing else "",
                    f"{len(unknown)} entries name no file under {config.root}, e.g. {unknown[:3]}" if unknown else "",
                )
                if part
            )
        )
    bad = sorted({s for s in mapping.values() if not s or s.startswith(".") or "/" in s})
    if bad:
        raise ConfigError(f"split_map {path}: split names become file names ({{split}}.h5), got {bad}")
    return mapping


def import_recordings(
    config: ImportConfig, out: str | Path, *, workers: int | None = None, progress: bool | None = None
) -> dict[str, Path]:
    """Import ``config.root`` into ``out/<split>.h5``; return the split stores' paths.

    ``workers``: processes (default: the cores this process may use). ``progress``: a bar (True), a log line per
    file (False), or a bar only when stderr is a terminal (None).
    """
    from tqdm import tqdm

    out = Path(out)
    root = Path(config.root)
    files, classes = find_recordings(config)
    names = [path.relative_to(root).as_posix() for path, _ in files]
    splits = assign_splits(names, config)
    parts = out / PARTS
    tasks = [
        _FileTask(path, name, label, parts / f"{_part_key(path, name, label, config)}.h5", config)
        for (path, label), name in zip(files, names)
    ]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks)))
    bar = sys.stderr.isatty() if progress is None else progress
    results: dict[str, _PartResult] = {}
    with (
        worker_pool(workers) as pool,
        tqdm(total=len(tasks), desc=f"import {root.name}", unit="file", disable=not bar) as meter,
    ):
        for result in pool.map(_convert_file, tasks):
            if not config.skip_bad:
                result.raise_error()  # the finished parts stay: a rerun resumes from them
            results[result.name] = result
            meter.update()
            if not bar:
                log.info("import %s: %d/%d files, %s", root, len(results), len(tasks), _describe(result))
    skipped = {name: str(EventFormatError(*r.error)) for name, r in results.items() if r.part is None}
    for error in skipped.values():
        log.warning("import %s: skipped %s", root, error)
    sensor_size = _common_sensor_size([r for r in results.values() if r.part is not None], root)
    attrs = {"import": to_mapping(config), "window": config.window or "file", "skipped": sorted(skipped)}
    if classes is not None:
        attrs["class_names"] = classes
    written = {}
    for split in list(config.split) if config.split_map is None else sorted(set(splits.values())):
        members = [results[name] for name in names if splits[name] == split and results[name].part is not None]
        written[split] = _assemble(out / f"{split}.h5", members, sensor_size, config, attrs | {"split": split})
    shutil.rmtree(parts, ignore_errors=True)
    return written


def _describe(result: _PartResult) -> str:
    if result.part is None:
        return f"{result.name} skipped ({result.error[1]})"
    return f"{result.name}: {result.samples} samples, {result.events} events"


def _part_key(path: Path, name: str, label: int | None, config: ImportConfig) -> str:
    """Everything a part store is a function of: the file (name, size, modification time) and the settings that
    change its samples; a change makes a new key, so a rerun never reuses a stale part."""
    stat = path.stat()
    settings = {k: getattr(config, k) for k in ("window", "format", "sensor_size")}
    content = {"file": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "label": label, **settings}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _convert_file(task: _FileTask) -> _PartResult:
    """Convert one file into its part store (kept if it exists: a resumed import). Runs in a worker."""
    if task.part.is_file():
        with EventStore(task.part) as part:
            return _PartResult(task.name, task.part, part.sensor_size, len(part), int(part.attrs["num_events"]))
    try:
        return _write_part(task)
    except EventFormatError as error:
        return _PartResult(task.name, None, error=(error.path, error.reason, error.offset))


def _write_part(task: _FileTask) -> _PartResult:
    config = task.config
    stream = stream_recording(task.path, format=config.format, chunk_events=config.chunk_events)
    sensor_size = stream.sensor_size
    if sensor_size is None:
        if config.sensor_size is None:
            raise EventFormatError(
                task.path, "the file does not give its sensor size: set the import's sensor_size (--sensor-size H,W)"
            )
        sensor_size = tuple(config.sensor_size)
    elif config.sensor_size is not None and tuple(config.sensor_size) != tuple(sensor_size):
        raise EventFormatError(
            task.path, f"the file's sensor is {sensor_size[0]}x{sensor_size[1]} (HxW), the import's sensor_size "
            f"{config.sensor_size[0]}x{config.sensor_size[1]}"
        )  # fmt: skip
    label = {} if task.label is None else {"label": task.label}
    count = events = 0
    with EventStoreWriter(task.part, sensor_size=sensor_size, source=task.name) as writer:
        if config.window_spec is None:
            chunks = list(stream.chunks())
            whole = np.concatenate(chunks) if chunks else np.empty(0, EVENT_DTYPE)
            if not len(whole):
                raise EventFormatError(task.path, "the file holds no event")
            name = f"{task.name}@{int(whole['t'][0])}:{int(whole['t'][-1]) + 1}"
            writer.add_sample(whole, name=name, **label)
            count, events = 1, len(whole)
        elif config.window_spec.kind == "frames":
            if stream.format != "aedat4":
                raise EventFormatError(
                    task.path,
                    f"window {config.window} cuts at intensity frames, which only AEDAT4 recordings carry; this file "
                    f"is {stream.format}: use events:N or ms:T",
                )
            frames = iter_aedat4_frames(task.path, sensor_size)
            for window in frame_windows(stream.chunks(), frames, config.window_spec.size, source=task.path):
                writer.add_sample(
                    window.events,
                    name=f"{task.name}@{window.t_start}:{window.t_end}",
                    frames=window.frames,
                    diff_maps=difference_maps(window.frames),
                    **label,
                )
                count, events = count + 1, events + len(window.events)
        else:
            windower = Windower(config.window_spec, source=task.path)  # empty duration windows: no sample
            for window in windower.cut(stream.chunks()):  # raises if not one window fits, naming both sizes
                writer.add_sample(window.events, name=f"{task.name}@{window.t_start}:{window.t_end}", **label)
                count, events = count + 1, events + len(window.events)
    return _PartResult(task.name, task.part, tuple(sensor_size), count, events)


def difference_maps(frames: np.ndarray) -> np.ndarray:
    """(T - 1, H, W) float32 log-intensity changes of uint8 ``frames`` (T, H, W): ``lin_log(f_(n+1) / 255) -
    lin_log(f_n / 255)`` in nepers, as the simulator gives the EF and demo stores' ``diff_maps``."""
    from evpretrain.events.simulator import lin_log  # the simulator loads numba: only for imports with frames

    logs = lin_log(frames.astype(np.float32) / 255)
    return logs[1:] - logs[:-1]


def _common_sensor_size(results: list[_PartResult], root: Path) -> tuple[int, int]:
    if not results:
        raise ConfigError(f"import root {root}: every file was skipped; nothing to import")
    first = results[0]
    for result in results[1:]:
        if result.sensor_size != first.sensor_size:
            raise ConfigError(
                f"import root {root}: {result.name} has a {result.sensor_size} (H, W) sensor, {first.name} "
                f"{first.sensor_size}; a store holds one sensor size: import them separately"
            )
    return first.sensor_size


def _assemble(
    path: Path, members: list[_PartResult], sensor_size: tuple[int, int], config: ImportConfig, attrs: dict[str, Any]
) -> Path:
    """Copy the part stores of ``members``, in order, sample by sample, into the split store ``path``."""
    with EventStoreWriter(
        path,
        sensor_size=sensor_size,
        source=f"imported from {Path(config.root).resolve()}",
        builder_config=to_mapping(config),
        attrs=attrs,
    ) as writer:
        for member in members:
            with EventStore(member.part) as part:
                names = part.names
                for i in range(len(part)):
                    sample = part.sample(i)  # events, the label and the frames, where the part has them
                    writer.add_sample(sample.pop("events"), name=names[i], **sample)
    return path
