"""The shared training loop: optimizer groups and schedule, exact resume, the NaN stop, DDP, kNN, MLflow."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from paper_layout import their_keys, their_name
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.data import Dataset, Subset

from evpretrain.config import ConfigError, from_mapping
from evpretrain.errors import CheckpointError
from evpretrain.files import FolderLockedError
from evpretrain.models import create_backbone
from evpretrain.training import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    RESUME_NAME,
    Hook,
    KnnMonitor,
    MlflowHook,
    NonFiniteLossError,
    ResumeError,
    TrainConfig,
    build_optimizer,
    cosine_schedule,
    knn_accuracy,
    layer_scales,
    load_checkpoint,
    param_groups,
    train,
)
from evpretrain.training.checkpoint import save_checkpoint
from evpretrain.training.config import check_batch_fits
from evpretrain.training.rng import capture_rng_state, restore_rng_state
from evpretrain.training.sampling import EpochBatchSampler

# 24 samples in batches of 4: 6 steps per epoch, 12 in all; checkpoints at 5 and 10 and 12 (the end).
CONFIG = TrainConfig(
    epochs=2,
    batch_size=4,
    base_lr=0.5,
    min_lr=1e-4,
    warmup_epochs=0.5,
    clip_grad=1.0,
    checkpoint_every_steps=5,
    log_every_steps=4,
    seed=3,
)


class TinyNet(nn.Module):
    """An MLP with a norm, dropout and a (2-D) position embedding: every kind of parameter group."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 8))
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.pos_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_net(seed: int = 0, dropout: float = 0.3) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


class NoisyPoints(Dataset):
    """Three classes of 8-D points, augmented with torch and numpy noise drawn from the global RNGs."""

    def __init__(self, n: int = 24, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=generator)
        self.label = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        noise = 0.1 * torch.randn(8) + float(np.random.uniform(-0.05, 0.05))
        return {"x": self.x[index] + noise, "label": self.label[index]}


def cross_entropy_step(model, batch):
    loss = F.cross_entropy(model(batch["x"]), batch["label"])
    return loss, {"ce": loss.detach()}


class StepCounter(Hook):
    def __init__(self):
        self.count = 0

    def on_step_end(self, state, metrics):
        self.count += 1


class StopAt(Hook):
    """Simulates a preemption: the run dies after step ``step`` (with no checkpoint of that step)."""

    def __init__(self, step: int, kill: bool = False):
        self.step = step
        self.kill = kill

    def on_step_end(self, state, metrics):
        if state.step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt


def run(out_dir: Path, config: TrainConfig = CONFIG, *, model: nn.Module | None = None, **kwargs):
    model = tiny_net() if model is None else model
    metrics = train(model, cross_entropy_step, NoisyPoints(), config, out_dir, device="cpu", **kwargs)
    return model, metrics


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    unequal = [name for name in state_a if not torch.equal(state_a[name], state_b[name])]
    assert not unequal, f"tensors differ: {unequal}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    model, metrics = run(out_dir)
    return model, metrics


# --- config, optimizer, schedule -------------------------------------------------------------------------------


def test_the_package_loads_each_name_from_its_module_on_use():
    import evpretrain.training as training
    from evpretrain.training.loop import train as loop_train

    assert training.train is loop_train and training.TrainConfig is TrainConfig
    assert all(getattr(training, name) is not None for name in training.__all__)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        training.trian  # noqa: B018


def test_config_builds_from_the_study_config_and_names_bad_keys():
    built = from_mapping(TrainConfig, {"epochs": 3, "batch_size": 8, "base_lr": 1.5e-4, "betas": [0.9, 0.99]}, "t")
    assert built.betas == (0.9, 0.99) and built.weight_decay == 0.05 and built.amp == "auto"
    with pytest.raises(ConfigError, match=r"t\.amp: expected one of \['auto', 'off', 'bf16'\]"):
        from_mapping(TrainConfig, {"epochs": 1, "batch_size": 8, "base_lr": 0.1, "amp": "fp16"}, "t")
    with pytest.raises(ConfigError, match=r"t: warmup_epochs must lie in \[0, epochs\]"):
        from_mapping(TrainConfig, {"epochs": 1, "batch_size": 8, "base_lr": 0.1, "warmup_epochs": 2}, "t")
    with pytest.raises(ConfigError, match=r"t: missing required key\(s\) \['base_lr'\]"):
        from_mapping(TrainConfig, {"epochs": 1, "batch_size": 8}, "t")


def test_optimizer_is_adamw_with_scaled_lr_and_no_decay_on_biases_norms_and_position_embeddings():
    model = tiny_net()
    optimizer = build_optimizer(model, CONFIG, world_size=2)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert by_decay == {
        0.05: ["body.0.weight", "head.weight"],
        0.0: ["body.0.bias", "body.1.bias", "body.1.weight", "head.bias", "pos_embed"],
    }
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95)
        assert group["lr"] == pytest.approx(0.5 * 4 * 2 / 256)


