"""Downstream samples, models and runs: windows, augmentation of dense targets, the frozen probe, the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from evpretrain.cli import main
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.store import EventStoreWriter, StoreError
from evpretrain.downstream.config import AugmentConfig, WindowConfig
from evpretrain.downstream.data import DownstreamDataset, collate, erase_and_add_events
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


@pytest.mark.parametrize("task", ["classify", "segment", "flow"])
@pytest.mark.parametrize("resolution", ["label", "input"])
def test_device_transforms_give_the_worker_batch(tmp_path, task, resolution):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.h5"
    with EventStoreWriter(path, sensor_size=SENSOR, source="test", attrs={"class_names": ["a", "b"]}) as writer:
        for label in range(6):
            count = int(rng.integers(0, 300))
            t = np.sort(rng.integers(0, 10_000, count))
            events = make_events(
                t, rng.integers(0, SENSOR[1], count), rng.integers(0, SENSOR[0], count), rng.choice([-1, 1], count)
            )
            writer.add_sample(
                events,
                label=label % 2,
                masks=rng.integers(0, 3, SENSOR, dtype=np.uint8),
                flow=rng.normal(size=(2, *SENSOR)).astype(np.float32),
                valid=rng.random(SENSOR) < 0.7,
            )
    augment = AugmentConfig(
        erase_add_fraction=(0.01, 0.1),
        crop_scale=(0.4, 0.9),
        crop_aspect="sensor_relative",
        hflip_p=0.5,
        time_flip_p=0.5,
    )
    options = dict(train=True, augment=augment, window=WindowConfig(train_events=200), input_size=(20, 28), seed=2)
    options["target_resolution"] = resolution
    worker = DownstreamDataset(path, task, **options)
    device = DownstreamDataset(path, task, transforms="device", **options)
    for epoch in range(3):  # several draws of every flip and crop
        worker.set_epoch(epoch), device.set_epoch(epoch)
        want = collate([worker[i] for i in range(len(worker))])
        got = device.batch_views()(collate([device[i] for i in range(len(device))]))
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            # The voxel grids differ by float32 rounding (numba's float64 bin position); the rest is the same ops.
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


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


def test_erase_and_add_draws_independent_counts_within_the_fraction_bounds():
    # 2000 events with distinct times and no jitter: an erased event's time is missing, an added copy's doubled.
    n = 2000
    events = make_events(np.arange(n) * 10, np.arange(n) % 24, np.arange(n) % 16, np.where(np.arange(n) % 2, 1, -1))
    changes, erased, doubled = [], [], []
    for seed in range(200):
        out = erase_and_add_events(events, (0.001, 0.01), 0.0, SENSOR, np.random.default_rng(seed))
        validate_events(out, sensor_size=SENSOR)
        counts = np.bincount(out["t"] // 10, minlength=n)
        changes.append(len(out) - n)
        erased.append(int((counts == 0).sum()))
        doubled.append(int((counts == 2).sum()))
    # Each count is an integer in [int(0.001 n), int(0.01 n)) = [2, 20), as np.random.randint(2, 20) in theirs.
    assert max(erased) < 20 and max(doubled) < 20 and min(erased + doubled) >= 0
    assert all(-18 <= c <= 18 for c in changes)
    # Independent draws: the length changes (one shared count would keep it), by 0 on average,
    # with the variance of a difference of two uniform integers on 2..19: 2 (18^2 - 1) / 12 = 53.8.
    assert len(set(changes)) > 10
    assert abs(np.mean(changes)) < 1.5 and 40 < np.var(changes) < 70
    # Nothing changes where int(0.01 n) is 0.
    few = events[:99]
    assert erase_and_add_events(few, (0.001, 0.01), 1.5, SENSOR, np.random.default_rng(0)) is few


def test_added_events_are_jittered_in_space_and_time_and_truncated_to_pixels():
    n, sensor = 20_000, (64, 64)
    events = make_events(np.arange(n) * 1_000_000, np.full(n, 32), np.full(n, 32), np.ones(n))
    out = erase_and_add_events(events, (0.4, 0.5), 1.5, sensor, np.random.default_rng(0), jitter_us=1000.0)
    offset = out["t"] - np.rint(out["t"] / 1e6).astype(np.int64) * 1_000_000
    added = out[offset != 0]  # originals sit on whole seconds; a copy is moved by N(0, 1 ms)
    assert 0.4 * n * 0.99 < len(added) <= 0.5 * n
    assert np.std(offset[offset != 0]) == pytest.approx(1000, rel=0.05)
    # x = trunc(32 + N(0, 1.5)): the floor of a normal, mean about -0.5, spread sqrt(1.5^2 + 1/12).
    dx = added["x"].astype(float) - 32
    assert np.mean(dx) == pytest.approx(-0.5, abs=0.05)
    assert np.std(dx) == pytest.approx(np.sqrt(1.5**2 + 1 / 12), rel=0.05)
    # Unmoved events are the originals, but for the few copies whose time jitter rounds to 0 (P = 0.04%).
    assert (out["x"][offset == 0] != 32).sum() < 0.001 * n


def test_a_random_evaluation_window_is_a_function_of_seed_and_index(tmp_path):
    store = _store(tmp_path / "s.h5", count=40)
    window = WindowConfig(train_events=10, eval_events=10, eval_position="random")
    first = DownstreamDataset(store, "classify", train=False, window=window, seed=3)
    again = DownstreamDataset(store, "classify", train=False, window=window, seed=3)
    first.set_epoch(5)  # evaluation draws do not follow the epoch
    assert torch.equal(first[0]["voxel"], again[0]["voxel"]) and torch.equal(first[1]["voxel"], again[1]["voxel"])
    assert first[0]["voxel"].abs().sum().item() == pytest.approx(10, rel=1e-5)
    assert first.deterministic
    draws = {
        DownstreamDataset(store, "classify", train=False, window=window, seed=s)[0]["voxel"].numpy().tobytes()
        for s in range(8)
    }
    assert len(draws) > 1  # the start moves with the seed
    middle = DownstreamDataset(store, "classify", train=False, window=WindowConfig(eval_events=10))
    expected = DownstreamDataset(store, "classify", train=False)  # events 15..24 of 0..39, read in full below
    assert middle[0]["voxel"].abs().sum().item() == pytest.approx(10, rel=1e-5)
    assert not torch.equal(middle[0]["voxel"], expected[0]["voxel"])
    with pytest.raises(ValueError, match="window.eval_position must be one of"):
        WindowConfig(eval_position="start")


def test_time_flip_reverses_and_negates_the_bins_and_reverses_flow(tmp_path):
    flow = np.stack([np.full(SENSOR, 3.0, np.float32), np.full(SENSOR, -2.0, np.float32)])
    store = _store(tmp_path / "f.h5", flow=flow)
    for task in ("classify", "flow"):
        plain = DownstreamDataset(store, task, train=True, seed=1)[0]
        flipped = DownstreamDataset(store, task, train=True, seed=1, augment=AugmentConfig(time_flip_p=1.0))[0]
        assert plain["voxel"].abs().sum() > 0
        assert torch.equal(flipped["voxel"], -plain["voxel"].flip(0))
    assert torch.equal(flipped["flow"], -plain["flow"])


def test_val_event_noise_erases_and_adds_at_evaluation_reproducibly(tmp_path):
    store = _store(tmp_path / "s.h5", count=400)
    augment = AugmentConfig(erase_add_fraction=(0.1, 0.2))
    clean = DownstreamDataset(store, "classify", train=False, augment=augment, seed=0)
    noisy = clean.with_corruption(None, event_noise=True)
    assert clean.deterministic and not noisy.deterministic
    assert not torch.equal(noisy[0]["voxel"], clean[0]["voxel"])
    assert torch.equal(noisy[0]["voxel"], clean.with_corruption(None, event_noise=True)[0]["voxel"])


def test_sensor_relative_crops_follow_the_sensor_aspect_and_swap_sides():
    from evpretrain.downstream.data import _random_crop

    rng = np.random.default_rng(0)
    height, width = 60, 120  # W/H = 2: aspect drawn in [1.5, 2.67], then swapped with p 1/2
    crops = [_random_crop((height, width), (0.3, 0.5), "sensor_relative", rng) for _ in range(400)]
    for top, left, h, w in crops:
        assert 0 < h < height and 0 < w < width and top + h < height and left + w < width
        assert 1.4 < w / h < 2.8 or 1 / 2.8 < w / h < 1 / 1.4  # either orientation, rounding aside
    assert any(w < h for _, _, h, w in crops) and any(w > h for _, _, h, w in crops)
    with pytest.raises(ValueError, match="augment.crop_aspect must be one of"):
        AugmentConfig(crop_aspect="square")


@pytest.mark.parametrize("head", ["linear", "mae_bn"])
def test_linear_probe_trains_only_its_head(head):
    torch.manual_seed(0)
    backbone = create_backbone("vit_demo", img_size=32, depth=2)
    probe = LinearProbe(backbone, 3, head=head, head_init="xavier_uniform").train()
    assert not backbone.training  # frozen: evaluation behaviour even while the head trains
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(4, 5, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    names = ["head.weight", "head.bias"] if head == "linear" else ["head.1.weight", "head.1.bias"]
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == names


def test_the_authors_probe_is_a_linear_map_of_the_mean_of_the_normed_tokens():
    torch.manual_seed(0)
    backbone = create_backbone("vit_demo", img_size=32, depth=2)
    probe = LinearProbe(backbone, 3, head="linear", head_init="xavier_uniform").eval()
    bound = np.sqrt(6 / (backbone.embed_dim + 3))  # xavier_uniform's, as ft_cls_hub_model.py:111
    assert probe.head.weight.abs().max() <= bound and probe.head.weight.abs().max() > 0.9 * bound
    assert torch.equal(probe.head.bias, torch.zeros(3))
    voxel = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        tokens = backbone(voxel).tokens  # (2, N, D), after the final LayerNorm (weight 1, bias 0 at init)
        expected = tokens.mean(dim=1) @ probe.head.weight.T + probe.head.bias
    assert torch.allclose(tokens.mean(-1), torch.zeros(tokens.shape[:2]), atol=1e-5)
    assert torch.allclose(probe(voxel), expected, atol=1e-6)
    assert torch.allclose(probe(probe.features(voxel)), expected, atol=1e-6)  # cached features: the same logits
    # backbone_mode "train": the frozen backbone keeps its training behaviour (drop path) while the head trains.
    stochastic = LinearProbe(
        create_backbone("vit_demo", img_size=32, depth=2, drop_path_rate=0.5), 3, backbone_mode="train"
    )
    assert stochastic.train().backbone.training


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
            "linear": {
                "augment": {"erase_add_fraction": [0.05, 0.1]},
                "train": {"epochs": 2, "batch_size": 4, "base_lr": 1e-2},
            },
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
        "robustness": {"shot_noise_hz": [0.0, 100.0], "drop": [0.5], "val_event_noise": True},
    },
}


@pytest.mark.parametrize(("task", "mode"), [("classify", "linear"), ("classify", "finetune")])
def test_a_task_refuses_a_store_smaller_than_a_batch_by_its_key(tmp_path, capsys, task, mode):
    store = tmp_path / "s.h5"
    with EventStoreWriter(store, sensor_size=(24, 24), source="test", attrs={"class_names": ["a", "b", "c"]}) as writer:
        for label in range(3):
            writer.add_sample(make_events([0, 500, 1000], [1, 2, 3], [4, 5, 6], [1, 0, 1]), label=label)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY_STUDY))
    out = tmp_path / "run"
    argv = ["finetune", task, "--mode", mode, "--config", str(config), "--train", str(store), "--eval", str(store)]
    assert main([*argv, "--seed", "0", "--out", str(out)]) == 2
    expected = f"downstream.{task}.{mode}.train.batch_size 4 is larger than the 3 samples of {store}"
    assert capsys.readouterr().err == f"evpretrain: error: {expected}\n"
    assert not out.exists()


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
    variant = tmp_path / "mode_1.h5"  # another evaluation store: here the same samples, under another name
    shutil.copy(stores["val"], variant)
    common = [
        "evaluate-robustness",
        "--config",
        str(config),
        "--run",
        str(run),
        "--eval",
        str(stores["val"]),
        "--variants",
        str(variant),
        "--seed",
        "0",
    ]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert [(r["split"], r["corruption"], r["level"]) for r in a] == [
        ("val", "shot_noise", 0.0),
        ("val", "shot_noise", 100.0),
        ("val", "drop", 0.5),
        ("val", "val_event_noise", 0.1),  # the run's erase/add at evaluation, its upper fraction as the level
        ("mode_1", "none", 0.0),
    ]
    assert a == json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]  # deterministic for a seed
    clean = json.loads((run / "metrics.json").read_text())["top1_last"]
    assert a[0]["top1"] == pytest.approx(clean)  # level 0 is the clean evaluation
    assert a[-1]["top1"] == pytest.approx(clean)  # the same samples under another name score the same
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
    from evpretrain.downstream.config import RobustnessConfig, robustness_config, task_config

    assert task_config(TINY_STUDY, "classify", "finetune").layer_decay == 0.75
    assert task_config(TINY_STUDY, "flow").channels == 16
    assert robustness_config(TINY_STUDY) == RobustnessConfig(
        shot_noise_hz=(0.0, 100.0), drop=(0.5,), val_event_noise=True
    )
    finetune = TINY_STUDY["downstream"]["classify"]["finetune"]
    with pytest.raises(ConfigError, match=r"downstream.classify.finetune.head: .* expected 'linear'"):
        task_config({"downstream": {"classify": {"finetune": {**finetune, "head": "mae_bn"}}}}, "classify", "finetune")
    with pytest.raises(ConfigError, match=r"downstream.classify.linear: head must be one of \('linear', 'mae_bn'\)"):
        task_config({"downstream": {"classify": {"linear": {**finetune, "head": "bn"}}}}, "classify", "linear")
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


@pytest.mark.slow
@pytest.mark.parametrize(("task", "mode"), [("classify", "finetune"), ("flow", None)])
def test_device_transforms_fine_tune_as_worker_transforms(tiny_demo, tmp_path, task, mode):
    from evpretrain.downstream.run import run_downstream

    stores, _ = tiny_demo
    section = ("classify", "finetune") if task == "classify" else (task,)
    results = {}
    for transforms in ("worker", "device"):
        study = yaml.safe_load(yaml.safe_dump(TINY_STUDY))
        settings = study["downstream"]
        for key in section:
            settings = settings[key]
        settings |= {
            "transforms": transforms,
            "augment": {"crop_scale": [0.6, 1.0], "hflip_p": 0.5, "time_flip_p": 0.5},
        }
        results[transforms] = run_downstream(
            task, study, train_store=stores["train"], eval_store=stores["val"], out=tmp_path / transforms, mode=mode
        )
    for key in ("train_loss", "train_step"):
        assert results["device"][key] == pytest.approx(results["worker"][key], rel=1e-4), key
