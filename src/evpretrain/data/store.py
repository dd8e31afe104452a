"""The event store: one HDF5 file per dataset split.

Layout (all optional groups share the sample axis):
  /events/{t,x,y,p}           every sample's events concatenated (EVENT_DTYPE columns, t in microseconds)
  /samples/{offset,count}     int64 (N,): sample i is events[offset[i] : offset[i] + count[i]]
  /samples/name               optional (N,) UTF-8 names (source file, image id)
  /clean_events/{t,x,y,p}     optional noise-free events, indexed by /samples/{clean_offset,clean_count}
  /labels                     optional int64 (N,)
  /frames, /diff_maps, /flow, /masks, /valid, /rgb   optional dense arrays (N, ...), one chunk per sample (per frame
                              for frames and diff_maps)
                              (valid: (H, W) uint8, 1 where the flow or mask ground truth is defined; rgb: (3, S, S)
                              uint8, the colour source image of an EF video, CLIP's resize and centre crop)
File attributes: format, format_version, sensor_size (H, W), time_unit, source, builder_config (JSON),
num_samples, num_events and content_sha256 (a digest of every dataset's bytes, see ``content_checksum``).

A writer fills a temporary file beside the target and renames it when complete, so a reader never sees a
half-written store and a crash leaves the previous file (if any) untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from evpretrain import __version__
from evpretrain.data.config import StoreCompression
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, validate_events
from evpretrain.files import AtomicPath

STORE_FORMAT = "evpretrain-event-store"
STORE_VERSION = 1
DENSE_KEYS = ("frames", "diff_maps", "flow", "masks", "valid", "rgb")
# Events per HDF5 chunk. A read decodes (and checksums) every chunk it touches, so a chunk much larger than a sample
# multiplies a random read's cost: 2^16 made a 8,000-event demo sample cost 5x its own size (bench/README.md, loader).
EVENT_CHUNK = 1 << 13
FRAME_KEYS = ("frames", "diff_maps")  # dense fields with a time axis: one chunk per frame, so one frame reads alone


def frame_times(num_frames: int, frame_rate_hz: float) -> np.ndarray:
    """(T,) int64 microseconds of the frames of a stored video: round(n * 1e6 / frame_rate_hz), the times the
    builders render at and the store's ``frame_rate_hz`` attribute lets a reader rebuild."""
    return np.round(np.arange(num_frames) * 1e6 / frame_rate_hz).astype(np.int64)


class StoreError(EventFormatError):
    """A store file is missing, malformed, or inconsistent with what is written to it."""


