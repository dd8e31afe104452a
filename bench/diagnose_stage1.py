"""What stage 1 learns on a finished study: its loss against a mean predictor, and how predictable its target is.

For every stage-1 run of the study in ``--results`` (its ``manifest.json``), on ``--store`` (default: the study's
validation split) without augmentation, with the same seeded masks for every run:

- ``loss``: the run's masked reconstruction loss (MSE on the masked patches, per-patch normalised target);
- ``mean``: the loss of predicting each masked patch's own mean (0 on a normalised target), the floor a model that
  learned nothing reaches; ``skill`` = 1 - loss / mean, the fraction of the target's variance the model explains;
- ``flat %``: masked patches whose target is constant (variance < 1e-6): nothing to reconstruct there;
- ``event %``: the share of the target's energy (sum of squares) on pixels with an event in the window;
- ``oracle``: a ridge regression from each patch's OWN voxel values (which the masked model never sees) to its
  normalised target, fit on ``--fit-store`` patches: how much of the target the events at that place explain
  (n/a for the voxel target, which is those values);
- ``probe``: the linear-probe top-1 (last epoch, %) of every variant whose pre-training starts with this run, mean
  over the seeds found, from ``downstream/*/metrics.json``.

Then, from ``tables/ablation.csv``, each variant whose pre-training was rerun under other seeds (variants named
``<name>_seed<N>``, ``workflow/presets/demo-diagnosis.yaml``) with ``<name>``'s: the probe top-1 of each pre-training
seed (its mean over the probe seeds) and their mean ± sample std, the spread that pre-training adds to the probe's.

Run (after ``make demo`` and the diagnosis variants, docs/results.md):
    .venv/bin/python bench/diagnose_stage1.py --results results --batches 8
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from evpretrain.pretrain.config import pretrain_config
from evpretrain.pretrain.losses import masked_reconstruction_loss
from evpretrain.pretrain.masking import patchify
from evpretrain.pretrain.run import build_stage_module
from evpretrain.pretrain.stages import TARGET_KEYS
from evpretrain.training.checkpoint import load_checkpoint

EPS = 1e-6


def normalised(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, P) -> the per-patch normalised patches and a (B, N) flag of constant patches."""
    var = patches.var(dim=-1, keepdim=True)
    return (patches - patches.mean(dim=-1, keepdim=True)) / (var + EPS).sqrt(), var.squeeze(-1) < EPS


def batches(dataset, count: int, batch_size: int):
    """The first ``count`` batches of ``dataset`` in order (no augmentation: the view is fixed per index)."""
    for start in range(0, min(len(dataset), count * batch_size), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def patch_pairs(module, batch, target_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's voxel values (B*N, C*p*p) and its normalised target (B*N, P)."""
    p = module.backbone.patch_size
    target, _ = normalised(patchify(batch[target_key].float(), p))
    return patchify(batch["voxel"].float(), p).flatten(0, 1), target.flatten(0, 1)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge weights (D, P) and bias (P,) from x (M, D) to y (M, P)."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = (x - mean_x).double(), (y - mean_y).double()
    weights = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.double), xc.T @ yc).float()
    return weights, mean_y - mean_x @ weights


