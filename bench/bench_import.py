"""Throughput and peak memory of `evpretrain data import` on the shipped EVT3 recording and on one REPEAT times longer.

The long recording repeats the shipped one's events (../shared/data/real/evt3.raw, 1.2 M events, 10.8 s) with times
shifted by its span each time, written as EVT 3.0 by faery in pieces (so that building it stays in bounded memory
too). Each import runs in a fresh process, one worker, so that its peak RSS (``resource.getrusage``, the child's
maximum resident set) is the import's alone.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/bench_import.py [--repeat 12] [--window events:50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "evt3.raw"
SENSOR = (720, 1280)
WIDTHS = (22, 14, 8, 9, 8, 11, 11, 13)

CHILD = """
import json, resource, sys, time
from evpretrain.data.config import ImportConfig
from evpretrain.data.importer import import_recordings
from evpretrain.data.store import EventStore
config = ImportConfig(root=sys.argv[1], layout="recordings", window=sys.argv[3], split={"train": 1.0})
start = time.perf_counter()
(path,) = import_recordings(config, sys.argv[2], workers=1, progress=False).values()
seconds = time.perf_counter() - start
store = EventStore(path)
print(json.dumps({"seconds": seconds, "events": int(store.attrs["num_events"]), "windows": len(store),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_repeated(source: Path, target: Path, repeat: int) -> int:
    """``repeat`` copies of ``source``'s events back to back (each shifted by the span + 1 us) as EVT 3.0."""
    from faery.events_stream import EVENTS_DTYPE
    from faery.extension import evt

    from evpretrain.events.readers import read_events

    events = read_events(source)
    packet = np.zeros(len(events), EVENTS_DTYPE)
    packet["x"], packet["y"], packet["on"] = events["x"], events["y"], events["p"] > 0
    span = int(events["t"][-1] - events["t"][0]) + 1
    with evt.Encoder(str(target), "evt3", False, (SENSOR[1], SENSOR[0]), True) as encoder:
        for k in range(repeat):
            packet["t"] = events["t"] + k * span
            encoder.write({"events": packet})
    return len(events) * repeat


def measure(folder: Path, out: Path, window: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out), window], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=12, help="how many times longer the long recording is")
    parser.add_argument("--window", default="events:50000", help="the import's windows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "short").mkdir()
        (tmp / "short" / "evt3.raw").symlink_to(REAL)
        (tmp / "long").mkdir()
        start = time.perf_counter()
        total = write_repeated(REAL, tmp / "long" / "evt3_x.raw", args.repeat)
        size_mb = (tmp / "long" / "evt3_x.raw").stat().st_size / 2**20
        seconds = time.perf_counter() - start
        print(f"built the {args.repeat}x recording: {total:,} events, {size_mb:.0f} MB, {seconds:.1f} s")
        head = ("recording", "events", "MB", "windows", "s", "Mevents/s", "windows/s", "peak RSS MB")
        print("".join(f"{h:<22}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, WIDTHS))))
        for name, folder in (("shipped evt3.raw", tmp / "short"), (f"{args.repeat}x evt3.raw", tmp / "long")):
            result = measure(folder, tmp / f"out-{folder.name}", args.window)
            file_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            print(
                f"{name:<22}{result['events']:>14,}{file_mb:>8.0f}{result['windows']:>9}{result['seconds']:>8.2f}"
                f"{result['events'] / result['seconds'] / 1e6:>11.2f}{result['windows'] / result['seconds']:>11.1f}"
                f"{result['peak_rss_mb']:>13.0f}"
            )


if __name__ == "__main__":
    main()
