"""Foreign-checkpoint import: state dicts laid out as the paper's, ECDP's and MEM's code saves them (names and shapes,
random values, small sizes), imported into our backbones, then checked against faithful re-implementations of each
source's forward pass on the same weights; refusal of partial imports, the report, and weights-only loading."""

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from paper_layout import CHECKPOINTS, LAYOUT, their_keys, their_name
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from evpretrain.config import ConfigError
from evpretrain.downstream.importers import (
    CheckpointImportError,
    fixed_pos_embed,
    import_checkpoint,
    known_sources,
)
from evpretrain.models import ConvViT, SwinBackbone, VisionTransformer, create_backbone

DIM, DEPTH, HEADS, IMG, PATCH = 64, 2, 2, 32, 8  # ViTs: a 4x4 token grid
GRID = IMG // PATCH
ATOL = 1e-5


# --- source layouts ---------------------------------------------------------------------------------------------


def vit_block_shapes(prefix, dim, *, beit=False):
    """One transformer block as timm / MAE name it; BEiT's adds q and v biases (no qkv bias) and layer scale."""
    shapes = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    shapes |= (
        {"attn.q_bias": (dim,), "attn.v_bias": (dim,), "gamma_1": (dim,), "gamma_2": (dim,)}
        if beit
        else {"attn.qkv.bias": (3 * dim,)}
    )
    return {prefix + name: shape for name, shape in shapes.items()}


def conv_block_shapes(prefix, dim):
    """ConvMAE's block as the paper names it (model/sub_module/conv_block.py)."""
    shapes = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "conv1.weight": (dim, dim, 1, 1),
        "conv1.bias": (dim,),
        "attn.weight": (dim, 1, 5, 5),
        "attn.bias": (dim,),
        "conv2.weight": (dim, dim, 1, 1),
        "conv2.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim, 1, 1),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim, 1, 1),
        "mlp.fc2.bias": (dim,),
    }
    return {prefix + name: shape for name, shape in shapes.items()}


def patch_embed_shapes(prefix, in_chans, dim, stride, *, norm=True):
    shapes = {"proj.weight": (dim, in_chans, stride, stride), "proj.bias": (dim,)}
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)} if norm else {}
    return {prefix + name: shape for name, shape in shapes.items()}


def random_state(shapes, seed):
    """Random float tensors of the given shapes; norm and layer-scale weights near 1, the rest small."""
    generator = torch.Generator().manual_seed(seed)
    near_one = ("norm.weight", "norm1.weight", "norm2.weight", "norm_layer.weight", "gamma_1", "gamma_2")
    return {
        name: (1.0 if name.endswith(near_one) else 0.0) + 0.2 * torch.randn(shape, generator=generator)
        for name, shape in shapes.items()
    }


def mae_sincos(dim, side):
    """(1, side * side, dim): MAE's get_2d_sincos_pos_embed as ECDP and the paper compute it, in numpy float64."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64)))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    halves = []
    for coordinate in grid:  # the column coordinate first, as MAE's meshgrid(w, h) puts it
        angles = np.einsum("m,d->md", coordinate.reshape(-1), omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()[None]


def paper_vit_state(seed=0):
    """model/backbone/vit.py's state dict: vit_block, norm_layer, the fixed pos_embed saved as a parameter."""
    shapes = patch_embed_shapes("patch_embed.", 5, DIM, PATCH)
    for i in range(DEPTH):
        shapes |= vit_block_shapes(f"vit_block.{i}.", DIM)
    state = random_state(shapes | {"norm_layer.weight": (DIM,), "norm_layer.bias": (DIM,)}, seed)
    return state | {"pos_embed": mae_sincos(DIM, GRID)}


def paper_pretraining_heads(seed=1):
    """What PrHubModel keeps beside its backbone in stage 1 + 3 (rec+con): decoder, projector, predictor, queue."""
    shapes = {
        "pretrain_rec_decoder.patch_embed.weight": (32, DIM),
        "pretrain_rec_decoder.patch_embed.bias": (32,),
        "pretrain_rec_decoder.mask_token": (1, 1, 32),
        "pretrain_rec_decoder.pos_embed": (1, GRID**2, 32),
        "pretrain_rec_decoder.norm.weight": (32,),
        "pretrain_rec_decoder.norm.bias": (32,),
        "pretrain_rec_decoder.pred.weight": (PATCH**2, 32),
        "pretrain_rec_decoder.pred.bias": (PATCH**2,),
        "emb_h_proj.0.weight": (128, DIM),
        "emb_h_proj.1.weight": (128,),
        "emb_h_proj.1.bias": (128,),
        "emb_h_proj.1.running_mean": (128,),
        "emb_h_proj.1.running_var": (128,),
        "emb_h_pred.0.weight": (128, DIM),
        "norm_clip_emb.weight": (48,),
        "norm_clip_emb.bias": (48,),
        "clip_emb_proj.weight": (DIM, 48),
        "queue": (DIM, GRID**2, 16),
    }
    shapes |= vit_block_shapes("pretrain_rec_decoder.vit_block.0.", 32)
    return random_state(shapes, seed) | {
        "emb_h_proj.1.num_batches_tracked": torch.tensor(7),
        "queue_ptr": torch.zeros(1, dtype=torch.long),
    }


