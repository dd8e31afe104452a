"""The files ``evpretrain embed`` and ``evpretrain predict`` write, each whole: an error leaves nothing half-written.

Inputs (``RecordingInput``): a recording file in any readable format, streamed chunk by chunk where its reader allows
(``evpretrain.events.readers.stream_recording``: DAT and the faery formats; others are read whole) and cut into
windows (``evpretrain.events.windows``); or an event store, each sample one window (or cut into windows when a
window is given). Memory: one chunk, one batch of windows and the batch's outputs, whatever the recording's length.

``embed`` -> one HDF5 file (``write_features``): ``embeddings`` (N, D) float32, the pooled tokens of each window;
``tokens`` (N, L, D) float32 with ``tokens=True``; ``t_start``, ``t_end`` (N,) int64 microseconds, the window's span
[t_start, t_end) on the recording's clock (after ``time_origin``); ``source`` (N,) the recording (``STORE#index`` for
a store's sample). Attributes: ``format`` "evpretrain-features", the checkpoint, its spec (JSON), the window, the
resize policy, ``recordings`` (JSON: per input its sensor size, events, windows, events left out at the end).

``predict`` -> one folder (``write_predictions``), built beside its target and renamed onto it when complete;
``prediction.json`` says what is in it. Classifier: ``predictions.csv`` and ``predictions.json``, the top-k classes
and probabilities of each window. Segmenter: ``masks.npz`` (one (h, w) array of class ids per window, named
``window_00000``..., with ``t_start``, ``t_end``, ``source``) and ``masks/window_00000.png`` (palette PNGs whose
pixel values are the class ids). Flow: ``flow.npz`` ((2, h, w) float32 per window, (dx, dy) pixels of the view over
the window) and ``flow/window_00000.png`` (Middlebury colour wheel). Always ``preview.gif``: the first
``preview_frames`` windows as event frames with their predictions, each shown for its real duration.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evpretrain.config import ConfigError
from evpretrain.events.readers.streaming import CHUNK_EVENTS, stream_recording
from evpretrain.events.windows import Window, Windower, WindowSpec
from evpretrain.files import AtomicPath, write_text_atomic
from evpretrain.inference.model import InferenceModel
from evpretrain.inference.preview import event_frame, flow_colors, frame_size, mask_image, preview_frame, write_gif

__all__ = ["FEATURES_FORMAT", "MANIFEST_NAME", "RecordingInput", "write_features", "write_predictions"]

FEATURES_FORMAT = "evpretrain-features"
MANIFEST_NAME = "prediction.json"


class RecordingInput:
    """One ``--input``: a recording file or an event store (module docstring). ``window`` None takes each store
    sample whole (a file needs a window). ``sensor_size`` (H, W) overrides what the file says; ``time_origin`` and
    ``format`` as ``read_recording``'s. After iterating, ``summary()`` describes what was read."""

    def __init__(
        self,
        path: str | Path,
        window: WindowSpec | None,
        *,
        time_origin: str = "file",
        format: str | None = None,
        sensor_size: tuple[int, int] | None = None,
        chunk_events: int = CHUNK_EVENTS,
    ):
        from evpretrain.data.info import is_store

        self.path, self.window = Path(path), window
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such recording or store")
        self.is_store = self.path.is_file() and is_store(self.path)
        self.stats: dict[str, Any] = {"events": 0, "windows": 0, "dropped_events": 0}
        if self.is_store:
            from evpretrain.data.store import EventStore

            self._store = EventStore(self.path)
            self.sensor_size = tuple(sensor_size or self._store.sensor_size)
            return
        if window is None:
            raise ConfigError(
                f"{self.path}: a recording needs --window (events:N or ms:T); only a store's samples "
                "are windows already"
            )
        self._stream = stream_recording(self.path, format=format, time_origin=time_origin, chunk_events=chunk_events)
        size = sensor_size or self._stream.sensor_size
        if size is None:
            raise ConfigError(f"{self.path}: the file does not say its sensor size; pass --sensor-size H W")
        self.sensor_size = tuple(int(v) for v in size)

    def windows(self) -> Iterator[tuple[str, Window]]:
        """(source name, window) of every window, in time order (store: sample order)."""
        if not self.is_store:
            cutter = Windower(self.window, keep_empty=True, source=self.path)  # one output per slot of the grid
            for window in cutter.cut(self._stream.chunks()):
                yield str(self.path), window
            self.stats.update(events=cutter.events, windows=cutter.windows, dropped_events=cutter.dropped_events)
            return
        names = self._store.names
        for index in range(len(self._store)):
            events = self._store.events(index)
            source = f"{self.path}#{names[index] if names else index}"
            self.stats["events"] += len(events)
            if self.window is None:
                if len(events):
                    self.stats["windows"] += 1
                    yield source, Window(events, int(events["t"][0]), int(events["t"][-1]) + 1)
                continue
            # A sample shorter than one window gives none; only a store without any window fails.
            cutter = Windower(self.window, keep_empty=True, source=source)
            for window in cutter.cut([events], required=False):
                self.stats["windows"] += 1
                yield source, window
            self.stats["dropped_events"] += cutter.dropped_events
        if self.stats["windows"] == 0:
            raise ConfigError(
                f"{self.path}: no sample of the store holds one complete window {self.window}: choose a smaller "
                "--window, or none (each sample whole)"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": "store" if self.is_store else "recording",
            "sensor_size": list(self.sensor_size),
            **self.stats,
        }


