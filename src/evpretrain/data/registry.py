"""The dataset registry (registry.yaml): what each paper dataset is, how to check a local copy, how to convert it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module, resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from evpretrain.config import ConfigError, from_mapping
from evpretrain.data.download import RemoteFile
from evpretrain.files import file_sha256
from evpretrain.workers import worker_pool


@dataclass(frozen=True)
class Expectation:
    """At least ``min`` paths under the root match ``glob`` (a trailing ``/`` matches folders only)."""

    glob: str
    min: int = 1


@dataclass(frozen=True)
class RandomSplit:
    """Cut the files of split ``from`` into train/test at random, per class, with ``seed``."""

    train: float
    test: float
    seed: int
    # ``from`` is a Python keyword: the YAML key is mapped to ``source`` in ``DatasetEntry.from_yaml``.
    source: str = "all"


@dataclass(frozen=True)
class Layout:
    kind: Literal["class_folders", "sequences"]
    splits: dict[str, str] = field(default_factory=dict)
    exclude_classes: list[str] = field(default_factory=list)
    random_split: RandomSplit | None = None


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    title: str
    task: Literal["classification", "segmentation", "flow"]
    format: str
    sensor_size: tuple[int, int]
    obtain: str
    layout: Layout
    expect: list[Expectation]
    checksums: dict[str, str] = field(default_factory=dict)
    # Where the paper's authors share their organised copy (their README's "Datasets" table): laid out for their
    # loaders, which `expect` does not check.
    authors_copy: str = ""
    # The files `evpretrain data download` fetches (none where the publisher asks for a form or a request), and the
    # copy's root inside the download folder (what `verify` and `convert` take as --root).
    files: list[RemoteFile] = field(default_factory=list)
    download_root: str = "."

    def __post_init__(self):
        if Path(self.download_root).is_absolute() or ".." in Path(self.download_root).parts:
            raise ValueError(f"download_root must be a folder inside the download folder, got {self.download_root!r}")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"files: two files share a name in {names}")

    @property
    def other_ways(self) -> str:
        """How to obtain the data without `download`: the publisher's steps and the authors' copy."""
        return self.obtain + (f" The paper's authors' organised copy: {self.authors_copy}" if self.authors_copy else "")


def load_registry(path: str | Path | None = None, *, extra: str | Path | None = None) -> dict[str, DatasetEntry]:
    """Read and validate the registry (the packaged registry.yaml by default), keyed by dataset name; the entries of
    ``extra`` (a file of the same form, config ``data.registry``) add datasets or replace whole entries."""
    text = Path(path).read_text() if path else resources.files("evpretrain.data").joinpath("registry.yaml").read_text()
    entries = _parse_registry(yaml.safe_load(text))
    if extra:
        entries |= _parse_registry(yaml.safe_load(Path(extra).read_text()) or {})
    return entries


def _parse_registry(raw: Mapping[str, Any]) -> dict[str, DatasetEntry]:
    entries = {}
    for name, values in raw.items():
        values = dict(values)
        layout = dict(values.get("layout", {}))
        if isinstance(layout.get("random_split"), dict):
            split = dict(layout["random_split"])
            if "from" in split:
                split["source"] = split.pop("from")
            layout["random_split"] = split
        values["layout"] = layout
        entries[name] = from_mapping(DatasetEntry, {"name": name, **values}, f"registry.{name}")
    return entries


def get_dataset(name: str, registry: dict[str, DatasetEntry] | None = None) -> DatasetEntry:
    registry = registry or load_registry()
    if name not in registry:
        raise ConfigError(f"unknown dataset {name!r}; the registry has {sorted(registry)}")
    return registry[name]


@dataclass
class VerifyReport:
    """What ``verify_dataset`` found: one line per check, ``problems`` listing what is missing or wrong."""

    dataset: str
    root: Path
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    obtain: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.dataset} at {self.root}: " + ("complete" if self.ok else f"{len(self.problems)} problem(s)")
        lines = [head, *(f"  ok       {c}" for c in self.checks), *(f"  MISSING  {p}" for p in self.problems)]
        if not self.ok:
            lines.append(f"  how to obtain it: {self.obtain}")
        return "\n".join(lines)


def verify_dataset(entry: DatasetEntry, root: str | Path, *, checksums: bool = False) -> VerifyReport:
    """Check a local copy against the registry's expectations; never raises for a missing or partial copy."""
    root = Path(root)
    report = VerifyReport(entry.name, root, obtain=entry.other_ways)
    if not root.is_dir():
        report.problems.append(f"{root} does not exist or is not a folder")
        return report
    for expectation in entry.expect:
        folders_only = expectation.glob.endswith("/")
        matches = [p for p in root.glob(expectation.glob.rstrip("/")) if not folders_only or p.is_dir()]
        line = f"{expectation.glob}: {len(matches)} found, at least {expectation.min} expected"
        (report.checks if len(matches) >= expectation.min else report.problems).append(line)
    for split, folder in entry.layout.splits.items():
        if not (root / folder).is_dir():
            report.problems.append(f"split {split!r}: folder {root / folder} is missing")
    if checksums:
        for relative, expected in entry.checksums.items():
            path = root / relative
            if not path.is_file():
                report.problems.append(f"{relative}: file missing (has a published checksum)")
                continue
            actual = file_sha256(path)
            (report.checks if actual == expected else report.problems).append(
                f"{relative}: sha256 {'matches' if actual == expected else f'{actual} != published {expected}'}"
            )
    return report


