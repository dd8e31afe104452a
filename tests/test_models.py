"""Backbones: the interface contract for every registered name, masking without leakage, the fixed sin-cos
positions, the registry, and parameter counts against the paper code's structure."""

import math
import re
from functools import cache

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.config import ConfigError
from evpretrain.models import BackboneSpec, SwinBackbone, backbone_spec, build_backbone, create_backbone, list_backbones
from evpretrain.models.base import kept_indices, space_to_depth_tokens
from evpretrain.models.pos_embed import sincos_pos_embed_2d
from evpretrain.models.registry import _PRESETS
from evpretrain.models.spec import BACKBONE_IMG_SIZES, BACKBONES

PAPER_SIZE = ["vit_small_patch16", "vit_base_patch16", "convvit_small", "convvit_base", "swin_tiny"]
DEMO = ["vit_demo", "vit_tiny_demo", "convvit_demo", "swin_demo"]
TRACED_ONLY = ["vit_base_patch16", "convvit_base"]  # slow to initialise and run on a CPU: shapes on the meta device


@cache
def backbone(name):
    """One shared, seeded instance per name, in eval mode; tests only read it."""
    torch.manual_seed(0)
    return create_backbone(name).eval()


@cache
def meta_backbone(name):
    """An uninitialised instance on the meta device: structure, parameter counts and shapes without compute."""
    with torch.device("meta"):
        return create_backbone(name)


