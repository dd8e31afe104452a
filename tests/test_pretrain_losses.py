"""Stage losses and heads: what counts in the loss, the negatives, the queue, BatchNorm over tokens."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from evpretrain.pretrain import losses
from evpretrain.pretrain.heads import FeatureFusion, ReconstructionDecoder, TeacherProjection, TokenMLP
from evpretrain.pretrain.losses import TokenInfoNCE, masked_reconstruction_loss, weighted_token_mean
from evpretrain.training import TrainConfig, train


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


@pytest.mark.parametrize("exclude", [True, False])
def test_queue_keeps_the_same_samples_keys_unless_told_to_exclude_them(exclude):
    criterion = TokenInfoNCE(2, 1, queue_length=2, temperature=1.0, exclude_same_sample=exclude).eval()
    criterion.queue.copy_(torch.eye(2).view(2, 1, 2))  # slot 0 holds e1 (sample 7), slot 1 e2 (sample 8)
    criterion.queue_ids.copy_(torch.tensor([7, 8]))
    e1 = torch.tensor([[[1.0, 0.0]]])
    loss = criterion(e1, e1, torch.tensor([7]))  # positive e1.e1 = 1; negatives e1.e1 = 1 (sample 7), e1.e2 = 0
    # -log(e / (e + e^0)) without its own key; -log(e / (e + e + e^0)) with it (the paper's code).
    expected = math.log(1 + math.exp(-1)) if exclude else math.log(2 + math.exp(-1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "enqueue, expected_ids", [("gathered", [3, 4, 103, 104, -1, -1]), ("local", [3, 4, -1, -1, -1, -1])]
)
def test_the_queue_takes_every_ranks_keys_or_this_ranks(monkeypatch, enqueue, expected_ids):
    # A stand-in for two ranks: the other rank's keys are ours negated, its sample ids ours + 100.
    def two_ranks(tensor):
        other = tensor + 100 if tensor.dtype == torch.long else -tensor
        return torch.cat([tensor, other])

    monkeypatch.setattr(losses, "_gather", two_ranks)
    criterion = TokenInfoNCE(2, 1, queue_length=6, enqueue=enqueue)
    teacher = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    criterion(torch.randn(2, 1, 2), teacher, torch.tensor([3, 4]))
    assert criterion.queue_ids.tolist() == expected_ids
    keys = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    stored = torch.cat([keys, -keys]) if enqueue == "gathered" else keys
    torch.testing.assert_close(criterion.queue[:, 0, : len(stored)], stored.T)
    assert int(criterion.queue_ptr) == len(stored)
    with pytest.raises(ValueError, match="enqueue must be 'gathered' or 'local'"):
        TokenInfoNCE(2, 1, enqueue="all")


class QueuedPair(nn.Module):
    """A student and a trained teacher projection (Linear 8 -> 8 on 3 tokens) under a 6-slot queue, exclusion on."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.student, self.teacher = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.criterion = TokenInfoNCE(8, 3, queue_length=6, temperature=0.2)

    def forward(self, batch):
        per_token = self.criterion(self.student(batch["x"]), self.teacher(batch["t"]), batch["index"])
        return per_token.mean(), {}


class Tokens(Dataset):
    """6 samples of 3 tokens: the same teacher tokens every epoch, as cached ones are."""

    def __init__(self):
        generator = torch.Generator().manual_seed(5)
        self.x, self.t = torch.randn(6, 3, 8, generator=generator), torch.randn(6, 3, 8, generator=generator)

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return {"x": self.x[index], "t": self.t[index], "index": index}


def cloning_loss(model: QueuedPair, batch) -> torch.Tensor:
    """The former TokenInfoNCE: negatives against a copy of the queue, the enqueue in the forward pass."""
    criterion = model.criterion
    q = F.normalize(model.student(batch["x"]), dim=-1)
    k = F.normalize(model.teacher(batch["t"]), dim=-1)
    positive = torch.einsum("bnc,bnc->bn", q, k).unsqueeze(-1)
    negative = torch.einsum("bnc,cnk->bnk", q, criterion.queue.clone())
    same_sample = batch["index"].view(-1, 1) == criterion.queue_ids.view(1, -1)
    negative = negative.masked_fill(same_sample.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=-1) / criterion.temperature
    criterion._enqueue(k.detach(), batch["index"])
    labels = torch.zeros(logits.shape[:2], dtype=torch.long)
    return F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none").mean()