@torch.no_grad()
def diagnose(run: Path, store: Path, fit_store: Path, count: int, batch_size: int) -> dict[str, float]:
    config = pretrain_config(yaml.safe_load((run / "study.yaml").read_text()))
    module = build_stage_module(1, config, None)
    module.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    module.eval()
    method = config.stage1.method
    target_key = TARGET_KEYS[method.target]

    oracle = None
    if method.target != "voxel":
        pairs = [
            patch_pairs(module, b, target_key) for b in batches(config.data.dataset(fit_store, augment=False), 16, 64)
        ]
        oracle = fit_ridge(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))

    sums: dict[str, float] = defaultdict(float)
    torch.manual_seed(0)  # the masks the stage draws: the same for every run
    for batch in batches(config.data.dataset(store, augment=False), count, batch_size):
        loss, _, out = module(batch)  # the stage's own masking, decoder and loss
        mask = out["mask"]
        masked = mask.float()
        count_masked = masked.sum().item()
        zeros = torch.zeros_like(out["pred"])  # each patch's mean, on a per-patch normalised target
        mean = masked_reconstruction_loss(zeros, out["target"], mask, normalize_target=method.normalize_target)
        sums["loss"] += loss.item() * count_masked
        sums["mean"] += mean.item() * count_masked
        sums["flat"] += (normalised(out["target"].float())[1].float() * masked).sum().item()
        sums["masked"] += count_masked
        raw = batch[target_key].float()
        events = (batch["density"] > 0).unsqueeze(1).expand_as(raw)
        sums["energy"] += (raw**2).sum().item()
        sums["energy_on_events"] += (raw**2)[events].sum().item()
        if oracle is not None:
            x, y = patch_pairs(module, batch, target_key)
            error = ((x @ oracle[0] + oracle[1] - y) ** 2).mean(-1).reshape(mask.shape)
            sums["oracle"] += (error * masked).sum().item()
    masked = sums["masked"]
    return {
        "loss": sums["loss"] / masked,
        "mean": sums["mean"] / masked,
        "skill": 1 - sums["loss"] / sums["mean"],
        "flat %": 100 * sums["flat"] / masked,
        "event %": 100 * sums["energy_on_events"] / max(sums["energy"], EPS),
        "oracle": sums["oracle"] / masked if oracle is not None else float("nan"),
    }


def probes(results: Path, evaluations: list[dict]) -> float:
    """Mean linear-probe top-1 (%) over the variant's finished classify-linear evaluations; nan when none."""
    values = []
    for evaluation in evaluations:
        metrics = results / "downstream" / evaluation["folder"] / "metrics.json"
        if evaluation["task"] == "classify" and evaluation["mode"] == "linear" and metrics.exists():
            values.append(100 * json.loads(metrics.read_text())["top1_last"])
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="a finished study's results folder")
    parser.add_argument(
        "--dataset", default="demo", help="the study's pretrain_dataset (its stores under <results>/data)"
    )
    parser.add_argument("--store", type=Path, help="scored store (default: <results>/data/<dataset>/val.h5)")
    parser.add_argument("--fit-store", type=Path, help="the oracle's fitting store (default: the train split)")
    parser.add_argument("--batches", type=int, default=8, help="batches of --batch-size scored per run")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    manifest = json.loads((args.results / "manifest.json").read_text())
    runs: dict[str, list[str]] = defaultdict(list)
    for name, variant in manifest.items():
        first = (variant.get("nodes") or [""])[0]
        if first.startswith("stage1-"):
            runs[first].append(name)
    header = ["stage-1 run", "variants (probe top-1 %)", "loss", "mean", "skill", "flat %", "event %", "oracle"]
    print(" | ".join(header))
    for node, names in sorted(runs.items(), key=lambda item: item[1][0]):
        run = args.results / "pretrain" / node
        store = args.store or args.results / "data" / args.dataset / "val.h5"
        fit_store = args.fit_store or args.results / "data" / args.dataset / "train.h5"
        row = diagnose(run, store, fit_store, args.batches, args.batch_size)
        labels = ", ".join(f"{n} ({probes(args.results, manifest[n]['evaluations']):.1f})" for n in names)
        print(
            " | ".join(
                [
                    node,
                    labels,
                    *(
                        f"{row[k]:.3f}" if k in ("loss", "mean", "skill", "oracle") else f"{row[k]:.1f}"
                        for k in header[2:]
                    ),
                ]
            )
        )
    pretraining_seeds(args.results)


def pretraining_seeds(results: Path) -> None:
    """Print each ``<name>`` with its ``<name>_seed<N>`` variants: top-1 per pre-training seed, mean ± sample std."""
    import re

    import pandas as pd

    table = pd.read_csv(results / "tables" / "ablation.csv")
    top1 = table[table["figure"] == "top-1"].set_index("variant")["mean"]
    groups: dict[str, list[str]] = defaultdict(list)
    for name in top1.index:
        groups[re.sub(r"_seed\d+$", "", name)].append(name)
    print("\nvariant | top-1 per pre-training seed | mean ± std")
    for name, members in groups.items():
        if len(members) > 1 and name in members:
            values = top1[[name] + sorted(m for m in members if m != name)]
            print(f"{name} | {', '.join(f'{v:.2f}' for v in values)} | {values.mean():.2f} ± {values.std():.2f}")


if __name__ == "__main__":
    main()