def _batches(model: InferenceModel, source: RecordingInput) -> Iterator[tuple[list[str], list[Window]]]:
    """(sources, windows) in batches of the model's ``batch_size``."""
    names: list[str] = []
    windows: list[Window] = []
    for name, window in source.windows():
        names.append(name)
        windows.append(window)
        if len(windows) == model.batch_size:
            yield names, windows
            names, windows = [], []
    if windows:
        yield names, windows


def _progress(enabled: bool, text: str):
    from tqdm.auto import tqdm

    return tqdm(desc=text, unit="window", disable=not enabled)


def write_features(
    model: InferenceModel,
    inputs: Sequence[RecordingInput],
    out: str | Path,
    *,
    tokens: bool = False,
    attrs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed every window of ``inputs`` into the HDF5 file ``out`` (module docstring); return a summary."""
    import h5py

    out = Path(out)
    count = 0
    with AtomicPath(out) as tmp, h5py.File(tmp, "w") as file, _progress(progress, "embed") as bar:
        columns: dict[str, h5py.Dataset] = {}
        for source in inputs:
            for names, windows in _batches(model, source):
                result = model.embed_batch([w.events for w in windows], source.sensor_size, tokens)
                result |= {
                    "t_start": np.array([w.t_start for w in windows], np.int64),
                    "t_end": np.array([w.t_end for w in windows], np.int64),
                    "source": np.array(names, dtype=object),
                }
                for key, value in result.items():
                    if key not in columns:
                        columns[key] = _growing(file, key, value)
                    data = columns[key]
                    data.resize(count + len(value), axis=0)
                    data[count:] = value
                count += len(windows)
                bar.update(len(windows))
        summary = {
            "format": FEATURES_FORMAT,
            "windows": count,
            "embed_dim": model.embed_dim,
            "recordings": [source.summary() for source in inputs],
            **(attrs or {}),
        }
        for key, value in summary.items():
            file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    return summary


def _growing(file, key: str, first: np.ndarray):
    """A dataset of ``first``'s kind, growing along its first axis."""
    import h5py

    if first.dtype == object:
        return file.create_dataset(key, (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,))
    shape = first.shape[1:]
    rows = max(1, min(4096, (1 << 20) // max(1, int(np.prod(shape)) * first.itemsize)))  # about 1 MB chunks
    return file.create_dataset(key, (0, *shape), maxshape=(None, *shape), dtype=first.dtype, chunks=(rows, *shape))


class _NpzWriter:
    """An ``.npz`` archive written one array at a time (``np.load`` reads it), so per-window arrays need not be held
    together in memory."""

    def __init__(self, path: Path, compress: bool):
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        self.archive = zipfile.ZipFile(path, "w", compression=method, compresslevel=1 if compress else None)

    def add(self, name: str, array: np.ndarray) -> None:
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as file:
            np.lib.format.write_array(file, np.asarray(array), allow_pickle=False)

    def close(self) -> None:
        self.archive.close()


def write_predictions(
    model: InferenceModel,
    inputs: Sequence[RecordingInput],
    out: str | Path,
    *,
    top_k: int = 5,
    preview_frames: int = 100,
    attrs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict every window of ``inputs`` into the folder ``out`` (module docstring); return its manifest.

    ``out`` may be absent, empty, or an earlier prediction folder (holding ``prediction.json``), which is replaced;
    anything else is refused before any work."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST_NAME).is_file())):
        raise FileExistsError(
            f"{out}: exists and is not an earlier prediction folder (no {MANIFEST_NAME}); choose another --out or "
            "remove it"
        )
    task = model.spec.task
    model.require_predictor()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    work.mkdir()
    try:
        manifest = _predict_into(model, inputs, work, task, top_k, preview_frames, progress)
        manifest |= attrs or {}
        write_text_atomic(work / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _predict_into(
    model: InferenceModel,
    inputs: Sequence[RecordingInput],
    work: Path,
    task: str,
    top_k: int,
    preview_frames: int,
    progress: bool,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    frames: list[Image.Image] = []
    durations: list[int] = []
    archive = None
    if task != "classify":
        name = "masks" if task == "segment" else "flow"
        (work / name).mkdir()
        archive = _NpzWriter(work / f"{name}.npz", compress=task == "segment")
    spans: dict[str, list] = {"t_start": [], "t_end": [], "source": []}
    index = 0
    with _progress(progress, "predict") as bar:
        for source in inputs:
            box = model.view(source.sensor_size)
            panel = frame_size(box[2:])
            for names, windows in _batches(model, source):
                out = model.predict_batch([w.events for w in windows], source.sensor_size, top_k)
                for i, (name, window) in enumerate(zip(names, windows)):
                    spans["t_start"].append(window.t_start)
                    spans["t_end"].append(window.t_end)
                    spans["source"].append(name)
                    caption = f"{Path(name).name}  {window.t_start / 1e6:.3f}-{window.t_end / 1e6:.3f} s"
                    picture = [event_frame(window.events, box, panel)] if index < preview_frames else None
                    if task == "classify":
                        best = [
                            {"class": int(c), "name": model.class_name(int(c)), "prob": float(p)}
                            for c, p in zip(out["classes"][i], out["probs"][i])
                        ]
                        rows.append(
                            {
                                "window": index,
                                "source": name,
                                "t_start_us": window.t_start,
                                "t_end_us": window.t_end,
                                "top_k": best,
                            }
                        )
                        caption += "  " + ", ".join(f"{b['name']} ({b['prob']:.0%})" for b in best[:3])
                    elif task == "segment":
                        mask = out["masks"][i]
                        archive.add(f"window_{index:05d}", mask)
                        image = mask_image(mask)
                        image.save(work / "masks" / f"window_{index:05d}.png")
                        if picture is not None:
                            small = image.resize(panel[::-1], Image.NEAREST).convert("RGB")
                            picture.append(np.asarray(small))
                    else:
                        flow = out["flow"][i]
                        archive.add(f"window_{index:05d}", flow)
                        colours = Image.fromarray(flow_colors(flow))
                        colours.save(work / "flow" / f"window_{index:05d}.png")
                        if picture is not None:
                            picture.append(np.asarray(colours.resize(panel[::-1], Image.BILINEAR)))
                    if picture is not None:
                        frames.append(preview_frame(picture, caption))
                        durations.append(round((window.t_end - window.t_start) / 1000))
                    index += 1
                bar.update(len(windows))
    files = ["preview.gif"]
    if archive is not None:
        archive.add("t_start", np.asarray(spans["t_start"], np.int64))
        archive.add("t_end", np.asarray(spans["t_end"], np.int64))
        archive.add("source", np.asarray(spans["source"], dtype=str))
        archive.close()
        name = "masks" if task == "segment" else "flow"
        files += [f"{name}.npz", f"{name}/window_NNNNN.png"]
    else:
        _write_table(rows, work, top_k)
        files += ["predictions.csv", "predictions.json"]
    write_gif(frames, durations, work / "preview.gif")
    return {
        "task": task,
        "windows": index,
        "preview_frames": len(frames),
        "files": files,
        "inputs": [source.summary() for source in inputs],
        "class_names": list(model.spec.class_names) if model.spec.class_names else None,
    }


def _write_table(rows: list[dict[str, Any]], work: Path, top_k: int) -> None:
    k = min(top_k, len(rows[0]["top_k"]))
    header = ["window", "source", "t_start_us", "t_end_us"]
    header += [f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class", "name", "prob")]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        best = [v for b in row["top_k"] for v in (b["class"], b["name"], f"{b['prob']:.6f}")]
        writer.writerow([row["window"], row["source"], row["t_start_us"], row["t_end_us"], *best])
    write_text_atomic(work / "predictions.csv", text.getvalue())
    write_text_atomic(work / "predictions.json", json.dumps({"windows": rows}, indent=1) + "\n")


def _swap_in(work: Path, out: Path) -> None:
    """Rename the finished folder ``work`` onto ``out``; an earlier ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
