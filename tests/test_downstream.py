"""Downstream samples, models and runs: windows, augmentation of dense targets, the frozen probe, the CLI."""

import json

import numpy as np
import pytest
import torch
import yaml

from evpretrain.cli import main
from evpretrain.data.demo import DemoConfig, build_demo
from evpretrain.data.store import EventStoreWriter, StoreError
from evpretrain.downstream.data import AugmentConfig, DownstreamDataset, WindowConfig, erase_and_add_events
from evpretrain.downstream.models import LinearProbe
from evpretrain.events.contract import make_events, validate_events
from evpretrain.models import create_backbone

SENSOR = (16, 24)


def _store(path, count=40, **dense):
    """A store of two samples of ``count`` events each (t = 0..count-1 us, x = t % W), with dense fields."""
    with EventStoreWriter(path, sensor_size=SENSOR, source="test", attrs={"class_names": ["a", "b"]}) as writer:
        for label in (0, 1):
            t = np.arange(count)
            events = make_events(t, t % SENSOR[1], t % SENSOR[0], np.where(t % 2, 1, -1))
            writer.add_sample(events, label=label, **dense)
    return path


def test_classification_windows_are_random_in_training_and_central_in_evaluation(tmp_path):
    store = _store(tmp_path / "s.h5", count=40)
    window = WindowConfig(train_events=10, eval_events=20)
    evaluation = DownstreamDataset(store, "classify", train=False, window=window)
    # Evaluation: events 10..29 (the middle 20), each at x = t % 24 in one bin range: the grid sums to +-1 per event.
    assert evaluation[0]["voxel"].abs().sum().item() == pytest.approx(20, rel=1e-5)
    training = DownstreamDataset(store, "classify", train=True, window=window, seed=3)
    draws = set()
    for epoch in range(6):
        training.set_epoch(epoch)
        first = training[0]["voxel"]
        assert first.abs().sum().item() == pytest.approx(10, rel=1e-5)
        training.set_epoch(epoch)
        assert torch.equal(training[0]["voxel"], first)  # a function of (seed, epoch, index)
        draws.add(first.numpy().tobytes())
    assert len(draws) > 1  # the start moves between epochs
    assert training[1]["label"].item() == 1


def test_flow_is_rescaled_and_mirrored_with_the_view(tmp_path):
    flow = np.stack([np.full(SENSOR, 3.0, np.float32), np.full(SENSOR, -2.0, np.float32)])
    valid = np.zeros(SENSOR, bool)
    valid[:, :6] = True  # the left quarter
    store = _store(tmp_path / "f.h5", flow=flow, valid=valid)
    half = DownstreamDataset(store, "flow", train=False, input_size=(8, 12), target_resolution="input")[0]
    assert torch.allclose(half["flow"][0], torch.full((8, 12), 1.5))
    assert torch.allclose(half["flow"][1], torch.full((8, 12), -1.0))
    assert half["valid"][:, :3].all() and not half["valid"][:, 3:].any()
    flipped = DownstreamDataset(store, "flow", train=True, augment=AugmentConfig(hflip_p=1.0))[0]
    assert torch.allclose(flipped["flow"][0], torch.full(SENSOR, -3.0))  # dx changes sign under a mirror
    assert torch.allclose(flipped["flow"][1], torch.full(SENSOR, -2.0))
    assert flipped["valid"][:, -6:].all() and not flipped["valid"][:, :-6].any()


def test_dense_targets_stay_at_the_label_resolution_in_sensor_pixels(tmp_path):
    flow = np.stack([np.full(SENSOR, 3.0, np.float32), np.full(SENSOR, -2.0, np.float32)])
    mask = np.zeros(SENSOR, np.uint8)
    mask[:, 12:] = 1
    store = _store(tmp_path / "f.h5", flow=flow, masks=mask)
    sample = DownstreamDataset(store, "flow", train=False, input_size=(8, 12))[0]
    assert sample["voxel"].shape == (5, 8, 12)  # the network's input
    assert torch.equal(sample["flow"], torch.from_numpy(flow)) and sample["valid"].shape == SENSOR
    segment = DownstreamDataset(store, "segment", train=False, input_size=(8, 12))[0]
    assert torch.equal(segment["mask"], torch.from_numpy(mask).long())
    # A training crop is resized back to the label's size, its flow scaled by label / crop pixels.
    cropped = DownstreamDataset(
        store, "flow", train=True, input_size=(8, 12), augment=AugmentConfig(crop_scale=(0.25, 0.5)), seed=2
    )[0]
    assert cropped["flow"].shape == (2, *SENSOR) and cropped["flow"][0].unique().numel() == 1
    assert cropped["flow"][0, 0, 0].item() > 3.0 and cropped["flow"][1, 0, 0].item() < -2.0


