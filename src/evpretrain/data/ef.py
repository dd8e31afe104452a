"""EF-ImageNet: the paper's pre-training data recipe for any ImageNet-style image folder.

Each image is moved to make a short 30 fps video (a random pan with a slight zoom, as a hand-held camera would
see it), the video is simulated into events, and the events, the difference maps and optionally the frames and the
colour source image (``keep_rgb``: what the paper's CLIP teacher sees, ``load_rgb``) go into one event store. Work
is split into shards of ``shard_size`` images written by parallel processes; a shard is written atomically, so a
rerun after a crash or a cancelled job skips every finished shard. When all shards exist they are merged into the
final store and removed.

On a cluster the build splits further into ``shards`` parts, one job each (``build_ef(..., shard=i, num_shards=n)``),
each a run of whole ``shard_size`` blocks, and ``merge_ef`` joins the parts into the store one build would write:
every image's seeds follow from its index in the sorted folder, so neither the samples nor their order depend on how
the build was split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
from scipy import ndimage

from evpretrain.config import to_mapping
from evpretrain.data.config import EFConfig
from evpretrain.data.store import EventStore, EventStoreWriter, StoreError, frame_times
from evpretrain.events.simulator import simulate
from evpretrain.files import write_text_atomic
from evpretrain.workers import worker_pool

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def builder_config(config: EFConfig) -> dict:
    """The settings a store records (attribute ``builder_config``): all but ``shards``, which changes how the build
    runs, not what it writes."""
    return {k: v for k, v in to_mapping(config).items() if k != "shards"}


def list_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Images of an ImageNet-style folder (one sub-folder a class), sorted; returns (paths, labels, class names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"{root}: no images with suffix in {IMAGE_SUFFIXES} under the class folders")
    return paths, labels, classes


def load_gray(path: Path, min_side: int) -> np.ndarray:
    """A greyscale image in [0, 1], float32 (H, W), resized so that its shorter side is ``min_side``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L")
            scale = min_side / min(image.size)
            size = (max(min_side, round(image.width * scale)), max(min_side, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise StoreError(path, f"cannot read image: {err}") from err


def load_rgb(path: Path, size: int) -> np.ndarray:
    """The colour image as CLIP's preprocessing crops it, (3, size, size) uint8: the shorter side resized to ``size``
    (PIL bicubic, the longer one to int(size * long / short)), then the centre ``size`` x ``size`` (offsets rounded).
    This is torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image, the first steps of
    OpenAI's ``clip.load`` preprocess, which the paper's N-ImageNet loader applies to the ImageNet JPEG
    (BIT-Vision/EventPretrain, dataset/pretrain/pr_n_imagenet_dataset.py:66-74); the teacher then normalises."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            long = int(size * max(width, height) / min(width, height))
            new_w, new_h = (size, long) if width <= height else (long, size)
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
            return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    except (OSError, UnidentifiedImageError) as err:
        raise StoreError(path, f"cannot read image: {err}") from err


def moving_video(image: np.ndarray, config: EFConfig, rng: np.random.Generator) -> np.ndarray:
    """Frames (T, S, S) in [0, 1] of a window panning over ``image`` at constant velocity while zooming slightly."""
    size, steps = config.image_size, config.num_frames - 1
    angle = rng.uniform(0, 2 * np.pi)
    velocity = rng.uniform(*config.pan_speed_px_per_frame) * np.array([np.cos(angle), np.sin(angle)])
    zoom = rng.uniform(-config.zoom_per_frame, config.zoom_per_frame)
    h, w = image.shape
    centre = np.array([w / 2, h / 2]) - velocity * steps / 2  # the path is centred on the image
    grid = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    frames = np.empty((config.num_frames, size, size), np.float32)
    for n in range(config.num_frames):
        scale = (1 + zoom) ** n
        cx, cy = centre + velocity * n
        coords = [grid[0] / scale + cy, grid[1] / scale + cx]
        frames[n] = ndimage.map_coordinates(image, coords, order=1, mode="reflect")
    return np.clip(frames, 0.0, 1.0)


def _shard_job(
    config: EFConfig, paths: list[Path], labels: list[int], first_index: int, out: Path, classes: list[str]
) -> int:
    timestamps = frame_times(config.num_frames, config.frame_rate_hz)
    # The window must stay inside the image over the whole pan: pad the shorter side by the travel.
    travel = config.pan_speed_px_per_frame[1] * (config.num_frames - 1)
    min_side = int(np.ceil(config.image_size * (1 + config.zoom_per_frame) ** config.num_frames + travel + 2))
    with EventStoreWriter(
        out,
        sensor_size=(config.image_size, config.image_size),
        source="evpretrain data build-ef (shard)",
        builder_config=builder_config(config),
        attrs={"first_index": first_index, "class_names": classes},
        compression=config.compression,
    ) as writer:
        for k, (path, label) in enumerate(zip(paths, labels)):
            render_seed, sim_seed = np.random.SeedSequence([config.seed, first_index + k]).spawn(2)
            frames = moving_video(load_gray(path, min_side), config, np.random.default_rng(render_seed))
            sim = simulate(frames, timestamps, seed=int(sim_seed.generate_state(1)[0]), config=config.simulator)
            dense = {"diff_maps": sim.diff_maps.astype(config.dense_dtype)}
            if config.keep_frames:
                dense["frames"] = np.round(frames * 255).astype(np.uint8)
            if config.keep_rgb:
                dense["rgb"] = load_rgb(path, config.rgb_size)
            writer.add_sample(
                sim.events,
                label=label,
                clean_events=sim.clean_events if config.keep_clean_events else None,
                name=str(path.relative_to(path.parents[1])),
                **dense,
            )
    return len(paths)


def _join(stores: list[Path], out: Path, config: EFConfig, *, source: str, attrs: dict) -> Path:
    """Write the samples of ``stores``, in order, into the store ``out``."""
    with EventStoreWriter(
        out,
        sensor_size=(config.image_size, config.image_size),
        source=source,
        builder_config=builder_config(config),
        attrs=attrs,
        compression=config.compression,
    ) as writer:
        for path in stores:
            with EventStore(path) as store:
                names = store.names
                for i in range(len(store)):
                    sample = store.sample(i)
                    writer.add_sample(
                        sample.pop("events"),
                        label=sample.pop("label"),
                        clean_events=sample.pop("clean_events", None),
                        name=names[i],
                        **sample,
                    )
    return out


def build_ef(
    config: EFConfig,
    images: str | Path,
    out: str | Path,
    *,
    shard: int = 0,
    num_shards: int = 1,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build the store ``out`` from the image folder ``images``; resumable through ``<out>.shards/``. With
    ``num_shards`` > 1, only part ``shard`` (0-based) of it: the blocks of ``shard_size`` images from
    ``shard * B // num_shards`` to ``(shard + 1) * B // num_shards`` of the B in the folder (a part may be empty);
    ``merge_ef`` joins the parts."""
    from tqdm import tqdm

    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards = {num_shards}), got {shard}")
    out = Path(out)
    paths, labels, classes = list_images(images)
    shard_dir = out.with_name(out.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "config": to_mapping(config),
        "images": hashlib.sha256("\n".join(str(p.relative_to(images)) for p in paths).encode()).hexdigest(),
        "num_images": len(paths),
    }
    manifest_path = shard_dir / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()) != manifest:
        raise StoreError(
            manifest_path,
            "unfinished shards were built from another config or image list; delete this folder to start over",
        )
    write_text_atomic(manifest_path, json.dumps(manifest, sort_keys=True, indent=1))

    blocks = range(0, len(paths), config.shard_size)  # each block's first image
    starts = blocks[shard * len(blocks) // num_shards : (shard + 1) * len(blocks) // num_shards]
    shards = [shard_dir / f"shard-{i // config.shard_size:06d}.h5" for i in starts]
    todo = [(s, p) for s, p in zip(starts, shards) if not p.exists()]
    part_size = sum(len(paths[s : s + config.shard_size]) for s in starts)
    workers = workers or len(os.sched_getaffinity(0))
    with tqdm(
        total=part_size,
        initial=part_size - sum(len(paths[s : s + config.shard_size]) for s, _ in todo),
        desc="build-ef",
        unit="image",
        disable=not progress,
    ) as bar:
        jobs = [
            (config, paths[s : s + config.shard_size], labels[s : s + config.shard_size], s, p, classes)
            for s, p in todo
        ]
        if workers == 1:  # in-process: no pool start-up, and a debugger or profiler sees the work
            for job in jobs:
                bar.update(_shard_job(*job))
        else:
            with worker_pool(workers) as pool:
                for future in as_completed([pool.submit(_shard_job, *job) for job in jobs]):
                    bar.update(future.result())

    attrs = {"class_names": classes, "frame_rate_hz": config.frame_rate_hz}
    if num_shards > 1:
        first = min(shard * len(blocks) // num_shards * config.shard_size, len(paths))  # an empty part's too
        attrs |= {"shard": shard, "num_shards": num_shards, "first_index": first, "num_images": len(paths)}
    _join(shards, out, config, source=f"evpretrain data build-ef from {Path(images).resolve()}", attrs=attrs)
    shutil.rmtree(shard_dir)
    return out


def merge_ef(config: EFConfig, parts: list[str | Path], out: str | Path) -> Path:
    """Join the parts of a split build (``build_ef`` with ``shard``, ``num_shards``), given in any order, into the
    store ``out``: the store, array for array and attribute for attribute, that one build writes. Parts of another
    split, config or image folder, or a missing part, raise StoreError."""
    by_shard = {}
    for path in map(Path, parts):
        with EventStore(path) as store:
            attrs = store.attrs
            by_shard[int(attrs["shard"]) if "shard" in attrs else None] = (path, attrs, len(store))
    if sorted(by_shard, key=str) != list(range(len(parts))):
        raise StoreError(
            Path(parts[0]),
            f"merge-ef needs parts 0..{len(parts) - 1} of one build (build-ef --shard i --num-shards {len(parts)}); "
            f"got shards {sorted(by_shard, key=str)}",
        )
    expected = json.loads(json.dumps(builder_config(config)))  # as stored: tuples become lists
    first, next_index = by_shard[0][1], 0
    for path, attrs, size in (by_shard[k] for k in range(len(parts))):
        if attrs["num_shards"] != len(parts):
            raise StoreError(path, f"a part of {attrs['num_shards']} parts, not of the {len(parts)} given")
        if attrs["builder_config"] != expected:
            raise StoreError(path, "this part was built with other data.ef settings than the given config")
        if (attrs["source"], attrs["class_names"]) != (first["source"], first["class_names"]):
            raise StoreError(path, "this part was built from another image folder than part 0")
        if attrs["first_index"] != next_index:
            raise StoreError(path, f"this part starts at image {attrs['first_index']}, expected {next_index}")
        next_index += size
    if next_index != first["num_images"]:
        raise StoreError(Path(parts[0]), f"the parts hold {next_index} images, the folder {first['num_images']}")
    attrs = {"class_names": first["class_names"], "frame_rate_hz": config.frame_rate_hz}
    return _join([by_shard[k][0] for k in range(len(parts))], Path(out), config, source=first["source"], attrs=attrs)
