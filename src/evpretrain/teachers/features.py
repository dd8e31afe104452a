"""Teacher features computed once per event store and cached in their own HDF5 file.

Layout: ``/tokens`` (N, gh * gw, D) float16, one chunk per sample: sample i's teacher tokens on the grid ``grid``
(gh, gw) (the student's token grid, or the teacher's own: ``pretrain.teacher.grid``), from one image per stored
video (as the paper's one ``clip_emb`` per ImageNet image), chosen by ``image`` (config ``pretrain.teacher.input``):

- ``rgb`` (the paper's): the colour source image as CLIP's preprocessing crops it, the store's ``/rgb`` (written by
  ``build-ef`` with ``keep_rgb``: shorter side resized to ``rgb_size`` bicubic, centre crop; ``evpretrain.data.ef``),
  then the teacher's own resizing and normalisation (CLIP: OpenAI's mean and std). The paper's N-ImageNet path feeds
  the ImageNet JPEG through ``clip.load``'s preprocess (BIT-Vision/EventPretrain,
  dataset/pretrain/pr_n_imagenet_dataset.py:66-74). Its field of view is the source image's centre, not exactly the
  moving window the events were simulated from.
- ``last_frame``: the LAST frame of the sample's ``/frames`` (the end of its event window), grey in three channels;
  the demo's digits have no colour source.

File attributes: format, format_version, teacher (registry name), teacher_weights (path of its weights file),
teacher_grid, teacher_input_size, grid, embed_dim, num_samples, input (``rgb`` or ``last_frame``; files without it
are ``last_frame``), image (in words), source_store (path) and source_content_sha256 (the store's ``content_sha256``).

The features live beside the store rather than inside it, so the store stays immutable and its checksum valid; the
recorded checksum ties the two together (``TeacherFeatures.check_source``). The file is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from evpretrain import __version__
from evpretrain.data.store import EventStore, StoreError
from evpretrain.files import AtomicPath
from evpretrain.teachers.base import Teacher, resize_tokens

__all__ = [
    "FEATURES_FORMAT",
    "TEACHER_INPUTS",
    "TeacherFeatures",
    "compute_teacher_features",
    "frame_to_image",
    "rgb_to_image",
]

FEATURES_FORMAT = "evpretrain-teacher-features"
FEATURES_VERSION = 1
# What the teacher sees: the store field it reads, and the file's description of the image.
TEACHER_INPUTS = {
    "rgb": ("rgb", "the colour source image (/rgb), CLIP's resize and centre crop"),
    "last_frame": ("frames", "last frame of /frames, grey in three channels"),
}


def frame_to_image(frame: np.ndarray) -> torch.Tensor:
    """A stored grey frame (H, W), float in [0, 1] or uint8 0-255 (EF stores), as an image (3, H, W) float32.

    The image is in [0, 1].
    """
    if frame.dtype == np.uint8:
        grey = torch.from_numpy(frame.astype(np.float32) / 255.0)
    else:
        grey = torch.from_numpy(np.asarray(frame, dtype=np.float32))
    return grey.expand(3, -1, -1)


def rgb_to_image(rgb: np.ndarray) -> torch.Tensor:
    """A stored colour image (3, H, W) uint8 (``/rgb``) as an image (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)


