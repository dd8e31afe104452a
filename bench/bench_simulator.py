"""Simulator throughput against eventify-dvs on the same frames, side by side in one run, single thread.

A real photograph (scikit-image's ``camera``) translates by a sub-pixel step per frame at a DAVIS346 resolution
(346 x 260); both simulators turn the same frames into events at contrast threshold 0.2. Ours is timed with the
noise off (signal events only, still with threshold mismatch and refractory period) and with its default noise
(shot noise and leak, merged by time); eventify-dvs (a frame-difference simulator: no per-pixel reference, events
not sorted by time) gets the frames in its native 0-255 scale. Rendering and the numba compilation are outside the
timing; each simulator runs ``--repeats`` times, interleaved, and the best run counts. Prints frames/s (input
frames), M events/s and the ratios to eventify-dvs.

Run: .venv/bin/python bench/bench_simulator.py [--frames 120] [--repeats 5]
"""

from __future__ import annotations

import os

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # single thread: set before numpy and numba load

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from eventify import frame_to_event_tuples  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage import data  # noqa: E402

from evpretrain.events.simulator import simulate  # noqa: E402
from evpretrain.events.simulator_config import SimulatorConfig  # noqa: E402

HEIGHT, WIDTH = 260, 346
CONTRAST = 0.2


def translating_frames(num_frames: int, step_px: tuple[float, float]) -> np.ndarray:
    """(T, 260, 346) float32 in [0, 1]: the camera photograph shifted by ``step_px`` (dy, dx) per frame."""
    image = data.camera().astype(np.float32) / 255
    top, left = (image.shape[0] - HEIGHT) // 2, (image.shape[1] - WIDTH) // 2
    frames = np.empty((num_frames, HEIGHT, WIDTH), dtype=np.float32)
    for n in range(num_frames):
        shifted = ndimage.shift(image, (step_px[0] * n, step_px[1] * n), order=1, mode="reflect")
        frames[n] = shifted[top : top + HEIGHT, left : left + WIDTH]
    return np.clip(frames, 0.0, 1.0)


def run_ours(frames, timestamps, config) -> int:
    return len(simulate(frames, timestamps, contrast=CONTRAST, seed=0, config=config).events)


def run_eventify(frames_255, timestamps) -> int:
    pairs = zip(frames_255[:-1], frames_255[1:], timestamps[:-1], timestamps[1:])
    chunks = [frame_to_event_tuples(a, b, int(t_a), int(t_b), c_thresh=CONTRAST) for a, b, t_a, t_b in pairs]
    return len(np.concatenate(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--frame-rate-hz", type=float, default=30.0)
    parser.add_argument("--step", type=float, nargs=2, default=(0.6, 0.8), metavar=("DY", "DX"), help="px per frame")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    frames = translating_frames(args.frames, tuple(args.step))
    frames_255 = frames * np.float32(255)
    timestamps = np.round(np.arange(args.frames) * 1e6 / args.frame_rate_hz).astype(np.int64)
    noise_off = SimulatorConfig(shot_noise_rate_hz=0.0, leak_rate_hz=0.0)
    runs = {
        "ours, clean (no noise)": lambda: run_ours(frames, timestamps, noise_off),
        "ours, noisy (defaults)": lambda: run_ours(frames, timestamps, SimulatorConfig()),
        "eventify-dvs 0.2.0": lambda: run_eventify(frames_255, timestamps),
    }
    run_ours(frames[:3], timestamps[:3], SimulatorConfig())  # warm-up: numba compilation or cache load
    run_eventify(frames_255[:3], timestamps[:3])

    best = {name: np.inf for name in runs}
    counts = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            counts[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)

    print(
        f"{args.frames} frames of {WIDTH}x{HEIGHT} at {args.frame_rate_hz:g} Hz, step {args.step} px/frame, "
        f"contrast {CONTRAST}, single thread, best of {args.repeats}"
    )
    reference = "eventify-dvs 0.2.0"
    header = ("frames/s", 9), ("M ev/s", 8), ("events", 10), ("ev/pair", 8), ("x frames/s", 11), ("x ev/s", 7)
    print(f"{'simulator':24s} " + " ".join(f"{label:>{width}s}" for label, width in header))
    for name, seconds in best.items():
        fps, rate = args.frames / seconds, counts[name] / seconds / 1e6
        reference_rate = counts[reference] / best[reference] / 1e6
        print(
            f"{name:24s} {fps:9.0f} {rate:8.2f} {counts[name]:10,d} {counts[name] / (args.frames - 1):8.0f} "
            f"{best[reference] / seconds:11.2f} {rate / reference_rate:7.2f}"
        )


if __name__ == "__main__":
    main()
