"""How fast backbones learn the demo's digits from scratch: validation top-1 after each epoch, side by side.

Supervised training from a random initialisation on the voxel grids of the demo study's training and validation
splits, built into a temporary folder from ``--config``'s ``data.demo`` once for each ``--legs`` (the saccade's legs:
one leg hides the strokes along it) and each ``--motion`` JITTER,DRIFT (``digit_jitter_px``, how far the digit's path
may sit off centre, and ``digit_drift_px_per_frame``, the digit's own motion; the config's by default), and read as
5-bin voxel grids (no time flip, no augmentation); then, the same for every model: AdamW (lr ``--lr``, weight decay
0.05), batch 32, cross-entropy, ``--epochs`` epochs, torch seed 0. The models:

- ``cnn_bn``: the reference, 4 blocks of 3x3 conv -> BatchNorm -> ReLU -> 2x2 max pool (32, 64, 128, 128 channels),
  global average pool, linear;
- ``cnn_gn``: the same with GroupNorm(1, C) (a LayerNorm over each map) in place of BatchNorm;
- ``timm_vit``: timm's VisionTransformer of ``vit_tiny_demo``'s shape (patch 8, width 128, 4 blocks, 4 heads,
  average pooling), the outside reference for our ViT;
- ``vit_tiny_demo``, ``convvit_demo``, ``swin_demo``: this project's demo backbones under ``Classifier``.

Prints one row per (legs, motion, model): the top-1 on the validation split after each epoch and the seconds taken.
The machine is shared: read the accuracies, not the times.
Run (as ``make bench`` does): .venv/bin/python bench/bench_learnability.py --config config.yaml --legs 2
    --motion 4,0.6 0,0.3 --models cnn_bn vit_tiny_demo --lr 5e-4
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from evpretrain.config import load_section, load_yaml
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.downstream.models import Classifier
from evpretrain.models.registry import create_backbone
from evpretrain.pretrain.config import PretrainAugment
from evpretrain.pretrain.data import PretrainDataset


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel grids (N, 5, H, W) and labels (N,) of a store."""
    dataset = PretrainDataset(path, num_bins=5, augment=PretrainAugment(time_flip_p=0.0), seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["voxel"] for s in samples]), torch.stack([s["label"] for s in samples])


def motion(text: str) -> tuple[float, float]:
    """``--motion`` JITTER,DRIFT -> (digit_jitter_px, digit_drift_px_per_frame)."""
    try:
        jitter, drift = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected JITTER,DRIFT (two numbers, e.g. 4,0.6), got {text!r}") from None
    return jitter, drift


def cnn(norm: type[nn.Module] | None) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        layer = nn.BatchNorm2d(c_out) if norm is nn.BatchNorm2d else nn.GroupNorm(1, c_out)
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), layer, nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(5, 32),
        block(32, 64),
        block(64, 128),
        block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def build(name: str, image_size: int) -> nn.Module:
    if name == "cnn_bn":
        return cnn(nn.BatchNorm2d)
    if name == "cnn_gn":
        return cnn(nn.GroupNorm)
    if name == "timm_vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=image_size,
            patch_size=8,
            in_chans=5,
            num_classes=10,
            embed_dim=128,
            depth=4,
            num_heads=4,
            global_pool="avg",
        )
    return Classifier(create_backbone(name, img_size=image_size), 10)


def learn(model: nn.Module, train: tuple, val: tuple, epochs: int, lr: float) -> tuple[list[float], float]:
    """Train ``model``; return the validation top-1 after each epoch and the seconds taken."""
    (x, y), (x_val, y_val) = train, val
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    accuracies, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 31, 32):
            batch = order[i : i + 32]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracies.append((model(x_val).argmax(1) == y_val).float().mean().item())
    return accuracies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a study config: its data.demo section")
    parser.add_argument("--legs", type=int, nargs="+", default=[2], help="saccade legs of the stores to compare")
    parser.add_argument(
        "--motion",
        type=motion,
        nargs="+",
        default=None,
        metavar="JITTER,DRIFT",
        help="digit_jitter_px,digit_drift_px_per_frame pairs (default: the config's)",
    )
    parser.add_argument("--models", nargs="+", default=["cnn_bn", "cnn_gn", "timm_vit", "vit_tiny_demo"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    demo = load_section(DemoConfig, load_yaml(args.config), "data.demo")
    motions = args.motion or [(demo.digit_jitter_px, demo.digit_drift_px_per_frame)]
    for legs, (jitter, drift) in itertools.product(args.legs, motions):
        config = replace(
            demo,
            saccade_legs=legs,
            digit_jitter_px=jitter,
            digit_drift_px_per_frame=drift,
            samples={**demo.samples, "test": 0},
        )
        with tempfile.TemporaryDirectory() as folder:
            stores = build_demo(config, folder, progress=False)
            train, val = load_split(stores["train"]), load_split(stores["val"])
        print(
            f"{legs} leg(s), jitter {jitter} px, drift {drift} px/frame: {len(train[1])} training, "
            f"{len(val[1])} validation samples"
        )
        for name in args.models:
            torch.manual_seed(0)
            accuracies, seconds = learn(build(name, train[0].shape[-1]), train, val, args.epochs, args.lr)
            curve = " ".join(f"{100 * a:4.1f}" for a in accuracies)
            print(f"  {name:14s} top-1 % by epoch: {curve}   ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
