"""The three stages: freezing, focus weights, initialisation from the previous stage, the CLI end to end."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from evpretrain.cli import main
from evpretrain.config import ConfigError
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.store import EventStoreWriter
from evpretrain.events.contract import make_events
from evpretrain.models import BackboneSpec, backbone_spec
from evpretrain.pretrain.config import PretrainConfig, pretrain_config
from evpretrain.pretrain.run import (
    build_stage_module,
    initialise,
    stage_param_groups,
    teacher_cache_grid,
    teacher_features_for,
)
from evpretrain.pretrain.stages import focus_weights

TINY = {
    "backbone": "vit_demo",
    "backbone_overrides": {"img_size": [32, 32], "depth": 2},
    # The paper's sample (one interval, crop, flips, nearest/bicubic), teacher tokens moved with the view.
    "data": {
        "input_size": [32, 32],
        "window": "interval",
        "augment": {"crop_scale": [0.8, 1.0], "hflip_p": 0.5, "time_flip_p": 0.5},
        "resize": "nearest",
        "target_resize": "bicubic",
        "align_teacher_tokens": True,
    },
    "knn": {"every_steps": 2, "memory": 8, "queries": 4, "k": 3},
    "stage1": {
        "method": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3, "max_steps": 2},
    },
    "stage2": {
        "method": {"hidden_dim": 32, "queue_length": 8},
        "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3, "max_steps": 2},
    },
    "stage3": {
        "method": {"hidden_dim": 32, "queue_length": 8, "focus": "density"},
        "layer_lr": {"rule": "grafted", "grafted_groups": "thirds"},
        "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3, "max_steps": 2},
    },
}


def tiny_config(**changes) -> PretrainConfig:
    return pretrain_config({"pretrain": TINY | changes})


def random_batch(module, batch=4, teacher_dim=None):
    backbone = module.backbone
    h, w = backbone.img_size
    out = {
        "voxel": torch.randn(batch, backbone.in_chans, h, w),
        "density": torch.rand(batch, h, w),
        "target_difference": torch.randn(batch, 1, h, w),
    }
    if teacher_dim:
        out["teacher"] = torch.randn(batch, backbone.num_tokens, teacher_dim)
    return out


@pytest.mark.parametrize("teacher_projection", ["trained", "frozen"])
def test_stage2_trains_only_the_final_norm_of_the_backbone_and_the_heads(teacher_projection):
    torch.manual_seed(0)
    stage2 = {**TINY["stage2"], "method": {**TINY["stage2"]["method"], "teacher_projection": teacher_projection}}
    config = tiny_config(stage2=stage2)
    module = build_stage_module(2, config, teacher_dim=12)
    groups = stage_param_groups(module, 2, config, weight_decay=0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loss, _, _ = module(random_batch(module, teacher_dim=12))
    loss.backward()
    optimizer.step()
    after = module.state_dict()
    changed = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    backbone_changed = {k for k in changed if k.startswith("backbone.")}
    assert backbone_changed == {"backbone.norm.weight", "backbone.norm.bias"}
    assert any(k.startswith("projector.") for k in changed)
    # A frozen teacher projection keeps the queued keys consistent (see ContrastConfig).
    assert any(k.startswith("teacher_projection.") for k in changed) == (teacher_projection == "trained")
    trainable = {n for g in groups for p in g["params"] for n, q in module.named_parameters() if q is p}
    assert {n for n in trainable if n.startswith("backbone.")} == {"backbone.norm.weight", "backbone.norm.bias"}


def test_stage3_layer_rule_scales_the_backbone_by_depth():
    config = tiny_config()
    module = build_stage_module(3, config, teacher_dim=12)
    groups = stage_param_groups(module, 3, config, weight_decay=0.05)
    scale = {n: g["lr_scale"] for g in groups for p in g["params"] for n, q in module.named_parameters() if q is p}
    assert scale["backbone.blocks.0.attn.qkv.weight"] == 0.01  # first third of the blocks (grafted by thirds)
    assert scale["backbone.blocks.1.attn.qkv.weight"] == 0.1
    assert scale["projector.layers.0.weight"] == 1.0
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen == {
        "teacher_projection.norm.weight",
        "teacher_projection.norm.bias",
        "teacher_projection.proj.weight",
    }


@pytest.mark.parametrize("score", ["events", "abs_sum"])
def test_density_masking_scores_patches_by_event_count_or_by_the_papers_abs_sum(score):
    stage1 = {**TINY["stage1"], "method": {**TINY["stage1"]["method"], "masking": "densest", "density_score": score}}
    module = build_stage_module(1, tiny_config(stage1=stage1), None)  # 4x4 patches of 8x8 pixels, 8 masked
    batch = random_batch(module, batch=1)
    signed = torch.tensor([0, 2, 5, 7, 8, 10, 13, 15])  # patches with net polarity
    voxel, density = torch.zeros(1, 5, 4, 8, 4, 8), torch.zeros(1, 4, 8, 4, 8)
    rows, cols = signed // 4, signed % 4
    voxel[0, 0, rows, 0, cols, 0] = 1.0  # one ON event: |sum| 1, one event
    cancelling = torch.tensor([i for i in range(16) if i not in signed.tolist()])
    rows, cols = cancelling // 4, cancelling % 4
    voxel[0, 1, rows, :, cols, :] = 1.0  # ON and OFF at every pixel: |sum| 0, 128 events per pixel
    voxel[0, 2, rows, :, cols, :] = -1.0
    density[0, rows, :, cols, :] = 2.0
    density[0, signed // 4, 0, signed % 4, 0] = 1.0
    batch |= {"voxel": voxel.reshape(1, 5, 32, 32), "density": density.reshape(1, 32, 32)}
    _, _, outputs = module(batch)
    expected = signed if score == "abs_sum" else cancelling
    assert outputs["mask"][0].nonzero().flatten().tolist() == expected.tolist()


def test_the_teacher_grid_setting_decides_the_cached_grid_and_the_projection(monkeypatch):
    assert teacher_cache_grid("resize", (4, 4), (14, 14)) == (4, 4)
    assert teacher_cache_grid("conv", (7, 7), (14, 14)) == (14, 14)  # the paper's Swin: a stride-2 conv
    assert teacher_cache_grid("conv", (14, 14), (14, 14)) == (14, 14)  # the paper's ViT: a Linear layer
    with pytest.raises(ConfigError, match=r"pretrain\.teacher\.grid: conv needs the teacher's token grid \(14, 14\)"):
        teacher_cache_grid("conv", (4, 4), (14, 14))
    config = tiny_config(teacher={"grid": "conv"})
    module = build_stage_module(2, config, teacher_dim=12, teacher_grid=(8, 8))  # the backbone's grid is 4x4
    assert isinstance(module.teacher_projection.proj, torch.nn.Conv2d)
    batch = random_batch(module, teacher_dim=12) | {"teacher": torch.randn(4, 64, 12)}
    loss, _, _ = module(batch)
    assert loss.isfinite()
    assert module.teacher_projection(batch["teacher"]).shape == (4, 16, 192)
    assert isinstance(build_stage_module(2, config, 12, (4, 4)).teacher_projection.proj, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"teacher tokens on a \(6, 6\) grid: expected the backbone's \(4, 4\)"):
        build_stage_module(2, config, teacher_dim=12, teacher_grid=(6, 6))
    # teacher-features caches on the grid the setting asks for: the teacher's own (7x7 for EfficientNet-Lite0).
    import evpretrain.teachers as teachers

    calls = []
    monkeypatch.setattr(teachers, "create_teacher", lambda name, **_: type("T", (), {"grid_size": (8, 8)})())
    monkeypatch.setattr(teachers, "compute_teacher_features", lambda *a, grid_size, **_: calls.append(grid_size))
    teacher_features_for(config, "store.h5", "out.h5", device="cpu")
    teacher_features_for(tiny_config(), "store.h5", "out.h5", device="cpu")
    assert calls == [(8, 8), (4, 4)]


def test_focus_weights_follow_the_region_value_with_mean_one():
    density = torch.zeros(1, 4, 4)
    density[0, :2, :2] = 10.0  # all events in the top-left patch of a 2x2 grid of 2-pixel patches
    weights = focus_weights("density", {"density": density}, patch_size=2)
    assert weights.shape == (1, 4)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0, 0] > 3.5 and torch.all(weights[0, 1:] > 0)  # empty patches keep a floor
    difference = torch.zeros(1, 1, 4, 4)
    difference[0, 0, 2:, 2:] = 1.0
    weights = focus_weights("difference", {"target_difference": difference}, patch_size=2)
    assert weights.argmax().item() == 3
    assert focus_weights("none", {}, 2) is None


def test_each_stage_starts_from_the_previous_ones_weights(tmp_path):
    config = tiny_config()
    stage1 = build_stage_module(1, config, None)
    torch.save({"model": stage1.state_dict()}, tmp_path / "s1.pt")
    stage2 = build_stage_module(2, config, teacher_dim=12)
    assert initialise(stage2, 2, tmp_path / "s1.pt") == {"missing": [], "unexpected": []}
    for k, v in stage1.backbone.state_dict().items():
        assert torch.equal(stage2.backbone.state_dict()[k], v)
    torch.save({"model": stage2.state_dict()}, tmp_path / "s2.pt")
    stage3 = build_stage_module(3, config, teacher_dim=12)
    initialise(stage3, 3, tmp_path / "s2.pt")
    for k, v in stage2.state_dict().items():
        assert torch.equal(stage3.state_dict()[k], v)  # the same heads, the same queue
    # Without stage 2 (an ablation), stage 3 starts from stage 1's backbone with fresh heads.
    torch.manual_seed(5)
    fresh = build_stage_module(3, config, teacher_dim=12)
    heads = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith("backbone.")}
    initialise(fresh, 3, tmp_path / "s1.pt")
    for k, v in stage1.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[k], v)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in heads.items())


def test_the_pretrain_config_and_downstream_build_the_same_backbone():
    study = {"pretrain": TINY | {"data": {"num_bins": 3, "input_size": [32, 32]}}}
    expected = BackboneSpec("vit_demo", 3, {"img_size": [32, 32], "depth": 2})
    assert pretrain_config(study).backbone_spec == backbone_spec(study) == expected
    assert (
        tiny_config().backbone_spec
        == backbone_spec({"pretrain": TINY})
        == BackboneSpec("vit_demo", 5, expected.overrides)
    )


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"pretrain\.stage1\.method\.masking: expected one of"):
        tiny_config(stage1={"method": {"masking": "edges"}, "train": TINY["stage1"]["train"]})
    with pytest.raises(ConfigError, match=r"pretrain\.stage2: missing required key\(s\) \['train'\]"):
        tiny_config(stage2={})
    with pytest.raises(ConfigError, match=r"pretrain\.data\.augment: augment\.hflip_p must lie in \[0, 1\], got 2"):
        tiny_config(data={"augment": {"hflip_p": 2}})
    with pytest.raises(ConfigError, match=r"pretrain\.data\.window: expected one of \['interval', 'clip'\]"):
        tiny_config(data={"window": "frame"})
    with pytest.raises(ConfigError, match=r"pretrain\.teacher\.input: expected one of \['rgb', 'last_frame'\]"):
        tiny_config(teacher={"input": "grey"})
    with pytest.raises(ConfigError, match=r"pretrain\.teacher\.grid: expected one of \['resize', 'conv'\]"):
        tiny_config(teacher={"grid": "pool"})
    stage1 = {"method": {"density_score": "count"}, "train": TINY["stage1"]["train"]}
    with pytest.raises(ConfigError, match=r"pretrain\.stage1\.method\.density_score: expected one of"):
        tiny_config(stage1=stage1)


@pytest.mark.parametrize(
    ("data", "batch_size", "message"),
    [
        (  # the store's sensor (input_size null) is not the backbone's input
            {"window": "clip"},
            4,
            "pretrain.data.input_size: the input is [24, 24] (the sensor size of {store}) but the backbone "
            "(backbone_overrides.img_size) takes [32, 32]; set input_size: [32, 32]",
        ),
        (
            {"window": "clip", "input_size": [32, 32]},
            4,
            "pretrain.stage1.train.batch_size 4 is larger than the 3 samples of {store}",
        ),
    ],
)
def test_a_stage_refuses_a_store_the_backbone_does_not_take_or_smaller_than_a_batch(
    tmp_path, capsys, data, batch_size, message
):
    store = tmp_path / "s.h5"
    with EventStoreWriter(store, sensor_size=(24, 24), source="test") as writer:
        for label in range(3):
            writer.add_sample(make_events([0, 500, 1000], [1, 2, 3], [4, 5, 6], [1, 0, 1]), label=label)
    config = tmp_path / "study.yaml"
    stage1 = {**TINY["stage1"], "train": {**TINY["stage1"]["train"], "batch_size": batch_size}}
    config.write_text(yaml.safe_dump({"pretrain": TINY | {"data": data, "stage1": stage1}}))
    out = tmp_path / "s1"
    assert main(["pretrain", "--stage", "1", "--config", str(config), "--data", str(store), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"evpretrain: error: {message.format(store=store)}\n"
    assert not out.exists()  # refused before the run took its folder


@pytest.mark.slow
def test_three_stages_run_from_the_cli_and_resume(tmp_path, capsys):
    stores = build_demo(
        DemoConfig(
            samples={"train": 8, "val": 4, "test": 8},
            image_size=32,
            digit_size=12,
            num_frames=3,
            pan_speed_px_per_frame=(0.5, 1.0),
            digit_drift_px_per_frame=0.3,
        ),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"pretrain": TINY}))
    common = ["--config", str(config), "--data", str(stores["train"]), "--val", str(stores["val"])]
    assert main(["pretrain", "--stage", "1", *common, "--out", str(tmp_path / "s1")]) == 0
    assert (tmp_path / "s1" / "reconstructions.png").stat().st_size > 1000
    # The same folder and settings on other data: the checkpoint is of another run, not resumed.
    other = ["--config", str(config), "--data", str(stores["test"]), "--val", str(stores["val"])]
    assert main(["pretrain", "--stage", "1", *other, "--out", str(tmp_path / "s1")]) == 2
    assert "was written by a run with other settings (data: '" in capsys.readouterr().err
    assert (
        main(
            [
                "teacher-features",
                "--config",
                str(config),
                "--data",
                str(stores["train"]),
                "--out",
                str(tmp_path / "teacher.h5"),
            ]
        )
        == 0
    )
    features = ["--teacher-features", str(tmp_path / "teacher.h5")]
    assert (
        main(
            [
                "pretrain",
                "--stage",
                "2",
                *common,
                *features,
                "--init",
                str(tmp_path / "s1" / "checkpoint.pt"),
                "--out",
                str(tmp_path / "s2"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "pretrain",
                "--stage",
                "3",
                *common,
                *features,
                "--init",
                str(tmp_path / "s2" / "checkpoint.pt"),
                "--out",
                str(tmp_path / "s3"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    assert metrics["step"] == 2 and "knn_top1" in metrics and metrics["loss_con"] > 0
    # A rerun finds the finished checkpoint and does not train again.
    before = (tmp_path / "s3" / "checkpoint.pt").stat().st_mtime_ns
    assert (
        main(
            [
                "pretrain",
                "--stage",
                "3",
                *common,
                *features,
                "--init",
                str(tmp_path / "s2" / "checkpoint.pt"),
                "--out",
                str(tmp_path / "s3"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s3" / "checkpoint.pt").stat().st_mtime_ns == before
    # An --init that is not a checkpoint, an --out that is a file: one line each, naming the file, exit status 2.
    stage3 = ["pretrain", "--stage", "3", *common, *features]
    not_a_checkpoint = str(tmp_path / "s3" / "metrics.json")
    assert main([*stage3, "--init", not_a_checkpoint, "--out", str(tmp_path / "s3b")]) == 2
    assert f"{not_a_checkpoint}: not a readable torch checkpoint" in capsys.readouterr().err
    init = ["--init", str(tmp_path / "s2" / "checkpoint.pt")]
    assert main([*stage3, *init, "--out", not_a_checkpoint]) == 2
    assert not_a_checkpoint in capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_writes_one_log_line_per_log_interval_and_no_progress_bar_to_a_log_file(tmp_path):
    stores = build_demo(
        DemoConfig(samples={"train": 8, "val": 4}, image_size=32, digit_size=12, num_frames=3),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    study = TINY | {"stage1": {**TINY["stage1"], "train": {**TINY["stage1"]["train"], "log_every_steps": 1}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"pretrain": study}))
    log = tmp_path / "stage1.log"
    command = ["pretrain", "--stage", "1", "--config", str(config), "--data", str(stores["train"])]
    with log.open("w") as stderr:  # as a Snakemake rule's `2>&1 > log` or a SLURM job's log file
        done = subprocess.run(
            [sys.executable, "-m", "evpretrain.cli", *command, "--out", str(tmp_path / "s1")],
            stderr=stderr,
            stdout=subprocess.DEVNULL,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    steps = json.loads((tmp_path / "s1" / "metrics.json").read_text())["step"]
    lines = [line for line in text.splitlines() if " step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == [f"{n}/{steps}" for n in range(1, steps + 1)]
    assert "\r" not in text and "step/s" not in text  # no tqdm bar


def test_stage1_with_device_transforms_trains_as_with_worker_transforms(tmp_path):
    """transforms: device (workers read, the loop's batch transform builds the batch) runs stage 1 and its kNN
    monitor end to end, to the losses and kNN scores of the worker path (the voxel grids differ by float rounding)."""
    from evpretrain.pretrain.run import run_stage

    stores = build_demo(
        DemoConfig(samples={"train": 8, "val": 4}, image_size=32, digit_size=12, num_frames=3),
        tmp_path / "data",
        workers=1,
        progress=False,
    )
    metrics = {}
    for transforms in ("worker", "device"):
        config = tiny_config(data=TINY["data"] | {"transforms": transforms})
        metrics[transforms] = run_stage(
            1, config, train_store=stores["train"], val_store=stores["val"], out=tmp_path / transforms
        )
    worker, device = metrics["worker"], metrics["device"]
    assert device["step"] == worker["step"] == 2
    for key in ("loss", "loss_rec", "knn_top1"):
        assert device[key] == pytest.approx(worker[key], rel=1e-4, abs=1e-6), key