def random_mask(batch_size, num_tokens, num_hidden, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    for row in range(batch_size):
        mask[row, torch.randperm(num_tokens, generator=generator)[:num_hidden]] = True
    return mask


def voxels(model, batch_size, seed=0):
    return torch.randn(batch_size, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(seed))


def patch_pixels(model, position):
    """Row and column slices of the input pixels under last-level token ``position``."""
    row, col = divmod(position, model.grid_size[1])
    p = model.patch_size
    return slice(row * p, (row + 1) * p), slice(col * p, (col + 1) * p)


def test_the_registry_holds_the_papers_backbones_and_the_demo_presets():
    assert list_backbones() == sorted(PAPER_SIZE + DEMO)
    assert list(BACKBONES) == list_backbones()  # the torch-free names the plan checks pretrain.backbone against
    # and the input side the plan checks pretrain.data.input_size against
    assert BACKBONE_IMG_SIZES == {name: preset["img_size"] for name, (_, preset) in _PRESETS.items()}
    assert BackboneSpec("vit_demo").img_size == (64, 64)
    assert BackboneSpec("vit_demo", overrides={"img_size": [32, 48]}).img_size == (32, 48)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": 0}, "block indices must be distinct"),
        ({"num_heads": 5}, "AssertionError"),  # timm's Attention: 192 is not a multiple of 5
        ({"img_size": 60}, "is not a multiple of patch_size 8"),
    ],
)
def test_a_value_a_backbone_refuses_is_a_config_error_naming_its_overrides(overrides, message):
    with pytest.raises(ConfigError, match=rf"^backbone 'vit_demo' with overrides {re.escape(str(overrides))}: .*"):
        create_backbone("vit_demo", **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_backbone("vit_demo", **overrides)


def test_the_package_loads_each_name_from_its_module_on_use():
    import evpretrain.models as models

    assert models.create_backbone is create_backbone and models.build_backbone is build_backbone
    assert all(getattr(models, name) is not None for name in models.__all__)
    with pytest.raises(AttributeError, match="no attribute 'VisionTransformr'"):
        models.VisionTransformr  # noqa: B018


def test_an_unknown_name_or_argument_is_refused_with_the_known_ones():
    with pytest.raises(
        ConfigError,
        match="unknown backbone 'vit_huge'; known backbones: convvit_base, convvit_demo,"
        " convvit_small, swin_demo, swin_tiny, vit_base_patch16, vit_demo",
    ):
        create_backbone("vit_huge")
    with pytest.raises(
        ConfigError,
        match=r"backbone 'vit_demo' \(VisionTransformer\) does not take \['dept'\]; "
        r"it takes \['img_size', 'patch_size', 'in_chans'",
    ):
        create_backbone("vit_demo", dept=3)


def assert_unmasked_contract(model, out, batch_size):
    n, d = model.num_tokens, model.embed_dim
    assert model.in_chans == 5
    assert n == model.grid_size[0] * model.grid_size[1]
    assert model.img_size == (model.grid_size[0] * model.patch_size, model.grid_size[1] * model.patch_size)
    assert len(model.level_dims) == len(model.levels) and model.level_dims[-1] == d
    assert out.tokens.shape == (batch_size, n, d)
    assert [level.shape for level in out.levels] == [(batch_size, n, dim) for dim in model.level_dims]
    assert out.kept.shape == (batch_size, n)
    assert [m.shape for m in out.feature_maps] == [
        (batch_size, c, model.img_size[0] // s, model.img_size[1] // s)
        for c, s in zip(model.feature_dims, model.feature_strides)
    ]


@pytest.mark.parametrize("name", sorted(set(PAPER_SIZE + DEMO) - set(TRACED_ONLY)))
def test_every_backbone_honours_the_output_contract_with_and_without_a_mask(name):
    model = backbone(name)
    batch_size = 2 if name in DEMO else 1
    x = voxels(model, batch_size)
    n, d = model.num_tokens, model.embed_dim
    with torch.no_grad():
        out = model(x)
        hidden = n // 2
        masked = model(x, random_mask(batch_size, n, hidden))

    assert_unmasked_contract(model, out, batch_size)
    assert torch.equal(out.kept, torch.arange(n).expand(batch_size, n))
    torch.testing.assert_close(model.pool(out), out.tokens.mean(dim=1))
    # Levels are pre-norm and the last is the last block's output: the final norm of it gives the tokens.
    torch.testing.assert_close(model.norm(out.levels[-1]), out.tokens)

    kept = n if isinstance(model, SwinBackbone) else n - hidden  # Swin keeps the grid (SimMIM mask token)
    assert masked.tokens.shape == (batch_size, kept, d)
    assert [level.shape for level in masked.levels] == [(batch_size, kept, dim) for dim in model.level_dims]
    assert masked.kept.shape == (batch_size, kept)
    assert masked.feature_maps is None
    assert model.pool(masked).shape == (batch_size, d)


@pytest.mark.parametrize("name", TRACED_ONLY)
def test_the_base_backbones_trace_the_output_contract_on_the_meta_device(name):
    # Same classes as the small ones above (masking included); here only the shapes at base width, uncomputed.
    model = meta_backbone(name)
    with torch.device("meta"):
        out = model(torch.empty(1, 5, 224, 224))
    assert_unmasked_contract(model, out, 1)
    assert model.pool(out).shape == (1, model.embed_dim)


def test_the_vit_fuses_the_papers_blocks_and_returns_its_dense_indices():
    for name in ("vit_small_patch16", "vit_base_patch16"):
        assert meta_backbone(name).levels == (1, 3, 11)  # the paper's stage-1 fusion (its masked path)
        assert meta_backbone(name).feature_blocks == (3, 5, 7, 11)  # the paper's out_indices for dense heads
    assert meta_backbone("vit_demo").levels == (0, 1, 5)
    assert meta_backbone("swin_tiny").level_dims == [96 * 64, 192 * 16, 384 * 4, 768]
    assert meta_backbone("convvit_small").feature_strides == [4, 8, 16]


def _vit_count(in_chans, patch, dim, depth):
    """Parameters of the paper code's ViT encoder: conv patch embed + LayerNorm, pre-norm blocks, final norm."""
    norms, qkv, proj = 2 * 2 * dim, 3 * dim * dim + 3 * dim, dim * dim + dim
    mlp = (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    block = norms + qkv + proj + mlp
    return (in_chans * patch * patch * dim + dim) + 2 * dim + depth * block + 2 * dim


def _convvit_count(in_chans, dims, depths, strides, mlp_ratio=4):
    """Parameters of the paper code's ConvViT: three conv patch embeds (+ LayerNorm), a token Linear, ConvMAE
    conv blocks (LayerNorm, 1x1, depthwise 5x5, 1x1, LayerNorm, 1x1 MLP), ViT blocks, final norm."""
    embeds = sum(
        c_in * s * s * c_out + c_out + 2 * c_out for c_in, c_out, s in zip((in_chans, dims[0], dims[1]), dims, strides)
    )
    token_linear = dims[2] * dims[2] + dims[2]
    conv_block = [
        4 * d + 2 * (d * d + d) + (25 * d + d) + (d * mlp_ratio * d + mlp_ratio * d) + (mlp_ratio * d * d + d)
        for d in dims[:2]
    ]
    d = dims[2]
    vit_block = 4 * d + 3 * d * d + 3 * d + d * d + d + 8 * d * d + 5 * d
    return embeds + token_linear + depths[0] * conv_block[0] + depths[1] * conv_block[1] + depths[2] * vit_block + 2 * d


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_size_parameter_counts_match_the_paper_codes_structure():
    assert _vit_count(5, 16, 384, 12) == 21_787_008  # ViT-S/16 on 5 bins: "about 21.7M" in the encoder
    assert _count(meta_backbone("vit_small_patch16")) == 21_787_008
    assert _count(meta_backbone("vit_base_patch16")) == _vit_count(5, 16, 768, 12) == 86_041_344
    assert (
        _count(meta_backbone("convvit_small"))
        == _convvit_count(5, (128, 256, 384), (2, 2, 11), (4, 2, 2))
        == 21_871_360
    )
    assert (
        _count(meta_backbone("convvit_base")) == _convvit_count(5, (256, 384, 768), (2, 2, 11), (4, 2, 2)) == 84_463_488
    )
    # Swin-T: timm's swin_tiny_patch4_window7_224 without its head, on 5 bins, plus the 96-wide SimMIM mask token.
    with torch.device("meta"):
        reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, in_chans=5)
    assert _count(meta_backbone("swin_tiny")) == _count(reference) + 96 == 27_522_522


def test_the_sincos_embedding_is_a_fixed_buffer_with_maes_values():
    model = backbone("vit_demo")
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()  # derived from the grid, so checkpoints load at any img_size
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(192, (8, 8)))

    table = sincos_pos_embed_2d(192, (8, 8))  # quarters of 48: sin(col), cos(col), sin(row), cos(row)
    row, col = 2, 3
    token = table[row * 8 + col]
    assert token[0] == pytest.approx(math.sin(3)) and token[48] == pytest.approx(math.cos(3))
    assert token[96] == pytest.approx(math.sin(2)) and token[144] == pytest.approx(math.cos(2))
    assert token[1] == pytest.approx(math.sin(3 * 10000 ** (-1 / 48)))
    assert token[47] == pytest.approx(math.sin(3 * 10000 ** (-47 / 48)))
    assert torch.equal(table[0], torch.tensor([0.0] * 48 + [1.0] * 48 + [0.0] * 48 + [1.0] * 48))

    # A non-square grid, every value by hand: width 8 -> frequencies 1 and 1/100 per coordinate.
    rect = sincos_pos_embed_2d(8, (2, 3))
    assert rect.shape == (6, 8) and rect.dtype == torch.float32
    expected = [
        math.sin(2),
        math.sin(0.02),
        math.cos(2),
        math.cos(0.02),
        math.sin(1),
        math.sin(0.01),
        math.cos(1),
        math.cos(0.01),
    ]  # row 1, col 2
    torch.testing.assert_close(rect[5], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, (2, 2))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 30), st.data())
