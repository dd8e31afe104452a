"""Cost model of the paper study (workflow/presets/paper.yaml): FLOPs, GPU-hours, loader workers, data size.

Every number printed is measured here or read from a named source:

- FLOPs per sample of one training step (forward and backward; frozen parts forward only) of each distinct
  pre-training stage config of the plan (``build_stage_module`` via bench_training's ``stage_workload``, optimizer
  step included, which counts nothing), each downstream model the plan evaluates (``downstream.run.build_model``
  and ``step_function`` on a synthetic batch at the backbone's input, labels at the dataset's label size), their
  evaluation forward, and the CLIP ViT-B/16 teacher's forward (``create_teacher`` on random weights), counted with
  ``FlopCounterMode`` at ``--batch`` samples (matmuls, convolutions, attention; elementwise work counts nothing);
- the plan (``plan_study``): stage nodes (shared prefixes trained once), evaluations (variants x tasks x seeds),
  each with its epochs and dataset;
- dataset sizes: ``DATASETS`` below, each with its source;
- events and bytes of EF-ImageNet: a few EF samples built with the preset's ``data.ef`` from scikit-image's
  bundled photographs (``build_ef``, one process), timed, measured and extrapolated;
- GPU throughput: samples/s = MFU x ``--peak-tflops`` / FLOPs per sample, at each ``--mfu`` (assumed: no GPU MFU
  of ours is measured yet); loader workers per GPU = samples/s over ``--worker-rate`` (samples/s of one worker).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/cost_model.py   (about 80 s of CPU, 2.1 GB peak; the
tables and what they say: docs/cost.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from bench_training import CPU_ATTENTION_FLOPS, count_flops, stage_workload  # same folder: bench/
from torch.utils.flop_counter import FlopCounterMode

from evpretrain.config import load_section, load_yaml
from evpretrain.data.config import EFConfig, MvsecConvertConfig
from evpretrain.data.ef import build_ef
from evpretrain.data.store import EventStore, frame_times
from evpretrain.downstream.config import robustness_config, task_config
from evpretrain.downstream.robustness import corruptions
from evpretrain.downstream.run import build_model, model_settings, step_function
from evpretrain.models import backbone_spec, build_backbone
from evpretrain.pipeline.plan import plan_study
from evpretrain.pretrain.config import pretrain_config

ROOT = Path(__file__).resolve().parents[1]
GIGA, TERA = 1e9, 1e12
TOKENS_BYTES = 196 * 512 * 2  # cached teacher tokens per sample: 14 x 14 grid, 512-dim, float16 (teachers/features.py)


def _mvsec_windows() -> tuple[int, int]:
    """(train, test) windows of the paper's MVSEC split (dt = 1) from the converter's frame ranges: ``stop - first
    - 1`` windows a sequence, 1% of indoor_flying1's moved to train (an upper bound: the start offsets and gt
    coverage may drop a few)."""
    config = MvsecConvertConfig()
    windows = {seq: stop - first - config.frame_skip for seq, (first, stop) in config.frame_ranges.items()}
    lent = {seq: int(share * windows[seq]) for seq, share in config.train_share.items()}
    train = sum(windows[s] for s in config.train_sequences) + sum(lent.values())
    return train, sum(windows[s] for s in config.test_sequences) - sum(lent.values())


# Samples per split (one sample a recording or labelled frame), the label size (H, W) of dense tasks, classes.
DATASETS = {
    "ef": {
        "train": 1_281_167,
        "val": 50_000,
        "source": "ImageNet-1k train/val images (Russakovsky et al., IJCV 2015), one EF sample each",
    },
    "n-caltech101": {
        "train": round(0.8 * 8_246),
        "test": 8_246 - round(0.8 * 8_246),
        "classes": 101,
        "source": "8,246 recordings of the 101 object classes (Orchard et al., Front. Neurosci. 2015), "
        "80/20 (registry.yaml random_split)",
    },
    "n-cars": {
        "train": 15_422,
        "test": 8_607,
        "classes": 2,
        "source": "Sironi et al., CVPR 2018 (registry.yaml expect: 7,940 + 7,482 / 4,396 + 4,211)",
    },
    "n-imagenet": {
        "train": 1_281_167,
        "val": 50_000,
        "classes": 1000,
        "source": "ImageNet-1k re-recorded (Kim et al., ICCV 2021)",
    },
    "cifar10-dvs": {
        "train": 9_000,
        "test": 1_000,
        "classes": 10,
        "source": "10,000 recordings (Li et al., Front. Neurosci. 2017), 90/10 (registry.yaml)",
    },
    "dsec-semantic": {
        "train": 8_082,
        "test": 2_809,
        "classes": 11,
        "label": (440, 640),
        "source": "labelled frames, Sun et al. (ESS), ECCV 2022; 440 x 640 after the crop",
    },
    "ddd17": {
        "train": 15_950,
        "test": 3_890,
        "classes": 6,
        "label": (200, 346),
        "source": "EV-SegNet labels (Alonso & Murillo, CVPRW 2019; registry.yaml); 200 x 346",
    },
    "mvsec": dict(
        zip(("train", "test"), _mvsec_windows()),
        label=(260, 346),
        source="windows of MvsecConvertConfig's frame ranges (data/config.py), dt = 1; 260 x 346",
    ),
}
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "moon",
    "cat",
    "clock",
    "brick",
    "grass",
    "gravel",
)  # scikit-image's bundled images (no download)


# --- FLOPs ------------------------------------------------------------------------------------------------------


def flops_of(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return float(counter.get_total_flops())


def pretrain_flops(plan, batch: int) -> dict[str, float]:
    """{node name: training FLOPs per sample}, counted once per distinct stage config."""
    counted, per_node = {}, {}
    for name, node in plan.nodes.items():
        own = node.config["pretrain"][f"stage{node.stage}"]
        key = json.dumps([node.stage, own.get("method"), (own.get("layer_lr") or {})], sort_keys=True, default=str)
        if key not in counted:
            config = pretrain_config(node.config)
            counted[key] = count_flops(stage_workload(node.stage, config, "ViT-S/16", batch, "cpu")) / batch
        per_node[name] = counted[key]
    return per_node


def queue_bytes(plan) -> int:
    """Bytes of the TokenInfoNCE negatives queue of a stage-2 module of the plan (its ``queue`` buffer)."""
    node = next(n for n in plan.nodes.values() if n.stage == 2)
    from evpretrain.pretrain.run import build_stage_module

    module = build_stage_module(2, pretrain_config(node.config), 512)
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name.endswith("queue"))


def teacher_flops(batch: int) -> float:
    """Forward FLOPs per image of the CLIP ViT-B/16 teacher (its own tokens, 224 x 224), on random weights."""
    import open_clip

    from evpretrain.teachers import create_teacher
    from evpretrain.teachers.clip import OPEN_CLIP_ARCHITECTURE

    config = open_clip.get_model_config(OPEN_CLIP_ARCHITECTURE)
    visual = open_clip.CLIP(**config).visual
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-ViT-B-16.pt"
        torch.save({f"visual.{k}": v.half() for k, v in visual.state_dict().items()}, path)
        del visual
        teacher = create_teacher("clip_vit_b16", weights=path)
    images = torch.rand(batch, 3, *teacher.input_size)
    # A frozen nn.MultiheadAttention takes the fused fast path, whose one kernel FlopCounterMode does not count
    # (the projections and attention, a third of the FLOPs): count the same math through the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return flops_of(lambda: teacher.encode(images)) / batch
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def synthetic_downstream_batch(task: str, dataset: str, in_chans: int, size, batch: int, classes: int | None):
    generator = torch.Generator().manual_seed(0)
    out = {"voxel": torch.randn(batch, in_chans, *size, generator=generator)}
    if task == "classify":
        out["label"] = torch.randint(classes, (batch,), generator=generator)
    elif task == "segment":
        out["mask"] = torch.randint(classes, (batch, *DATASETS[dataset]["label"]), generator=generator)
    else:
        label = DATASETS[dataset]["label"]
        out["flow"] = torch.randn(batch, 2, *label, generator=generator)
        out["valid"] = torch.ones(batch, *label, dtype=torch.bool)
    return out


def downstream_flops(evaluation, batch: int) -> tuple[float, float, str]:
    """(training step FLOPs per sample, evaluation forward FLOPs per sample, backbone name) of an evaluation."""
    spec = backbone_spec(evaluation.config)
    config = task_config(evaluation.config, evaluation.task, evaluation.mode)
    torch.manual_seed(0)
    backbone = build_backbone(spec.with_overrides(drop_path_rate=config.drop_path_rate))
    classes = DATASETS[evaluation.dataset].get("classes")
    settings = model_settings(evaluation.task, evaluation.mode, config)
    model = build_model(evaluation.task, evaluation.mode, backbone, classes, settings)
    data = synthetic_downstream_batch(
        evaluation.task, evaluation.dataset, spec.in_chans, backbone.img_size, batch, classes
    )
    step = step_function(evaluation.task, config)
    forward = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    backward = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with forward:
        loss, _ = step(model.train(), data)
    with backward:
        loss.backward()
    # The evaluation forward runs the same matmuls as the training forward (drop path and dropout count nothing).
    fwd = float(forward.get_total_flops())
    return (fwd + float(backward.get_total_flops())) / batch, fwd / batch, spec.name


# --- EF-ImageNet ------------------------------------------------------------------------------------------------


def interval_counts(t: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Events of each frame interval [times[i], times[i + 1]) (the last one closed) of sorted timestamps ``t``."""
    edges = np.append(np.searchsorted(t, times[:-1], "left"), np.searchsorted(t, times[-1], "right"))
    return np.diff(edges)


