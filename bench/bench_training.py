"""Training throughput and model FLOP utilisation of the three pre-training stages, with references, in one run.

On the CPU (``torch.set_num_threads(--threads)``, float32) and, where CUDA is present, also on the GPU (bf16
autocast, as the training loop runs there), on synthetic batches held in memory:

- matmul peak: (n x n) @ (n x n) matmuls, n = 2048 in float32 on the CPU and 8192 in bf16 on the GPU; the best
  sample of the run (a few are taken in every round, so the peak spans the same load as the steps);
- the three stages, one training step each (zero_grad, forward, backward, AdamW step), built as
  ``evpretrain pretrain`` builds them (``build_stage_module``, ``stage_param_groups``, ``build_optimizer``):
  the demo (config.yaml's ``pretrain`` section: vit_demo, 64x64, patch 8, its stage heads; EfficientNet-Lite0
  teacher tokens, 1280-dim) at batch 32, and ViT-S/16 at 224x224 with the paper's heads (``MaskedModelingConfig()``:
  decoder 256 wide, 8 deep; ``ContrastConfig()``: MLP heads 4096 wide; CLIP ViT-B/16 teacher tokens, 512-dim) at
  batch 8 (and ``--cuda-vit-batch`` on the GPU, where 8 samples leave it idle);
- the training options (``train.optimizer_impl``, ``train.compile``): on the CPU, ViT-S/16 stage 1 also with fused
  AdamW and compiled (``--cpu-compile``: vit, demo or none); on CUDA every stage with foreach AdamW, fused AdamW
  and compiled with fused AdamW, side by side (the FLOPs of a compiled step are counted on its eager twin);
- the ViT-S/16 encoder alone (no mask; forward and backward of the mean square of its tokens, no optimizer) and
  the reference: ``nn.TransformerEncoder`` of 12 ``nn.TransformerEncoderLayer`` of the same shape (d_model 384, the
  ViT's head count, MLP 1536, GELU, pre-norm, batch first, no dropout) plus a final LayerNorm, on (B, 196, 384)
  tokens. The ratio of their step times is the cost of our encoder over plain PyTorch (goal: <= 1.10).

FLOPs are counted once per workload over a whole step with ``FlopCounterMode`` (matmuls, convolutions and attention,
forward and backward; elementwise work and the optimizer count nothing, so the utilisation is of the matrix units).
Utilisation (MFU) = FLOPs per step / median step time / matmul peak. Each workload is warmed up by three steps (one
counts its FLOPs, one sizes its timed samples); then the workloads take turns, ``--repeats`` rounds, and the median
counts (the machine is shared).

Last, the data loader: samples/s of ``PretrainDataset`` (time flip p = 0.5) on a demo store built in a temporary
folder, at 64x64 (the demo's input) and upsampled to 224x224 (ViT-S/16's), through a DataLoader (batch 32, persistent
workers) with 0, 1 and 2 workers, one torch thread per process. "loader workers" in the step table is the step's
samples/s over the 1-worker rate at the model's input size: the workers (cores) that keep that step fed.
Run: .venv/bin/python bench/bench_training.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from evpretrain.config import load_section, load_yaml
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.models import create_backbone
from evpretrain.pretrain.config import (
    ContrastConfig,
    MaskedModelingConfig,
    PretrainAugment,
    PretrainConfig,
    pretrain_config,
)
from evpretrain.pretrain.data import PretrainDataset, collate
from evpretrain.pretrain.run import build_stage_module, stage_param_groups
from evpretrain.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TEACHER_DIMS = {"demo": 1280, "ViT-S/16": 512}  # EfficientNet-Lite0 feature channels; CLIP ViT-B/16 projected tokens
LOADER_SIZES = {"demo": 64, "ViT-S/16": 224}  # input pixels (H = W) each model trains on

ENCODER = "ViT-S/16 encoder"
PLAIN = "plain nn.TransformerEncoder"


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention runs.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


@dataclass
class Workload:
    """One timed unit of work: ``run()`` does it once, on ``batch_size`` samples (0: not a batch)."""

    device: str
    name: str
    batch_size: int
    run: Callable[[], None]
    flops: float = 0.0  # per run; counted by ``measure`` unless given
    loader_size: int | None = None  # input pixels (H = W), for the loader-workers column
    eager: Callable[[], None] | None = None  # the same step uncompiled, whose FLOPs are counted (compiled runs)


@dataclass(frozen=True)
class Timing:
    """What ``measure`` found for one workload: seconds per run (median, or best for the peak), FLOPs per run."""

    device: str
    name: str
    batch_size: int
    seconds: float
    flops: float
    loader_size: int | None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def precision(device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The training loop's precision: full float32 on the CPU, bf16 autocast on CUDA."""
    return lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def synthetic_batch(backbone: nn.Module, batch_size: int, teacher_dim: int, device: str) -> dict[str, torch.Tensor]:
    """A pre-training batch of the contract's shapes: voxel (B, 5, H, W), density (B, H, W) events per pixel,
    target_difference (B, 1, H, W), teacher (B, N, D_t)."""
    height, width = backbone.img_size
    generator = torch.Generator().manual_seed(0)
    batch = {
        "voxel": torch.randn(batch_size, backbone.in_chans, height, width, generator=generator),
        "density": torch.poisson(torch.full((batch_size, height, width), 2.0), generator=generator),
        "target_difference": torch.randn(batch_size, 1, height, width, generator=generator),
        "teacher": torch.randn(batch_size, backbone.num_tokens, teacher_dim, generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


def stage_workload(
    stage: int,
    config: PretrainConfig,
    model: str,
    batch_size: int,
    device: str,
    *,
    optimizer_impl: str | None = None,
    compile: bool = False,
) -> Workload:
    """One training step of ``stage``: zero_grad, forward, backward, AdamW step (the training loop's, no clipping).

    ``optimizer_impl`` (auto, foreach, fused; None: the stage's ``train.optimizer_impl``) and ``compile`` as the
    ``train`` options of that name; a row that sets them says so in its name."""
    torch.manual_seed(0)
    module = build_stage_module(stage, config, TEACHER_DIMS[model]).to(device).train()
    train_config = {1: config.stage1, 2: config.stage2, 3: config.stage3}[stage].train
    train_config = dataclasses.replace(train_config, batch_size=batch_size)
    if optimizer_impl is not None:
        train_config = dataclasses.replace(train_config, optimizer_impl=optimizer_impl)
    groups = stage_param_groups(module, stage, config, train_config.weight_decay)
    optimizer = build_optimizer(groups, train_config, device_type=device)
    batch = synthetic_batch(module.backbone, batch_size, TEACHER_DIMS[model], device)
    autocast = precision(device)
    net = torch.compile(module) if compile else module

    def stepper(net: nn.Module) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _, _ = net(batch)
            loss.backward()
            optimizer.step()

        return step

    options = [f"{optimizer_impl} AdamW"] if optimizer_impl is not None else []
    options += ["compiled"] if compile else []
    name = f"{model} stage {stage}" + (f", {', '.join(options)}" if options else "")
    return Workload(
        device,
        name,
        batch_size,
        stepper(net),
        loader_size=LOADER_SIZES[model],
        eager=stepper(module) if compile else None,
    )


def encoder_workload(name: str, encoder: nn.Module, inputs: torch.Tensor, device: str) -> Workload:
    """Forward and backward of an encoder (``encoder(inputs)`` -> (B, N, D) tokens), mean-square loss, no optimizer."""
    encoder = encoder.to(device).train()
    inputs = inputs.to(device)
    autocast = precision(device)

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        with autocast():
            tokens = encoder(inputs)
        tokens.float().square().mean().backward()

    return Workload(device, name, inputs.shape[0], step)


class ViTEncoder(nn.Module):
    """The backbone as a plain encoder: voxels (B, C, H, W) -> final tokens (B, N, D), no mask."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        return self.backbone(voxels).tokens


def plain_transformer(depth: int, dim: int, num_heads: int, mlp_ratio: float) -> nn.Module:
    """The reference: PyTorch's own pre-norm encoder of the ViT's shape, with the ViT's final LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        dim, num_heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


def matmul_workload(device: str, size: int) -> Workload:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    return Workload(
        device,
        f"matmul {size}^2 {str(dtype).removeprefix('torch.')}",
        0,
        lambda: torch.mm(a, b, out=out),
        flops=2.0 * size**3,
    )


def device_workloads(
    device: str, demo: PretrainConfig, vit_batches: list[int], demo_batch: int, compile_cpu: str
) -> list[Workload]:
    """The rows of one device. On CUDA every stage also runs with each AdamW kernel (foreach, fused) and compiled
    (fused); on the CPU stage 1 of ``compile_cpu`` (demo, vit, none) also runs compiled, and ViT-S/16 stage 1 with
    fused AdamW."""
    paper = dataclasses.replace(
        demo,
        backbone="vit_small_patch16",
        stage1=dataclasses.replace(demo.stage1, method=MaskedModelingConfig()),
        stage2=dataclasses.replace(demo.stage2, method=ContrastConfig()),
        stage3=dataclasses.replace(demo.stage3, method=ContrastConfig(focus=demo.stage3.method.focus)),
    )
    if device == "cuda":
        variants = [
            {"optimizer_impl": "foreach"},
            {"optimizer_impl": "fused"},
            {"optimizer_impl": "fused", "compile": True},
        ]
    else:
        variants = [{}]
    workloads = [
        stage_workload(stage, demo, "demo", demo_batch, device, **variant)
        for stage in (1, 2, 3)
        for variant in variants
    ]
    if device == "cpu" and compile_cpu == "demo":
        workloads.append(stage_workload(1, demo, "demo", demo_batch, device, compile=True))
    for batch_size in vit_batches:
        workloads += [
            stage_workload(stage, paper, "ViT-S/16", batch_size, device, **variant)
            for stage in (1, 2, 3)
            for variant in variants
        ]
        if device == "cpu":
            workloads.append(stage_workload(1, paper, "ViT-S/16", batch_size, device, optimizer_impl="fused"))
            if compile_cpu == "vit":
                workloads.append(stage_workload(1, paper, "ViT-S/16", batch_size, device, compile=True))
        torch.manual_seed(0)
        vit = create_backbone("vit_small_patch16")
        attention = vit.blocks[0].attn
        plain = plain_transformer(len(vit.blocks), vit.embed_dim, attention.num_heads, mlp_ratio=4.0)
        workloads += [
            encoder_workload(ENCODER, ViTEncoder(vit), torch.randn(batch_size, 5, 224, 224), device),
            encoder_workload(
                f"{PLAIN}, {attention.num_heads} heads",
                plain,
                torch.randn(batch_size, vit.num_tokens, vit.embed_dim),
                device,
            ),
        ]
    return workloads


def count_flops(workload: Workload) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        (workload.eager or workload.run)()
    synchronize(workload.device)
    return float(counter.get_total_flops())


def time_runs(workload: Workload, runs: int) -> float:
    """Seconds per run, over ``runs`` back-to-back runs."""
    synchronize(workload.device)
    start = time.perf_counter()
    for _ in range(runs):
        workload.run()
    synchronize(workload.device)
    return (time.perf_counter() - start) / runs


def measure(
    workloads: list[Workload], peak: Workload, repeats: int, min_sample_s: float
) -> tuple[list[Timing], Timing]:
    """Warm up and count FLOPs, then time the workloads in turns, ``repeats`` rounds (each timed sample lasting at
    least ``min_sample_s``); the median sample of each workload, and the best of the peak's 3 samples per round."""
    for workload in workloads:
        start = time.perf_counter()
        workload.run()  # warm-up: allocations, optimizer state, kernel selection, compilation
        if workload.eager is not None:
            print(f"{workload.device} {workload.name}: first step (compilation) {time.perf_counter() - start:.0f} s")
        workload.flops = count_flops(workload)  # also a second warm-up
    time_runs(peak, 2)
    everything = [peak, *workloads]
    runs = [max(1, math.ceil(min_sample_s / time_runs(w, 1))) for w in everything]  # per timed sample
    samples: list[list[float]] = [[] for _ in everything]
    for _ in range(repeats):
        samples[0] += [time_runs(peak, runs[0]) for _ in range(3)]
        for i, workload in enumerate(everything[1:], start=1):
            samples[i].append(time_runs(workload, runs[i]))

    def timing(workload: Workload, seconds: float) -> Timing:
        return Timing(
            workload.device, workload.name, workload.batch_size, seconds, workload.flops, workload.loader_size
        )

    return ([timing(w, statistics.median(s)) for w, s in zip(workloads, samples[1:])], timing(peak, min(samples[0])))


def loader_rates(path: Path, sizes: list[int], workers: list[int], batch_size: int, repeats: int) -> dict:
    """{(input size, workers): samples/s} of ``PretrainDataset`` through a DataLoader, median of ``repeats`` epochs."""
    rates = {}
    for num_workers in workers:
        loaders = {
            size: DataLoader(
                PretrainDataset(path, augment=PretrainAugment(time_flip_p=0.5), input_size=size),
                batch_size=batch_size,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                collate_fn=collate,
            )
            for size in sizes
        }
        samples: dict[int, list[float]] = {size: [] for size in sizes}
        for epoch in range(repeats + 1):  # epoch 0 warms up: worker start, numba cache, file handles
            for size, loader in loaders.items():
                loader.dataset.set_epoch(epoch)
                start = time.perf_counter()
                count = sum(len(batch["index"]) for batch in loader)
                if epoch:
                    samples[size].append(count / (time.perf_counter() - start))
        for size in sizes:
            rates[size, num_workers] = statistics.median(samples[size])
        del loaders  # stops the persistent workers
    return rates


def print_steps(timings: list[Timing], peak: Timing, per_worker: dict[int, float]) -> None:
    """The step table of one device, then the goals: our encoder against the plain stack, stage 1's MFU."""
    peak_flops = peak.flops / peak.seconds
    print(f"\n{peak.device}: matmul peak {peak_flops / 1e9:,.1f} GFLOP/s ({peak.name}, best sample)")
    print(
        f"{'workload':38s} {'batch':>5s} {'step ms':>9s} {'samples/s':>9s} {'GFLOP/step':>10s} "
        f"{'GFLOP/s':>9s} {'MFU %':>6s} {'loader workers':>14s}"
    )
    for t in timings:
        rate = t.batch_size / t.seconds
        feed = f"{rate / per_worker[t.loader_size]:.2f}" if t.loader_size in per_worker else "-"
        print(
            f"{t.name:38s} {t.batch_size:5d} {t.seconds * 1e3:9.1f} {rate:9.1f} {t.flops / 1e9:10.1f} "
            f"{t.flops / t.seconds / 1e9:9.1f} {100 * t.flops / t.seconds / peak_flops:6.1f} {feed:>14s}"
        )
    for ours in (t for t in timings if t.name == ENCODER):
        batch_size = ours.batch_size
        plain = next(t for t in timings if t.name.startswith(PLAIN) and t.batch_size == batch_size)
        stage1 = next(t for t in timings if t.name.startswith("ViT-S/16 stage 1") and t.batch_size == batch_size)
        print(
            f"batch {batch_size}: ViT-S/16 encoder / plain stack: step time x{ours.seconds / plain.seconds:.3f} "
            f"(goal <= 1.10), FLOPs x{ours.flops / plain.flops:.3f}; ViT-S/16 stage 1 at "
            f"{100 * stage1.flops / stage1.seconds / peak_flops:.1f}% of the peak (goal >= 60%)"
        )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the CPU steps")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed steps (and loader epochs)")
    parser.add_argument("--demo-batch", type=int, default=32)
    parser.add_argument("--vit-batch", type=int, nargs="+", default=[8], help="ViT-S/16 batches on the CPU")
    parser.add_argument("--cuda-vit-batch", type=int, nargs="+", default=[8, 128], help="ViT-S/16 batches on CUDA")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers")
    parser.add_argument("--loader-samples", type=int, default=200, help="training samples of the demo store")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only, even where CUDA is present")
    parser.add_argument(
        "--cpu-compile",
        choices=["none", "demo", "vit"],
        default="vit",
        help="also time stage 1 of this model compiled on the CPU (ViT-S/16's first step compiles for about 100 s)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study = load_yaml(ROOT / "config.yaml")
    demo = pretrain_config(study)
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, load average {os.getloadavg()[0]:.1f}; "
        f"median of {args.repeats} rounds; demo: {demo.backbone} (config.yaml)"
    )

    devices = {"cpu": (args.vit_batch, 2048, 0.5)}  # (ViT-S batches, matmul size, least seconds per timed sample)
    if torch.cuda.is_available() and not args.no_cuda:
        devices["cuda"] = (args.cuda_vit_batch, 8192, 0.2)
    results = []
    for device, (vit_batches, matmul_size, min_sample_s) in devices.items():
        # The workloads (models, optimizers, batches) go out of scope with the call: freed before the next device.
        results.append(
            measure(
                device_workloads(device, demo, vit_batches, args.demo_batch, args.cpu_compile),
                matmul_workload(device, matmul_size),
                args.repeats,
                min_sample_s,
            )
        )

    with tempfile.TemporaryDirectory() as tmp, torch_threads(1):  # DataLoader workers run one thread each
        store_config = load_section(DemoConfig, study, "data.demo")
        store_config = dataclasses.replace(store_config, samples={"train": args.loader_samples})
        path = build_demo(store_config, tmp, progress=False)["train"]
        sizes = sorted(set(LOADER_SIZES.values()))
        rates = loader_rates(path, sizes, args.workers, args.demo_batch, args.repeats)

    per_worker = {size: rates[size, 1] for size in sizes if (size, 1) in rates}
    for timings, peak in results:
        print_steps(timings, peak, per_worker)
    print(
        f"\nPretrainDataset ({args.loader_samples} demo samples, batch {args.demo_batch}, time flip 0.5, "
        f"1 torch thread per process)"
    )
    print(f"{'input':>9s} {'workers':>7s} {'samples/s':>9s} {'per worker':>10s}")
    for (size, num_workers), rate in sorted(rates.items()):
        print(f"{size:4d}x{size:<4d} {num_workers:7d} {rate:9.0f} {rate / max(num_workers, 1):10.0f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