def test_gpu_options_are_checked_by_key_and_fused_adamw_is_chosen_on_cuda_only():
    base = {"epochs": 1, "batch_size": 8, "base_lr": 0.1}
    built = from_mapping(TrainConfig, base, "t")
    assert built.compile is False and built.optimizer_impl == "auto"
    with pytest.raises(ConfigError, match=r"t\.compile: expected true or false, got 'yes'"):
        from_mapping(TrainConfig, base | {"compile": "yes"}, "t")
    with pytest.raises(ConfigError, match=r"t\.optimizer_impl: expected one of \['auto', 'foreach', 'fused'\]"):
        from_mapping(TrainConfig, base | {"optimizer_impl": "apex"}, "t")
    with pytest.raises(ValueError, match="optimizer_impl must be one of auto, foreach, fused, got 'apex'"):
        replace(CONFIG, optimizer_impl="apex")
    expected = {  # (optimizer_impl, device type) -> AdamW's (foreach, fused)
        ("auto", "cuda"): (False, True),
        ("auto", "cpu"): (True, False),
        ("auto", "mps"): (True, False),
        ("foreach", "cuda"): (True, False),
        ("fused", "cpu"): (False, True),
    }
    for (impl, device_type), flags in expected.items():
        # The parameters stay on the CPU: AdamW builds with either kernel there; only the device type is asked.
        optimizer = build_optimizer(tiny_net(), replace(CONFIG, optimizer_impl=impl), device_type=device_type)
        assert (optimizer.defaults["foreach"], optimizer.defaults["fused"]) == flags, (impl, device_type)


def test_foreach_and_fused_adamw_step_like_the_per_tensor_loop():
    def trained(optimizer_for) -> dict[str, torch.Tensor]:
        model = tiny_net(dropout=0.0)
        optimizer = optimizer_for(model)
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(16, 8, generator=generator)).square().mean().backward()
            optimizer.step()
        return model.state_dict()

    config = replace(CONFIG, weight_decay=0.05)
    lr = config.base_lr * config.batch_size / 256
    loop = trained(lambda m: torch.optim.AdamW(param_groups(m, 0.05), lr=lr, betas=config.betas, foreach=False))
    foreach = trained(lambda m: build_optimizer(m, replace(config, optimizer_impl="foreach")))
    fused = trained(lambda m: build_optimizer(m, replace(config, optimizer_impl="fused")))
    for name, value in loop.items():
        assert torch.equal(foreach[name], value), name  # the same bits: auto on the CPU keeps the loop's
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6)  # its own rounding
    assert any(not torch.equal(fused[name], value) for name, value in loop.items())


def test_a_compiled_run_trains_the_plain_module_to_the_eager_weights(tmp_path):
    # No dropout: compiled code draws its random masks with its own generator, not eager's.
    config = replace(CONFIG, max_steps=6)
    eager, eager_metrics = run(tmp_path / "eager", config, model=tiny_net(dropout=0.0))
    model, stepped = tiny_net(dropout=0.0), set()

    def step(net, batch):
        stepped.add(type(net).__name__)
        return cross_entropy_step(net, batch)

    metrics = train(model, step, NoisyPoints(), replace(config, compile=True), tmp_path / "compiled", device="cpu")
    assert stepped == {"OptimizedModule"} and type(model) is TinyNet  # the steps compiled; saved, returned plain
    assert load_checkpoint(tmp_path / "compiled" / RESUME_NAME)["model"].keys() == eager.state_dict().keys()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=1e-4)