def test_the_queue_is_written_after_backward_and_training_matches_the_copying_path():
    data = Tokens()
    models = {"hook": QueuedPair(), "copy": QueuedPair()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=0.05) for name, model in models.items()}
    losses_seen = {name: [] for name in models}
    for step in range(5):  # 4 samples a step into 6 slots: the queue wraps, and holds the batch's own samples
        index = torch.tensor([(4 * step + i) % 6 for i in range(4)])
        batch = {"x": data.x[index], "t": data.t[index], "index": index}
        for name, model in models.items():
            optimizers[name].zero_grad()
            if name == "hook":
                before = model.criterion.queue.clone()
                loss, _ = model(batch)
                assert torch.equal(model.criterion.queue, before)  # not yet: the backward pass reads it
            else:
                loss = cloning_loss(model, batch)
            loss.backward()
            optimizers[name].step()
            losses_seen[name].append(loss.item())
    assert losses_seen["hook"] == losses_seen["copy"]
    hook, copy = models["hook"].state_dict(), models["copy"].state_dict()
    assert all(torch.equal(hook[name], copy[name]) for name in hook)  # weights, queue, pointer, queued ids
    assert int(models["hook"].criterion.queue_ptr) == 20 % 6  # 20 keys went in


def test_a_run_resumed_mid_way_has_the_uninterrupted_queue_and_weights(tmp_path):
    # 6 samples in batches of 2: 3 steps an epoch, 6 in all; the first run stops at step 4, where its checkpoint is.
    config = TrainConfig(epochs=2, batch_size=2, base_lr=2.0, checkpoint_every_steps=4, seed=1)
    reference = QueuedPair()
    train(reference, lambda model, batch: model(batch), Tokens(), config, tmp_path / "whole", device="cpu")
    resumed = QueuedPair()
    train(
        resumed,
        lambda model, batch: model(batch),
        Tokens(),
        replace(config, max_steps=4),
        tmp_path / "parts",
        device="cpu",
    )
    resumed = QueuedPair(seed=9)  # a fresh process: everything comes from the checkpoint
    train(resumed, lambda model, batch: model(batch), Tokens(), config, tmp_path / "parts", device="cpu")
    expected, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert int(got["criterion.queue_ptr"]) == 0 and sorted(got["criterion.queue_ids"].tolist()) == list(range(6))


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


def test_decoder_mask_token_is_drawn_or_left_at_zeros():
    torch.manual_seed(0)
    zeros = ReconstructionDecoder(6, (2, 2), 2, dim=512, depth=0, num_heads=2, mask_token_init="zeros")
    assert torch.equal(zeros.mask_token.data, torch.zeros(1, 1, 512))  # the paper's: never initialised
    normal = ReconstructionDecoder(6, (2, 2), 2, dim=512, depth=0, num_heads=2)
    assert normal.mask_token.std().item() == pytest.approx(0.02, rel=0.15)  # 512 draws of N(0, 0.02^2)
    # With no block, a hidden position of the zeros decoder sees its position embedding only.
    out = zeros(torch.randn(1, 1, 6), torch.tensor([[0]]))
    torch.testing.assert_close(out[0, 3], zeros.pred(zeros.norm(zeros.pos_embed[0, 3])))
    with pytest.raises(ValueError, match="mask_token_init must be 'normal' or 'zeros', got 'ones'"):
        ReconstructionDecoder(6, (2, 2), 2, dim=8, depth=0, num_heads=2, mask_token_init="ones")


def test_teacher_projection_is_layernorm_then_bias_free_linear():
    projection = TeacherProjection(12, 5)
    assert projection.proj.bias is None
    tokens = torch.randn(2, 3, 12) * 7 + 2
    torch.testing.assert_close(projection(tokens), projection.proj(F.layer_norm(tokens, (12,))))


def test_teacher_projection_convolves_a_grid_twice_as_fine_into_the_backbones():
    torch.manual_seed(5)
    projection = TeacherProjection(3, 4, grid_size=(4, 6), stride=2)
    tokens = torch.randn(2, 24, 3) * 5 + 1
    out = projection(tokens)
    assert out.shape == (2, 6, 4)  # a 4x6 grid onto 2x3
    normed = F.layer_norm(tokens, (3,)).view(2, 4, 6, 3)  # row-major (row, column) grid
    weight, bias = projection.proj.weight, projection.proj.bias  # (4, 3, 2, 2), (4,)
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        block = normed[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # (2, 2, 2, 3): the output cell's 2x2 tokens
        expected = torch.einsum("bpqc,ocpq->bo", block, weight) + bias
        torch.testing.assert_close(out[:, 3 * i + j], expected)
    with pytest.raises(ValueError, match="stride must be 1, or 2 with an even token grid"):
        TeacherProjection(3, 4, grid_size=(7, 7), stride=2)
