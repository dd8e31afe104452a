"""Pre-training data loader throughput (samples/s, per worker), side by side with the store's read bound in one run.

Builds a demo store (the default ``DemoConfig``: 64x64, 8 frames, 200 training samples) in a temporary folder and
reads it through a ``torch.utils.data.DataLoader`` (batch 32, persistent workers) with 0, 1 and 2 workers:

- transfer only: one 64x64 sample returned for every index (the DataLoader's own cost: collating, and from workers
  the shared-memory transfer of each batch to the main process);
- events only: each sample's events read from the store, nothing else (the I/O bound of any loader on this store);
- events, h5py datasets kept open: the same read without the store's per-read dataset look-ups (the file's bound);
- ``PretrainDataset`` at the store's 64x64, time flip p = 0.5: voxel grid, difference and frame targets, density;
- ``PretrainDataset`` at 224x224 (the paper's input size; bilinear upsampling of the grid and the targets) with the
  teacher's 224x224 image.

Every loader is warmed up by one epoch (worker start, numba cache, file handles); then the contenders take turns,
one epoch each, for ``--repeats`` rounds, and the median epoch counts. Torch runs one thread in every process
(DataLoader workers do so anyway), so the per-worker rate is per CPU core: a GPU consuming R samples/s needs about
R / (per-worker rate) workers. A per-stage breakdown of one sample (in-process) follows the table.
Run: .venv/bin/python bench/bench_data_loader.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.resize import resize_maps
from evpretrain.data.store import EventStore
from evpretrain.events.contract import EVENT_DTYPE
from evpretrain.events.representations import voxel_grid
from evpretrain.pretrain.config import PretrainAugment
from evpretrain.pretrain.data import PretrainDataset, collate, event_density


class EventsOnly(Dataset):
    """The reference: sample i's events as read from the store, one handle per worker process."""

    def __init__(self, path: Path):
        self.path = path
        with EventStore(path) as store:
            self.length = len(store)
        self._store: EventStore | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        if self._store is None:
            self._store = EventStore(self.path)
        return self._store.events(index)


class EventsCachedDatasets(EventsOnly):
    """The file's bound: the same events read with h5py, the four column datasets opened once per process (the
    store looks each one up on every read)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._columns: list[h5py.Dataset] | None = None

    def __getitem__(self, index: int) -> np.ndarray:
        if self._columns is None:
            file = h5py.File(self.path, "r")
            self._columns = [file[f"events/{name}"] for name in EVENT_DTYPE.names]
            self._offset, self._count = file["samples/offset"][:], file["samples/count"][:]
        start, stop = self._offset[index], self._offset[index] + self._count[index]
        out = np.empty(stop - start, EVENT_DTYPE)
        for name, column in zip(EVENT_DTYPE.names, self._columns):
            out[name] = column[start:stop]
        return out


class FixedSample(Dataset):
    """The DataLoader's own ceiling: one ``PretrainDataset`` sample at 64x64 returned again and again."""

    def __init__(self, sample: dict[str, torch.Tensor], length: int):
        self.sample, self.length = sample, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample


def keep_list(samples: list) -> list:
    return samples  # events differ in length: no stacking


def epoch_rate(loader: DataLoader, epoch: int) -> float:
    dataset = loader.dataset
    if isinstance(dataset, PretrainDataset):
        dataset.set_epoch(epoch)
    start = time.perf_counter()
    count = sum(len(batch["index"]) if isinstance(batch, dict) else len(batch) for batch in loader)
    return count / (time.perf_counter() - start)


def breakdown(path: Path, samples: int) -> dict[str, float]:
    """Microseconds per sample of each step of ``PretrainDataset.__getitem__``, in-process (best of 3 passes)."""

    def mean_micros(step: Callable[[int], object], passes: int = 3) -> float:
        step(0)  # warm-up
        best = float("inf")
        for _ in range(passes):  # the best pass: the machine is shared
            start = time.perf_counter()
            for i in range(samples):
                step(i)
            best = min(best, time.perf_counter() - start)
        return best / samples * 1e6

    with EventStore(path) as store:
        events = [store.events(i) for i in range(samples)]  # the compute steps run on events read beforehand
        out = {
            "read events": mean_micros(lambda i: store.events(i)),
            "voxel grid 64x64": mean_micros(lambda i: voxel_grid(events[i], 5, height=64, width=64)),
            "density 64x64": mean_micros(lambda i: event_density(events[i], (64, 64), (64, 64))),
            "read + sum diff_maps": mean_micros(lambda i: store.dense("diff_maps", i).sum(0, dtype=np.float32)),
            "read frames": mean_micros(lambda i: store.dense("frames", i)),
            "resize 5x64x64 -> 224": mean_micros(lambda i: resize_maps(torch.zeros(5, 64, 64), (224, 224))),
        }
    dataset = PretrainDataset(path, augment=PretrainAugment(time_flip_p=0.5))
    out["whole sample 64x64"] = mean_micros(lambda i: dataset[i])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="training samples of the demo store")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo(DemoConfig(samples={"train": args.samples}), tmp, progress=False)["train"]
        with EventStore(path) as store:
            counts = store.event_counts
        print(
            f"demo store: {len(counts)} samples of 64x64, 8 frames, {counts.mean():,.0f} events/sample "
            f"(min {counts.min():,}, max {counts.max():,}); batch {args.batch_size}, median of {args.repeats} epochs"
        )
        contenders = {
            "transfer only (one fixed sample)": lambda: FixedSample(PretrainDataset(path)[0], len(counts)),
            "events only (I/O bound)": lambda: EventsOnly(path),
            "events, h5py datasets kept open": lambda: EventsCachedDatasets(path),
            "PretrainDataset 64x64": lambda: PretrainDataset(path, augment=PretrainAugment(time_flip_p=0.5)),
            "PretrainDataset 224x224 + image": lambda: PretrainDataset(
                path, augment=PretrainAugment(time_flip_p=0.5), input_size=224, with_image=True, image_size=224
            ),
        }
        rows = []
        for workers in args.workers:
            loaders = {
                name: DataLoader(
                    make(),
                    batch_size=args.batch_size,
                    shuffle=False,
                    num_workers=workers,
                    persistent_workers=workers > 0,
                    collate_fn=keep_list if name.startswith("events") else collate,
                )
                for name, make in contenders.items()
            }
            for loader in loaders.values():
                epoch_rate(loader, 0)  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in loaders}
            for repeat in range(args.repeats):
                for name, loader in loaders.items():
                    rates[name].append(epoch_rate(loader, repeat + 1))
            reference = float(np.median(rates["events only (I/O bound)"]))
            for name, values in rates.items():
                rate = float(np.median(values))
                rows.append((name, workers, rate, rate / max(workers, 1), rate / reference))
            del loaders  # stops the persistent workers

        print(f"\n{'loader':34s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s} {'x I/O':>6s}")
        for name, workers, rate, per_worker, ratio in rows:
            print(f"{name:34s} {workers:7d} {rate:10.0f} {per_worker:10.0f} {ratio:6.2f}")

        print("\nper sample, in-process (us):")
        for name, micros in breakdown(path, min(args.samples, 200)).items():
            print(f"  {name:28s} {micros:8.0f}")


if __name__ == "__main__":
    main()