def compute_teacher_features(
    store_path: str | Path,
    teacher: Teacher,
    out_path: str | Path,
    *,
    grid_size: Sequence[int],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    image: str = "last_frame",
) -> Path:
    """Run ``teacher`` (moved to ``device``) on every sample's ``image`` (``rgb`` or ``last_frame``, see the module
    docstring); write the tokens resized to ``grid_size`` (gh, gw) (unchanged where it is the teacher's own grid)
    into ``out_path``. Returns ``out_path``."""
    from tqdm import tqdm

    store_path, out_path = Path(store_path), Path(out_path)
    grid = (int(grid_size[0]), int(grid_size[1]))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image not in TEACHER_INPUTS:
        raise ValueError(f"pretrain.teacher.input must be one of {list(TEACHER_INPUTS)}, got {image!r}")
    field, description = TEACHER_INPUTS[image]
    with EventStore(store_path) as store:
        if field not in store.fields:
            hint = (
                "build the store with data.ef.keep_rgb: true, or set pretrain.teacher.input: last_frame (the demo's "
                "digits have no colour source)"
                if image == "rgb"
                else "build the store with frames (data.ef.keep_frames: true)"
            )
            raise StoreError(
                store_path,
                f"pretrain.teacher.input: {image} needs the field {field!r}, but this store has "
                f"{sorted(store.fields)}: {hint}",
            )
        source_sha = store.attrs.get("content_sha256", "")
        num_samples = len(store)
        teacher = teacher.to(device).freeze()
        with AtomicPath(out_path) as tmp, h5py.File(tmp, "w") as out:
            tokens = out.create_dataset(
                "tokens",
                shape=(num_samples, grid[0] * grid[1], teacher.embed_dim),
                dtype=np.float16,
                chunks=(1, grid[0] * grid[1], teacher.embed_dim),
            )
            out.attrs.update(
                {
                    "format": FEATURES_FORMAT,
                    "format_version": FEATURES_VERSION,
                    "teacher": teacher.name,
                    "teacher_weights": str(getattr(teacher, "weights_path", "")),
                    "teacher_grid": teacher.grid_size,
                    "teacher_input_size": teacher.input_size,
                    "grid": grid,
                    "embed_dim": teacher.embed_dim,
                    "num_samples": num_samples,
                    "input": image,
                    "image": description,
                    "source_store": str(store_path),
                    "source_content_sha256": source_sha,
                    "created_by": f"evpretrain {__version__}",
                }
            )
            with tqdm(
                total=num_samples, desc=f"teacher-features {teacher.name}", unit="sample", disable=not progress
            ) as bar:
                for start in range(0, num_samples, batch_size):
                    stop = min(start + batch_size, num_samples)
                    if image == "rgb":
                        images = torch.stack([rgb_to_image(store.dense("rgb", i)) for i in range(start, stop)])
                    else:
                        images = torch.stack([frame_to_image(store.dense("frames", i)[-1]) for i in range(start, stop)])
                    with torch.inference_mode():
                        batch = resize_tokens(teacher(images.to(device)), teacher.grid_size, grid)
                    tokens[start:stop] = batch.to(torch.float16).cpu().numpy()
                    bar.update(stop - start)
    return out_path


class TeacherFeatures:
    """Read cached teacher tokens: ``features[i]`` -> (gh * gw, D) float32 tensor.

    Safe to pickle into DataLoader workers (each opens its own handle). With ``store``, checks at once that the
    features were computed from that store (``check_source``); with ``image``, that the teacher saw that input.
    """

    def __init__(self, path: str | Path, *, store: str | Path | EventStore | None = None, image: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(self.path, "no such teacher-features file")
        self._file: h5py.File | None = None
        file = self._open()
        if file.attrs.get("format") != FEATURES_FORMAT:
            raise StoreError(
                self.path,
                f"not a teacher-features file: attribute 'format' is {file.attrs.get('format')!r}, "
                f"expected {FEATURES_FORMAT!r}",
            )
        if "tokens" not in file:
            raise StoreError(self.path, "missing dataset /tokens")
        self._len = int(file["tokens"].shape[0])
        self.grid_size: tuple[int, int] = tuple(int(v) for v in file.attrs["grid"])
        self.embed_dim = int(file.attrs["embed_dim"])
        self.teacher = str(file.attrs["teacher"])
        self.image = str(file.attrs.get("input", "last_frame"))
        if image is not None and image != self.image:
            raise StoreError(
                self.path,
                f"teacher tokens of the input {self.image!r}, but pretrain.teacher.input is {image!r}: recompute the "
                "teacher features",
            )
        if store is not None:
            self.check_source(store)

    def _open(self) -> h5py.File:
        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise StoreError(self.path, f"cannot open as HDF5: {err}") from err
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_file"} | {"_file": None}

    def __enter__(self) -> TeacherFeatures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self._len <= index < self._len:
            raise IndexError(f"{self.path}: sample {index} out of range for {self._len} samples")
        return torch.from_numpy(self._open()["tokens"][index % self._len].astype(np.float32))

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self._open().attrs.items()}

    def check_source(self, store: str | Path | EventStore) -> None:
        """Raise StoreError unless these features were computed from ``store``: the same ``content_sha256`` and
        sample count (the store's recorded digest is compared, not recomputed; ``EventStore.verify`` does that)."""
        owned = not isinstance(store, EventStore)
        store = EventStore(store) if owned else store
        try:
            expected = store.attrs.get("content_sha256")
            recorded = self._open().attrs.get("source_content_sha256")
            if recorded != expected:
                raise StoreError(
                    self.path,
                    f"computed from a store with content_sha256 {recorded}, but {store.path} has {expected}: "
                    "recompute the teacher features",
                )
            if len(store) != self._len:
                raise StoreError(self.path, f"holds {self._len} samples, but {store.path} has {len(store)}")
        finally:
            if owned:
                store.close()
