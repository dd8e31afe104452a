"""Event-store read throughput by compression filter and chunk checksum, side by side in one run.

Events: a real Prophesee recording cut into samples of ``--window`` events, written with each filter of
``StoreCompression`` and read back at random as training does (M events/s, size, ratio to a store with no filter
and no checksum: "plain"). Every store is written with the fletcher32 chunk checksum (the default) except "plain".
Dense fields: the demo builder's frames (real digits over a real texture, (T, 64, 64) float32) written the same
way (samples/s, size, ratio). Run: .venv/bin/python bench/bench_store.py [--recording PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from evpretrain.data.config import StoreCompression
from evpretrain.data.store import EventStore, EventStoreWriter
from evpretrain.events.readers import read_recording

DEFAULT_RECORDING = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "gen4.dat"


def write(path: Path, events: np.ndarray, sensor_size, window: int, compression: StoreCompression) -> None:
    with EventStoreWriter(path, sensor_size=sensor_size, source="bench", compression=compression) as writer:
        for start in range(0, len(events) - window + 1, window):
            writer.add_sample(events[start : start + window])


def read_rate(path: Path, reads: int, seed: int = 0) -> float:
    with EventStore(path) as store:
        order = np.random.default_rng(seed).integers(0, len(store), reads)
        store.events(0)  # open the file outside the timing
        start = time.perf_counter()
        total = sum(len(store.events(int(i))) for i in order)
        return total / (time.perf_counter() - start) / 1e6


def demo_frames(count: int) -> list[np.ndarray]:
    """``count`` rendered demo samples' frames, (T, 64, 64) float32 each."""
    from evpretrain.data.config import DemoConfig
    from evpretrain.data.demo import load_background, load_digits_split, render_sample

    config = DemoConfig()
    images, labels = load_digits_split(0)["train"]
    background = load_background(config.background, config.background_intensity)
    rng = np.random.default_rng(0)
    return [render_sample(images[i], int(labels[i]), background, config, rng).frames for i in range(count)]


def dense_read_rate(path: Path, reads: int, seed: int) -> float:
    with EventStore(path) as store:
        order = np.random.default_rng(seed).integers(0, len(store), reads)
        store.dense("frames", 0)
        start = time.perf_counter()
        for i in order:
            store.dense("frames", int(i))
        return reads / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recording", type=Path, default=DEFAULT_RECORDING)
    parser.add_argument("--window", type=int, default=30_000, help="events per sample")
    parser.add_argument("--reads", type=int, default=400, help="random sample reads per filter")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recording = read_recording(args.recording)
    events = recording.events
    print(
        f"{args.recording.name}: {len(events):,} events, samples of {args.window:,} events, {args.reads} random reads"
    )
    filters = {
        "plain": StoreCompression(events="none", checksum=False),
        "none": StoreCompression(events="none"),
        "lzf": StoreCompression(events="lzf"),
        "gzip-1": StoreCompression(events="gzip", gzip_level=1),
        "gzip-4": StoreCompression(events="gzip", gzip_level=4),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, compression in filters.items():
            path = Path(tmp) / f"{name}.h5"
            write(path, events, recording.sensor_size, args.window, compression)
            rate = float(np.median([read_rate(path, args.reads, seed) for seed in range(args.repeats)]))
            rows.append((name, rate, path.stat().st_size / 2**20))
        base = rows[0][1]
        print(f"{'events filter':14s} {'M ev/s':>8s} {'vs plain':>8s} {'MiB':>8s} {'B/event':>8s}")
        for name, rate, mib in rows:
            print(f"{name:14s} {rate:8.1f} {rate / base:8.2f} {mib:8.1f} {mib * 2**20 / len(events):8.2f}")

        frames = demo_frames(200)
        empty = np.empty(0, dtype=events.dtype)
        print(f"\ndemo frames: 200 samples of {frames[0].shape} float32, {args.reads} random reads")
        rows = []
        for name, compression in filters.items():
            dense = StoreCompression(
                dense=compression.events, gzip_level=compression.gzip_level, checksum=compression.checksum
            )
            path = Path(tmp) / f"dense-{name}.h5"
            with EventStoreWriter(path, sensor_size=(64, 64), source="bench", compression=dense) as writer:
                for f in frames:
                    writer.add_sample(empty, frames=f)
            rate = float(np.median([dense_read_rate(path, args.reads, seed) for seed in range(args.repeats)]))
            rows.append((name, rate, path.stat().st_size / 2**20))
        base = rows[0][1]
        print(f"{'dense filter':14s} {'samples/s':>9s} {'vs plain':>8s} {'MiB':>8s}")
        for name, rate, mib in rows:
            print(f"{name:14s} {rate:9.0f} {rate / base:8.2f} {mib:8.1f}")


if __name__ == "__main__":
    main()