def paper_checkpoint(model_state):
    """utils/misc.py save_model: the argparse namespace travels with the weights."""
    return {
        "model": model_state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 99,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(
            backbone_type="vit",
            model_size="small",
            num_bins=5,
            blr=1.5e-4,
            output_dir="results/pretrain",
            use_queue=True,
        ),
    }


def ecdp_encoder_state(seed=2):
    """ECDP's OursModel encoder (ours_model_pretrain.py): timm PatchEmbed without norm, two tokens, fixed pos_embed."""
    shapes = patch_embed_shapes("patch_embed.", 2, DIM, PATCH, norm=False)
    for i in range(DEPTH):
        shapes |= vit_block_shapes(f"blocks.{i}.", DIM)
    shapes |= {
        "tokens": (1, 2, DIM),
        "norm.weight": (DIM,),
        "norm.bias": (DIM,),
        "event_head.weight": (32, DIM),
        "event_head.bias": (32,),
        "image_head.weight": (32, DIM),
        "image_head.bias": (32,),
    }
    return random_state(shapes, seed) | {"pos_embed": mae_sincos(DIM, GRID)}


def ecdp_pretraining_checkpoint(encoder):
    """trainer/pr_trainer.py save: {"checkpoint": hub state, "optimizer"}; encoder_k is a momentum copy."""
    hub = {f"encoder_q.{k}": v for k, v in encoder.items()} | {f"encoder_k.{k}": v + 0.01 for k, v in encoder.items()}
    hub |= random_state(
        {
            "pred1.0.weight": (64, 32),
            "pred1.1.running_mean": (64,),
            "pred2.0.weight": (64, 32),
            "to_event.0.weight": (32, 48),
            "head.0.weight": (2 * DIM,),
            "head.0.bias": (2 * DIM,),
            "head.1.weight": (10, 2 * DIM),
            "head.1.bias": (10,),
        },
        seed=3,
    )
    return {"checkpoint": hub, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}


def mem_state(seed=4, vocab=32):
    """MEM's BEiT pre-training model (modeling_pretrain.py): shared relative position bias, no absolute positions."""
    shapes = patch_embed_shapes("patch_embed.", 2, DIM, PATCH, norm=False)
    for i in range(DEPTH):
        shapes |= vit_block_shapes(f"blocks.{i}.", DIM, beit=True)
    shapes |= {
        "cls_token": (1, 1, DIM),
        "mask_token": (1, 1, DIM),
        "norm.weight": (DIM,),
        "norm.bias": (DIM,),
        "rel_pos_bias.relative_position_bias_table": ((2 * GRID - 1) ** 2 + 3, HEADS),
        "lm_head.weight": (vocab, DIM),
        "lm_head.bias": (vocab,),
    }
    index = torch.zeros(GRID**2 + 1, GRID**2 + 1, dtype=torch.long)  # an integer buffer; its values do not matter
    return random_state(shapes, seed) | {"rel_pos_bias.relative_position_index": index}


# The paper's released checkpoints: which importer and which of our presets take each backbone.
RELEASED = {
    "vit": ("eventpretrain_vit", "vit_small_patch16"),
    "convvit": ("eventpretrain_convvit", "convvit_small"),
    "swin": ("eventpretrain_swin", "swin_tiny"),
}
# Buffers of their PrHubModel (no optimizer state): the queue, BatchNorm statistics, Swin's index tables.
THEIR_BUFFERS = r"queue(_ptr)?|.*\.(running_mean|running_var|num_batches_tracked|relative_position_index)"


