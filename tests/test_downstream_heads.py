"""Dense heads and their losses: output shapes on every demo backbone, the ViT neck, gradients into the backbone,
the map the auxiliary head reads, flow upsampling, a tiny overfit, and the losses against hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evpretrain.downstream.heads import (
    FCNHead,
    FlowModel,
    MultiLevelNeck,
    SegmentationModel,
    UPerHead,
    upsample_flow,
    upsample_to,
)
from evpretrain.downstream.losses import DICE_LOSSES, flow_loss, segmentation_loss, soft_dice_loss, squared_dice_loss
from evpretrain.models import create_backbone

DEMO = ["vit_demo", "convvit_demo", "swin_demo"]
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These tensors are too small to gain from threads, and on a shared 2-core machine two spinning intra-op
    threads made the overfit test 40x slower (37 s against 0.9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_backbone(name):
    torch.manual_seed(0)
    return create_backbone(name)


def voxels(batch_size=2, seed=0):
    return torch.randn(batch_size, 5, 64, 64, generator=torch.Generator().manual_seed(seed))


# --- heads -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEMO)
def test_models_predict_at_input_resolution_with_the_beit_neck(name):
    backbone = seeded_backbone(name)
    model = SegmentationModel(backbone, NUM_CLASSES, channels=16, aux_channels=8, neck="beit").eval()
    # The ViT's single-stride maps become a pyramid; the others already are one. Every head ends at stride 2.
    assert isinstance(model.neck.rescale, MultiLevelNeck) == (name == "vit_demo")
    assert model.decode_head.out_stride == 2
    flow_model = FlowModel(backbone, channels=16, neck="beit").eval()
    with torch.no_grad():
        out = model(voxels())
        flow = flow_model(voxels())
    assert set(out) == {"logits", "aux_logits"} and set(flow) == {"flow", "aux_flow"}
    assert out["logits"].shape == out["aux_logits"].shape == (2, NUM_CLASSES, 64, 64)
    assert flow["flow"].shape == flow["aux_flow"].shape == (2, 2, 64, 64) and torch.isfinite(flow["flow"]).all()


@pytest.mark.parametrize("name", DEMO)
def test_models_predict_at_the_size_asked_for(name):
    backbone = seeded_backbone(name)
    model = SegmentationModel(backbone, NUM_CLASSES, channels=16, aux_channels=8).eval()
    flow_model = FlowModel(backbone, channels=16, aux=False).eval()
    with torch.no_grad():
        out = model(voxels(), size=(50, 70))
        flow = flow_model(voxels(), size=(50, 70))
    assert out["logits"].shape == out["aux_logits"].shape == (2, NUM_CLASSES, 50, 70)
    assert set(flow) == {"flow"} and flow["flow"].shape == (2, 2, 50, 70)


def test_vit_maps_reach_the_heads_unchanged_without_a_neck():
    backbone = seeded_backbone("vit_demo").eval()  # patch 8, 64 pixels: four 8x8 maps of 192 channels
    model = SegmentationModel(backbone, NUM_CLASSES, channels=16, aux_channels=8, neck="none").eval()
    x = voxels()
    with torch.no_grad():
        maps = model.neck(backbone(x))
        expected = backbone(x).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 4
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert model.neck.strides == [8] * 4 and model.decode_head.out_stride == 8
    assert not any(k.startswith("neck.") for k in model.state_dict())  # no neck weights
    # The auxiliary head reads the third map (the paper code's in_index=2).
    assert model.aux_head.in_index in (2, -2) and model.aux_head.convs[0][0].in_channels == 192


def test_convvit_gets_four_levels_the_last_two_from_the_final_normed_stage():
    torch.manual_seed(0)
    backbone = create_backbone("convvit_small").eval()  # the paper's ConvViT-S at 224 pixels
    model = SegmentationModel(backbone, NUM_CLASSES, channels=16, aux_channels=8, neck="none").eval()
    x = torch.randn(1, 5, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = backbone(x)
        maps = model.neck(output)
    # convvit.py:204: (b,128,56,56) (b,256,28,28) (b,384,14,14) (b,384,6,6).
    assert [tuple(m.shape) for m in maps] == [(1, 128, 56, 56), (1, 256, 28, 28), (1, 384, 14, 14), (1, 384, 6, 6)]
    assert model.neck.channels == [128, 256, 384, 384] and model.neck.strides == [4, 8, 16, 32]
    assert torch.equal(maps[0], output.feature_maps[0]) and torch.equal(maps[1], output.feature_maps[1])
    normed = output.tokens.transpose(1, 2).reshape(1, 384, 14, 14)  # after the final norm, as theirs
    assert torch.equal(maps[2], normed) and not torch.allclose(maps[2], output.feature_maps[2])
    down = model.neck.levels.down
    assert (down[0].kernel_size, down[0].stride, down[0].padding) == ((3, 3), (2, 2), (0, 0))
    with torch.no_grad():
        assert torch.allclose(maps[3], F.gelu(down[1](down[0](normed))))
    # The fourth level lives in the neck, the backbone is untouched: a pre-trained checkpoint still loads strictly.
    assert {k for k in model.state_dict() if k.startswith("neck.")} == {
        f"neck.levels.down.{k}" for k in nn.Sequential(down[0], down[1]).state_dict()
    }
    assert model.aux_head.convs[0][0].in_channels == 384  # FCN on the stride-16 map (theirs: in_index=2)


def test_convvit_fourth_level_needs_a_grid_of_three_cells():
    with pytest.raises(ValueError, match="at least 3x3"):
        SegmentationModel(create_backbone("convvit_demo", img_size=16), NUM_CLASSES, neck="none")  # grid 2x2


def test_dense_models_refuse_unknown_necks_and_predictors():
    backbone = seeded_backbone("vit_demo")
    with pytest.raises(ValueError, match=r"neck must be one of \('none', 'beit'\), got 'fpn'"):
        SegmentationModel(backbone, NUM_CLASSES, neck="fpn")
    with pytest.raises(ValueError, match="predictor must be one of"):
        FlowModel(backbone, predictor="mlp")


@pytest.mark.parametrize("name", DEMO)
def test_gradients_reach_every_backbone_parameter_that_builds_the_maps(name):
    torch.manual_seed(0)
    model = SegmentationModel(create_backbone(name, img_size=32), NUM_CLASSES, channels=8, aux_channels=8, neck="beit")
    out = model(torch.randn(2, 5, 32, 32))
    (out["logits"].square().mean() + out["aux_logits"].square().mean()).backward()
    # With the beit neck dense maps are taken before the final norm; the mask token only serves pre-training.
    untouched = {"norm.weight", "norm.bias", "mask_token"}
    no_gradient = [
        n
        for n, p in model.backbone.named_parameters()
        if n not in untouched and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert no_gradient == []


def test_segmentation_model_without_aux_returns_only_logits():
    model = SegmentationModel(seeded_backbone("swin_demo"), NUM_CLASSES, channels=8, aux=False).eval()
    assert set(model(voxels(1))) == {"logits"}


def test_vit_neck_rescales_four_maps_to_quarter_half_same_and_double_stride():
    neck = MultiLevelNeck([6] * 4, stride=16)
    maps = [torch.randn(2, 6, 8, 10) for _ in range(4)]
    out = neck(maps)
    assert [tuple(m.shape) for m in out] == [(2, 6, 32, 40), (2, 6, 16, 20), (2, 6, 8, 10), (2, 6, 4, 5)]
    assert neck.out_strides == [4, 8, 16, 32]
    assert torch.equal(out[2], maps[2])
    assert torch.equal(out[3], F.max_pool2d(maps[3], 2))
    with pytest.raises(ValueError, match="takes 4 maps"):
        MultiLevelNeck([6] * 3, stride=16)
    with pytest.raises(ValueError, match="divisible by 4"):
        MultiLevelNeck([6] * 4, stride=6)


def test_uper_head_outputs_logits_at_its_finest_stride():
    head = UPerHead([4, 8, 16], [4, 8, 16], channels=8, num_classes=5).eval()
    maps = [torch.randn(2, 4, 16, 12), torch.randn(2, 8, 8, 6), torch.randn(2, 16, 4, 3)]
    assert head(maps).shape == (2, 5, 16, 12) and head.out_stride == 4
    with pytest.raises(ValueError, match=r"expected maps with channels \[4, 8, 16\]"):
        head([maps[0], maps[1], torch.randn(2, 8, 4, 3)])


def test_fcn_head_reads_only_the_map_it_names():
    maps = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 8, 4, 4)]
    head = FCNHead(in_channels=6, channels=5, num_classes=3).eval()  # default in_index -2: the 8x8 map
    out = head(maps)
    assert out.shape == (2, 3, 8, 8)
    changed_others = [torch.randn_like(maps[0]), maps[1], torch.randn_like(maps[2])]
    assert torch.equal(head(changed_others), out)
    assert not torch.allclose(head([maps[0], torch.randn_like(maps[1]), maps[2]]), out)
    first = FCNHead(in_channels=4, channels=5, num_classes=3, in_index=0).eval()
    assert first(maps).shape == (2, 3, 16, 16)


def test_upsampling_keeps_logits_in_place_and_scales_flow_to_input_pixels_per_axis():
    logits = torch.randn(1, 2, 5, 5)
    assert upsample_to(logits, (5, 5)) is logits
    coarse = torch.ones(1, 2, 4, 8)  # one grid cell in x and in y
    flow = upsample_flow(coarse, (16, 64))  # stride 4 in y, 8 in x
    assert flow.shape == (1, 2, 16, 64)
    assert torch.allclose(flow[:, 0], torch.full((1, 16, 64), 8.0))
    assert torch.allclose(flow[:, 1], torch.full((1, 16, 64), 4.0))


def resize_flow_as_the_paper(flow, size):
    """BIT-Vision/EventPretrain utils/reshape.py:45-54, written out: bilinear (align_corners None), then u times
    new_w / org_w and v times new_h / org_h."""
    org_h, org_w = flow.shape[-2:]
    out = F.interpolate(flow, size, None, "bilinear", None)
    return torch.einsum(
        "bhwc->bchw", torch.einsum("bchw->bhwc", out) * torch.tensor([size[1] / org_w, size[0] / org_h])
    )


def test_flow_resized_to_the_sensor_as_the_paper_code_resizes_it():
    # A constant field of (1, 1) input pixels at 224 x 224 is (346 / 224, 260 / 224) sensor pixels at 260 x 346.
    flow = upsample_flow(torch.ones(1, 2, 224, 224), (260, 346))
    assert flow.shape == (1, 2, 260, 346)
    assert torch.allclose(flow[:, 0], torch.full((1, 260, 346), 346 / 224))
    assert torch.allclose(flow[:, 1], torch.full((1, 260, 346), 260 / 224))
    # Any field, straight from a 56 x 56 head output: the paper code's resize, value for value.
    coarse = torch.randn(2, 2, 56, 56, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(upsample_flow(coarse, (260, 346)), resize_flow_as_the_paper(coarse, (260, 346)), atol=1e-6)


def test_flow_model_resizes_its_head_output_once_to_the_size_asked_for():
    backbone = seeded_backbone("convvit_demo")
    model = FlowModel(backbone, channels=8, aux_channels=8).eval()
    with torch.no_grad():
        maps = model.neck(backbone(voxels()))
        coarse, coarse_aux = model.flow_head(maps), model.aux_head(maps)
        out = model(voxels(), size=(26, 35))
    assert isinstance(model.flow_head, UPerHead)  # the paper's predictor: dropout + 1x1 conv
    assert torch.allclose(out["flow"], resize_flow_as_the_paper(coarse, (26, 35)), atol=1e-6)
    assert torch.allclose(out["aux_flow"], resize_flow_as_the_paper(coarse_aux, (26, 35)), atol=1e-6)


def test_segmentation_overfits_two_fixed_samples():
    torch.manual_seed(0)
    model = SegmentationModel(create_backbone("swin_demo", img_size=32), NUM_CLASSES, channels=16, aux_channels=16)
    x = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, :, 16:] = 1
    target[1, 16:, :] = 2
    target[1, :8, :8] = 1
    target[0, :2] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        out = model(x)
        loss = segmentation_loss(out["logits"], target)[0] + 0.4 * segmentation_loss(out["aux_logits"], target)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4


# --- losses ----------------------------------------------------------------------------------------------------


def test_the_torch_free_config_names_every_dice_loss():
    from evpretrain.downstream.config import DICE_FORMS

    assert DICE_FORMS == tuple(DICE_LOSSES)


def test_segmentation_loss_matches_cross_entropy_and_dice_by_hand():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[-1.0, 0.5, 3.0]]]])  # (1, 3, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])  # class 2 absent, last pixel ignored
    loss, terms = segmentation_loss(logits, target, dice_weight=0.5)
    p = logits.softmax(dim=1)[0, :, 0]  # (3 classes, 3 pixels)
    ce = -(math.log(p[0, 0]) + math.log(p[1, 1])) / 2
    dice_0 = 2 * p[0, 0] / (p[0, 0] + p[0, 1] + 1)
    dice_1 = 2 * p[1, 1] / (p[1, 0] + p[1, 1] + 1)
    dice = 1 - (dice_0 + dice_1) / 2
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(dice.item(), rel=1e-6)
    assert loss.item() == pytest.approx(ce + 0.5 * dice.item(), rel=1e-6)


def test_the_paper_dice_squares_its_terms_smooths_by_one_and_averages_every_class():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[-1.0, 0.5, 3.0]]]])  # (1, 3, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])  # class 2 absent, last pixel ignored
    p = logits.softmax(dim=1)[0, :, 0, :2]  # (3 classes, the 2 counted pixels)
    dice = [
        (2 * p[0, 0] + 1) / (p[0].square().sum() + 1 + 1),
        (2 * p[1, 1] + 1) / (p[1].square().sum() + 1 + 1),
        torch.tensor(1.0) / (p[2].square().sum() + 1),  # absent: no overlap, no target
    ]
    expected = sum(1 - d for d in dice) / 3
    assert squared_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    _, terms = segmentation_loss(logits, target, dice="squared")
    assert terms["dice"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="dice must be one of"):
        segmentation_loss(logits, target, dice="v-net")


def test_a_perfect_prediction_has_near_zero_dice_and_cross_entropy():
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = 50.0 * F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    loss, terms = segmentation_loss(logits, target)
    assert terms["dice"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_ignored_pixels_change_neither_term_and_an_all_ignored_batch_costs_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[:, :, 4:] = 255
    loss, _ = segmentation_loss(logits, target)
    changed = logits.clone()
    changed[:, :, :, 4:] = torch.randn(2, 4, 5, 2) * 100
    assert segmentation_loss(changed, target)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    cropped, _ = segmentation_loss(logits[..., :4], target[..., :4])
    assert cropped.item() == pytest.approx(loss.item(), rel=1e-6)

    logits.requires_grad_(True)
    empty, terms = segmentation_loss(logits, torch.full((2, 5, 6), 255))
    empty.backward()
    assert empty.item() == 0.0 and terms["dice"].item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_leaves_out_classes_absent_from_the_target():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(1, 4, 4, dtype=torch.long)  # only class 0
    p = logits.softmax(dim=1)[0, 0]
    expected = 1 - 2 * p.sum() / (p.sum() + 16)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_flow_loss_is_l1_over_valid_pixels_and_ignores_whatever_invalid_ones_hold():
    pred = torch.tensor([[[[1.0, 2.0, 0.0]], [[0.0, -1.0, 5.0]]]], requires_grad=True)  # (1, 2, 1, 3)
    target = torch.tensor([[[[0.0, 0.0, math.nan]], [[2.0, 1.0, math.inf]]]])
    valid = torch.tensor([[[True, True, False]]])
    loss = flow_loss(pred, target, valid)
    assert loss.item() == pytest.approx(((1 + 2) + (2 + 2)) / 4)  # mean over the 4 components of 2 pixels
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.equal(pred.grad[..., 2], torch.zeros(1, 2, 1))
    other_target = target.clone()
    other_target[..., 2] = 123.0
    assert flow_loss(pred, other_target, valid).item() == loss.item()


def test_flow_loss_without_mask_averages_every_pixel_and_with_no_valid_pixel_is_zero():
    pred, target = torch.ones(2, 2, 3, 3), torch.zeros(2, 2, 3, 3)
    assert flow_loss(pred, target).item() == pytest.approx(1.0)
    assert flow_loss(pred, target, torch.zeros(2, 3, 3, dtype=torch.bool)).item() == 0.0


def test_flow_loss_leaves_out_true_flow_of_max_flow_pixels_or_more():
    # True flows of length 5 (3, 4), 400 (exactly the cut: left out, theirs is mag < max_flow) and 500.
    target = torch.tensor([[[[3.0, 400.0, 300.0]], [[4.0, 0.0, 400.0]]]])
    pred = torch.zeros(1, 2, 1, 3, requires_grad=True)
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    loss = flow_loss(pred, target, valid, max_flow=400)
    assert loss.item() == pytest.approx((3 + 4) / 2)
    loss.backward()
    assert torch.equal(pred.grad[..., 1:], torch.zeros(1, 2, 1, 2))
    assert flow_loss(pred, target, valid, max_flow=None).item() == pytest.approx((3 + 4 + 400 + 300 + 400) / 6)
    assert flow_loss(pred, target, valid, max_flow=4.9).item() == 0.0