def test_kept_indices_are_exactly_the_visible_positions_in_order(batch_size, num_tokens, data):
    num_hidden = data.draw(st.integers(0, num_tokens - 1))
    mask = random_mask(batch_size, num_tokens, num_hidden, seed=data.draw(st.integers(0, 2**16)))
    kept = kept_indices(mask, batch_size, num_tokens, torch.device("cpu"))
    assert [row.tolist() for row in kept] == [torch.nonzero(~m).flatten().tolist() for m in mask]


def test_the_masked_vit_encodes_only_the_visible_tokens():
    model = backbone("vit_demo")
    x = voxels(model, 2)
    mask = random_mask(2, model.num_tokens, 40)
    with torch.no_grad():
        out = model(x, mask)
        embedded = model.embed(x)
        for row in range(2):
            visible = torch.nonzero(~mask[row]).flatten()
            assert torch.equal(out.kept[row], visible)
            tokens = embedded[row, visible][None]  # this sample alone, only its visible tokens
            for block in model.blocks:
                tokens = block(tokens)
            torch.testing.assert_close(out.tokens[row], model.norm(tokens)[0])


@pytest.mark.parametrize("name", ["vit_demo", "convvit_demo", "convvit_small", "swin_demo"])
def test_the_content_of_hidden_patches_reaches_no_output(name):
    model = backbone(name)
    x = voxels(model, 2)
    n = model.num_tokens
    mask = random_mask(2, n, n // 2)
    changed = x.clone()
    noise = voxels(model, 2, seed=1) * 10
    for row in range(2):
        for position in torch.nonzero(mask[row]).flatten().tolist():
            rows, cols = patch_pixels(model, position)
            changed[row, :, rows, cols] = noise[row, :, rows, cols]
    with torch.no_grad():
        out, out_changed = model(x, mask), model(changed, mask)
    torch.testing.assert_close(out_changed.tokens, out.tokens, rtol=0, atol=1e-5)
    for level, level_changed in zip(out.levels, out_changed.levels):
        torch.testing.assert_close(level_changed, level, rtol=0, atol=1e-5)

    # The control: a visible patch's content does reach the output, so the comparison above can fail.
    visible = torch.nonzero(~mask[0]).flatten()[0].item()
    rows, cols = patch_pixels(model, visible)
    changed[0, :, rows, cols] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(changed, mask).tokens[0], out.tokens[0], atol=1e-3)


def test_a_folded_level_under_a_linear_is_convmaes_strided_stage_conv():
    feature_map = torch.randn(2, 3, 8, 12)
    conv = torch.nn.Conv2d(3, 7, kernel_size=4, stride=4)
    linear = torch.nn.Linear(3 * 16, 7)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
        folded = space_to_depth_tokens(feature_map, 4)
        assert folded.shape == (2, 2 * 3, 48)
        torch.testing.assert_close(linear(folded), conv(feature_map).flatten(2).transpose(1, 2))


