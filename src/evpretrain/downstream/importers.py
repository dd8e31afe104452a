"""Foreign checkpoints into our backbones: the paper's released ViT / ConvViT / Swin, ECDP's ViT-S and MEM's ViT-B,
each through an explicit key map, so that any published checkpoint is evaluated under one protocol.

    backbone = create_backbone("vit_small_patch16", in_chans=2, patch_norm=False)
    report = import_checkpoint("ecdp_vits.pt", "ecdp_vit", backbone)
    print(report.summary())

A ``KeyMap`` per source says which keys are the backbone's, which are dropped on purpose and why (heads, decoders, a
momentum encoder, prefix tokens), which hold what our backbones cannot represent (a relative position bias, a learned
position embedding), how names map onto ours, and which exact rewrites apply (BEiT's q/v biases fused into one qkv
bias, its layer scale folded into the projections). An import that would leave a parameter of ours unfilled, skip a
tensor that is not dropped on purpose, or drop something unmappable is refused unless ``allow_partial=True``.
Files load with ``torch.load(weights_only=True)``: no code from a checkpoint ever runs.

Layouts, as the projects save them (read from their public code):
- the paper (BIT-Vision/EventPretrain, ``utils/misc.py`` ``save_model``): ``{"model", "optimizer", "epoch", "scaler",
  "args"}``, ``args`` an ``argparse.Namespace``; "model" holds ``backbone.*`` next to the reconstruction decoder,
  projector, predictor and queue (``main_finetune_cls.py`` also reads ``pretrain_encoder.*`` / ``finetune_encoder.*``).
  Block lists are ``vit_block``, ``conv_block1/2``, ``swin_block.<i>.blocks`` (GreenMIM's Swin: patch merging closes
  a stage, where timm's opens the next), the final norm ``norm_layer`` (``norm_l_h`` / ``norm_h`` in earlier saves),
  and the fixed sin-cos ``pos_embed`` is a saved parameter.
- ECDP (Yan98/Event-Camera-Data-Pre-training): pre-training ``{"checkpoint": encoder_q.*, encoder_k.*, pred1/2.*,
  to_event.*, head.*}``; fine-tuning ``{"model": timm VisionTransformer}`` with a (1, 2, D) ``cls_token``. Plain conv
  patch embedding on 2-channel histograms, two learned prefix tokens, fixed sin-cos positions.
- MEM (tum-vision/mem, BEiT): ``{"model": cls_token, mask_token, rel_pos_bias.relative_position_bias_table (shared),
  blocks.<i>.{attn.q_bias, attn.v_bias, gamma_1, gamma_2, ...}, norm, lm_head}, "args": Namespace}``; 2-channel
  histograms, no absolute position embedding.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from evpretrain.config import ConfigError
from evpretrain.models.pos_embed import sincos_pos_embed_2d

__all__ = [
    "KEY_MAPS",
    "CheckpointImportError",
    "ImportReport",
    "KeyMap",
    "Rewrite",
    "fixed_pos_embed",
    "fold_layer_scale",
    "fuse_qv_bias",
    "import_checkpoint",
    "known_sources",
    "map_state_dict",
    "read_state_dict",
]

# Where projects keep the weights inside a saved checkpoint, tried in this order; otherwise the top level.
STATE_DICT_CONTAINERS = ("model", "state_dict", "checkpoint", "module")

# MAE-style training scripts (the paper's, MEM's) save their argparse namespace beside the weights. It is plain
# attributes, so weights_only loading may rebuild it without running code from the file.
SAFE_GLOBALS = [argparse.Namespace]

# A saved fixed sin-cos table matches ours to float32 rounding; float16 rounds values in [-1, 1] by at most 4.9e-4.
FIXED_POS_EMBED_ATOL = 1e-3


class CheckpointImportError(ConfigError):
    """A checkpoint that cannot be imported as asked; the message names the file, the source and the offending keys
    (also in ``keys``). A ConfigError: the checkpoint does not fit the backbone the study config builds."""

    def __init__(self, path: str | PathLike | None, source: str, message: str, keys: Sequence[str] = ()):
        self.path = None if path is None else str(path)
        self.source = source
        self.keys = tuple(keys)
        self.reason = message
        super().__init__(f"{self.path or '<state dict>'} (source {source!r}): {message}")


@dataclass(frozen=True)
class Rewrite:
    """What a transform made of a state dict: the new state, and the keys it dropped or found unmappable, with why."""

    state: dict[str, Tensor]
    dropped: dict[str, str] = field(default_factory=dict)
    unmappable: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


Transform = Callable[[dict[str, Tensor], nn.Module], Rewrite]
Replacement = str | Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class KeyMap:
    """How one project's checkpoints map onto one of our backbones.

    Patterns are regular expressions matched in full against checkpoint keys once ``module.`` and the backbone prefix
    are removed; keys outside the backbone are matched as saved.

    backbone: how to build our matching backbone (shown in messages).
    backbone_prefixes: prefixes of the backbone's keys, by preference; a checkpoint with none is all backbone. Keys
        outside the chosen prefix are dropped.
    dropped: (pattern, reason) for tensors left out on purpose.
    unmappable: (pattern, reason) for tensors holding what our backbone cannot represent.
    renames: (pattern, replacement) onto our names, a ``re.Match.expand`` template or a function of the match; the
        first full match wins, other keys keep their names.
    transforms: rewrites of the renamed state, applied in order.
    initialised_ok: (pattern on our names, reason) for our parameters without a counterpart in the source, which keep
        their initialisation without making the import partial.
    preset: the registered backbone that holds the source's released checkpoints, which a study's checkpoint variant
        builds (``evpretrain.pipeline.plan``); None where the study's voxel-grid input does not fit the source.
    in_chans: the input channels (voxel-grid bins) of that backbone.
    norm_eps: (pattern on our module names, eps) of the source's LayerNorms, the first full match wins; each of our
        LayerNorms whose eps differs from its counterpart's is noted.
    """

    source: str
    description: str
    backbone: str
    backbone_prefixes: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    unmappable: tuple[tuple[str, str], ...] = ()
    renames: tuple[tuple[str, Replacement], ...] = ()
    transforms: tuple[Transform, ...] = ()
    initialised_ok: tuple[tuple[str, str], ...] = ()
    preset: str | None = None
    in_chans: int = 5
    norm_eps: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ImportReport:
    """What an import did (or would do). ``loaded``, ``missing``, ``shape_mismatches`` and ``kept_initialised`` use
    our names; ``dropped`` and ``unmappable`` checkpoint keys without ``module.`` and the backbone prefix (keys outside
    the backbone as saved); ``unexpected`` the checkpoint keys after renaming that no parameter of ours takes.
    ``shape_mismatches`` maps to (checkpoint shape, our shape)."""

    source: str
    path: str | None
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    dropped: dict[str, str]
    unmappable: dict[str, str]
    kept_initialised: dict[str, str]
    notes: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Every parameter of ours filled, every tensor of the checkpoint loaded or dropped on purpose."""
        return not (self.missing or self.unexpected or self.shape_mismatches or self.unmappable)

    @property
    def offending_keys(self) -> tuple[str, ...]:
        return (*self.unmappable, *self.missing, *self.unexpected, *self.shape_mismatches)

    def problems(self) -> list[str]:
        """One line per reason the import is partial."""
        lines = [f"unmappable {_abbreviate(keys)}: {reason}" for reason, keys in _by_reason(self.unmappable)]
        if self.missing:
            lines.append(f"missing from the checkpoint: {_abbreviate(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (no parameter of ours after renaming): {_abbreviate(self.unexpected)}")
        lines += [
            f"shape mismatch {key}: checkpoint {theirs}, backbone {ours}"
            for key, (theirs, ours) in self.shape_mismatches.items()
        ]
        return lines

    def summary(self) -> str:
        """A readable account: counts, what was dropped and why, the problems and the notes."""
        state = "complete" if self.complete else "PARTIAL"
        lines = [f"{self.source} checkpoint {self.path or '<state dict>'}: {len(self.loaded)} tensors loaded, {state}"]
        lines += [f"  dropped {_abbreviate(keys)}: {reason}" for reason, keys in _by_reason(self.dropped)]
        lines += [
            f"  kept as initialised {_abbreviate(keys)}: {reason}" for reason, keys in _by_reason(self.kept_initialised)
        ]
        lines += [f"  {line}" for line in self.problems()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --- transforms -----------------------------------------------------------------------------------------------------


def fuse_qv_bias(state: dict[str, Tensor], backbone: nn.Module) -> Rewrite:
    """BEiT's attention has a q and a v bias and no k bias; timm's one ``qkv.bias`` is [q_bias, 0, v_bias] (exact)."""
    state = dict(state)
    fused = 0
    for q_key in [key for key in state if key.endswith("attn.q_bias")]:
        stem = q_key.removesuffix("q_bias")
        if stem + "v_bias" not in state or stem + "qkv.bias" in state:
            continue  # left as it is: reported as unexpected
        q_bias, v_bias = state.pop(q_key), state.pop(stem + "v_bias")
        state[stem + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        fused += 1
    notes = (f"q_bias and v_bias fused into qkv.bias with a zero k bias in {fused} blocks (exact)",) if fused else ()
    return Rewrite(state, notes=notes)


# BEiT's layer-scale vector -> the linear layer whose output it scales.
_LAYER_SCALE_TARGETS = {"gamma_1": "attn.proj", "gamma_2": "mlp.fc2"}


def fold_layer_scale(state: dict[str, Tensor], backbone: nn.Module) -> Rewrite:
    """BEiT's layer scale folded into the linear layer it scales: gamma * (W h + b) = (diag(gamma) W) h + gamma b.

    The function is unchanged; fine-tuning then updates the folded weights, as there is no separate scale to train.
    """
    state = dict(state)
    folded = 0
    for key in [key for key in state if "." in key and key.rsplit(".", 1)[1] in _LAYER_SCALE_TARGETS]:
        stem, name = key.rsplit(".", 1)
        target = f"{stem}.{_LAYER_SCALE_TARGETS[name]}"
        if f"{target}.weight" not in state:
            continue  # left as it is: reported as unexpected
        gamma = state.pop(key)
        state[f"{target}.weight"] = gamma[:, None] * state[f"{target}.weight"]
        if f"{target}.bias" in state:
            state[f"{target}.bias"] = gamma * state[f"{target}.bias"]
        folded += 1
    notes = (
        (
            f"layer scale (gamma_1, gamma_2) folded into attn.proj and mlp.fc2: {folded} vectors, the same function; "
            "fine-tuning then trains the folded weights",
        )
        if folded
        else ()
    )
    return Rewrite(state, notes=notes)


def fixed_pos_embed(state: dict[str, Tensor], backbone: nn.Module, *, num_prefix_tokens: int = 0) -> Rewrite:
    """Check a saved absolute position embedding (1, num_prefix_tokens + gh * gw, D) against the fixed 2-D sin-cos
    table our ViTs compute themselves (a non-persistent buffer, so not loadable): dropped when it is that table,
    unmappable when it was learned. The rows of prefix tokens come first and go with the tokens."""
    if "pos_embed" not in state:
        return Rewrite(state)
    state = dict(state)
    table = state.pop("pos_embed")
    rows = table.reshape(-1, table.shape[-1])[num_prefix_tokens:].float()
    num_rows, dim = rows.shape
    side = math.isqrt(num_rows)
    if side * side != num_rows or dim % 4:
        return Rewrite(
            state,
            unmappable={
                "pos_embed": (
                    f"a learned position embedding of {num_rows} positions x {dim}; our backbone adds a fixed "
                    "2-D sin-cos embedding and cannot hold a learned one"
                )
            },
        )
    deviation = (rows - sincos_pos_embed_2d(dim, (side, side))).abs().max().item()
    if deviation > FIXED_POS_EMBED_ATOL:
        return Rewrite(
            state,
            unmappable={
                "pos_embed": (
                    f"a learned position embedding ({side}x{side} grid, up to {deviation:.3g} from the fixed "
                    "sin-cos table); our backbone adds the fixed table and cannot hold a learned one"
                )
            },
        )
    reason = f"the fixed 2-D sin-cos table of a {side}x{side} grid, which our backbone computes itself"
    grid = tuple(getattr(backbone, "grid_size", (side, side)))
    if grid != (side, side):
        reason += f" for its {grid[0]}x{grid[1]} grid"
    return Rewrite(state, dropped={"pos_embed": reason})


# --- key maps -------------------------------------------------------------------------------------------------------

# main_finetune_cls.py copies finetune_encoder.* and then pretrain_encoder.* into the backbone: the latter wins.
_PAPER_PREFIXES = ("backbone.", "pretrain_encoder.", "finetune_encoder.")
_PAPER_DROPPED = (
    (r"pretrain_rec_decoder\..*", "the stage-1 reconstruction decoder"),
    (r"emb_h_(proj|pred)\..*", "the stage-2/3 projector and predictor"),
    (r"(norm_clip_emb|clip_emb_proj)\..*", "the stage-2/3 image-token LayerNorm and projection"),
    (r"queue(_ptr)?", "the contrastive queue of image tokens"),
    (r"classify_head\..*", "a classification head"),
    (
        r"stage\d_output_decode\..*",
        "the stage-1 fusion convolutions bringing early stages to the last grid (ours "
        "are part of the pre-training head)",
    ),
    (r"fpn\..*", "the down-sampling neck of dense fine-tuning"),
)
_PAPER_NORM = (r"(norm_layer|norm_l_h|norm_h)\.(weight|bias)", r"norm.\2")

_ECDP_TOKENS = (
    "ECDP's two learned tokens (event, image) prepended to the patch tokens; our ViT has no prefix "
    "tokens, so its patch tokens no longer attend to them and are mean-pooled instead"
)
_BEIT_CLS = (
    "BEiT's class token; our ViT has no prefix token, so its patch tokens no longer attend to it and are "
    "mean-pooled instead"
)

KEY_MAPS: dict[str, KeyMap] = {
    keymap.source: keymap
    for keymap in (
        KeyMap(
            source="eventpretrain_vit",
            description="the paper's ViT-S/16 or ViT-B/16 (BIT-Vision/EventPretrain model/backbone/vit.py)",
            backbone="create_backbone('vit_small_patch16') or create_backbone('vit_base_patch16')",
            preset="vit_small_patch16",  # released: README.md, "Pre-trained Checkpoints"; 5 bins (main_pretrain.py:117)
            backbone_prefixes=_PAPER_PREFIXES,
            dropped=_PAPER_DROPPED,
            renames=((r"vit_block\.(\d+)\.(.*)", r"blocks.\1.\2"), _PAPER_NORM),
            transforms=(fixed_pos_embed,),
            # model/sub_module/vit_block.py:57 (patch embedding, torch's default); model/backbone/vit.py:163
            norm_eps=((r"patch_embed\.norm", 1e-5), (r".*", 1e-6)),
        ),
        KeyMap(
            source="eventpretrain_convvit",
            description="the paper's ConvViT-S or ConvViT-B (BIT-Vision/EventPretrain model/backbone/convvit.py)",
            backbone="create_backbone('convvit_small') or create_backbone('convvit_base')",
            preset="convvit_small",  # released: README.md, "Pre-trained Checkpoints"; 5 bins (main_pretrain.py:117)
            backbone_prefixes=_PAPER_PREFIXES,
            dropped=_PAPER_DROPPED,
            renames=((r"conv_block([12])\.(.*)", r"blocks\1.\2"), (r"vit_block\.(.*)", r"blocks3.\1"), _PAPER_NORM),
            transforms=(fixed_pos_embed,),
            # model/sub_module/conv_block.py:28,36 and vit_block.py:57 (torch's default); model/backbone/convvit.py:214
            norm_eps=((r"patch_embed\d\.norm|blocks[12]\.\d+\.norm[12]", 1e-5), (r".*", 1e-6)),
        ),
        KeyMap(
            source="eventpretrain_swin",
            description="the paper's Swin-T, GreenMIM's layout (BIT-Vision/EventPretrain model/backbone/swin.py)",
            backbone="create_backbone('swin_tiny')",
            preset="swin_tiny",  # released: README.md, "Pre-trained Checkpoints"; 5 bins (main_pretrain.py:117)
            backbone_prefixes=_PAPER_PREFIXES,
            dropped=(
                *_PAPER_DROPPED,
                (
                    r"swin_block\.\d+\.blocks\.\d+\.attn\.relative_position_index",
                    "an index buffer derived from the window size, which our Swin computes itself",
                ),
            ),
            renames=(
                (r"swin_block\.(\d+)\.blocks\.(.*)", r"stages.\1.blocks.\2"),
                # GreenMIM merges patches at the end of stage i; timm at the start of stage i + 1.
                (r"swin_block\.(\d+)\.downsample\.(.*)", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}"),
                _PAPER_NORM,
            ),
            initialised_ok=(
                (
                    r"mask_token",
                    "our SimMIM mask token, used only under a mask; the paper's Swin drops hidden patches instead",
                ),
            ),
            norm_eps=((r".*", 1e-6),),  # every norm: model/backbone/swin.py:44,299
        ),
        KeyMap(
            source="ecdp_vit",
            description="ECDP's ViT-S/16 (Yang et al., ICCV 2023; Yan98/Event-Camera-Data-Pre-training)",
            backbone="create_backbone('vit_small_patch16', in_chans=2, patch_norm=False)",
            backbone_prefixes=("encoder_q.",),
            dropped=(
                (r"encoder_k\..*", "the momentum (key) encoder, a moving average of encoder_q"),
                (r"pred[12]\..*", "the MoCo-v3 predictors"),
                (r"to_event\..*", "the projection of the CLIP embedding"),
                (r"(event_head|image_head)\..*", "the contrastive projection heads"),
                (r"head\..*", "the classification head on the two tokens"),
                (r"tokens|cls_token", _ECDP_TOKENS),
            ),
            transforms=(fixed_pos_embed,),
            norm_eps=((r".*", 1e-6),),
        ),
        KeyMap(
            source="mem_vit",
            description="MEM's BEiT ViT-B/16 (Klenk et al., WACV 2024; tum-vision/mem)",
            backbone="create_backbone('vit_base_patch16', in_chans=2, patch_norm=False)",
            dropped=(
                (r"cls_token", _BEIT_CLS),
                (r"mask_token", "BEiT's mask token, used only under a mask in pre-training"),
                (r"lm_head\..*", "the visual-token prediction head of pre-training"),
                (r"head\..*", "a classification head"),
                (r"(rel_pos_bias|blocks\.\d+\.attn)\.relative_position_index", "an index buffer derived from the grid"),
            ),
            unmappable=(
                (
                    r"rel_pos_bias\.relative_position_bias_table",
                    "BEiT's relative position bias shared by all blocks: our ViT has no attention bias, and MEM has no "
                    "absolute position embedding, so this is all it knows of position",
                ),
                (
                    r"blocks\.\d+\.attn\.relative_position_bias_table",
                    "a per-block relative position bias: our ViT has no attention bias",
                ),
                (
                    r"fc_norm\.(weight|bias)",
                    "a LayerNorm of the mean-pooled token (BEiT fine-tuning); "
                    "ours normalises each token before pooling",
                ),
            ),
            transforms=(fuse_qv_bias, fold_layer_scale, partial(fixed_pos_embed, num_prefix_tokens=1)),
            norm_eps=((r".*", 1e-6),),
        ),
    )
}


def known_sources() -> list[str]:
    """The names ``import_checkpoint`` accepts as ``source``, sorted."""
    return sorted(KEY_MAPS)


# --- reading, mapping, importing ------------------------------------------------------------------------------------


def read_state_dict(path: str | PathLike, source: str = "unknown") -> dict[str, Tensor]:
    """The weights of a checkpoint file, loaded onto the CPU with ``weights_only=True``, found under "model",
    "state_dict", "checkpoint" or "module", else at the top level. ``source`` names the project in errors."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointImportError(
                path,
                source,
                (
                    f"torch.load(weights_only=True) refuses it: it holds a pickled {found[1]}, which only "
                    "weights_only=False could rebuild, by running code named in the file. If you trust the file, load "
                    "it once with weights_only=False and save its state dict alone with torch.save"
                ),
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        raise CheckpointImportError(
            path,
            source,
            f"torch.load(weights_only=True) cannot read it: {detail[1] if detail else str(error).splitlines()[0]}",
        ) from None
    state = _find_state_dict(checkpoint)
    if state is None:
        layout = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointImportError(
            path,
            source,
            (
                f"found no state dict (names to tensors) under any of {list(STATE_DICT_CONTAINERS)} "
                f"or at the top level; the file holds {layout}"
            ),
        )
    return state


def map_state_dict(
    state: Mapping[str, Tensor], keymap: KeyMap, backbone: nn.Module, *, path: str | PathLike | None = None
) -> tuple[dict[str, Tensor], ImportReport]:
    """The tensors of a source's ``state`` renamed onto ``backbone``'s parameters, only those that fit, and the report.

    Nothing is loaded; ``path`` only names the file in the report and in errors. Raises CheckpointImportError when two
    checkpoint keys map onto one name.
    """
    state = {key.removeprefix("module."): value for key, value in state.items()}
    inside, dropped = _split_backbone(state, keymap)
    renamed: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unmappable: dict[str, str] = {}
    for key, value in inside.items():
        if (reason := _first_match(keymap.dropped, key)) is not None:
            dropped[key] = reason
        elif (reason := _first_match(keymap.unmappable, key)) is not None:
            unmappable[key] = reason
        else:
            name = _rename(keymap.renames, key)
            if name in renamed:
                raise CheckpointImportError(
                    path, keymap.source, f"{origin[name]} and {key} both map onto {name}", keys=(origin[name], key)
                )
            renamed[name], origin[name] = value, key
    notes: list[str] = []
    for transform in keymap.transforms:
        rewrite = transform(renamed, backbone)
        renamed = rewrite.state
        dropped |= rewrite.dropped
        unmappable |= rewrite.unmappable
        notes += rewrite.notes

    ours = backbone.state_dict()
    fitting = {key: value for key, value in renamed.items() if key in ours and value.shape == ours[key].shape}
    mismatches = {
        key: (tuple(value.shape), tuple(ours[key].shape))
        for key, value in renamed.items()
        if key in ours and value.shape != ours[key].shape
    }
    absent = [key for key in ours if key not in renamed]
    kept = {key: reason for key in absent if (reason := _first_match(keymap.initialised_ok, key)) is not None}
    notes += _eps_notes(keymap, backbone)
    report = ImportReport(
        source=keymap.source,
        path=None if path is None else str(path),
        loaded=tuple(fitting),
        missing=tuple(key for key in absent if key not in kept),
        unexpected=tuple(key for key in renamed if key not in ours),
        shape_mismatches=mismatches,
        dropped=dropped,
        unmappable=unmappable,
        kept_initialised=kept,
        notes=tuple(notes),
    )
    return fitting, report


def import_checkpoint(
    path: str | PathLike, source: str, backbone: nn.Module, *, allow_partial: bool = False
) -> ImportReport:
    """Load the checkpoint file ``path`` of project ``source`` (one of ``known_sources()``) into ``backbone``.

    Raises CheckpointImportError, leaving ``backbone`` untouched, for an unknown source, a file that
    ``torch.load(weights_only=True)`` refuses, and, unless ``allow_partial``, an import that is not complete
    (``ImportReport.complete``). With ``allow_partial`` every tensor that fits is loaded and the rest of ``backbone``
    keeps its initialisation; the report lists what was left out.
    """
    if source not in KEY_MAPS:
        raise CheckpointImportError(path, source, f"unknown source; known sources: {', '.join(known_sources())}")
    keymap = KEY_MAPS[source]
    state, report = map_state_dict(read_state_dict(path, source), keymap, backbone, path=path)
    if not report.complete and not allow_partial:
        raise CheckpointImportError(
            path,
            source,
            (
                f"refusing a partial import into {type(backbone).__name__} ({len(report.loaded)} tensors would load): "
                + "; ".join(report.problems())
                + f". {keymap.description} corresponds to {keymap.backbone}; pass allow_partial=True to load what fits "
                "and keep the rest as initialised"
            ),
            keys=report.offending_keys,
        )
    backbone.load_state_dict(state, strict=False)  # the report already accounts for every key left out
    return report


def _find_state_dict(checkpoint: object) -> dict[str, Tensor] | None:
    if not isinstance(checkpoint, Mapping):
        return None
    container = next(
        (checkpoint[key] for key in STATE_DICT_CONTAINERS if isinstance(checkpoint.get(key), Mapping)), checkpoint
    )
    if container and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in container.items()):
        return dict(container)
    return None


def _split_backbone(state: dict[str, Tensor], keymap: KeyMap) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(the backbone's tensors with their prefix removed, {key outside the backbone: why it is dropped})."""
    prefix = next((p for p in keymap.backbone_prefixes if any(key.startswith(p) for key in state)), None)
    if prefix is None:
        return dict(state), {}
    inside = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    outside = {
        key: _first_match(keymap.dropped, key) or f"not part of the backbone, which is read from {prefix}*"
        for key in state
        if not key.startswith(prefix)
    }
    return inside, outside


def _eps_notes(keymap: KeyMap, backbone: nn.Module) -> list[str]:
    """One note per (source eps, our eps) pair that differs, naming our LayerNorms concerned."""
    differing: dict[tuple[float, float], list[str]] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.LayerNorm) and (eps := _first_match(keymap.norm_eps, name)) is not None:
            if module.eps != eps:
                differing.setdefault((eps, module.eps), []).append(name)
    return [
        f"{len(names)} LayerNorms of ours ({_abbreviate(names)}) have eps {ours:g} where the source's have "
        f"{theirs:g}: outputs differ slightly (a relative change of about the eps difference over the token "
        "variance per norm)"
        for (theirs, ours), names in differing.items()
    ]


def _first_match(rules: Sequence[tuple[str, Any]], key: str) -> Any:
    return next((reason for pattern, reason in rules if re.fullmatch(pattern, key)), None)


def _rename(renames: Sequence[tuple[str, Replacement]], key: str) -> str:
    for pattern, replacement in renames:
        if match := re.fullmatch(pattern, key):
            return match.expand(replacement) if isinstance(replacement, str) else replacement(match)
    return key


def _by_reason(entries: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for key, reason in entries.items():
        groups.setdefault(reason, []).append(key)
    return list(groups.items())


def _abbreviate(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