def test_lr_scales_give_each_group_its_factor_and_frozen_parameters_are_left_out():
    model = tiny_net()
    model.head.requires_grad_(False)
    scales = {"body.0.weight": 0.1, "body.0.bias": 0.1, "pos_embed": 0.01}
    optimizer = build_optimizer(param_groups(model, 0.05, lr_scales=scales), CONFIG)
    names = {id(p): n for n, p in model.named_parameters()}
    found = {names[id(p)]: (g["lr_scale"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    peak = 0.5 * 4 / 256
    assert found == {
        "pos_embed": (0.01, pytest.approx(0.01 * peak)),
        "body.0.weight": (0.1, pytest.approx(0.1 * peak)),
        "body.0.bias": (0.1, pytest.approx(0.1 * peak)),
        "body.1.weight": (1.0, pytest.approx(peak)),
        "body.1.bias": (1.0, pytest.approx(peak)),
    }


def test_cosine_schedule_warms_up_linearly_then_halves_at_midpoint_and_ends_at_min():
    assert cosine_schedule(0, 110, 10, 1.0, 0.1) == 0.0
    assert cosine_schedule(5, 110, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert cosine_schedule(10, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(60, 110, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_schedule(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(0, 100, 0, 2.0, 0.0) == 2.0


@given(st.integers(1, 500), st.integers(0, 100), st.floats(1e-6, 1.0), st.floats(0, 1))
def test_cosine_schedule_decreases_after_warmup_within_its_bounds(total, warmup, base, min_fraction):
    warmup = min(warmup, total)
    minimum = base * min_fraction
    values = [cosine_schedule(s, total, warmup, base, minimum) for s in range(warmup, total + 1)]
    assert all(minimum - 1e-12 <= v <= base + 1e-12 for v in values)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


class WithHeads(nn.Module):
    """A backbone with a head and a decoder whose blocks are not the backbone's: both count as the top layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, 3)
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList([Block(8, num_heads=2)])


VIT_NAMES = (  # vit_demo: depth 6
    ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"]
    + [f"backbone.blocks.{i}.attn.qkv.weight" for i in range(6)]
    + ["backbone.norm.weight", "head.weight", "decoder.blocks.0.mlp.fc1.weight"]
)


def vit_with_heads() -> WithHeads:
    return WithHeads(create_backbone("vit_demo", img_size=16))


def test_layer_decay_scales_are_decay_to_the_distance_from_the_top():
    scales = layer_scales(vit_with_heads(), "decay", decay=0.5)
    expected = [0.5**7, 0.5**7, 0.5**6, 0.5**5, 0.5**4, 0.5**3, 0.5**2, 0.5, 1.0, 1.0, 1.0]
    assert [scales[n] for n in VIT_NAMES] == pytest.approx(expected)


def their_grafted_scale(name: str) -> float:
    """utils/lr_decay.py of the paper: get_layer_id_for_vit(layer_grafted=True) (:77-92) into layer_scales
    [0.01, 0.1, 1] (:34-35), for a parameter name of their PrHubModel."""
    if name.startswith(("backbone.pos_embed", "backbone.patch_embed")):
        group = 0
    elif name.startswith(("backbone.conv_block1", "backbone.conv_block2")):
        group = 0
    elif name.startswith("backbone.vit_block"):
        block_id = int(name.split(".")[2])
        group = 0 if block_id // 4 == 0 else 1 if block_id // 4 == 1 else 2
    else:
        group = 2
    return [0.01, 0.1, 1][group]


@pytest.mark.parametrize(
    "kind, preset", [("vit", "vit_small_patch16"), ("convvit", "convvit_small"), ("swin", "swin_tiny")]
)
def test_layer_grafted_scales_are_the_papers_for_every_parameter(kind, preset):
    with torch.device("meta"):
        module = WithHeads(create_backbone(preset))
    scales = layer_scales(module, "grafted")
    theirs = their_keys(f"{kind}_mm_trans_cl")
    expected = {}
    for name, _ in module.named_parameters():
        if not name.startswith("backbone."):
            expected[name] = their_grafted_scale(name)  # heads, decoders: not theirs' backbone, 1.0
            continue
        their = their_name(kind, name.removeprefix("backbone."))
        if their is None:  # our Swin's mask token, which theirs lacks: with the input embedding
            expected[name] = 0.01
            continue
        assert f"backbone.{their}" in theirs, name
        expected[name] = their_grafted_scale(f"backbone.{their}")
    assert scales == expected
    if kind == "convvit":  # blocks3 (their vit_block) 0-3, 4-7, 8-10; the conv stages with the first group
        assert [scales[f"backbone.blocks3.{i}.attn.qkv.weight"] for i in (3, 4, 7, 8, 10)] == [0.01, 0.1, 0.1, 1, 1]
        assert scales["backbone.blocks2.1.mlp.fc2.weight"] == scales["backbone.patch_embed4.weight"] == 0.01


def test_layer_grafted_scales_by_thirds_split_the_blocks_by_depth():
    module = vit_with_heads()
    scales = layer_scales(module, "grafted", grafted_groups="thirds")
    expected = [0.01, 0.01, 0.01, 0.01, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [scales[n] for n in VIT_NAMES] == expected
    assert list(scales) == [name for name, _ in module.named_parameters()]
    with torch.device("meta"):
        deep = layer_scales(WithHeads(create_backbone("vit_small_patch16")), "grafted", grafted_groups="thirds")
    blocks = [{v for n, v in deep.items() if n.startswith(f"backbone.blocks.{i}.")} for i in range(12)]
    assert blocks == [{0.01}] * 4 + [{0.1}] * 4 + [{1.0}] * 4
    assert set(layer_scales(module, "none").values()) == {1.0}
    with pytest.raises(ValueError, match="unknown layer-scale rule 'linear'"):
        layer_scales(module, "linear")
    with pytest.raises(ValueError, match="unknown grafted_groups 'halves'"):
        layer_scales(module, "grafted", grafted_groups="halves")


def test_layer_scales_follow_each_backbones_own_layer_ids():
    # convvit_demo: depths (1, 1, 4), 6 layers between the embedding and the final norm; a later stage's patch
    # embedding shares its first block's layer. swin_demo: depths (1, 1, 2, 1), 5 layers; the patch merging that
    # opens a stage shares its first block's layer.
    convvit = WithHeads(create_backbone("convvit_demo", img_size=16))
    decay = layer_scales(convvit, "decay", 0.5)
    grafted = layer_scales(convvit, "grafted", grafted_groups="thirds")
    for name, layer in [
        ("backbone.patch_embed1.proj.weight", 0),
        ("backbone.blocks1.0.norm1.weight", 1),
        ("backbone.patch_embed2.proj.weight", 2),
        ("backbone.blocks2.0.norm1.weight", 2),
        ("backbone.patch_embed4.weight", 3),
        ("backbone.blocks3.3.norm1.weight", 6),
        ("backbone.norm.weight", 7),
        ("head.weight", 7),
    ]:
        assert decay[name] == 0.5 ** (7 - layer), name
    assert [grafted[f"backbone.blocks3.{i}.norm1.weight"] for i in range(4)] == [0.1, 0.1, 1.0, 1.0]
    assert grafted["backbone.patch_embed2.proj.weight"] == grafted["backbone.blocks1.0.norm1.weight"] == 0.01
    swin = WithHeads(create_backbone("swin_demo", img_size=16))
    decay = layer_scales(swin, "decay", 0.5)
    grafted = layer_scales(swin, "grafted", grafted_groups="thirds")
    for name, layer, third in [
        ("backbone.mask_token", 0, 0.01),
        ("backbone.stages.0.blocks.0.norm1.weight", 1, 0.01),
        ("backbone.stages.1.downsample.norm.weight", 2, 0.01),
        ("backbone.stages.2.blocks.0.norm1.weight", 3, 0.1),
        ("backbone.stages.2.blocks.1.norm1.weight", 4, 0.1),
        ("backbone.stages.3.blocks.0.norm1.weight", 5, 1.0),
        ("backbone.norm.weight", 6, 1.0),
        ("decoder.blocks.0.mlp.fc1.weight", 6, 1.0),
    ]:
        assert (decay[name], grafted[name]) == (0.5 ** (6 - layer), third), name


# --- data order and RNG ----------------------------------------------------------------------------------------


def test_sampler_shards_add_up_to_the_single_process_batches_and_resume_mid_epoch():
    single = EpochBatchSampler(26, 6, seed=7)
    ranks = [EpochBatchSampler(26, 3, seed=7, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_position(1, 0)
    whole = list(single)
    shards = [list(s) for s in ranks]
    assert len(whole) == 4 and all(len(s) == 4 for s in shards)
    for b, batch in enumerate(whole):
        assert sorted(batch) == sorted(shards[0][b] + shards[1][b])
        assert {epoch for _, epoch in batch} == {1}
    single.set_position(1, 3)
    assert list(single) == whole[3:]
    single.set_position(0, 0)
    assert list(single) != whole  # another epoch, another order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(5, 3, seed=0, world_size=2)


@pytest.mark.parametrize(("samples", "world_size"), [(5, 1), (6, 1), (7, 2), (8, 2), (0, 1)])
def test_a_batch_larger_than_the_store_is_refused_by_its_key_where_the_sampler_would_have_no_step(samples, world_size):
    config = replace(CONFIG, batch_size=4)
    steps = samples // (4 * world_size)  # the sampler drops the tail that does not fill a global batch
    if steps:
        check_batch_fits(config, samples, world_size, "pretrain.stage1.train", "s.h5")
        assert EpochBatchSampler(samples, 4, seed=0, world_size=world_size).batches_per_epoch == steps
        return
    processes = " x 2 processes" if world_size == 2 else ""
    expected = f"pretrain.stage1.train.batch_size 4{processes} is larger than the {samples} samples of s.h5"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        check_batch_fits(config, samples, world_size, "pretrain.stage1.train", "s.h5")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(samples, 4, seed=0, world_size=world_size)


class EpochAwarePoints(NoisyPoints):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_a_dataset_with_set_epoch_is_told_each_epoch_also_on_resume(tmp_path):
    first, second = EpochAwarePoints(), EpochAwarePoints()
    train(tiny_net(), cross_entropy_step, first, replace(CONFIG, max_steps=8), tmp_path, device="cpu")
    train(tiny_net(), cross_entropy_step, second, CONFIG, tmp_path, device="cpu")
    assert (first.epochs, second.epochs) == ([0, 1], [1])


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "c.pt")
    first = (random.random(), np.random.normal(), torch.randn(3))
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    second = (random.random(), np.random.normal(), torch.randn(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


# --- checkpoints and exact resume ------------------------------------------------------------------------------


def test_checkpoint_holds_the_whole_run_state_and_loads_weights_only(tmp_path):
    _, metrics = run(tmp_path, replace(CONFIG, max_steps=5))
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["step"] == 5 and (checkpoint["epoch"], checkpoint["batch_in_epoch"]) == (0, 5)
    assert {"model", "optimizer", "schedule", "rng", "config", "world_size"} <= checkpoint.keys()
    assert checkpoint["schedule"] == {"peak_lr": 0.5 * 4 / 256, "min_lr": 1e-4, "warmup_steps": 3, "total_steps": 12}
    assert checkpoint["config"]["max_steps"] == 5 and len(checkpoint["rng"]) == 1
    assert json.loads((tmp_path / METRICS_NAME).read_text())["step"] == 5 == metrics["step"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_stopped_between_checkpoints_resumes_to_exactly_the_uninterrupted_weights(
    uninterrupted, tmp_path, num_workers
):
    config = replace(CONFIG, num_workers=num_workers)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, config, hooks=[StopAt(7)])  # dies at step 7, in epoch 1; last checkpoint at step 5
    assert load_checkpoint(tmp_path / RESUME_NAME)["step"] == 5
    assert not (tmp_path / METRICS_NAME).exists() and not (tmp_path / CHECKPOINT_NAME).exists()
    model, metrics = run(tmp_path, config)
    reference, reference_metrics = uninterrupted
    assert_same_weights(model, reference)
    assert metrics["loss"] == reference_metrics["loss"] and metrics["step"] == 12
    assert metrics["log"] == reference_metrics["log"]  # the loss curve too: rows before the checkpoint kept


def test_a_run_capped_by_max_steps_continues_on_the_same_trajectory(uninterrupted, tmp_path):
    run(tmp_path, replace(CONFIG, max_steps=4))
    model, _ = run(tmp_path)
    assert_same_weights(model, uninterrupted[0])


def in_forked_child(fn) -> int | None:
    """Run ``fn`` in a forked process on one intra-op thread (the parent's thread pool does not survive a fork);
    return its exit code."""

    def target():
        torch.set_num_threads(1)
        fn()

    child = multiprocessing.get_context("fork").Process(target=target)
    child.start()
    child.join(60)
    return child.exitcode


def test_a_process_killed_by_sigkill_resumes_to_exactly_the_uninterrupted_weights(tmp_path):
    # All runs on one thread: a reduction split over another number of threads may round differently.
    def save_run(out_dir, name):
        model, _ = run(out_dir)
        torch.save(model.state_dict(), tmp_path / name)

    assert in_forked_child(lambda: save_run(tmp_path / "uninterrupted", "reference.pt")) == 0
    assert in_forked_child(lambda: run(tmp_path / "killed", hooks=[StopAt(8, kill=True)])) == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "killed" / RESUME_NAME)["step"] == 5
    assert in_forked_child(lambda: save_run(tmp_path / "killed", "resumed.pt")) == 0
    reference, resumed = (torch.load(tmp_path / name, weights_only=True) for name in ("reference.pt", "resumed.pt"))
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)


def test_rerunning_a_finished_run_loads_its_weights_and_returns_its_metrics(uninterrupted, tmp_path):
    first_model, first_metrics = run(tmp_path)
    (tmp_path / METRICS_NAME).unlink()
    model, metrics = run(tmp_path, model=tiny_net(seed=9))
    assert metrics == first_metrics == json.loads((tmp_path / METRICS_NAME).read_text())
    assert_same_weights(model, first_model)


def test_a_finished_run_whose_checkpoint_a_pipeline_deleted_publishes_it_again_without_training(
    uninterrupted, tmp_path
):
    first_model, first_metrics = run(tmp_path)
    checkpoint, resume = tmp_path / CHECKPOINT_NAME, tmp_path / RESUME_NAME
    assert os.path.samefile(checkpoint, resume)  # one file, two names: no copy
    checkpoint.unlink()  # what Snakemake does to the outputs of a job that failed after training
    (tmp_path / METRICS_NAME).unlink()
    steps = StepCounter()
    model, metrics = run(tmp_path, model=tiny_net(seed=9), hooks=[steps])
    assert steps.count == 0 and metrics == first_metrics
    assert_same_weights(model, first_model)
    assert os.path.samefile(checkpoint, resume)


def test_resuming_with_other_settings_is_refused_and_names_them(tmp_path):
    run(tmp_path, replace(CONFIG, max_steps=2))
    with pytest.raises(ResumeError, match=r"base_lr: 0\.5 -> 0\.25"):
        run(tmp_path, replace(CONFIG, base_lr=0.25))
    run(tmp_path, replace(CONFIG, num_workers=2, log_every_steps=1, max_steps=3))  # execution-only: fine


def test_a_checkpoint_written_before_a_setting_existed_resumes_under_its_default(tmp_path):
    run(tmp_path, replace(CONFIG, max_steps=2))
    checkpoint = torch.load(tmp_path / "resume.pt", weights_only=True)
    del checkpoint["config"]["optimizer_impl"], checkpoint["config"]["compile"]  # as before issue 16 added them
    torch.save(checkpoint, tmp_path / "resume.pt")
    _, metrics = run(tmp_path, replace(CONFIG, max_steps=3))
    assert metrics["step"] == 3
    with pytest.raises(ResumeError, match=r"optimizer_impl: 'auto' -> 'fused'"):
        run(tmp_path, replace(CONFIG, optimizer_impl="fused"))


def test_resuming_a_run_of_other_data_method_or_init_is_refused_and_names_them(tmp_path):
    identity = {"data": {"train": "sha-a"}, "method": {"mask_ratio": 0.75}, "init": None}
    run(tmp_path, replace(CONFIG, max_steps=2), identity=identity)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["identity"] == identity
    other = {"data": {"train": "sha-b"}, "method": {"mask_ratio": 0.5}, "init": "sha-c"}
    with pytest.raises(ResumeError) as error:
        run(tmp_path, identity=other)
    message = str(error.value)
    for difference in ("data.train: 'sha-a' -> 'sha-b'", "method.mask_ratio: 0.75 -> 0.5", "init: None -> 'sha-c'"):
        assert difference in message
    run(tmp_path, replace(CONFIG, max_steps=3), identity=dict(identity))  # the same identity resumes
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    class SecondRunAt(Hook):  # while the first run trains, a second one starts on the same folder
        def on_step_end(self, state, metrics):
            if state.step == 2:
                with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
                    run(tmp_path)

    run(tmp_path, replace(CONFIG, max_steps=3), hooks=[SecondRunAt()])
    run(tmp_path, replace(CONFIG, max_steps=4))  # released at the end: the next run continues
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 4


def test_a_nan_loss_stops_with_the_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def poisoned_step(model, batch):
        calls.append(None)
        loss = F.cross_entropy(model(batch["x"]), batch["label"])
        if len(calls) == 7:
            loss = loss * float("nan")
        return loss, {"ce": loss.detach(), "reg": 0.25}

    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss nan at step 7 \(loss terms \{'ce': nan, 'reg': 0.25\}\)"
        r".*resume\.pt \(step 5\) is kept",
    ) as error:
        train(tiny_net(), poisoned_step, NoisyPoints(), CONFIG, tmp_path, device="cpu")
    assert error.value.step == 7 and error.value.checkpoint_step == 5
    saved = load_checkpoint(tmp_path / RESUME_NAME)
    assert saved["step"] == 5
    reference, _ = run(tmp_path / "five", replace(CONFIG, max_steps=5))
    assert all(torch.equal(saved["model"][k], v) for k, v in reference.state_dict().items())
    assert not (tmp_path / METRICS_NAME).exists()


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


# --- the step: clipping, precision, metrics --------------------------------------------------------------------


class GradientNorms(Hook):
    def __init__(self):
        self.norms = []

    def on_step_end(self, state, metrics):
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self.norms.append(
            (float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))), metrics["grad_norm"])
        )


def test_gradients_are_clipped_to_the_max_norm_and_the_raw_norm_is_logged(tmp_path):
    norms = GradientNorms()
    run(tmp_path, replace(CONFIG, clip_grad=0.05, max_steps=4), hooks=[norms])
    assert all(clipped <= 0.05 * (1 + 1e-5) for clipped, _ in norms.norms)
    assert all(raw > 0.05 for _, raw in norms.norms)


@pytest.mark.parametrize("amp, dtype", [("auto", torch.float32), ("off", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_is_bf16_only_when_asked_on_the_cpu(tmp_path, amp, dtype):
    seen = set()

    def step(model, batch):
        logits = model(batch["x"])
        seen.add(logits.dtype)
        return F.cross_entropy(logits.float(), batch["label"]), {}

    train(tiny_net(), step, NoisyPoints(), replace(CONFIG, amp=amp, max_steps=2), tmp_path, device="cpu")
    assert seen == {dtype}


def test_metrics_json_holds_the_final_loss_terms_and_throughput(uninterrupted):
    _, metrics = uninterrupted
    assert metrics["step"] == 12 and metrics["epoch"] == 2.0 and metrics["samples"] == 48
    assert {"loss", "ce", "lr", "grad_norm", "samples_per_s", "wall_time_s", "peak_lr"} <= metrics.keys()
    assert metrics["ce"] == pytest.approx(metrics["loss"])
    assert metrics["samples_per_s"] > 0 and math.isfinite(metrics["loss"])
    # The loss curve: one row of means every log_every_steps (4) and at the last step, the last being the final.
    assert [row["step"] for row in metrics["log"]] == [4, 8, 12]
    assert [row["epoch"] for row in metrics["log"]] == [pytest.approx(4 / 6), pytest.approx(8 / 6), 2.0]
    assert metrics["log"][-1]["loss"] == metrics["loss"] and metrics["log"][0]["loss"] > metrics["loss"]


# --- kNN ---------------------------------------------------------------------------------------------------------


def test_knn_accuracy_weights_votes_by_exp_similarity_over_temperature():
    train_features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train_labels = torch.tensor([0, 1, 1])
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # cosine similarities 1, 0, 0.7071. T = 1: class 0 e^1 = 2.72 < class 1 e^0 + e^0.7071 = 3.03.
    assert knn_accuracy(train_features, train_labels, query, label, k=3, temperature=1.0) == 0.0
    # T = 0.07: class 0 e^14.3 > class 1 1 + e^10.1.
    assert knn_accuracy(train_features, train_labels, query, label, k=3, temperature=0.07) == 1.0
    # k = 2 leaves the orthogonal sample out: e^1 > e^0.7071 at any temperature; k > N uses all N.
    assert knn_accuracy(train_features, train_labels, query, label, k=2, temperature=1.0) == 1.0
    assert knn_accuracy(5 * train_features, train_labels, query, label, k=20, temperature=1.0) == 0.0
    queries = torch.tensor([[1.0, 0.0], [0.1, 1.0]])
    assert knn_accuracy(train_features, train_labels, queries, torch.tensor([0, 1]), k=1, chunk_size=1) == 1.0
    with pytest.raises(ValueError, match="labels >= 0"):
        knn_accuracy(train_features, torch.tensor([0, -1, 1]), query, label)


class PartlyLabelled(NoisyPoints):
    def __getitem__(self, index):
        return super().__getitem__(index) | {"label": torch.tensor(-1 if index % 2 else index % 3)}


def test_knn_monitor_leaves_unlabelled_samples_out():
    oracle = KnnMonitor(
        lambda model, batch: F.one_hot(batch["label"].clamp(min=0), 3).float(),
        PartlyLabelled(),
        PartlyLabelled(),
        every_steps=1,
    )
    assert oracle.evaluate(tiny_net(), torch.device("cpu")) == 1.0
    unlabelled = KnnMonitor(
        lambda model, batch: batch["x"], PartlyLabelled(), Subset(PartlyLabelled(), [1]), every_steps=1
    )
    with pytest.raises(ValueError, match="no labelled sample"):
        unlabelled.evaluate(tiny_net(), torch.device("cpu"))


def test_knn_monitor_logs_the_final_models_accuracy_without_changing_the_training(uninterrupted, tmp_path):
    def monitor(embed_fn, name):
        return KnnMonitor(
            embed_fn, NoisyPoints(32, seed=5), NoisyPoints(16, seed=6), every_steps=4, batch_size=10, name=name
        )

    features = monitor(lambda model, batch: model.features(batch["x"]), "knn_top1")
    oracle = monitor(lambda model, batch: F.one_hot(batch["label"], 3).float(), "knn_oracle")
    model, metrics = run(tmp_path, hooks=[features, oracle])
    assert_same_weights(model, uninterrupted[0])
    assert metrics["knn_oracle"] == 1.0  # features that are the labels: the labels reach knn_accuracy aligned
    torch.manual_seed(123)  # evaluate() seeds the subsets' augmentation itself
    assert metrics["knn_top1"] == features.evaluate(model, torch.device("cpu"))
    assert model.training


# --- MLflow ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # importing mlflow and creating a sqlite store take seconds
def test_mlflow_hook_logs_one_run_across_a_crash_and_a_resume_without_repeating_a_row(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {"stage": 1, "train": {"base_lr": 0.5}}
    with pytest.raises(KeyboardInterrupt):  # dies at step 9: rows of steps 4 and 8 logged, last checkpoint at 5
        run(tmp_path / "run", hooks=[StopAt(9), MlflowHook(uri, "tests", "stage1", params, tags={"kind": "stage"})])
    client = MlflowClient(uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert killed.info.status == "KILLED" and killed.data.metrics["train/step"] == 8
    # The rerun has one hook fewer: the run id still reaches the MLflow hook, which logs from step 9 on.
    _, metrics = run(tmp_path / "run", hooks=[MlflowHook(uri, "tests", "stage1", params)])

    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert found.info.run_id == killed.info.run_id and found.info.status == "FINISHED"
    assert found.info.run_name == "stage1" and found.data.tags["kind"] == "stage"
    assert found.data.params == {"stage": "1", "train.base_lr": "0.5"}
    loss = client.get_metric_history(found.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(row["step"], row["loss"]) for row in metrics["log"]]
    assert [m.step for m in loss] == [4, 8, 12]  # the row of step 8 once, though steps 6-9 ran twice
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/epoch")] == [4, 8, 12]
    assert found.data.metrics["loss"] == metrics["loss"] and found.data.metrics["samples"] == 48
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == [METRICS_NAME]
    assert (tmp_path / "mlartifacts").is_dir()


@pytest.mark.slow  # importing mlflow takes seconds
def test_a_tracking_server_that_is_down_is_reported_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once rather than after minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    hook = MlflowHook(f"http://127.0.0.1:{_free_port()}", "tests", "stage1", {"stage": 1})  # nothing listens
    with caplog.at_level("WARNING", logger="evpretrain.training.mlflow_hook"):
        _, metrics = run(tmp_path, hooks=[hook])
    assert metrics["step"] == 12 and (tmp_path / METRICS_NAME).exists()
    warnings = [r for r in caplog.records if r.name == "evpretrain.training.mlflow_hook"]
    assert len(warnings) == 1 and "trains on without live tracking" in warnings[0].getMessage()
    assert hook.run_id is None


class Counter(Hook):
    """Counts the steps it saw; the count travels in the checkpoint."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, state, metrics):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_a_resumed_run_with_a_hook_more_or_less_keeps_each_hooks_state(tmp_path):
    first = Counter()
    with pytest.raises(KeyboardInterrupt):  # dies at step 7: the checkpoint of step 5 holds Counter's 5
        run(tmp_path, hooks=[StopAt(7), first])
    assert first.seen == 6  # StopAt raised before Counter saw step 7
    resumed = Counter()
    run(tmp_path, hooks=[resumed])  # StopAt gone: Counter's state still reaches Counter
    assert resumed.seen == 5 + 7  # steps 1-5 from the checkpoint, 6-12 in this run


# --- DDP ---------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: Path, result_dir: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    model = tiny_net(seed=rank, dropout=0.0)  # another init on rank 1: DDP must broadcast rank 0's
    metrics = train(model, cross_entropy_step, NoisyPoints(), CONFIG, out_dir, device="cpu")
    torch.save({"weights": model.state_dict(), "metrics": metrics}, result_dir / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters import torch
def test_two_gloo_processes_match_one_process_with_their_global_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), tmp_path / "ddp", tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name
    assert ranks[0]["metrics"]["peak_lr"] == 0.5 * 4 * 2 / 256 and ranks[0]["metrics"]["world_size"] == 2
    assert load_checkpoint(tmp_path / "ddp" / CHECKPOINT_NAME)["world_size"] == 2
    assert (tmp_path / "ddp" / METRICS_NAME).exists()

    single, _ = run(tmp_path / "single", replace(CONFIG, batch_size=8), model=tiny_net(seed=0, dropout=0.0))
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["weights"][name], tensor, rtol=0, atol=1e-6)


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_autocast_is_bf16_and_a_resumed_run_matches_exactly(tmp_path):
    seen = set()

    def step(model, batch):
        logits = model(batch["x"])
        seen.add(logits.dtype)
        return F.cross_entropy(logits.float(), batch["label"]), {}

    def cuda_run(out_dir, config, hooks=()):
        model = tiny_net()
        train(model, step, NoisyPoints(), config, out_dir, device="cuda", hooks=hooks)
        return model

    reference = cuda_run(tmp_path / "a", CONFIG)
    with pytest.raises(KeyboardInterrupt):
        cuda_run(tmp_path / "b", CONFIG, hooks=[StopAt(7)])
    assert "cuda" in load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["rng"][0]
    resumed = cuda_run(tmp_path / "b", CONFIG)
    assert seen == {torch.bfloat16}
    assert_same_weights(resumed, reference)


def test_a_file_that_is_not_a_checkpoint_is_an_error_naming_it(tmp_path):
    save_checkpoint({"format": 1, "model": {}, "step": 3}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {
        "missing.pt": "no such checkpoint file",
        "truncated.pt": "not a readable torch checkpoint",
        # one line: of torch's paragraph on weights_only, only what its unpickler refused ("n" is opcode 110)
        "text.pt": r"not a readable torch checkpoint \(UnpicklingError: Unsupported operand 110\)$",
        "list.pt": "holds a list, expected a dict",
    }
    for name, reason in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name}: {reason}") as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"whole\.pt: lacks \['optimizer'\]"):
        load_checkpoint(tmp_path / "whole.pt", required=("model", "optimizer"))
    assert load_checkpoint(tmp_path / "whole.pt", required=("model",))["step"] == 3


@pytest.mark.parametrize(
    ("amp", "device_type", "expected"),
    [("auto", "cpu", False), ("auto", "cuda", True), ("bf16", "cpu", True), ("off", "cuda", False)],
)
def test_bf16_autocast_follows_amp_and_the_device(amp, device_type, expected):
    from evpretrain.training.config import TrainConfig, uses_bf16

    assert uses_bf16(TrainConfig(epochs=1, batch_size=1, base_lr=1e-3, amp=amp), device_type) is expected
