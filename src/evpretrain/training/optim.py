"""AdamW with MAE's parameter groups, the linear lr scaling rule, layer-wise lr scales and the cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from evpretrain.training.config import TrainConfig

# Fixed or learned position embeddings are a lookup table, not a weight to shrink (timm's ``no_weight_decay``).
NO_WEIGHT_DECAY_NAMES = ("pos_embed",)
GRAFTED_SCALES = (0.01, 0.1, 1.0)


def peak_lr(config: TrainConfig, world_size: int = 1) -> float:
    """``base_lr * batch_size * world_size / 256``: the linear scaling rule on the global batch."""
    return config.base_lr * config.batch_size * world_size / 256


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, base: float, minimum: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based), as MAE's ``adjust_learning_rate`` but per step.

    Linear warm-up from 0 to ``base`` over ``warmup_steps``, then a half cosine from ``base`` down to ``minimum``
    at ``total_steps``.
    """
    if step < warmup_steps:
        return base * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    lr_scales: Mapping[str, float] | None = None,
    no_weight_decay: Iterable[str] = NO_WEIGHT_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr scale, decayed or not), as timm's ``param_groups_weight_decay``.

    No weight decay on biases, on 1-D parameters (norm weights) and on parameters whose full name or last name
    component is in ``no_weight_decay`` (or in the model's own timm-style ``no_weight_decay()``).
    ``lr_scales`` maps a parameter name to its learning-rate factor (missing: 1.0), e.g. from ``layer_scales``.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = set(no_weight_decay)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip or name.rsplit(".", 1)[-1] in skip)
        scale = float(lr_scales.get(name, 1.0)) if lr_scales is not None else 1.0
        group = groups.setdefault(
            (scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(
    model_or_groups: nn.Module | Iterable[Mapping[str, Any]],
    config: TrainConfig,
    world_size: int = 1,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW(``config.betas``) at the peak lr of ``world_size`` processes, with the kernels of
    ``optimizer_kernels(config.optimizer_impl, device_type)`` (``device_type``: where the parameters live).

    A module gets ``param_groups(model, config.weight_decay)``; explicit groups keep their own ``weight_decay``
    and ``lr_scale`` (defaults: ``config.weight_decay`` and 1.0). Each group's lr is the schedule's value times
    its ``lr_scale``; the ``lr_scale`` key stays in the group for the loop's schedule to read.
    """
    if isinstance(model_or_groups, nn.Module):
        groups = param_groups(model_or_groups, config.weight_decay)
    else:
        groups = [dict(group) for group in model_or_groups]
    base = peak_lr(config, world_size)
    for group in groups:
        group.setdefault("weight_decay", config.weight_decay)
        group["lr_scale"] = float(group.get("lr_scale", 1.0))
        group["lr"] = base * group["lr_scale"]
    impl = optimizer_kernels(config.optimizer_impl, device_type)
    return torch.optim.AdamW(
        groups,
        lr=base,
        betas=config.betas,
        weight_decay=config.weight_decay,
        foreach=impl == "foreach",
        fused=impl == "fused",
    )


def optimizer_kernels(impl: Literal["auto", "foreach", "fused"], device_type: str) -> Literal["foreach", "fused"]:
    """The AdamW kernels ``impl`` means on ``device_type`` ("cuda", "cpu"): "auto" is fused on CUDA, else foreach."""
    if impl == "auto":
        return "fused" if device_type == "cuda" else "foreach"
    if impl not in ("foreach", "fused"):
        raise ValueError(f"optimizer_impl must be one of auto, foreach, fused, got {impl!r}")
    return impl


def layer_scales(
    module: nn.Module,
    rule: Literal["none", "decay", "grafted"],
    decay: float = 0.75,
    *,
    grafted: tuple[float, float, float] = GRAFTED_SCALES,
    grafted_groups: Literal["blocks_of_4", "thirds"] = "blocks_of_4",
) -> dict[str, float]:
    """Learning-rate factor of each parameter of ``module``, a model around a ``backbone``, by its layer.

    The layer ``l`` is the backbone's own ``layer_id``: 0 for the input embedding, the blocks from 1 to ``depth``
    (``depth = backbone.num_layers - 2``), ``depth + 1`` for the final norm; the parameters outside the backbone
    (heads, projectors, decoders) count as the top layer, ``depth + 1``.

    - ``"none"``: 1.0 everywhere.
    - ``"decay"`` (MAE's ``lr_decay.py``, fine-tuning): ``decay ** (depth + 1 - l)``: the embeddings get
      ``decay ** (depth + 1)``, block ``i`` gets ``decay ** (depth - i)``, the final norm and heads 1.0.
    - ``"grafted"`` (layer-grafted pre-training), factors ``grafted`` = (0.01, 0.1, 1.0) by group 0, 1, 2:
      ``grafted_groups="blocks_of_4"`` is the paper's ``utils/lr_decay.py`` (``get_layer_id_for_vit``): plain
      transformer block ``i`` (ViT ``blocks.i``, ConvViT ``blocks3.i``: their ``vit_block.i``) in group
      ``min(i // 4, 2)``; everything before those blocks (patch embeddings, positions, ConvViT's conv stages) in
      group 0; everything after (final norm, heads, decoders, projectors) in group 2. A backbone without plain
      blocks (Swin, ``backbone.vit_layer`` None) has its input embedding in group 0 and the rest in group 2, as
      theirs. ``"thirds"`` (ours before) splits all the blocks by depth, block ``i`` in ``floor(3 i / depth)``,
      the embeddings with the first third, everything after the blocks with the last.
    """
    backbone = module.backbone
    top = backbone.num_layers - 1
    ids = {
        name: backbone.layer_id(name.removeprefix("backbone.")) if name.startswith("backbone.") else top
        for name, _ in module.named_parameters()
    }
    if rule == "grafted" and grafted_groups == "blocks_of_4":
        first = backbone.vit_layer
        return {name: float(grafted[_group_of_4(layer, first, top)]) for name, layer in ids.items()}
    if rule == "grafted" and grafted_groups != "thirds":
        raise ValueError(f"unknown grafted_groups {grafted_groups!r}; expected 'blocks_of_4' or 'thirds'")
    return _scales_for_layers(ids, top - 1, rule, decay, grafted)


def _group_of_4(layer: int, first: int | None, top: int) -> int:
    """The paper's grafted group of layer id ``layer``: 0 before the plain block at layer ``first``, then
    ``(layer - first) // 4`` up to 2; the top layer (final norm, heads) 2. Without plain blocks: 0 for the input
    embedding (layer 0), else 2."""
    if first is None:
        return 0 if layer == 0 else 2
    if layer >= top:
        return 2
    return min(max(layer - first, 0) // 4, 2)


def _scales_for_layers(
    ids: Mapping[str, int],
    depth: int,
    rule: Literal["none", "decay", "grafted"],
    decay: float,
    grafted: tuple[float, float, float],
) -> dict[str, float]:
    """``layer_scales`` of layer ids in [0, depth + 1]; ``grafted`` by thirds of the depth."""
    if rule == "none":
        return {name: 1.0 for name in ids}
    if rule == "decay":
        return {name: decay ** (depth + 1 - layer) for name, layer in ids.items()}
    if rule == "grafted":

        def third(layer: int) -> int:
            if layer == 0:
                return 0
            if layer > depth:
                return 2
            return 3 * (layer - 1) // depth

        return {name: float(grafted[third(layer)]) for name, layer in ids.items()}
    raise ValueError(f"unknown layer-scale rule {rule!r}; expected 'none', 'decay' or 'grafted'")