def released_checkpoint(name, seed=0):
    """A released checkpoint (tests/paper_layout.py names) exactly as utils/misc.py save_model (:353-359) writes it:
    {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch", "scaler":
    loss_scaler.state_dict(), "args": the argparse Namespace of main_pretrain.py as main() completes it (:182,325)}.

    Every key of their state dict at its dtype and shape: the backbone's floats random, its pos_embed the fixed sin-cos
    table; everything else (decoder, projector, predictor, queue, index buffers) zeros expanded to its shape, which
    torch.save stores as one element. The AdamW state likewise."""
    kind, phase = name.split("_", 1)
    generator = torch.Generator().manual_seed(seed)
    model = {}
    for key, (dtype, shape) in their_keys(name).items():
        if key == "backbone.pos_embed":
            model[key] = mae_sincos(shape[-1], math.isqrt(shape[1]))
        elif key.startswith("backbone.") and dtype == "float32" and not re.fullmatch(THEIR_BUFFERS, key):
            model[key] = torch.randn(shape, generator=generator)
        else:
            model[key] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
    frozen = set(LAYOUT["frozen"][name])
    params = [k for k, v in model.items() if v.is_floating_point() and not re.fullmatch(THEIR_BUFFERS, k)]
    trainable = [k for k in params if k not in frozen]
    args = argparse.Namespace(**LAYOUT["args"])
    args.backbone_type, args.pr_phase = kind, "rec" if phase == "mm" else "con"
    args.use_layer_decay = args.use_layer_grafted = args.use_checkpoint = phase != "mm"
    args.output_dir = os.path.join(args.output_root_path, "pretrain", args.exp_name)
    args.lr = args.blr * args.batch_size / 256
    groups = [
        {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd, "amsgrad": False, "maximize": False,
         "foreach": None, "capturable": False, "differentiable": False, "fused": None, "lr_scale": 1.0,
         "params": [i for i, k in enumerate(trainable) if (model[k].ndim == 1) == (wd == 0.0)]}
        for wd in (0.05, 0.0)
    ]  # fmt: skip
    zeros = {k: torch.zeros(()).expand(model[k].shape) for k in trainable}
    state = {
        i: {"step": torch.tensor(3.0), "exp_avg": zeros[k], "exp_avg_sq": zeros[k]} for i, k in enumerate(trainable)
    }
    return {
        "model": model,
        "optimizer": {"state": state, "param_groups": groups},
        "epoch": 3,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "args": args,
    }  # fmt: skip


def save(tmp_path, checkpoint, name="checkpoint.pth"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


# --- reference forward passes, read off each source's code ----------------------------------------------------------


def layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def channel_norm(x, state, name, eps=1e-5):
    """nn.LayerNorm over the channels of (B, C, H, W), as the paper applies it through permutes."""
    return layer_norm(x.permute(0, 2, 3, 1), state, name, eps).permute(0, 3, 1, 2)


def linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, bias=None):
    """softmax(q k^T / sqrt(d_head) + bias) v over tokens (B, N, D), heads concatenated, then the output projection."""
    b, n, d = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5
    if bias is not None:
        logits = logits + bias
    return F.linear((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d), proj_weight, proj_bias)


def mlp(x, state, prefix):
    return linear(F.gelu(linear(x, state, prefix + "fc1")), state, prefix + "fc2")


def vit_block(x, state, p, num_heads, eps=1e-6):
    x = x + attention(
        layer_norm(x, state, p + "norm1", eps),
        state[p + "attn.qkv.weight"],
        state[p + "attn.qkv.bias"],
        state[p + "attn.proj.weight"],
        state[p + "attn.proj.bias"],
        num_heads,
    )
    return x + mlp(layer_norm(x, state, p + "norm2", eps), state, p + "mlp.")


def paper_patch_embed(x, state, prefix, stride):
    """The paper's PatchEmbed: strided conv, LayerNorm over channels (eps 1e-5), GELU."""
    x = F.conv2d(x, state[prefix + "proj.weight"], state[prefix + "proj.bias"], stride=stride)
    return F.gelu(channel_norm(x, state, prefix + "norm"))


def paper_vit_forward(state, x):
    """model/backbone/vit.py, unmasked: the normed last-block tokens (B, N, D)."""
    tokens = paper_patch_embed(x, state, "patch_embed.", PATCH).flatten(2).transpose(1, 2) + state["pos_embed"]
    for i in range(DEPTH):
        tokens = vit_block(tokens, state, f"vit_block.{i}.", HEADS)
    return layer_norm(tokens, state, "norm_layer", 1e-6)