def test_flow_samples_mark_the_pixels_with_events_and_cancelled_pixels_count_as_without(tmp_path):
    flow = np.zeros((2, *SENSOR), np.float32)
    store = _store(tmp_path / "f.h5", count=40, flow=flow)
    sample = DownstreamDataset(store, "flow", train=False)[0]
    expected = np.zeros(SENSOR, bool)
    for t in range(40):  # event t at (y, x) = (t % 16, t % 24): 40 distinct pixels
        expected[t % 16, t % 24] = True
    assert sample["events"].dtype == torch.bool and torch.equal(sample["events"], torch.from_numpy(expected))
    at_input = DownstreamDataset(store, "flow", train=False, input_size=(8, 12), target_resolution="input")[0]
    assert torch.equal(at_input["events"], torch.from_numpy(expected[1::2, 1::2]))  # nearest-exact: odd pixels
    # Two events of opposite polarity at one pixel and time: the voxel grid is 0 there, as the paper's mask reads it.
    path = tmp_path / "c.h5"
    with EventStoreWriter(path, sensor_size=SENSOR, source="test") as writer:
        events = make_events(np.array([0, 0, 5]), np.array([3, 3, 7]), np.array([2, 2, 4]), np.array([1, -1, 1]))
        writer.add_sample(events, flow=flow)
    marked = DownstreamDataset(path, "flow", train=False)[0]["events"]
    assert marked.nonzero().tolist() == [[4, 7]]


def test_masks_keep_their_class_ids_through_crops(tmp_path):
    mask = np.zeros(SENSOR, np.uint8)
    mask[4:12, 6:18] = 7
    mask[0, 0] = 255  # unlabelled
    store = _store(tmp_path / "m.h5", masks=mask)
    dataset = DownstreamDataset(store, "segment", train=True, augment=AugmentConfig(crop_scale=(0.3, 0.6)), seed=1)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        assert sample["mask"].shape == SENSOR and sample["mask"].dtype == torch.int64
        assert set(sample["mask"].unique().tolist()) <= {0, 7, 255}


def test_a_task_without_its_targets_is_refused_by_name(tmp_path):
    store = _store(tmp_path / "s.h5")
    with pytest.raises(StoreError, match="task 'flow' needs the field 'flow'"):
        DownstreamDataset(store, "flow", train=True)


def test_erase_and_add_keeps_the_count_and_the_contract():
    rng = np.random.default_rng(0)
    t = np.sort(rng.integers(0, 10_000, 500))
    events = make_events(t, rng.integers(0, 24, 500), rng.integers(0, 16, 500), rng.choice([-1, 1], 500))
    out = erase_and_add_events(events, 0.1, 1.5, SENSOR, rng)
    assert len(out) == len(events)
    validate_events(out)
    assert out["x"].max() < 24 and out["y"].max() < 16
    assert len(np.intersect1d(out["t"], events["t"])) > 0.8 * len(np.unique(events["t"]))


def test_linear_probe_trains_only_its_head():
    torch.manual_seed(0)
    backbone = create_backbone("vit_demo", img_size=32, depth=2)
    probe = LinearProbe(backbone, 3).train()
    assert not backbone.training  # frozen: evaluation behaviour even while the head trains
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(4, 5, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]