class EventStoreWriter:
    """Append samples to a new store; ``close()`` (or leaving the ``with`` block) publishes it atomically.

    Every sample must carry the same optional fields as the first one (labels, clean events, dense arrays),
    and a dense field keeps the shape and dtype it had in the first sample.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        sensor_size: tuple[int, int],
        source: str,
        builder_config: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        compression: StoreCompression = StoreCompression(),
        flush_events: int = 1 << 20,
    ):
        self.path = Path(path)
        self.sensor_size = (int(sensor_size[0]), int(sensor_size[1]))
        self.compression = compression
        self._flush_events = flush_events
        self._target = AtomicPath(self.path)
        self._file: h5py.File | None = None
        try:
            self._file = h5py.File(self._target.tmp, "w")
            self._file.attrs.update(
                {
                    "format": STORE_FORMAT,
                    "format_version": STORE_VERSION,
                    "sensor_size": self.sensor_size,
                    "time_unit": "us",
                    "source": source,
                    "builder_config": json.dumps(builder_config or {}, sort_keys=True),
                    "created_by": f"evpretrain {__version__}",
                }
            )
            for key, value in (attrs or {}).items():
                self._file.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        except BaseException:
            self.abort()
            raise
        self._hashes: dict[str, hashlib._Hash] = {}
        self._pending: dict[str, list[np.ndarray]] = {"events": [], "clean_events": []}
        self._pending_len = {"events": 0, "clean_events": 0}
        self._pending_count = 0
        self._written = {"events": 0, "clean_events": 0}
        self._fields: set[str] | None = None
        self._names: list[str] = []
        self._columns: dict[str, list] = {
            "offset": [],
            "count": [],
            "clean_offset": [],
            "clean_count": [],
            "labels": [],
        }
        self._num_samples = 0
        self._closed = False

    def __enter__(self) -> EventStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return self._num_samples

    def add_sample(
        self,
        events: np.ndarray,
        *,
        label: int | None = None,
        clean_events: np.ndarray | None = None,
        name: str | None = None,
        **dense: np.ndarray,
    ) -> int:
        """Append one sample; return its index. ``dense`` keys are among ``DENSE_KEYS``."""
        if self._closed:
            raise StoreError(self.path, "cannot add a sample: the writer is closed")
        unknown = set(dense) - set(DENSE_KEYS)
        if unknown:
            raise StoreError(self.path, f"unknown dense field(s) {sorted(unknown)}; expected some of {DENSE_KEYS}")
        where = f"{self.path} sample {self._num_samples}"
        validate_events(events, source=where, sensor_size=self.sensor_size)
        fields = {k for k, v in dense.items() if v is not None}
        fields |= {k for k, v in (("labels", label), ("clean_events", clean_events), ("name", name)) if v is not None}
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise StoreError(
                self.path,
                f"sample {self._num_samples} has fields {sorted(fields)}, the first had {sorted(self._fields)}",
            )
        self._queue_events("events", events)
        if clean_events is not None:
            validate_events(clean_events, source=where + " (clean)", sensor_size=self.sensor_size)
            self._queue_events("clean_events", clean_events)
        if label is not None:
            self._columns["labels"].append(int(label))
        if name is not None:
            self._names.append(str(name))
        for key, array in dense.items():
            if array is not None:
                self._append_dense(key, np.asarray(array))
        self._num_samples += 1
        if self._pending_count >= self._flush_events:
            self._flush()
        return self._num_samples - 1

    def _queue_events(self, group: str, events: np.ndarray) -> None:
        prefix = "" if group == "events" else "clean_"
        self._columns[prefix + "offset"].append(self._written[group] + self._pending_len[group])
        self._columns[prefix + "count"].append(len(events))
        self._pending[group].append(events)
        self._pending_len[group] += len(events)
        self._pending_count += len(events)

    def _flush(self) -> None:
        for group, chunks in self._pending.items():
            if not chunks:
                continue
            events = np.concatenate(chunks)
            for column in EVENT_DTYPE.names:
                self._append(
                    f"{group}/{column}", np.ascontiguousarray(events[column]), chunk=(EVENT_CHUNK,), kind="events"
                )
            self._written[group] += len(events)
            self._pending_len[group] = 0
            chunks.clear()
        self._pending_count = 0

    def _append_dense(self, key: str, array: np.ndarray) -> None:
        if key in self._file:
            expected = self._file[key]
            if array.shape != expected.shape[1:] or array.dtype != expected.dtype:
                raise StoreError(
                    self.path,
                    f"sample {self._num_samples} field {key!r} has shape {array.shape} {array.dtype}, "
                    f"expected {expected.shape[1:]} {expected.dtype}",
                )
        chunk = (1, 1, *array.shape[1:]) if key in FRAME_KEYS else (1, *array.shape)
        self._append(key, array[None], chunk=chunk, kind="dense")

    def _append(self, name: str, data: np.ndarray, *, chunk: tuple[int, ...], kind: str) -> None:
        if name not in self._file:
            self._file.create_dataset(
                name,
                shape=(0, *data.shape[1:]),
                maxshape=(None, *data.shape[1:]),
                dtype=data.dtype,
                chunks=chunk,
                **self.compression.filters(kind),
            )
        dataset = self._file[name]
        start = dataset.shape[0]
        dataset.resize(start + data.shape[0], axis=0)
        dataset[start:] = data
        self._hashes.setdefault(name, hashlib.sha256()).update(np.ascontiguousarray(data).tobytes())

    def close(self) -> Path:
        """Write the index and attributes, then rename the temporary file onto ``path``."""
        if self._closed:
            return self.path
        try:
            self._flush()
            for group in ("events",) + (("clean_events",) if self._fields and "clean_events" in self._fields else ()):
                if group not in self._file:  # samples without any event still need the columns
                    for column in EVENT_DTYPE.names:
                        self._append(
                            f"{group}/{column}", np.empty(0, EVENT_DTYPE[column]), chunk=(EVENT_CHUNK,), kind="events"
                        )
            index = {"samples/offset": "offset", "samples/count": "count"}
            if self._fields and "clean_events" in self._fields:
                index |= {"samples/clean_offset": "clean_offset", "samples/clean_count": "clean_count"}
            if self._fields and "labels" in self._fields:
                index["labels"] = "labels"
            for name, column in index.items():
                self._write_whole(name, np.asarray(self._columns[column], dtype=np.int64))
            if self._names:
                self._write_whole("samples/name", np.asarray(self._names, dtype=h5py.string_dtype()))
            self._file.attrs["num_samples"] = self._num_samples
            self._file.attrs["num_events"] = self._written["events"]
            self._file.attrs["content_sha256"] = _combine(self._hashes)
            self._file.close()
            self._target.commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def _write_whole(self, name: str, data: np.ndarray) -> None:
        if data.dtype.kind == "O":  # variable-length strings take no filter (the content digest covers them)
            self._file.create_dataset(name, data=data)
        else:
            self._file.create_dataset(
                name, data=data, chunks=True, maxshape=(None, *data.shape[1:]), fletcher32=self.compression.checksum
            )
        payload = data.tobytes() if data.dtype.kind != "O" else "\0".join(data.tolist()).encode()
        self._hashes[name] = hashlib.sha256(payload)

    def abort(self) -> None:
        """Drop the temporary file; the target path is left as it was."""
        self._closed = True
        try:
            if self._file is not None:
                self._file.close()
        finally:
            self._target.discard()


def _describe(selection: Any) -> str:
    if isinstance(selection, slice):
        return (
            f"{'' if selection.start is None else selection.start}:{'' if selection.stop is None else selection.stop}"
        )
    return str(selection)


def _combine(hashes: Mapping[str, Any]) -> str:
    lines = "".join(f"{name}={h.hexdigest()}\n" for name, h in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def store_digest(path: str | Path) -> str:
    """The content digest a store's writer recorded (``content_sha256``): what a training run trained on, cheaply
    (``EventStore.verify`` recomputes it)."""
    with EventStore(path) as store:
        return str(store.attrs.get("content_sha256"))


class EventStore:
    """Read access to a store, per sample. Safe to pickle into DataLoader workers and to use across ``fork``: each
    process opens its own handle (one inherited through fork shares the parent's HDF5 library state)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(self.path, "no such event store")
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        try:
            self._check_header(self._open())
        except StoreError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as err:  # what h5py raises on damaged metadata
            self.close()
            raise StoreError(self.path, f"damaged HDF5 structure ({err}); the file is corrupt: rebuild it") from err

    def _check_header(self, file: h5py.File) -> None:
        if file.attrs.get("format") != STORE_FORMAT:
            raise StoreError(
                self.path,
                f"not an event store: attribute 'format' is {file.attrs.get('format')!r}, expected {STORE_FORMAT!r}",
            )
        if int(file.attrs.get("format_version", -1)) > STORE_VERSION:
            raise StoreError(
                self.path,
                f"store format version {file.attrs['format_version']} is newer than this reader ({STORE_VERSION})",
            )
        for name in ("events/t", "samples/offset", "samples/count"):
            if name not in file:
                raise StoreError(self.path, f"missing dataset /{name}")
        self._offset = self._read("samples/offset", slice(None))
        self._count = self._read("samples/count", slice(None))
        self.sensor_size: tuple[int, int] = tuple(int(v) for v in file.attrs["sensor_size"])
        self._check_index_tables(file)

    def _check_index_tables(self, file: h5py.File) -> None:
        """Raise StoreError unless the sample index fits the data: a corrupt index would read other samples'
        events, or fail deep inside a training run. Costs O(samples), not O(events)."""
        samples = len(self._offset)
        if len(self._count) != samples or int(file.attrs.get("num_samples", samples)) != samples:
            raise StoreError(
                self.path,
                f"/samples/offset has {samples} entries, /samples/count {len(self._count)}, attribute num_samples "
                f"{file.attrs.get('num_samples')}: the index is corrupt",
            )
        for group in ("events", "clean_events"):
            if group not in file:
                continue
            lengths = {
                column: file[f"{group}/{column}"].shape[0] for column in EVENT_DTYPE.names if column in file[group]
            }
            if len(lengths) != len(EVENT_DTYPE.names) or len(set(lengths.values())) != 1:
                raise StoreError(self.path, f"/{group} columns differ in length or are missing: {lengths}")
            prefix = "" if group == "events" else "clean_"
            offset, count = (
                (self._offset, self._count)
                if group == "events"
                else (self._read("samples/clean_offset", slice(None)), self._read("samples/clean_count", slice(None)))
            )
            bad = np.flatnonzero((offset < 0) | (count < 0) | (offset + count > lengths["t"]))
            if len(bad):
                raise StoreError(
                    self.path,
                    f"/samples/{prefix}offset and /samples/{prefix}count of sample {bad[0]} ({offset[bad[0]]}, "
                    f"{count[bad[0]]}) point outside the {lengths['t']} events of /{group} ({len(bad)} samples do): "
                    "the index is corrupt",
                )
        for name in ("labels", *DENSE_KEYS):
            if name in file and file[name].shape[0] != samples:
                raise StoreError(self.path, f"/{name} has {file[name].shape[0]} entries for {samples} samples")

    def _read(self, name: str, selection: Any) -> np.ndarray:
        """``dataset[selection]``, with a failed chunk checksum (or any HDF5 read error) turned into a StoreError
        that names the dataset."""
        try:
            return self._dataset(name)[selection]
        except (OSError, KeyError) as err:
            raise StoreError(
                self.path, f"cannot read /{name}[{_describe(selection)}]: {err}; the file is corrupt: rebuild it"
            ) from err

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise StoreError(self.path, f"cannot open as HDF5: {err}") from err
            self._pid = os.getpid()
            self._datasets = {}
        return self._file

    def _dataset(self, name: str) -> h5py.Dataset:
        # Looking a dataset up by name costs more than reading a sample's slice of it: keep the handles.
        file = self._open()
        if name not in self._datasets:
            self._datasets[name] = file[name]
        return self._datasets[name]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_datasets")} | {
            "_file": None,
            "_datasets": {},
        }

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._datasets = {}
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self._offset)

    @property
    def event_counts(self) -> np.ndarray:
        """Events per sample, (N,) int64, from the index (no event is read)."""
        return self._count.copy()

    @property
    def attrs(self) -> dict[str, Any]:
        out = {}
        for key, value in self._open().attrs.items():
            value = value.tolist() if isinstance(value, np.ndarray) else value
            if key == "builder_config" or (isinstance(value, str) and value[:1] in "[{"):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[key] = value
        return out

    @property
    def fields(self) -> list[str]:
        """Optional fields present: among labels, clean_events, name and ``DENSE_KEYS``."""
        file = self._open()
        present = [k for k in ("labels", "clean_events", *DENSE_KEYS) if k in file]
        return present + (["name"] if "samples/name" in file else [])

    @property
    def labels(self) -> np.ndarray | None:
        file = self._open()
        return self._read("labels", slice(None)) if "labels" in file else None

    @property
    def names(self) -> list[str] | None:
        file = self._open()
        return (
            [n.decode() if isinstance(n, bytes) else n for n in file["samples/name"][:]]
            if "samples/name" in file
            else None
        )

    def events(self, index: int, *, clean: bool = False) -> np.ndarray:
        """Sample ``index``'s events as an EVENT_DTYPE array (the noise-free ones with ``clean=True``)."""
        index = self._check_index(index)
        file = self._open()
        if clean:
            if "clean_events" not in file:
                raise StoreError(self.path, "this store holds no clean events")
            group = "clean_events"
            start, count = self._read("samples/clean_offset", index), self._read("samples/clean_count", index)
        else:
            group = "events"
            start, count = self._offset[index], self._count[index]
        out = np.empty(int(count), dtype=EVENT_DTYPE)
        for column in EVENT_DTYPE.names:
            out[column] = self._read(f"{group}/{column}", slice(start, start + count))
        return out

    def dense(self, key: str, index: int, item: int | slice | None = None) -> np.ndarray:
        """Sample ``index``'s dense field, or with ``item`` only that entry (or slice) of its first axis, read alone
        (one frame of a video reads 1/T of it).

        Frames (T, H, W), diff_maps (T-1, H, W), flow (2, H, W), masks or valid (H, W), rgb (3, S, S).
        """
        index = self._check_index(index)
        file = self._open()
        # A field whose handle is kept exists: looking the name up again costs as much as a frame's read.
        if key not in self._datasets and (key not in DENSE_KEYS or key not in file):
            raise StoreError(
                self.path, f"no dense field {key!r}; this store has {[k for k in DENSE_KEYS if k in file]}"
            )
        return self._read(key, index if item is None else (index, item))

    def sample(self, index: int) -> dict[str, Any]:
        """Everything stored for one sample, keyed by field name (``events`` always present)."""
        out: dict[str, Any] = {"events": self.events(index)}
        file = self._open()
        if "clean_events" in file:
            out["clean_events"] = self.events(index, clean=True)
        if "labels" in file:
            out["label"] = int(self._read("labels", index))
        for key in DENSE_KEYS:
            if key in file:
                out[key] = self._read(key, index)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self.sample(i)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path}: sample {index} out of range for {len(self)} samples")
        return index % len(self)

    def content_checksum(self) -> str:
        """Recompute the digest that the writer stored as ``content_sha256``."""
        file = self._open()
        hashes: dict[str, Any] = {}

        def visit(name: str, node: Any) -> None:
            if isinstance(node, h5py.Dataset):
                h = hashlib.sha256()
                if node.dtype.kind == "O":
                    h.update("\0".join(v.decode() if isinstance(v, bytes) else v for v in node[:]).encode())
                else:
                    step = max(
                        1, (64 << 20) // max(1, node.dtype.itemsize * int(np.prod(node.shape[1:], dtype=np.int64)))
                    )
                    for start in range(0, node.shape[0], step):
                        h.update(np.ascontiguousarray(node[start : start + step]).tobytes())
                hashes[name] = h

        try:
            file.visititems(visit)
        except OSError as err:  # a failed chunk checksum, a damaged header
            raise StoreError(self.path, f"cannot read the whole file: {err}; the file is corrupt: rebuild it") from err
        return _combine(hashes)

    def verify(self) -> None:
        """Raise StoreError when the content no longer matches the stored checksum."""
        stored = self._open().attrs.get("content_sha256")
        actual = self.content_checksum()
        if stored != actual:
            raise StoreError(self.path, f"content checksum mismatch: stored {stored}, computed {actual}")
