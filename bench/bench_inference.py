"""Throughput and peak memory of ``evpretrain embed`` and ``predict`` on a real recording, streamed from disk.

The recording (``--recording``, default the shipped 1280 x 720 Gen4 DAT, 1.22 M events over 10.8 s) is repeated
``--repeat`` times with shifted times into a temporary DAT file, so the reader streams it chunk by chunk. The model
is a randomly initialised backbone (``--backbone``, default the paper's ViT-S/16 at 224 x 224, 5-bin voxel grids)
with a linear classification head for ``predict`` (timing does not depend on the weights); windows of
``--window``. Each configuration runs in its own process, so its peak resident memory (``ru_maxrss``) is its own;
on a GPU the peak allocated CUDA memory is printed too. Throughput counts whole runs (reading, windowing, voxel grids,
the network, writing the output file; not the start-up of torch), after one warm-up batch.

Run: .venv/bin/python bench/bench_inference.py [--device cuda] [--repeat 1 10] [--window events:50000 ms:50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_RECORDING = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "gen4.dat"


def repeated_dat(source: Path, repeat: int, out: Path) -> Path:
    """``source`` (a DAT file) ``repeat`` times, each copy after the previous one's last event."""
    from evpretrain.events.readers.prophesee_dat import CD_EVENT_BYTES
    from evpretrain.events.readers.prophesee_header import read_prophesee_header

    with open(source, "rb") as file:
        header = read_prophesee_header(file, source=source)
        file.seek(0)
        head = file.read(header.size + 2)
        words = np.fromfile(file, dtype="<u4").reshape(-1, CD_EVENT_BYTES // 4)
    span = int(words[-1, 0]) - int(words[0, 0]) + 1
    with open(out, "wb") as file:
        file.write(head)
        for k in range(repeat):
            copy = words.copy()
            copy[:, 0] = (words[:, 0].astype(np.int64) + k * span) % (1 << 32)  # the reader unwraps 32-bit time
            copy.tofile(file)
    return out


def one(args: argparse.Namespace) -> dict:
    import torch

    from evpretrain.downstream.run import build_model
    from evpretrain.events.windows import WindowSpec
    from evpretrain.inference.model import InferenceModel
    from evpretrain.inference.outputs import RecordingInput, write_features, write_predictions
    from evpretrain.inference.spec import InferenceSpec
    from evpretrain.models import BackboneSpec, build_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec(args.backbone, 5))
    if args.command == "embed":
        spec, net = InferenceSpec("embed", BackboneSpec(args.backbone, 5)), backbone
    else:
        spec = InferenceSpec("classify", BackboneSpec(args.backbone, 5), num_classes=100, mode="finetune")
        net = build_model("classify", "finetune", backbone, 100, {})
    model = InferenceModel(spec, net, device=args.device, batch_size=args.batch_size)
    window = WindowSpec.parse(args.window)
    with tempfile.TemporaryDirectory() as tmp:
        recording = repeated_dat(Path(args.recording), args.repeat, Path(tmp) / "long.dat")
        warm = RecordingInput(args.recording, window)
        first = [w.events for _, (_, w) in zip(range(args.batch_size), warm.windows())]
        model.embed_batch(first, warm.sensor_size)  # the warm-up batch: kernels, allocator
        if model.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        source = RecordingInput(recording, window)
        start = time.perf_counter()
        if args.command == "embed":
            write_features(model, [source], Path(tmp) / "features.h5")
        else:
            write_predictions(model, [source], Path(tmp) / "pred", preview_frames=20)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = source.summary()
    return {
        "command": args.command,
        "backbone": args.backbone,
        "device": str(model.device),
        "window": args.window,
        "repeat": args.repeat,
        "recording_mb": round((Path(args.recording).stat().st_size * args.repeat) / 2**20),
        "events": stats["events"],
        "windows": stats["windows"],
        "seconds": round(seconds, 2),
        "windows_per_s": round(stats["windows"] / seconds, 1),
        "mevents_per_s": round(stats["events"] / seconds / 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if model.device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recording", type=Path, default=DEFAULT_RECORDING)
    parser.add_argument("--backbone", default="vit_small_patch16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--window", nargs="+", default=["events:50000", "ms:50"])
    parser.add_argument("--command", nargs="+", default=["embed", "predict"], choices=["embed", "predict"])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.repeat, args.window, args.command = args.repeat[0], args.window[0], args.command[0]
        print(json.dumps(one(args)))
        return
    header = (
        "| command | window | recording | events | windows | s | windows/s | M events/s | peak RSS MB | peak CUDA MB |"
    )
    print(f"{args.backbone} on {args.device}, batch {args.batch_size}, {args.threads} CPU thread(s)\n")
    print(header + "\n" + "|---" * 10 + "|")
    for command in args.command:
        for window in args.window:
            for repeat in args.repeat:
                cmd = [sys.executable, __file__, "--one", "--recording", str(args.recording), "--backbone"]
                cmd += [args.backbone, "--device", args.device, "--batch-size", str(args.batch_size)]
                cmd += ["--threads", str(args.threads), "--repeat", str(repeat), "--window", window]
                cmd += ["--command", command]
                row = json.loads(
                    subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
                )
                print(
                    f"| {command} | {window} | {row['recording_mb']} MB | {row['events']:,} | {row['windows']} "
                    f"| {row['seconds']} | {row['windows_per_s']} | {row['mevents_per_s']} | {row['peak_rss_mb']} "
                    f"| {row['peak_cuda_mb'] or '-'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