def class_folder_splits(entry: DatasetEntry, root: str | Path) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """Files and labels per output split for a ``class_folders`` dataset, and the class names (sorted)."""
    root = Path(root)
    layout = entry.layout
    per_split: dict[str, list[tuple[Path, str]]] = {}
    for split, folder in layout.splits.items():
        base = root / folder
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in layout.exclude_classes)
        per_split[split] = [(f, c) for c in classes for f in sorted(p for p in (base / c).iterdir() if p.is_file())]
    class_names = sorted({c for files in per_split.values() for _, c in files})
    if layout.random_split is not None:
        cut = layout.random_split
        files = per_split.pop(cut.source)
        rng = np.random.default_rng(cut.seed)
        train, test = [], []
        for name in class_names:  # per class, so that every class keeps the 80/20 proportion
            members = [f for f in files if f[1] == name]
            order = rng.permutation(len(members))
            n_train = int(round(cut.train * len(members)))
            train += [members[i] for i in sorted(order[:n_train])]
            test += [members[i] for i in sorted(order[n_train:])]
        per_split |= {"train": train, "test": test}
    index = {c: i for i, c in enumerate(class_names)}
    return {s: [(f, index[c]) for f, c in files] for s, files in per_split.items()}, class_names


# Dataset name -> "module:function" of its window converter, imported on use. Each takes
# (root, out, settings: Mapping | None, workers, progress) and returns the written store paths.
SEQUENCE_CONVERTERS = {
    "dsec-semantic": "evpretrain.data.sequences.dsec_semantic:convert",
    "ddd17": "evpretrain.data.sequences.ddd17:convert",
    "mvsec": "evpretrain.data.sequences.mvsec:convert",
}


def convert_sequences(
    entry: DatasetEntry,
    root: str | Path,
    out: str | Path,
    *,
    settings: Mapping[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Cut a ``sequences`` dataset into labelled windows with its registered converter."""
    if entry.name not in SEQUENCE_CONVERTERS:
        raise ConfigError(f"{entry.name}: no window converter is registered for this dataset")
    module, function = SEQUENCE_CONVERTERS[entry.name].split(":")
    convert = getattr(import_module(module), function)
    workers = workers or len(os.sched_getaffinity(0))
    return convert(Path(root), Path(out), settings, workers=workers, progress=progress)


READ_BATCH = 4096  # files in flight at once while converting a class-folder dataset


def _read(args: tuple[Path, str]) -> np.ndarray:
    from evpretrain.events.readers import read_events

    path, fmt = args
    return read_events(path, format=None if fmt == "auto" else fmt)


def convert_dataset(
    entry: DatasetEntry,
    root: str | Path,
    out: str | Path,
    *,
    settings: Mapping[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Convert a verified copy into ``out/<split>.h5`` stores; return their paths.

    ``class_folders`` datasets store one sample a file; ``sequences`` datasets are cut into labelled windows by
    their converter (``SEQUENCE_CONVERTERS``), which takes ``settings`` (config section ``data.convert.<name>``).
    """
    from tqdm import tqdm

    from evpretrain.data.store import EventStoreWriter  # h5py: not for the pipeline, which reads the registry

    report = verify_dataset(entry, root)
    if not report.ok:
        raise FileNotFoundError(report.format())
    if entry.layout.kind == "sequences":
        return convert_sequences(entry, root, out, settings=settings, workers=workers, progress=progress)
    splits, class_names = class_folder_splits(entry, root)
    written = []
    workers = workers or len(os.sched_getaffinity(0))
    with worker_pool(workers) as pool:
        for split, files in splits.items():
            path = Path(out) / f"{split}.h5"
            with EventStoreWriter(
                path,
                sensor_size=tuple(entry.sensor_size),
                source=f"{entry.title}; converted from {Path(root).resolve()}",
                builder_config={"dataset": entry.name, "split": split},
                attrs={"split": split, "class_names": class_names, "dataset": entry.name},
            ) as writer:
                with tqdm(total=len(files), desc=f"{entry.name}/{split}", disable=not progress) as bar:
                    # Bounded batches: Executor.map submits its whole input at once, and N-ImageNet has 1.8M files.
                    for start in range(0, len(files), READ_BATCH):
                        batch = files[start : start + READ_BATCH]
                        events = pool.map(_read, [(f, entry.format) for f, _ in batch], chunksize=16)
                        for (file, label), ev in zip(batch, events):
                            writer.add_sample(ev, label=label, name=str(file.relative_to(root)))
                            bar.update()
            written.append(path)
    return written
