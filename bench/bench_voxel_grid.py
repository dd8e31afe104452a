"""Voxel-grid throughput, side by side in one run: ours against the paper's code and tonic, and batches on threads.

Part 1, one thread: builds the 5-bin voxel grid of 1M and 10M events at 640x480 with the paper's
``events_to_voxel_grid`` (float Nx4 array, two torch index_add_), tonic's ``to_voxel_grid_numpy``, our numpy path
(numba loop) and the same loop as it was before issue 16 (kept below), our torch path (``voxel_grid_batch`` on the
CPU), and reads the same events once as a memory-read bound. Events are sorted in time with uniformly random pixels,
the cache's worst case. Prints the median M events/s and the ratio to the paper's code.

Part 2, batches: ``voxel_grid_many`` of 64 samples of 30k events at 224x224 and 640x480 on 1 and 2 numba threads
(with a fresh output, and with one reused through ``out``) against a Python loop of ``voxel_grid`` stacked into one
array. Prints samples/s, M events/s and the ratio to the loop.

Each input is prepared in its own format outside the timing; compilation and the first call are warm-up; the
contenders take turns within each repeat. Run: .venv/bin/python bench/bench_voxel_grid.py
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import time

import numba
import numpy as np
import torch
from tonic.functional import to_voxel_grid_numpy

from evpretrain.events.contract import make_events
from evpretrain.events.paper_reference import paper_voxel_grid
from evpretrain.events.representations import EventTensors, voxel_grid, voxel_grid_many

HEIGHT, WIDTH, NUM_BINS = 480, 640, 5
PAPER = "paper (torch index_add_, Nx4)"
LOOP = "loop of voxel_grid, np.stack"


@numba.njit(cache=True, nogil=True)
def kernel_before(events, num_bins, height, width, grid):
    """``_voxel_grid_kernel`` as it was before issue 16 (python error model, signed indices), for comparison."""
    n = events.shape[0]
    t_first = events[0].t
    span = events[n - 1].t - t_first
    scale = (num_bins - 1) / (span if span > 0 else 1)
    last = float(num_bins - 1)
    plane = height * width
    for i in range(n):
        event = events[i]
        col = np.int64(event.x)
        row = np.int64(event.y)
        if col >= width or row >= height:
            return i
        position = min(max((event.t - t_first) * scale, 0.0), last)
        lower_bin = int(position)
        upper_weight = np.float32(position - lower_bin)
        signed = np.float32(2 * (event.p > 0) - 1)
        index = lower_bin * plane + row * width + col
        grid[index] += signed - signed * upper_weight
        if lower_bin < num_bins - 1:
            grid[index + plane] += signed * upper_weight
    return -1


def voxel_grid_before(events: np.ndarray) -> np.ndarray:
    grid = np.zeros((NUM_BINS, HEIGHT, WIDTH), np.float32)
    kernel_before(events, NUM_BINS, HEIGHT, WIDTH, grid.reshape(-1))
    return grid


@numba.njit(cache=True)
def read_once(events) -> int:
    """Sum of every field of every event: reads the input once, as any voxel-grid builder must."""
    total = 0
    for i in range(events.shape[0]):
        event = events[i]
        total += event.t + event.x + event.y + event.p
    return total


def random_events(
    n: int, seed: int = 0, duration_us: int = 1_000_000, height: int = HEIGHT, width: int = WIDTH
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, n))
    return make_events(t, rng.integers(0, width, n), rng.integers(0, height, n), rng.choice([-1, 1], n))


def median_seconds(calls: dict, repeats: int) -> dict:
    """name -> median seconds of one call. Calls take turns within each repeat, so that the load of a shared machine
    falls on all of them alike; the first call of each (numba compilation, first-touch allocations) is not timed."""
    for run in calls.values():
        run()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, run in calls.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}


def contenders(events: np.ndarray) -> dict:
    """name -> a call building the grid from its own input format, prepared here, outside the timing."""
    paper_input = np.stack([events["x"], events["y"], events["t"], events["p"] > 0], axis=1).astype(np.float64)
    # tonic writes -1 over the caller's 0 polarities and reads a bool polarity as all +1: give it its own int copy.
    tonic_input = events.copy()
    tensors = EventTensors.from_numpy(events)
    return {
        PAPER: lambda: paper_voxel_grid(paper_input, NUM_BINS, HEIGHT, WIDTH),
        "tonic to_voxel_grid_numpy": lambda: to_voxel_grid_numpy(tonic_input, (WIDTH, HEIGHT, 2), NUM_BINS),
        "ours, numpy (numba)": lambda: voxel_grid(events, NUM_BINS, height=HEIGHT, width=WIDTH),
        "ours, numpy, before issue 16": lambda: voxel_grid_before(events),
        "ours, torch (CPU)": lambda: voxel_grid(tensors, NUM_BINS, height=HEIGHT, width=WIDTH),
        "memory-read bound": lambda: read_once(events),
    }


def on_threads(threads: int, build):
    """``build`` run on ``threads`` numba threads (set per call: the contenders take turns)."""

    def run():
        numba.set_num_threads(threads)
        return build()

    return run


def batch_contenders(samples: list, height: int, width: int, threads: list) -> dict:
    """name -> a call building the (B, NUM_BINS, height, width) grids of ``samples``."""
    out = np.empty((len(samples), NUM_BINS, height, width), np.float32)
    calls = {LOOP: lambda: np.stack([voxel_grid(events, NUM_BINS, height=height, width=width) for events in samples])}
    for n in threads:
        calls[f"voxel_grid_many, {n} thread(s)"] = on_threads(
            n, lambda: voxel_grid_many(samples, NUM_BINS, height=height, width=width)
        )
        calls[f"voxel_grid_many, {n} thread(s), out"] = on_threads(
            n, lambda: voxel_grid_many(samples, NUM_BINS, height=height, width=width, out=out)
        )
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64, help="samples per batch (part 2)")
    parser.add_argument("--batch-events", type=int, default=30_000, help="events per sample (part 2)")
    parser.add_argument("--batch-grids", nargs="*", default=["224x224", "480x640"], help="HxW grids (part 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="numba threads (part 2)")
    args = parser.parse_args()
    if max(args.threads) > numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads goes up to NUMBA_NUM_THREADS = {numba.config.NUMBA_NUM_THREADS}")
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(
        f"{NUM_BINS} bins, {HEIGHT}x{WIDTH}, 1 thread (torch {torch.get_num_threads()}, numba "
        f"{numba.get_num_threads()}), median of {args.repeats}; M events/s and ratio to the paper's code"
    )
    rates = {}
    for n in args.sizes:
        events = random_events(n)
        calls = contenders(events)
        paper = calls[PAPER]().numpy()
        ours = calls["ours, numpy (numba)"]()
        print(f"{n:,} events: max |ours - paper| = {np.abs(ours - paper).max():.1e}")
        for name, seconds in median_seconds(calls, args.repeats).items():
            rates[name, n] = n / seconds / 1e6
    header = "".join(f"{f'{n / 1e6:g}M ev/s':>12s}{'x paper':>9s}" for n in args.sizes)
    print(f"{'':32s}{header}")
    for name in calls:
        row = "".join(f"{rates[name, n]:12.1f}{rates[name, n] / rates[PAPER, n]:9.1f}" for n in args.sizes)
        print(f"{name:32s}{row}")
    if args.batch_grids:
        batch_report(args)


def batch_report(args) -> None:
    """Part 2: samples/s of each batch builder, per grid size, and the ratio to the loop of voxel_grid."""
    print(f"\n{args.batch} samples of {args.batch_events:,} events, {NUM_BINS} bins, median of {args.repeats}")
    print(f"{'':40s}{'grid':>9s}{'samples/s':>11s}{'M ev/s':>9s}{'x loop':>8s}")
    for grid in args.batch_grids:
        height, width = (int(size) for size in grid.split("x"))
        samples = [random_events(args.batch_events, seed, 50_000, height, width) for seed in range(args.batch)]
        calls = batch_contenders(samples, height, width, args.threads)
        loop = calls[LOOP]()
        for name, run in calls.items():
            assert np.array_equal(run(), loop), f"{name} differs from the loop of voxel_grid"
        seconds = median_seconds(calls, args.repeats)
        for name, time_s in seconds.items():
            rate = args.batch / time_s
            print(f"{name:40s}{grid:>9s}{rate:11.0f}{rate * args.batch_events / 1e6:9.1f}{seconds[LOOP] / time_s:8.2f}")
    print(f"numba threading layer: {numba.threading_layer()}")


if __name__ == "__main__":
    main()
