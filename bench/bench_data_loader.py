"""Pre-training data loader throughput (samples/s, per worker): the worker transforms against the device path's
worker side (read + pack only) and its device side, in one run.

Builds a demo store (the default ``DemoConfig``: 64x64, 8 frames, 200 training samples) in a temporary folder and
reads it through a ``torch.utils.data.DataLoader`` (batch 32, persistent workers, one fixed random order as training
reads: sequential reads would hit HDF5's chunk cache) with 0, 1 and 2 workers:

- transfer only: one 64x64 sample returned for every index (the DataLoader's own cost: collating, and from workers
  the shared-memory transfer of each batch to the main process);
- events only: each sample's events read from the store, nothing else (the I/O bound of any loader on this store);
- ``PretrainDataset`` with ``transforms: worker`` (today's path: the voxel grid, targets, density and image built
  in the workers) and with ``transforms: device`` (the workers read the window's events, the view and the one
  sensor-sized difference map and frame; ``collate`` packs them), each at 64x64 (the demo's sample: the whole clip,
  bilinear, time flip p 0.5) and at 224x224 (the paper's sample: one frame interval, crop 0.8-1, both flips, nearest
  grid and bicubic targets, and the teacher's 224x224 image).

Every loader is warmed up by one epoch (worker start, numba cache, file handles); then the contenders take turns,
one epoch each, for ``--repeats`` rounds, and the median epoch counts. Torch runs one thread in every process
(DataLoader workers do so anyway), so the per-worker rate is per CPU core: a GPU consuming R samples/s needs about
R / (per-worker rate) workers.

Then the device side: ``PretrainBatchViews`` on packed batches of 32 and 128 samples, samples/s of the transform
alone (median of ``--repeats``), on the CPU (one thread) and with ``--device cuda`` on the GPU (synchronised).
Run: .venv/bin/python bench/bench_data_loader.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.store import EventStore
from evpretrain.pretrain.config import PretrainAugment
from evpretrain.pretrain.data import PretrainDataset, collate
from evpretrain.training.distributed import to_device

SAMPLES = {
    "64x64": dict(augment=PretrainAugment(time_flip_p=0.5)),
    "224x224 paper + image": dict(
        input_size=224,
        window="interval",
        augment=PretrainAugment((0.8, 1.0), hflip_p=0.5, time_flip_p=0.5),
        resize="nearest",
        target_resize="bicubic",
        with_image=True,
        image_size=224,
    ),
}


class EventsOnly(Dataset):
    """The reference: sample i's events as read from the store, one handle per worker process."""

    def __init__(self, path: Path):
        self.store = EventStore(path)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.store.events(index)


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


def loader_table(path: Path, samples: int, batch_size: int, workers: list[int], repeats: int) -> list[tuple]:
    contenders = {
        "transfer only (one fixed sample)": lambda: FixedSample(PretrainDataset(path)[0], samples),
        "events only (I/O bound)": lambda: EventsOnly(path),
    }
    for name, options in SAMPLES.items():
        for transforms in ("worker", "device"):
            contenders[f"{transforms} {name}"] = lambda o=options, t=transforms: PretrainDataset(
                path, transforms=t, **o
            )
    order = np.random.default_rng(0).permutation(samples).tolist()
    rows = []
    for count in workers:
        loaders = {
            name: DataLoader(
                make(),
                batch_size=batch_size,
                sampler=order,
                num_workers=count,
                persistent_workers=count > 0,
                collate_fn=keep_list if name.startswith("events") else collate,
            )
            for name, make in contenders.items()
        }
        for loader in loaders.values():
            epoch_rate(loader, 0)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for repeat in range(repeats):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader, repeat + 1))
        reference = float(np.median(rates["events only (I/O bound)"]))
        for name, values in rates.items():
            rate = float(np.median(values))
            rows.append((name, count, rate, rate / max(count, 1), rate / reference))
        del loaders  # stops the persistent workers
    return rows


def device_side(path: Path, batch_sizes: list[int], device: torch.device, repeats: int) -> list[tuple]:
    """Samples/s of ``PretrainBatchViews`` alone on packed batches already on ``device``."""
    rows = []
    for name, options in SAMPLES.items():
        dataset = PretrainDataset(path, transforms="device", **options)
        transform = dataset.batch_views()
        for batch_size in batch_sizes:
            parts = [dataset[i % len(dataset)] for i in range(batch_size)]
            batch = to_device(collate(parts), device)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                transform(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            rows.append((name, batch_size, batch_size / float(np.median(times[1:]))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="training samples of the demo store")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device-batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--device", default="cpu", help="device of the device side: cpu or cuda")
    parser.add_argument("--store", type=Path, help="an existing store instead of a demo one (skips the build)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or build_demo(DemoConfig(samples={"train": args.samples}), tmp, progress=False)["train"]
        with EventStore(path) as store:
            counts = store.event_counts
            sensor = store.sensor_size
        print(
            f"store: {len(counts)} samples of {sensor[0]}x{sensor[1]}, {counts.mean():,.0f} events/sample "
            f"(min {counts.min():,}, max {counts.max():,}); batch {args.batch_size}, median of {args.repeats} epochs"
        )
        if args.workers:
            rows = loader_table(path, len(counts), args.batch_size, args.workers, args.repeats)
            print(f"\n{'loader':34s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s} {'x I/O':>6s}")
            for name, workers, rate, per_worker, ratio in rows:
                print(f"{name:34s} {workers:7d} {rate:10.0f} {per_worker:10.0f} {ratio:6.2f}")

        print(f"\ndevice side (PretrainBatchViews alone, {args.device}):")
        print(f"{'sample':34s} {'batch':>7s} {'samples/s':>10s}")
        for name, batch_size, rate in device_side(path, args.device_batch_sizes, torch.device(args.device), 7):
            print(f"{name:34s} {batch_size:7d} {rate:10.0f}")


if __name__ == "__main__":
    main()
