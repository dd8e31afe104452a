"""The embedded demo study: real handwritten digits moving over a real texture, simulated into events.

Nothing is downloaded: the digits are scikit-learn's (1,797 real 8x8 scans, 10 classes) and the background is a
texture that scikit-image ships. Each sample is an N-MNIST-style saccade: the view pans over the texture along
``saccade_legs`` consecutive legs of N-MNIST's triangle (directions 120 degrees apart, the first one random among the
three, jittered), and the digit drifts a little on top of that motion, so the scene holds two motions. One leg hides
the strokes that lie along its direction (a moving edge fires only across its motion); two legs show every stroke.
Frames are rendered at a fixed rate and simulated into events.

Per sample the store holds: noisy and clean events, frames (T, H, W) in [0, 1], difference maps (T-1, H, W)
(log-intensity change between consecutive frames), the digit label, a mask (H, W) with 11 classes (0 background,
1 + digit) at the last frame (the end of the event window, as DSEC labels its windows), and the ground-truth
optical flow (2, H, W): (dx, dy) in pixels from the first to the last frame, at first-frame positions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import ndimage

from evpretrain.config import to_mapping
from evpretrain.data.config import DEMO_SPLITS, DemoConfig
from evpretrain.data.store import EventStoreWriter, frame_times
from evpretrain.events.simulator import simulate
from evpretrain.workers import worker_pool

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}  # of the 1,797 digit images; no image in two splits
MASK_CLASSES = ["background"] + [f"digit {d}" for d in range(10)]


@dataclass(frozen=True)
class DemoSample:
    """One rendered saccade before simulation. Frames (T, H, W) in [0, 1]; timestamps (T,) microseconds."""

    frames: np.ndarray
    timestamps_us: np.ndarray
    mask: np.ndarray
    flow: np.ndarray


def load_digits_split(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as (images (N, 8, 8) in [0, 1], labels (N,)) per split, split by a seeded shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    bounds = np.cumsum([int(round(SPLIT_FRACTIONS[s] * len(images))) for s in DEMO_SPLITS[:-1]])
    parts = np.split(order, bounds)
    return {s: (images[idx], digits.target[idx].astype(np.int64)) for s, idx in zip(DEMO_SPLITS, parts)}


def load_background(name: str, intensity: tuple[float, float]) -> np.ndarray:
    """A grey texture from ``skimage.data`` rescaled to ``intensity`` = (low, high), float32 (H, W)."""
    import skimage.data
    from skimage.color import rgb2gray

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    if image.ndim == 3:
        image = rgb2gray(image[..., :3]).astype(np.float32)
    image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
    low, high = intensity
    return (low + (high - low) * image).astype(np.float32)


def saccade_path(config: DemoConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Displacements (T, 2), (dx, dy) pixels from the first frame, of the panned content and of the digit.

    The pan runs at one speed along ``config.saccade_legs`` legs of equal step counts (step n on leg
    ``n * legs // (T - 1)``), each leg turned 120 degrees from the last; the digit adds a constant drift.
    """
    steps = config.num_frames - 1
    first = rng.integers(3) * 2 * np.pi / 3 + rng.uniform(-np.pi / 12, np.pi / 12)
    angles = first + (np.arange(steps) * config.saccade_legs // steps) * 2 * np.pi / 3
    speed = rng.uniform(*config.pan_speed_px_per_frame)
    velocity = speed * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (steps, 2) per frame
    drift_angle = rng.uniform(0, 2 * np.pi)
    drift = config.digit_drift_px_per_frame * np.array([np.cos(drift_angle), np.sin(drift_angle)])
    pan = np.concatenate([np.zeros((1, 2)), np.cumsum(velocity, axis=0)])
    return pan, pan + drift * np.arange(config.num_frames)[:, None]


def render_sample(
    digit: np.ndarray, label: int, background: np.ndarray, config: DemoConfig, rng: np.random.Generator
) -> DemoSample:
    """Render one saccade: the texture pans along ``config.saccade_legs`` legs, the digit moves with it plus a drift.

    ``digit`` is (8, 8) in [0, 1]. All velocities are (dx, dy) pixels per frame in image coordinates.
    """
    size = config.image_size
    pan, digit_path = saccade_path(config, rng)

    # Texture origin such that the panned window never leaves the texture.
    reach = np.abs(pan).max(axis=0) + 1
    bg_h, bg_w = background.shape
    origin = np.array([rng.uniform(reach[0], bg_w - size - reach[0]), rng.uniform(reach[1], bg_h - size - reach[1])])
    # Digit start (top-left, x and y) such that its whole path stays inside the frame; with a jitter, the path's
    # centre lies within that many pixels of the frame centre (N-MNIST's digits are centred).
    low = -digit_path.min(axis=0) + 1
    high = size - config.digit_size - digit_path.max(axis=0) - 1
    if config.digit_jitter_px is not None:
        centred = (size - config.digit_size - digit_path.min(axis=0) - digit_path.max(axis=0)) / 2
        low = np.maximum(low, centred - config.digit_jitter_px)
        high = np.minimum(high, centred + config.digit_jitter_px)
    start = np.array([rng.uniform(low[0], high[0]), rng.uniform(low[1], high[1])])

    glyph = ndimage.zoom(digit, config.digit_size / digit.shape[0], order=1, grid_mode=True, mode="nearest")
    glyph = np.clip(glyph, 0.0, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    frames = np.empty((config.num_frames, size, size), np.float32)
    alphas = np.empty_like(frames)
    for n in range(config.num_frames):
        bx, by = origin - pan[n]  # content moves by +pan, so pixel (x, y) shows texture point (x - pan)
        texture = ndimage.map_coordinates(background, [yy + by, xx + bx], order=1, mode="reflect")
        dx, dy = start + digit_path[n]
        alpha = ndimage.map_coordinates(glyph, [yy - dy, xx - dx], order=1, mode="constant", cval=0.0)
        alphas[n] = alpha
        frames[n] = texture * (1 - alpha) + config.digit_intensity * alpha

    on_digit_first = alphas[0] > 0.5
    flow = np.where(on_digit_first, digit_path[-1][:, None, None], pan[-1][:, None, None]).astype(np.float32)
    mask = np.where(alphas[-1] > 0.5, label + 1, 0).astype(np.uint8)
    timestamps = frame_times(config.num_frames, config.frame_rate_hz)
    return DemoSample(np.clip(frames, 0.0, 1.0), timestamps, mask, flow)


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    digit: np.ndarray
    label: int
    seed: np.random.SeedSequence


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(config: DemoConfig) -> None:
    # Per-process state for the pool: the texture is loaded once per worker, not pickled per sample.
    _WORKER_STATE["config"] = config
    _WORKER_STATE["background"] = load_background(config.background, config.background_intensity)


def _make_sample(job: _Job) -> dict[str, Any]:
    config: DemoConfig = _WORKER_STATE["config"]
    render_rng, sim_seed = job.seed.spawn(2)
    sample = render_sample(job.digit, job.label, _WORKER_STATE["background"], config, np.random.default_rng(render_rng))
    sim = simulate(
        sample.frames,
        sample.timestamps_us,
        seed=int(sim_seed.generate_state(1)[0]),
        config=config.simulator,
    )
    return dict(
        events=sim.events,
        clean_events=sim.clean_events,
        label=job.label,
        frames=sample.frames,
        diff_maps=sim.diff_maps.astype(np.float32),
        flow=sample.flow,
        masks=sample.mask,
        name=f"{job.split}/{job.index:05d}",
    )


def _jobs(config: DemoConfig, split: str, digits: tuple[np.ndarray, np.ndarray]) -> Iterator[_Job]:
    images, labels = digits
    # One seed per (split, sample): the output does not depend on the number of workers.
    split_seed = np.random.SeedSequence([config.seed, DEMO_SPLITS.index(split)])
    for index, seed in enumerate(split_seed.spawn(config.samples.get(split, 0))):
        k = index % len(images)
        yield _Job(split, index, images[k], int(labels[k]), seed)


def build_demo(
    config: DemoConfig, out_dir: str | Path, *, workers: int | None = None, progress: bool = True
) -> dict[str, Path]:
    """Build ``out_dir/{train,val,test}.h5``; return the written paths by split. Deterministic for ``config.seed``."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    workers = workers or len(os.sched_getaffinity(0))
    digits = load_digits_split(config.seed)
    total = sum(config.samples.values())
    written: dict[str, Path] = {}
    size = config.image_size
    if workers == 1:  # in-process: no pool start-up, and a debugger or profiler sees the work
        _init_worker(config)
        pool = contextlib.nullcontext(SimpleNamespace(map=lambda fn, jobs, chunksize: map(fn, jobs)))
    else:
        pool = worker_pool(workers, _init_worker, (config,))
    with pool as pool, tqdm(total=total, desc="build-demo", unit="sample", disable=not progress) as bar:
        for split in DEMO_SPLITS:
            if config.samples.get(split, 0) == 0:
                continue
            path = out_dir / f"{split}.h5"
            attrs = {
                "split": split,
                "class_names": [str(d) for d in range(10)],
                "mask_class_names": MASK_CLASSES,
                "frame_rate_hz": config.frame_rate_hz,
                "flow_convention": "(dx, dy) pixels, first to last frame, at first-frame positions",
                "mask_convention": "classes at the last frame: 0 background, 1 + digit",
            }
            with EventStoreWriter(
                path,
                sensor_size=(size, size),
                source="evpretrain data build-demo (scikit-learn digits over a scikit-image texture)",
                builder_config=to_mapping(config),
                attrs=attrs,
                compression=config.compression,
            ) as writer:
                for sample in pool.map(_make_sample, _jobs(config, split, digits[split]), chunksize=8):
                    writer.add_sample(**sample)
                    bar.update()
            written[split] = path
    return written