TINY_STUDY = {
    "pretrain": {
        "backbone": "vit_demo",
        "backbone_overrides": {"img_size": [32, 32], "depth": 4, "feature_blocks": [0, 1, 2, 3]},
        "data": {"input_size": [32, 32]},
        "stage1": {"train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
        "stage2": {"train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
        "stage3": {"train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
    },
    "downstream": {
        "classify": {
            "linear": {"train": {"epochs": 2, "batch_size": 4, "base_lr": 1e-2}},
            "finetune": {
                "layer_decay": 0.75,
                "drop_path_rate": 0.1,
                "label_smoothing": 0.1,
                "augment": {"crop_scale": [0.8, 1.0]},
                "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3},
            },
        },
        "segment": {"channels": 16, "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
        "flow": {"channels": 16, "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
        "robustness": {"shot_noise_hz": [0.0, 100.0], "drop": [0.5]},
    },
}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    stores = build_demo(
        DemoConfig(
            samples={"train": 8, "val": 4},
            image_size=32,
            digit_size=12,
            num_frames=3,
            pan_speed_px_per_frame=(0.5, 1.0),
            digit_drift_px_per_frame=0.3,
        ),
        root / "data",
        workers=1,
        progress=False,
    )
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(TINY_STUDY))
    return stores, config


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, extra, figure, score",
    [
        ("classify", ["--mode", "linear"], "confusion.png", "top1_last"),
        ("classify", ["--mode", "finetune"], "confusion.png", "top1_best"),
        ("segment", [], "masks.png", "miou_batch_mean_last"),
        ("flow", [], "flow.png", "aee_batch_mean_last"),
    ],
)
def test_finetune_runs_from_the_cli_and_resumes(tiny_demo, tmp_path, task, extra, figure, score):
    stores, config = tiny_demo
    args = [
        "finetune",
        task,
        *extra,
        "--config",
        str(config),
        "--train",
        str(stores["train"]),
        "--eval",
        str(stores["val"]),
        "--seed",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["init"] == "random" and np.isfinite(metrics[score])
    assert len(metrics["history"]) == metrics["config"]["train"]["epochs"]  # one evaluation an epoch
    assert (tmp_path / "run" / figure).stat().st_size > 1000
    before = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    assert main(args) == 0  # finished: nothing trains again, and the figures agree
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[score] == metrics[score]


@pytest.mark.slow
def test_robustness_table_from_a_finetuned_classifier(tiny_demo, tmp_path):
    stores, config = tiny_demo
    run = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "classify",
                "--mode",
                "linear",
                "--config",
                str(config),
                "--train",
                str(stores["train"]),
                "--eval",
                str(stores["val"]),
                "--seed",
                "0",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    common = [
        "evaluate-robustness",
        "--config",
        str(config),
        "--run",
        str(run),
        "--eval",
        str(stores["val"]),
        "--seed",
        "0",
    ]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert [(r["corruption"], r["level"]) for r in a] == [("shot_noise", 0.0), ("shot_noise", 100.0), ("drop", 0.5)]
    assert a == json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]  # deterministic for a seed
    clean = json.loads((run / "metrics.json").read_text())["top1_last"]
    assert a[0]["top1"] == pytest.approx(clean)  # level 0 is the clean evaluation
    assert (tmp_path / "a" / "robustness.png").exists()
    assert "| shot_noise" in (tmp_path / "a" / "robustness.md").read_text()


def test_robustness_refuses_a_run_that_is_not_a_classifier(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"task": "flow"}))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY_STUDY))
    assert (
        main(
            [
                "evaluate-robustness",
                "--config",
                str(config),
                "--run",
                str(tmp_path / "run"),
                "--eval",
                "x.h5",
                "--seed",
                "0",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "task is 'flow'; robustness evaluates a classifier" in capsys.readouterr().err


def test_task_and_robustness_settings_come_from_their_sections_or_name_the_missing_one():
    from evpretrain.config import ConfigError
    from evpretrain.downstream.robustness import RobustnessConfig, robustness_config
    from evpretrain.downstream.run import task_config

    assert task_config(TINY_STUDY, "classify", "finetune").layer_decay == 0.75
    assert task_config(TINY_STUDY, "flow").channels == 16
    assert robustness_config(TINY_STUDY) == RobustnessConfig(shot_noise_hz=(0.0, 100.0), drop=(0.5,))
    # An empty section (what the plan writes for a study that sets no levels) means the default levels.
    assert robustness_config({"downstream": {"robustness": {}}}) == RobustnessConfig()
    no_levels = {"downstream": {k: v for k, v in TINY_STUDY["downstream"].items() if k != "robustness"}}
    with pytest.raises(ConfigError, match="config has no section 'downstream.robustness'"):
        robustness_config(no_levels)
    with pytest.raises(ConfigError, match=r"config has no section 'downstream.segment' \(no 'downstream'\)"):
        task_config({}, "segment")
    with pytest.raises(ConfigError, match="config has no section 'downstream.classify.linear'"):
        task_config({"downstream": {"classify": {"finetune": {}}}}, "classify", "linear")
    with pytest.raises(ConfigError, match="classification mode must be one of"):
        task_config(TINY_STUDY, "classify", "probe")
    with pytest.raises(ConfigError, match=r"downstream\.flow\.train: unknown key\(s\) \[.base_rate.\]"):
        task_config({"downstream": {"flow": {"train": {"epochs": 1, "base_rate": 1.0}}}}, "flow")


@pytest.mark.slow
def test_a_foreign_checkpoint_is_evaluated_through_its_importer(tiny_demo, tmp_path, capsys):
    from test_importers import DEPTH, DIM, HEADS, mem_state, paper_checkpoint, paper_vit_state, save

    stores, _ = tiny_demo
    study = {
        **TINY_STUDY,
        "pretrain": {
            **TINY_STUDY["pretrain"],
            "backbone_overrides": {"img_size": [32, 32], "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS},
        },
    }
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    common = [
        "finetune",
        "classify",
        "--mode",
        "linear",
        "--config",
        str(config),
        "--train",
        str(stores["train"]),
        "--eval",
        str(stores["val"]),
        "--seed",
        "0",
    ]
    paper = save(tmp_path, paper_checkpoint({f"backbone.{k}": v for k, v in paper_vit_state().items()}))
    assert (
        main(
            [
                *common,
                "--checkpoint",
                str(paper),
                "--checkpoint-source",
                "eventpretrain_vit",
                "--out",
                str(tmp_path / "paper"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "paper" / "metrics.json").read_text())
    assert metrics["init_source"] == "eventpretrain_vit" and metrics["init_complete"] is True
    # The probe's frozen backbone holds the paper's weights.
    saved = torch.load(tmp_path / "paper" / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(saved["backbone.blocks.1.mlp.fc2.weight"], paper_vit_state()["vit_block.1.mlp.fc2.weight"])
    # MEM's relative position bias has no place in our ViT: refused, naming it, unless a partial load is allowed.
    mem = save(tmp_path, {"model": mem_state()}, "mem.pth")
    assert (
        main([*common, "--checkpoint", str(mem), "--checkpoint-source", "mem_vit", "--out", str(tmp_path / "mem")]) == 2
    )
    assert "relative_position_bias_table" in capsys.readouterr().err
    assert not (tmp_path / "mem" / "metrics.json").exists()
