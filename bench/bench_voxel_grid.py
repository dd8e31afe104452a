"""Voxel-grid throughput on one CPU thread, side by side in one run: ours against the paper's code and tonic.

Builds the 5-bin voxel grid of 1M and 10M events at 640x480 with: the paper's ``events_to_voxel_grid`` (float Nx4
array, two torch index_add_), tonic's ``to_voxel_grid_numpy``, our numpy path (numba loop) and our torch path
(``voxel_grid_batch`` on the CPU), and reads the same events once as a memory-read bound. Events are sorted in time
with uniformly random pixels, the cache's worst case. Each input is prepared in its own format outside the timing;
compilation and the first call are warm-up; the contenders take turns within each repeat. Prints the median
M events/s of several repeats and the ratio to the paper's code. Run: .venv/bin/python bench/bench_voxel_grid.py
"""

from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"  # before numba loads: its thread pool stays at one thread
os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import time

import numba
import numpy as np
import torch
from tonic.functional import to_voxel_grid_numpy

from evpretrain.events.contract import make_events
from evpretrain.events.paper_reference import paper_voxel_grid
from evpretrain.events.representations import EventTensors, voxel_grid

HEIGHT, WIDTH, NUM_BINS = 480, 640, 5
PAPER = "paper (torch index_add_, Nx4)"


@numba.njit(cache=True)
def read_once(events) -> int:
    """Sum of every field of every event: reads the input once, as any voxel-grid builder must."""
    total = 0
    for i in range(events.shape[0]):
        event = events[i]
        total += event.t + event.x + event.y + event.p
    return total


def random_events(n: int, seed: int = 0, duration_us: int = 1_000_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, n))
    return make_events(t, rng.integers(0, WIDTH, n), rng.integers(0, HEIGHT, n), rng.choice([-1, 1], n))


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
        "ours, torch (CPU)": lambda: voxel_grid(tensors, NUM_BINS, height=HEIGHT, width=WIDTH),
        "memory-read bound": lambda: read_once(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{NUM_BINS} bins, {HEIGHT}x{WIDTH}, 1 thread (torch {torch.get_num_threads()}, numba "
        f"{numba.config.NUMBA_NUM_THREADS}), median of {args.repeats}; M events/s and ratio to the paper's code"
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


if __name__ == "__main__":
    main()