def test_bad_masks_and_inputs_are_refused_with_what_was_expected():
    model = backbone("vit_demo")
    x = voxels(model, 2)
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(2, 64\)"):
        model(x, torch.zeros(2, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(2, 64\)"):
        model(x, torch.zeros(2, 63, dtype=torch.bool))
    uneven = random_mask(2, 64, 10)
    uneven[0, torch.nonzero(~uneven[0])[0]] = True
    with pytest.raises(ValueError, match=r"same number of tokens in every row, got \[11, 10\]"):
        model(x, uneven)
    with pytest.raises(ValueError, match="hides every token"):
        model(x, torch.ones(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expects input \(B, 5, 64, 64\), got \(2, 5, 64, 48\)"):
        model(x[..., :48])


def test_overrides_change_channels_and_image_size():
    vit = create_backbone("vit_demo", in_chans=3, img_size=(48, 80))
    assert (vit.grid_size, vit.num_tokens, vit.pos_embed.shape) == ((6, 10), 60, (1, 60, 192))
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 48, 80)).tokens.shape == (1, 60, 192)
    convvit = create_backbone("convvit_demo", img_size=32, in_chans=2)
    with torch.no_grad():
        out = convvit(torch.randn(1, 2, 32, 32), random_mask(1, 16, 8))
    assert out.tokens.shape == (1, 8, 192) and convvit.grid_size == (4, 4)
    swin = create_backbone("swin_demo", img_size=(32, 64))
    with torch.no_grad():
        assert swin(torch.randn(1, 5, 32, 64)).tokens.shape == (1, 2 * 4, 256)
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        create_backbone("vit_demo", img_size=60)


def test_the_study_backbone_spec_reads_the_shared_pretrain_keys_only():
    study = {
        "pretrain": {
            "backbone": "vit_demo",
            "backbone_overrides": {"img_size": [32, 48], "depth": 2},
            "data": {"num_bins": 3, "input_size": [32, 48]},
            "stage1": {"anything": "the pre-training checks"},
        }
    }
    spec = backbone_spec(study)
    assert spec == BackboneSpec("vit_demo", 3, {"img_size": [32, 48], "depth": 2})
    assert backbone_spec({"pretrain": {"backbone": "swin_demo"}}) == BackboneSpec("swin_demo", 5, {})
    model = build_backbone(spec.with_overrides(drop_path_rate=0.1))
    assert (model.in_chans, model.img_size, len(model.blocks)) == (3, (32, 48), 2)
    assert spec.overrides == {"img_size": [32, 48], "depth": 2}  # with_overrides leaves the spec as it was
    with pytest.raises(ConfigError, match="config has no section 'pretrain'"):
        backbone_spec({})
    with pytest.raises(ConfigError, match=r"pretrain: missing required key\(s\) \['backbone'\]"):
        backbone_spec({"pretrain": {"data": {"num_bins": 3}}})
    with pytest.raises(ConfigError, match="pretrain.data.num_bins: expected an integer"):
        backbone_spec({"pretrain": {"backbone": "vit_demo", "data": {"num_bins": "5"}}})
    with pytest.raises(ConfigError, match="pretrain.data: expected a mapping"):
        backbone_spec({"pretrain": {"backbone": "vit_demo", "data": None}})
    with pytest.raises(ConfigError, match="pretrain: unknown backbone 'vit_dmeo'; known backbones: convvit_base, "):
        backbone_spec({"pretrain": {"backbone": "vit_dmeo"}})
    with pytest.raises(ConfigError, match="pretrain: data.num_bins must be >= 1, got 0"):
        backbone_spec({"pretrain": {"backbone": "vit_demo", "data": {"num_bins": 0}}})


@pytest.mark.parametrize("name", DEMO)
def test_gradients_reach_every_parameter_through_a_masked_forward(name):
    model = create_backbone(name)
    x = voxels(model, 2)
    out = model(x, random_mask(2, model.num_tokens, model.num_tokens // 2))
    (model.pool(out).square().sum() + sum(level.square().mean() for level in out.levels)).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", DEMO)
def test_layer_ids_run_from_the_embedding_to_the_final_norm(name):
    model = backbone(name)
    ids = [model.layer_id(parameter_name) for parameter_name, _ in model.named_parameters()]
    assert ids == sorted(ids)  # parameters are registered in forward order
    assert set(ids) == set(range(model.num_layers))
    assert model.layer_id("norm.weight") == model.num_layers - 1
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    if isinstance(model, SwinBackbone):
        assert "mask_token" in model.no_weight_decay()
