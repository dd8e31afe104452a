"""Stage losses and heads: what counts in the loss, the negatives, the queue, BatchNorm over tokens."""

import pytest
import torch
import torch.nn.functional as F

from evpretrain.pretrain.heads import FeatureFusion, ReconstructionDecoder, TeacherProjection, TokenMLP
from evpretrain.pretrain.losses import TokenInfoNCE, masked_reconstruction_loss, weighted_token_mean


def test_reconstruction_loss_counts_only_masked_patches_against_normalised_targets():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 16), torch.randn(2, 6, 16) * 3 + 1
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    loss = masked_reconstruction_loss(pred, target, mask)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - normalised) ** 2).mean(-1)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 5.0  # visible patches do not count
    assert masked_reconstruction_loss(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    raw = masked_reconstruction_loss(pred, target, mask, normalize_target=False)
    assert raw.item() == pytest.approx(((pred - target) ** 2).mean(-1)[mask].mean().item(), rel=1e-6)


def test_in_batch_infonce_matches_cross_entropy_over_images_at_each_position():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    loss = TokenInfoNCE(8, 4, queue_length=0, temperature=0.07)(student, teacher)
    q, k = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    for b in range(3):
        for n in range(4):
            logits = torch.stack([q[b, n] @ k[m, n] for m in range(3)]) / 0.07
            assert loss[b, n].item() == pytest.approx(F.cross_entropy(logits[None], torch.tensor([b])).item(), rel=1e-5)
    aligned = TokenInfoNCE(8, 4, queue_length=0)(teacher * 2, teacher)
    assert aligned.mean() < loss.mean()


def test_queue_negatives_are_the_last_teacher_tokens_per_position():
    torch.manual_seed(2)
    criterion = TokenInfoNCE(8, 4, queue_length=5, temperature=0.1)
    first, second = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    criterion(torch.randn(3, 4, 8), first)
    criterion(torch.randn(3, 4, 8), second)  # 6 keys into 5 slots: the pointer wraps
    keys = F.normalize(torch.cat([first, second]), dim=-1)  # (6, N, D) in arrival order
    assert int(criterion.queue_ptr) == 1
    torch.testing.assert_close(criterion.queue[:, :, 0], keys[5].T)  # the sixth key overwrote slot 0
    torch.testing.assert_close(criterion.queue[:, :, 1:5], keys[1:5].permute(2, 1, 0))
    student = torch.randn(2, 4, 8)
    teacher = torch.randn(2, 4, 8)
    criterion.eval()
    before = criterion.queue.clone()
    loss = criterion(student, teacher)
    assert torch.equal(criterion.queue, before)  # evaluation does not enqueue
    q, k = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    logits = torch.cat([(q[0, 2] @ k[0, 2])[None], q[0, 2] @ before[:, 2, :]]) / 0.1
    assert loss[0, 2].item() == pytest.approx(F.cross_entropy(logits[None], torch.tensor([0])).item(), rel=1e-5)


def test_queue_leaves_out_keys_of_the_same_sample():
    # A cached teacher gives a sample the same key every epoch: its queued copy must not be its own negative.
    torch.manual_seed(4)
    criterion = TokenInfoNCE(8, 4, queue_length=6, temperature=0.1)
    teacher = torch.randn(3, 4, 8)
    criterion(torch.randn(3, 4, 8), teacher, torch.tensor([10, 11, 12]))  # epoch 1 enqueues samples 10-12
    assert criterion.queue_ids.tolist() == [10, 11, 12, -1, -1, -1]
    criterion.eval()
    student = teacher.clone()  # a perfect student: only a copy of its own key can rival the positive
    with_ids = criterion(student, teacher, torch.tensor([10, 11, 12]))
    without_ids = criterion(student, teacher)
    q = F.normalize(student, dim=-1)
    queue = criterion.queue[:, 1]  # position 1: (D, K); sample 11 may not see slot 1
    kept = [0, 2, 3, 4, 5]
    logits = torch.cat([(q[1, 1] @ q[1, 1])[None], q[1, 1] @ queue[:, kept]]) / 0.1
    assert with_ids[1, 1].item() == pytest.approx(F.cross_entropy(logits[None], torch.tensor([0])).item(), rel=1e-5)
    assert (without_ids > with_ids + 0.5).all()  # its own copy costs at least log 2 - a little


def test_weighted_token_mean():
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert weighted_token_mean(loss, None).item() == 2.5
    assert weighted_token_mean(loss, torch.ones(2, 2)).item() == 2.5
    assert weighted_token_mean(loss, torch.tensor([[0.0, 1.0], [0.0, 3.0]])).item() == pytest.approx((2 + 12) / 4)


def test_token_mlp_normalises_over_batch_and_positions_like_batchnorm2d_on_the_grid():
    torch.manual_seed(3)
    mlp = TokenMLP(2, 6, 10, 4).train()
    tokens = torch.randn(3, 16, 6)
    out = mlp(tokens)
    assert out.shape == (3, 16, 4)
    flat = out.reshape(-1, 4)
    torch.testing.assert_close(flat.mean(0), torch.zeros(4), atol=1e-5, rtol=0)  # last BN without affine
    hidden = mlp.layers[0](tokens)  # (3, 16, 10) before the first BN
    grid = hidden.permute(0, 2, 1).reshape(3, 10, 4, 4)
    bn2d = torch.nn.BatchNorm2d(10).train()
    expected = bn2d(grid).reshape(3, 10, 16).permute(0, 2, 1)
    torch.testing.assert_close(mlp.layers[1](hidden.reshape(-1, 10)).reshape(3, 16, 10), expected)


def test_fusion_projects_wide_levels_and_normalises_the_sum_with_the_given_norm():
    norm = torch.nn.LayerNorm(8)
    fusion = FeatureFusion([32, 8, 8], norm=norm)
    assert fusion.norm is norm  # the backbone's own final norm, shared
    levels = [torch.randn(2, 5, 32), torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    expected = norm(fusion.projections[0](levels[0]) + levels[1] + levels[2])
    torch.testing.assert_close(fusion(levels), expected)
    with pytest.raises(ValueError, match="expected 3 feature levels, got 2"):
        fusion(levels[:2])


def test_decoder_places_kept_tokens_at_their_positions():
    torch.manual_seed(4)
    decoder = ReconstructionDecoder(in_dim=6, grid_size=(2, 3), patch_size=2, out_chans=1, dim=8, depth=0, num_heads=2)
    kept = torch.tensor([[4, 0, 2]])
    tokens = torch.randn(1, 3, 6)
    out = decoder(tokens, kept)
    assert out.shape == (1, 6, 4)
    changed = tokens.clone()
    changed[0, 1] += 1.0  # the token at position 0
    diff = (decoder(changed, kept) - out).abs().sum(-1)[0]
    assert diff[0] > 0 and torch.all(diff[1:] == 0)  # with no block, positions do not mix
    hidden = [1, 3, 5]
    assert torch.allclose(
        out[0, hidden[0]] - decoder.pred(decoder.norm(decoder.mask_token[0, 0] + decoder.pos_embed[0, 1])),
        torch.zeros(4),
        atol=1e-6,
    )


def test_teacher_projection_is_layernorm_then_bias_free_linear():
    projection = TeacherProjection(12, 5)
    assert projection.proj.bias is None
    tokens = torch.randn(2, 3, 12) * 7 + 2
    torch.testing.assert_close(projection(tokens), projection.proj(F.layer_norm(tokens, (12,))))