def paper_conv_block(x, state, p):
    """model/sub_module/conv_block.py: x + conv2(depthwise5x5(conv1(norm1 x))), then x + a 1x1-conv MLP."""
    h = F.conv2d(channel_norm(x, state, p + "norm1"), state[p + "conv1.weight"], state[p + "conv1.bias"])
    h = F.conv2d(h, state[p + "attn.weight"], state[p + "attn.bias"], padding=2, groups=x.shape[1])
    x = x + F.conv2d(h, state[p + "conv2.weight"], state[p + "conv2.bias"])
    h = F.gelu(F.conv2d(channel_norm(x, state, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
    return x + F.conv2d(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])


def paper_convvit_forward(state, x, strides, depths, num_heads):
    """model/backbone/convvit.py, unmasked."""
    for stage in (1, 2):
        x = paper_patch_embed(x, state, f"patch_embed{stage}.", strides[stage - 1])
        for i in range(depths[stage - 1]):
            x = paper_conv_block(x, state, f"conv_block{stage}.{i}.")
    tokens = paper_patch_embed(x, state, "patch_embed3.", strides[2]).flatten(2).transpose(1, 2)
    tokens = linear(tokens, state, "patch_embed4") + state["pos_embed"]
    for i in range(depths[2]):
        tokens = vit_block(tokens, state, f"vit_block.{i}.", num_heads)
    return layer_norm(tokens, state, "norm_layer", 1e-6)


def shifted_window_bias(table, height, width, window, shift):
    """(heads, N, N) attention bias over all N = height * width tokens: the relative position bias between tokens of
    one window, -inf across windows. Windows are shifted by ``shift`` without wrapping, as GreenMIM groups tokens."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    cell = (coords + (window - shift) % window) // window
    window_id = cell[:, 0] * (width + window) + cell[:, 1]
    relative = coords[:, None, :] - coords[None, :, :] + window - 1
    index = (relative[..., 0] * (2 * window - 1) + relative[..., 1]).clamp(0, table.shape[0] - 1)
    return table[index].permute(2, 0, 1).masked_fill(window_id[:, None] != window_id[None, :], float("-inf"))


def paper_swin_forward(state, x, patch, num_heads, window, eps):
    """model/backbone/swin.py with GreenMIM's blocks (model/sub_module/swin_block.py), unmasked: attention within
    (shifted) windows, patch merging [x0, x1, x2, x3] closing every stage but the last, final norm."""
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    b, _, height, width = x.shape
    x = layer_norm(x.flatten(2).transpose(1, 2), state, "patch_embed.norm", eps)
    for stage, heads in enumerate(num_heads):
        size, shift = (min(height, width), 0) if min(height, width) <= window else (window, window // 2)
        block = 0
        while (p := f"swin_block.{stage}.blocks.{block}.") + "norm1.weight" in state:
            bias = shifted_window_bias(
                state[p + "attn.relative_position_bias_table"], height, width, size, shift if block % 2 else 0
            )
            x = x + attention(
                layer_norm(x, state, p + "norm1", eps),
                state[p + "attn.qkv.weight"],
                state[p + "attn.qkv.bias"],
                state[p + "attn.proj.weight"],
                state[p + "attn.proj.bias"],
                heads,
                bias,
            )
            x = x + mlp(layer_norm(x, state, p + "norm2", eps), state, p + "mlp.")
            block += 1
        merge = f"swin_block.{stage}.downsample."
        if merge + "reduction.weight" in state:
            cells = x.reshape(b, height // 2, 2, width // 2, 2, -1)
            x = torch.cat([cells[:, :, 0, :, 0], cells[:, :, 1, :, 0], cells[:, :, 0, :, 1], cells[:, :, 1, :, 1]], -1)
            height, width = height // 2, width // 2
            x = linear(
                layer_norm(x.reshape(b, height * width, -1), state, merge + "norm", eps), state, merge + "reduction"
            )
    return layer_norm(x, state, "norm_layer", eps)


def beit_forward_without_position_bias(state, tokens):
    """MEM's BEiT blocks (modeling_finetune.py Block) on patch tokens (B, N, D), the relative position bias and the
    class token left out: q and v biases with no k bias, layer scale gamma_1 / gamma_2, final norm."""
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv_bias = torch.cat([state[p + "attn.q_bias"], torch.zeros(DIM), state[p + "attn.v_bias"]])
        tokens = tokens + state[p + "gamma_1"] * attention(
            layer_norm(tokens, state, p + "norm1", 1e-6),
            state[p + "attn.qkv.weight"],
            qkv_bias,
            state[p + "attn.proj.weight"],
            state[p + "attn.proj.bias"],
            HEADS,
        )
        tokens = tokens + state[p + "gamma_2"] * mlp(layer_norm(tokens, state, p + "norm2", 1e-6), state, p + "mlp.")
    return layer_norm(tokens, state, "norm", 1e-6)


def inputs(in_chans, seed=0):
    return torch.randn(2, in_chans, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def small_vit(**overrides):
    torch.manual_seed(0)
    return VisionTransformer(
        **dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS) | overrides
    ).eval()


def snapshot(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


# --- tests --------------------------------------------------------------------------------------------------------


def test_the_known_sources_are_the_papers_three_backbones_ecdp_and_mem():
    assert known_sources() == [
        "ecdp_vit",
        "eventpretrain_convvit",
        "eventpretrain_swin",
        "eventpretrain_vit",
        "mem_vit",
    ]


@pytest.mark.parametrize(
    "container, prefix, norm_name",
    [
        ("model", "backbone.", "norm_layer"),  # a pre-training checkpoint as utils/misc.py saves it
        ("state_dict", "module.finetune_encoder.", "norm_h"),  # a DDP-wrapped encoder, an earlier norm name
    ],
)
def test_the_papers_vit_imports_completely_and_matches_its_forward(tmp_path, container, prefix, norm_name):
    source_state = paper_vit_state()
    saved = {prefix + key.replace("norm_layer", norm_name): value for key, value in source_state.items()}
    checkpoint = paper_checkpoint(saved | paper_pretraining_heads())
    checkpoint[container] = checkpoint.pop("model")
    backbone = small_vit()

    report = import_checkpoint(save(tmp_path, checkpoint), "eventpretrain_vit", backbone)

    assert report.complete and len(report.loaded) == len(backbone.state_dict())
    assert "pos_embed" in report.dropped and "sin-cos" in report.dropped["pos_embed"]
    assert any(key.endswith("pretrain_rec_decoder.pred.weight") for key in report.dropped)
    with torch.no_grad():
        x = inputs(5)
        torch.testing.assert_close(backbone(x).tokens, paper_vit_forward(source_state, x), atol=ATOL, rtol=0)


def test_the_papers_convvit_imports_completely_and_matches_its_forward(tmp_path):
    dims, depths, strides = (16, 32, DIM), (1, 1, 2), (2, 2, 2)
    shapes = patch_embed_shapes("patch_embed1.", 5, dims[0], strides[0])
    shapes |= patch_embed_shapes("patch_embed2.", dims[0], dims[1], strides[1])
    shapes |= patch_embed_shapes("patch_embed3.", dims[1], dims[2], strides[2])
    shapes |= {
        "patch_embed4.weight": (DIM, DIM),
        "patch_embed4.bias": (DIM,),
        "norm_layer.weight": (DIM,),
        "norm_layer.bias": (DIM,),
        "stage1_output_decode.weight": (DIM, dims[0], 4, 4),
        "stage1_output_decode.bias": (DIM,),
        "stage2_output_decode.weight": (DIM, dims[1], 2, 2),
        "stage2_output_decode.bias": (DIM,),
    }
    for stage in (1, 2):
        for i in range(depths[stage - 1]):
            shapes |= conv_block_shapes(f"conv_block{stage}.{i}.", dims[stage - 1])
    for i in range(depths[2]):
        shapes |= vit_block_shapes(f"vit_block.{i}.", DIM)
    source_state = random_state(shapes, seed=5) | {"pos_embed": mae_sincos(DIM, GRID)}
    torch.manual_seed(0)
    backbone = ConvViT(img_size=IMG, embed_dims=dims, depths=depths, strides=strides, num_heads=HEADS).eval()

    path = save(tmp_path, paper_checkpoint({f"backbone.{k}": v for k, v in source_state.items()}))
    report = import_checkpoint(path, "eventpretrain_convvit", backbone)

    assert report.complete and len(report.loaded) == len(backbone.state_dict())
    assert {"stage1_output_decode.weight", "stage2_output_decode.bias"} <= set(report.dropped)
    with torch.no_grad():
        x = inputs(5)
        torch.testing.assert_close(
            backbone(x).tokens, paper_convvit_forward(source_state, x, strides, depths, HEADS), atol=ATOL, rtol=0
        )


def test_the_papers_swin_imports_completely_and_matches_greenmims_forward(tmp_path):
    embed, depths, num_heads, window, patch = 16, (2, 2, 2), (1, 2, 4), 4, 2  # resolutions 16, 8, 4: the last unshifted
    shapes = patch_embed_shapes("patch_embed.", 5, embed, patch)
    resolution = IMG // patch
    index = {}
    for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        dim, size = embed * 2**stage, min(window, resolution // 2**stage)
        for block in range(depth):
            p = f"swin_block.{stage}.blocks.{block}."
            shapes |= vit_block_shapes(p, dim) | {p + "attn.relative_position_bias_table": ((2 * size - 1) ** 2, heads)}
            index[p + "attn.relative_position_index"] = torch.zeros(size**2, size**2, dtype=torch.long)
        if stage < len(depths) - 1:
            shapes |= {
                f"swin_block.{stage}.downsample.norm.weight": (4 * dim,),
                f"swin_block.{stage}.downsample.norm.bias": (4 * dim,),
                f"swin_block.{stage}.downsample.reduction.weight": (2 * dim, 4 * dim),
                f"stage{stage + 1}_output_decode.weight": (4 * embed, dim, 2 ** (2 - stage), 2 ** (2 - stage)),
            }
    last = embed * 2 ** (len(depths) - 1)
    source_state = random_state(shapes | {"norm_layer.weight": (last,), "norm_layer.bias": (last,)}, seed=6)
    torch.manual_seed(0)
    backbone = SwinBackbone(
        img_size=IMG, patch_size=patch, embed_dim=embed, depths=depths, num_heads=num_heads, window_size=window
    ).eval()

    path = save(tmp_path, paper_checkpoint({f"backbone.{k}": v for k, v in (source_state | index).items()}))
    report = import_checkpoint(path, "eventpretrain_swin", backbone)

    assert report.complete and set(report.kept_initialised) == {"mask_token"}
    assert len(report.loaded) == len(backbone.state_dict()) - 1
    assert not any("eps" in note for note in report.notes)  # every norm at the paper's 1e-6
    with torch.no_grad():
        x = inputs(5)
        expected = paper_swin_forward(source_state, x, patch, num_heads, window, eps=1e-6)
        torch.testing.assert_close(backbone(x).tokens, expected, atol=ATOL, rtol=0)

    # timm's eps (1e-5) in every norm: 1 patch embedding + 2 per block + 1 per merge + the final norm, all noted.
    timm_eps = SwinBackbone(
        img_size=IMG,
        patch_size=patch,
        embed_dim=embed,
        depths=depths,
        num_heads=num_heads,
        window_size=window,
        norm_eps=1e-5,
    )
    notes = import_checkpoint(path, "eventpretrain_swin", timm_eps).notes
    count = 1 + 2 * sum(depths) + (len(depths) - 1) + 1
    assert [note for note in notes if "eps" in note] == [
        f"{count} LayerNorms of ours (patch_embed.norm, stages.0.blocks.0.norm1, stages.0.blocks.0.norm2, "
        f"stages.0.blocks.1.norm1 and {count - 4} more) have eps 1e-05 where the source's have 1e-06: outputs differ "
        "slightly (a relative change of about the eps difference over the token variance per norm)"
    ]


def test_ecdps_pretraining_checkpoint_imports_its_query_encoder_and_matches_timms_vit(tmp_path):
    encoder = ecdp_encoder_state()
    backbone = small_vit(in_chans=2, patch_norm=False)

    report = import_checkpoint(save(tmp_path, ecdp_pretraining_checkpoint(encoder)), "ecdp_vit", backbone)

    assert report.complete and len(report.loaded) == len(backbone.state_dict())
    assert "prefix tokens" in report.dropped["tokens"] and "momentum" in report.dropped["encoder_k.norm.weight"]
    assert {"event_head.weight", "head.1.weight", "pred1.0.weight", "pos_embed"} <= set(report.dropped)
    # ECDP's encoder is timm's VisionTransformer; without its two tokens, timm's forward on the same weights.
    reference = TimmVisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        in_chans=2,
        num_classes=0,
        global_pool="",
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        class_token=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    reference.load_state_dict({k: v for k, v in encoder.items() if not k.startswith(("tokens", "event_", "image_"))})
    with torch.no_grad():
        x = inputs(2)
        torch.testing.assert_close(backbone(x).tokens, reference.forward_features(x), atol=ATOL, rtol=0)


def test_a_learned_position_embedding_is_unmappable_and_refused_unless_partial_is_allowed(tmp_path):
    # ECDP fine-tuned: {"model": timm VisionTransformer}, its pos_embed trained away from the sin-cos table.
    state = {k: v for k, v in ecdp_encoder_state().items() if not k.startswith(("event_", "image_"))}
    state["cls_token"] = state.pop("tokens")
    state["pos_embed"] = state["pos_embed"] + 0.05 * torch.randn(state["pos_embed"].shape)
    state |= random_state({"head.1.weight": (10, 2 * DIM), "head.1.bias": (10,)}, seed=7)
    path = save(tmp_path, {"model": state, "optimizer": {"state": {}, "param_groups": []}})
    backbone = small_vit(in_chans=2, patch_norm=False)
    before = snapshot(backbone)

    with pytest.raises(CheckpointImportError, match="learned position embedding") as refused:
        import_checkpoint(path, "ecdp_vit", backbone)
    assert refused.value.keys == ("pos_embed",) and str(path) in str(refused.value)
    assert all(torch.equal(before[key], value) for key, value in backbone.state_dict().items())

    report = import_checkpoint(path, "ecdp_vit", backbone, allow_partial=True)
    assert not report.complete and list(report.unmappable) == ["pos_embed"]
    assert not report.missing and {"cls_token", "head.1.weight"} <= set(report.dropped)
    assert torch.equal(backbone.norm.weight, state["norm.weight"])


def test_mem_is_refused_for_its_relative_position_bias_unless_partial_is_allowed(tmp_path):
    state = mem_state()
    path = save(tmp_path, {"model": state, "epoch": 3, "args": argparse.Namespace(model="pt_vit", voxel=0)})
    backbone = small_vit(in_chans=2, patch_norm=False)
    before = snapshot(backbone)

    with pytest.raises(CheckpointImportError) as refused:
        import_checkpoint(path, "mem_vit", backbone)
    message = str(refused.value)
    assert str(path) in message and "'mem_vit'" in message and "rel_pos_bias.relative_position_bias_table" in message
    assert "allow_partial=True" in message
    assert refused.value.keys == ("rel_pos_bias.relative_position_bias_table",)
    assert all(torch.equal(before[key], value) for key, value in backbone.state_dict().items())

    report = import_checkpoint(path, "mem_vit", backbone, allow_partial=True)
    assert list(report.unmappable) == ["rel_pos_bias.relative_position_bias_table"]
    assert "all it knows of position" in report.unmappable["rel_pos_bias.relative_position_bias_table"]
    assert set(report.dropped) == {
        "cls_token",
        "mask_token",
        "lm_head.weight",
        "lm_head.bias",
        "rel_pos_bias.relative_position_index",
    }
    assert not report.missing and not report.unexpected and not report.shape_mismatches
    assert len(report.loaded) == len(backbone.state_dict())
    assert any("q_bias and v_bias fused" in note for note in report.notes)
    assert any("layer scale" in note for note in report.notes)
    assert "PARTIAL" in report.summary() and "unmappable rel_pos_bias.relative_position_bias_table" in report.summary()
    # Where the architectures coincide (no relative position bias, no class token, our fixed positions added),
    # the folded layer scale and fused biases reproduce BEiT's blocks.
    with torch.no_grad():
        x = inputs(2)
        patches = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
        tokens = patches.flatten(2).transpose(1, 2) + mae_sincos(DIM, GRID)
        torch.testing.assert_close(
            backbone(x).tokens, beit_forward_without_position_bias(state, tokens), atol=ATOL, rtol=0
        )


def test_a_wrong_input_channel_count_is_a_shape_mismatch_naming_the_backbone_to_build(tmp_path):
    path = save(tmp_path, ecdp_pretraining_checkpoint(ecdp_encoder_state()))
    backbone = small_vit(in_chans=5, patch_norm=False)
    before = backbone.patch_embed.proj.weight.clone()

    with pytest.raises(CheckpointImportError, match=r"in_chans=2") as refused:
        import_checkpoint(path, "ecdp_vit", backbone)
    assert "patch_embed.proj.weight: checkpoint (64, 2, 8, 8), backbone (64, 5, 8, 8)" in str(refused.value)

    report = import_checkpoint(path, "ecdp_vit", backbone, allow_partial=True)
    assert report.shape_mismatches == {"patch_embed.proj.weight": ((DIM, 2, PATCH, PATCH), (DIM, 5, PATCH, PATCH))}
    assert torch.equal(backbone.patch_embed.proj.weight, before)
    assert len(report.loaded) == len(backbone.state_dict()) - 1


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_released_checkpoint_as_save_model_writes_it_loads_every_backbone_tensor_unchanged(tmp_path, name):
    kind = name.split("_")[0]
    source, preset = RELEASED[kind]
    checkpoint = released_checkpoint(name)
    path = save(tmp_path, checkpoint)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # the Namespace needs the importer's allow-list
    torch.manual_seed(0)
    backbone = create_backbone(preset)

    report = import_checkpoint(path, source, backbone)

    saved = checkpoint["model"]
    assert report.complete and set(report.kept_initialised) == ({"mask_token"} if kind == "swin" else set())
    for key, value in backbone.state_dict().items():
        if key not in report.kept_initialised:
            assert torch.equal(value, saved[f"backbone.{their_name(kind, key)}"]), key
    # Every saved tensor is loaded or dropped on purpose: in the backbone only the fixed pos_embed, the stage-1
    # fusion convolutions and Swin's index tables; everything outside it (decoder, projector, predictor, queue).
    loaded = {f"backbone.{their_name(kind, key)}" for key in report.loaded}
    dropped = {key if key in saved else f"backbone.{key}" for key in report.dropped}
    assert loaded | dropped == set(saved) and not loaded & dropped
    assert {key for key in dropped if key.startswith("backbone.")} == {
        key
        for key in saved
        if re.fullmatch(r"backbone\.(pos_embed|stage\d_output_decode\..*|.*relative_position_index)", key)
    }
    assert not any("eps" in note for note in report.notes)


def test_tensors_no_parameter_takes_are_unexpected_and_parameters_left_unfilled_are_missing(tmp_path):
    path = save(tmp_path, paper_checkpoint({f"backbone.{k}": v for k, v in paper_vit_state().items()}))
    with pytest.raises(CheckpointImportError, match="unexpected") as refused:
        import_checkpoint(path, "eventpretrain_vit", small_vit(patch_norm=False))
    assert set(refused.value.keys) == {"patch_embed.norm.weight", "patch_embed.norm.bias"}

    ecdp = save(tmp_path, ecdp_pretraining_checkpoint(ecdp_encoder_state()), "ecdp.pth")
    report = import_checkpoint(ecdp, "ecdp_vit", small_vit(in_chans=2), allow_partial=True)
    assert report.missing == ("patch_embed.norm.weight", "patch_embed.norm.bias")


def test_two_checkpoint_keys_onto_one_parameter_are_refused(tmp_path):
    state = paper_vit_state()
    state |= {"norm_h.weight": state["norm_layer.weight"], "norm_h.bias": state["norm_layer.bias"]}
    with pytest.raises(CheckpointImportError, match="norm_layer.weight and norm_h.weight both map onto norm.weight"):
        import_checkpoint(save(tmp_path, {"model": state}), "eventpretrain_vit", small_vit())


@dataclass
class TrainingArgs:
    lr: float


def test_pickled_objects_are_refused_by_weights_only_loading_with_a_clear_message(tmp_path):
    path = save(tmp_path, {"model": paper_vit_state(), "args": TrainingArgs(lr=1e-3)})
    with pytest.raises(
        CheckpointImportError,
        match=r"weights_only=True\) refuses it: it holds a pickled "
        r"\S*TrainingArgs",
    ) as refused:
        import_checkpoint(path, "eventpretrain_vit", small_vit())
    assert str(path) in str(refused.value)


def test_an_unknown_source_or_a_file_without_a_state_dict_is_refused(tmp_path):
    with pytest.raises(
        CheckpointImportError, match="'mae_vit'.*unknown source; known sources: ecdp_vit, eventpretrain_convvit"
    ) as refused:
        import_checkpoint(tmp_path / "any.pth", "mae_vit", small_vit())
    assert isinstance(refused.value, ConfigError)  # a name registry: the CLI prints it as a one-line error
    with pytest.raises(CheckpointImportError, match=r"found no state dict.*\['epoch', 'optimizer'\]"):
        import_checkpoint(save(tmp_path, {"epoch": 3, "optimizer": {}}), "eventpretrain_vit", small_vit())


@settings(max_examples=40, deadline=None)
@given(
    side=st.integers(1, 16),
    quarter=st.integers(1, 24),
    prefix=st.integers(0, 2),
    offset=st.floats(2e-3, 1.0),
    position=st.integers(0, 10_000),
)
def test_a_position_embedding_is_dropped_only_when_it_is_the_fixed_sin_cos_table(
    side, quarter, prefix, offset, position
):
    dim = 4 * quarter
    table = torch.cat([torch.randn(1, prefix, dim), mae_sincos(dim, side)], dim=1)
    kept = fixed_pos_embed({"pos_embed": table}, nn.Identity(), num_prefix_tokens=prefix)
    assert not kept.state and "pos_embed" in kept.dropped and not kept.unmappable

    learned = table.clone()
    learned.view(-1, dim)[prefix + position % (side * side), position % dim] += offset
    moved = fixed_pos_embed({"pos_embed": learned}, nn.Identity(), num_prefix_tokens=prefix)
    assert "learned position embedding" in moved.unmappable["pos_embed"] and not moved.dropped