def ef_measure(config: EFConfig, count: int) -> dict:
    """Build ``count`` EF samples from scikit-image's photographs with ``config`` (one process) and measure them:
    seconds per sample, events per sample and per interval, bytes per sample by field and of the file."""
    import skimage.data
    from PIL import Image

    config = dataclasses.replace(config, shard_size=count, shards=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for k, name in enumerate(SKIMAGE_PHOTOS[:count]):
            (root / f"c{k:02d}").mkdir(parents=True)
            Image.fromarray(getattr(skimage.data, name)()).save(root / f"c{k:02d}" / f"{name}.png")
        warm = Path(tmp) / "warm"
        (warm / "c").mkdir(parents=True)
        Image.fromarray(skimage.data.camera()).save(warm / "c" / "camera.png")
        build_ef(dataclasses.replace(config, shard_size=1), warm, Path(tmp) / "warm.h5", workers=1, progress=False)
        start = time.perf_counter()
        path = build_ef(config, root, Path(tmp) / "ef.h5", workers=1, progress=False)
        seconds = (time.perf_counter() - start) / count
        times = frame_times(config.num_frames, config.frame_rate_hz)
        with EventStore(path) as store:
            events = store.event_counts.astype(float)
            intervals = np.concatenate([interval_counts(store.events(i)["t"], times) for i in range(len(store))])
            dense = {key: store.dense(key, 0).nbytes for key in ("diff_maps", "frames", "rgb") if key in store.fields}
        file_bytes = path.stat().st_size / count
    per_sample = 13 * events.mean() + sum(dense.values())
    return {
        "seconds": seconds,
        "events": events,
        "intervals": intervals,
        "dense": dense,
        "bytes": per_sample,
        "file_bytes": file_bytes,
        "count": count,
    }


# --- printing ---------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> None:
    """A markdown table; columns whose first cell reads as a number are right-aligned."""
    numeric = [str(x).replace(",", "").replace(".", "").replace("-", "").isdigit() for x in rows[0]]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    print()


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def job_cores(job: dict) -> int:
    """CPU cores of a job of ``execution.resources``: ``cpus`` is per task, and a job runs one task a GPU (or
    ``tasks``), as ``evpretrain.pipeline.submit.JobResources`` asks SLURM."""
    return int(job["cpus"]) * int(job.get("tasks") or max(int(job.get("gpus", 0)), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "workflow/presets/paper.yaml")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.30, 0.45], help="assumed model FLOP utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM bf16 dense peak, TFLOP/s")
    parser.add_argument(
        "--worker-rate",
        type=float,
        nargs="+",
        default=[458.0, 4893.0],
        help="samples/s of one loader core at 224x224 (bench/README.md loader section: worker path 458, device 4893)",
    )
    parser.add_argument("--batch", type=int, default=2, help="samples per FLOP-counted step")
    parser.add_argument("--ef-samples", type=int, default=len(SKIMAGE_PHOTOS), help="EF samples to build")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    study = load_yaml(args.config)
    plan = plan_study(study)
    peak = args.peak_tflops * TERA
    mfus = args.mfu
    resources = study["execution"]["resources"]

    # 1. FLOPs per sample
    node_flops = pretrain_flops(plan, args.batch)
    clip = teacher_flops(args.batch)
    queue = queue_bytes(plan)
    kinds = {}  # (label, backbone) -> (train FLOPs, eval FLOPs)
    eval_kind = {}
    for name, evaluation in plan.evaluations.items():
        spec_name = backbone_spec(evaluation.config).name
        kind = (evaluation.label, spec_name)
        if kind not in kinds:
            kinds[kind] = downstream_flops(evaluation, args.batch)[:2]
        eval_kind[name] = kind

    def rate(flops: float, mfu: float) -> float:
        return mfu * peak / flops

    print(f"# Cost model of {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}\n")
    print(
        f"Peak {args.peak_tflops:g} TFLOP/s a GPU (bf16 dense); MFU {', '.join(f'{m:.0%}' for m in mfus)} "
        f"(assumed); loader worker {', '.join(fmt(r) for r in args.worker_rate)} samples/s; FLOPs counted at "
        f"batch {args.batch}.\n"
    )

    print("## FLOPs per sample and throughput a GPU\n")
    header = ["workload", "GFLOP/sample"] + [f"samples/s @{m:.0%}" for m in mfus]
    header += [f"workers @{m:.0%}, {fmt(r)}/s" for r in args.worker_rate for m in mfus]
    rows = []
    seen = {}
    for name, node in plan.nodes.items():
        own = node.config["pretrain"][f"stage{node.stage}"]["method"]
        what = {
            1: f"target {own.get('target')}, masking {own.get('masking')}",
            2: "backbone frozen",
            3: f"focus {own.get('focus')}",
        }[node.stage]
        label = f"pre-train stage {node.stage} ({what})"
        seen.setdefault(label, node_flops[name])
    workloads = [*seen.items(), ("teacher CLIP ViT-B/16 forward (once a sample)", clip)]
    workloads += [(f"{label} [{backbone}] train", f[0]) for (label, backbone), f in kinds.items()]
    workloads += [(f"{label} [{backbone}] eval forward", f[1]) for (label, backbone), f in kinds.items()]
    for label, flops in workloads:
        rates = [rate(flops, m) for m in mfus]
        rows.append(
            [
                label,
                fmt(flops / GIGA, 1),
                *(fmt(r) for r in rates),
                *(fmt(r / w, 1) for w in args.worker_rate for r in rates),
            ]
        )
    table(header, rows)

    # 2. data
    print("## Datasets (samples a split; sources)\n")
    table(
        ["dataset", "train", "eval", "source"],
        [[d, fmt(v["train"]), fmt(v.get("val", v.get("test", 0))), v["source"]] for d, v in DATASETS.items()],
    )

    ef_config = load_section(EFConfig, study, "data.ef")
    ef = ef_measure(ef_config, args.ef_samples)
    n_ef = DATASETS["ef"]["train"] + DATASETS["ef"]["val"]
    events, intervals = ef["events"], ef["intervals"]
    print(
        f"## EF-ImageNet: {ef['count']} samples of scikit-image photographs, data.ef of the preset "
        f"({ef_config.image_size} px, {ef_config.num_frames - 1} intervals)\n"
    )
    rows = [
        ["events a sample (mean; min-max)", f"{fmt(events.mean())} ({fmt(events.min())}-{fmt(events.max())})"],
        [
            "events an interval (mean; 10-90 percentile)",
            f"{fmt(intervals.mean())} ({fmt(np.percentile(intervals, 10))}-{fmt(np.percentile(intervals, 90))})",
        ],
        ["bytes a sample: events (13 B each)", fmt(13 * events.mean())],
        *[[f"bytes a sample: {k}", fmt(v)] for k, v in ef["dense"].items()],
        ["bytes a sample: total (fields)", fmt(ef["bytes"])],
        ["bytes a sample: store file / samples", fmt(ef["file_bytes"])],
        [
            f"EF-ImageNet store, {fmt(n_ef)} samples (TB)",
            f"{ef['bytes'] * n_ef / TERA:.2f} "
            f"({13 * events.min() * n_ef / TERA + sum(ef['dense'].values()) * n_ef / TERA:.2f}-"
            f"{(13 * events.max() + sum(ef['dense'].values())) * n_ef / TERA:.2f})",
        ],
        ["teacher tokens cache (TB)", f"{TOKENS_BYTES * DATASETS['ef']['train'] / TERA:.2f}"],
        ["build: CPU seconds a sample (this machine, 1 process)", f"{ef['seconds']:.3f}"],
        ["build: CPU core-hours, all samples", fmt(ef["seconds"] * n_ef / 3600)],
        [
            f"build: wall hours on {ef_config.shards} jobs x {resources['data']['cpus']} cores",
            fmt(ef["seconds"] * n_ef / 3600 / (ef_config.shards * resources["data"]["cpus"]), 2),
        ],
    ]
    table(["EF-ImageNet", "value"], rows)

    # 3. GPU-hours; wall time of a job: its GPUs at the MFU, or its loader (cpus workers x the rate), the slower
    n_train = DATASETS["ef"]["train"]
    rates = args.worker_rate
    users = defaultdict(list)
    for variant in plan.variants.values():
        for node in variant.nodes:
            users[node].append(variant.name)
    job = resources["pretrain"]
    print(f"## Pre-training: GPU-hours a stage node (shared prefixes trained once), {n_train:,} samples an epoch\n")
    print(
        f"Wall hours of its {job['gpus']}-GPU job: GPU-bound at each MFU, and loader-bound with {job_cores(job)} "
        "workers (execution.resources.pretrain: cpus a task x one task a GPU) at each worker rate.\n"
    )
    header = ["node", "stage", "variants", "epochs", "PFLOP"] + [f"GPU-h @{m:.0%}" for m in mfus]
    header += [f"wall h GPU @{m:.0%}" for m in mfus] + [f"wall h loader {fmt(r)}/s" for r in rates]
    rows, pretrain_hours, pretrain_samples = [], np.zeros(len(mfus)), 0
    for name, node in plan.nodes.items():
        epochs = node.config["pretrain"][f"stage{node.stage}"]["train"]["epochs"]
        flops = node_flops[name] * epochs * n_train
        hours = np.array([flops / (m * peak) / 3600 for m in mfus])
        pretrain_hours += hours
        pretrain_samples += epochs * n_train
        rows.append(
            [
                name,
                node.stage,
                ", ".join(users[name]),
                epochs,
                fmt(flops / 1e15),
                *(fmt(h, 1) for h in hours),
                *(fmt(h / job["gpus"], 2) for h in hours),
                *(fmt(epochs * n_train / (job_cores(job) * r) / 3600, 1) for r in rates),
            ]
        )
    teacher_hours = np.array([clip * n_train / (m * peak) / 3600 for m in mfus]) * len(plan.teachers)
    rows.append(
        [
            f"teacher features x {len(plan.teachers)}",
            "-",
            "all with stage 2 or 3",
            1,
            fmt(clip * n_train * len(plan.teachers) / 1e15),
            *(fmt(h, 2) for h in teacher_hours),
            *(fmt(h / resources["teacher"]["gpus"], 2) for h in teacher_hours),
            *("-" for _ in rates),
        ]
    )
    table(header, rows)

    robust = robustness_config(study)
    levels = len(corruptions(robust)) + (1 if robust.val_event_noise else 0)
    groups = Counter(eval_kind.values())
    robust_runs = Counter(eval_kind[n] for n, e in plan.evaluations.items() if e.robustness)
    job = resources["finetune"]
    print("## Downstream: GPU-hours by evaluation\n")
    print(
        f"A run: its training steps, an evaluation pass after every epoch and at the end (eval_every_epochs), "
        f"and {levels} robustness passes on the first seed's classifiers. Wall hours of a run's {job['gpus']}-GPU "
        f"job as above, with {job_cores(job)} workers (execution.resources.finetune: cpus a task x tasks).\n"
    )
    header = ["evaluation", "backbone", "runs", "epochs", "train", "eval"]
    header += [f"GPU-h a run @{m:.0%}" for m in mfus] + [f"GPU-h all @{m:.0%}" for m in mfus]
    header += [f"wall h a run, loader {fmt(r)}/s" for r in rates]
    rows, downstream_hours, downstream_samples = [], np.zeros(len(mfus)), 0
    sample = {kind: next(e for n, e in plan.evaluations.items() if eval_kind[n] == kind) for kind in groups}
    for kind, runs in groups.items():
        evaluation = sample[kind]
        config = task_config(evaluation.config, evaluation.task, evaluation.mode)
        data = DATASETS[evaluation.dataset]
        n_eval = data.get(evaluation.eval_split, 0)
        epochs = config.train.epochs
        passes = epochs // config.eval_every_epochs + 1
        train_f, eval_f = kinds[kind]
        run_samples = epochs * data[evaluation.train_split] + passes * n_eval
        run_flops = train_f * epochs * data[evaluation.train_split] + eval_f * passes * n_eval
        all_flops = run_flops * runs + eval_f * levels * n_eval * robust_runs[kind]
        hours = np.array([all_flops / (m * peak) / 3600 for m in mfus])
        downstream_hours += hours
        downstream_samples += run_samples * runs
        rows.append(
            [
                kind[0],
                kind[1],
                runs,
                epochs,
                fmt(data[evaluation.train_split]),
                fmt(n_eval),
                *(fmt(run_flops / (m * peak) / 3600, 2) for m in mfus),
                *(fmt(h) for h in hours),
                *(fmt(run_samples / (job_cores(job) * r) / 3600, 1) for r in rates),
            ]
        )
    table(header, rows)

    print("## The whole preset\n")
    total = teacher_hours + pretrain_hours + downstream_hours
    parts = (
        ("teacher features", teacher_hours),
        (f"pre-training, {len(plan.nodes)} nodes", pretrain_hours),
        (f"downstream, {len(plan.evaluations)} runs", downstream_hours),
        ("total", total),
    )
    table(
        ["part", *(f"GPU-h @{m:.0%}" for m in mfus), *(f"GPU-days @{m:.0%}" for m in mfus)],
        [[part, *(fmt(h, 1) for h in hours), *(fmt(h / 24, 1) for h in hours)] for part, hours in parts],
    )
    loader_core_h = [(pretrain_samples + downstream_samples) / r / 3600 for r in rates]
    print(
        f"Plan: {len(plan.variants)} variants, {len(plan.nodes)} stage nodes, {len(plan.teachers)} teacher pass, "
        f"{len(plan.evaluations)} evaluations. Samples loaded: {pretrain_samples / 1e9:.2f} G pre-training, "
        f"{downstream_samples / 1e9:.2f} G downstream: "
        + ", ".join(f"{fmt(h)} loader core-hours at {fmt(r)}/s" for h, r in zip(loader_core_h, rates))
        + f". EF build: {fmt(ef['seconds'] * n_ef / 3600)} CPU core-hours.\n"
    )

    # 4. where it bends
    gpus = resources["pretrain"]["gpus"]
    stage1 = next(node_flops[n] for n, node in plan.nodes.items() if node.stage == 1)
    read_bytes = ef["bytes"] - ef["dense"].get("rgb", 0)  # a read takes a sample's events, diff maps, frames whole
    size = ef_config.image_size**2
    interval_bytes = 13 * ef["intervals"].mean() + 2 * size + 2 * size  # float16 diff map, two uint8 frames
    batch = next(n for n in plan.nodes.values() if n.stage == 2).config["pretrain"]["stage2"]["train"]["batch_size"]
    stage2 = next(node_flops[n] for n, node in plan.nodes.items() if node.stage == 2)
    print("## Where it bends (pre-training, at the highest MFU)\n")
    m = max(mfus)
    node_rate = gpus * rate(stage1, m)
    rows = [
        ["stage-1 samples/s of an 8-GPU node", fmt(node_rate), "-"],
        *[[f"loader workers an 8-GPU node needs at {fmt(r)}/s", fmt(node_rate / r), "-"] for r in rates],
        ["store bytes read a sample (events, diff maps, frames whole)", fmt(read_bytes), "events: x events/sample"],
        ["store read rate an 8-GPU node needs, GB/s", fmt(node_rate * read_bytes / GIGA, 1), "-"],
        [
            "the same if a read took only its interval (events, 1 diff map, 2 frames), GB/s",
            fmt(node_rate * interval_bytes / GIGA, 1),
            "-",
        ],
        ["EF-ImageNet store, TB", f"{ef['bytes'] * n_ef / TERA:.2f}", "x N"],
        ["teacher tokens cache, TB", f"{TOKENS_BYTES * n_train / TERA:.2f}", "x N"],
        ["teacher pass, GPU-h (once per teacher)", fmt(teacher_hours[-1], 2), "x N"],
        ["EF build, CPU core-hours", fmt(ef["seconds"] * n_ef / 3600), "x N"],
        ["TokenInfoNCE queue a module, MiB", fmt(queue / 2**20), "constant"],
        [
            f"queue broadcast (DDP buffer) a stage-2 GPU, GB/s at batch {batch}",
            fmt(queue * rate(stage2, m) / batch / GIGA, 1),
            "constant",
        ],
        ["pre-training GPU-h (all nodes)", fmt(pretrain_hours[-1]), "x N (epochs fixed)"],
    ]
    table(["quantity", "at the preset", "scales with data size N"], rows)
    print(f"(ran in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
