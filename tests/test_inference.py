"""Embed and predict with any checkpoint: windows, inputs, the checkpoint's inference entry, the files of `embed` and
`predict` on the shipped real recordings, errors that name what is wrong and leave nothing half-written."""

import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from event_testing import REAL, needs_real
from PIL import Image

from evpretrain.cli import main
from evpretrain.config import ConfigError
from evpretrain.data.demo import DemoConfig, build_demo
from evpretrain.data.resize import resize_maps
from evpretrain.data.store import EventStore
from evpretrain.downstream.data import DownstreamDataset
from evpretrain.errors import CheckpointError
from evpretrain.events.contract import EventFormatError, make_events
from evpretrain.events.readers import read_events
from evpretrain.events.representations import voxel_grid
from evpretrain.events.windows import Windower, WindowSpec
from evpretrain.inference import InferenceSpec, Representation, load_model
from evpretrain.inference.model import InferenceModel, view_box
from evpretrain.models import BackboneSpec, create_backbone

STUDY = {
    "pretrain": {
        "backbone": "vit_demo",
        "backbone_overrides": {"img_size": [32, 32], "depth": 4, "feature_blocks": [0, 1, 2, 3]},
        "data": {"input_size": [32, 32]},
        "knn": {"memory": 0, "queries": 0},
        "stage1": {
            "method": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
            "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3},
        },
    },
    "downstream": {
        "classify": {
            "linear": {"window": {"eval_events": 300}, "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}}
        },
        "segment": {"channels": 16, "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
        "flow": {"channels": 16, "train": {"epochs": 1, "batch_size": 4, "base_lr": 1e-3}},
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny demo, a stage-1 run and the three fine-tuned tasks trained on it (seconds on a CPU)."""
    root = tmp_path_factory.mktemp("inference")
    demo = DemoConfig(
        samples={"train": 8, "val": 4},
        image_size=32,
        digit_size=12,
        num_frames=3,
        pan_speed_px_per_frame=(0.5, 1.0),
        digit_drift_px_per_frame=0.3,
    )
    stores = build_demo(demo, root / "data", workers=1, progress=False)
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    data = ["--config", str(config), "--data", str(stores["train"])]
    assert main(["pretrain", "--stage", "1", *data, "--out", str(root / "stage1")]) == 0
    common = ["--config", str(config), "--train", str(stores["train"]), "--eval", str(stores["val"]), "--seed", "0"]
    checkpoint = ["--checkpoint", str(root / "stage1" / "checkpoint.pt")]
    for task, extra in (("classify", ["--mode", "linear"]), ("segment", []), ("flow", [])):
        assert main(["finetune", task, *extra, *common, *checkpoint, "--out", str(root / task)]) == 0
    return {"root": root, "config": config, **stores}


# --- windows -----------------------------------------------------------------------------------------------------


def _events(t, width=8):
    t = np.asarray(t)
    return make_events(t, t % width, np.zeros_like(t), np.where(t % 20, 1, -1))


def _cut(chunks, spec):
    cutter = Windower(WindowSpec.parse(spec), keep_empty=True, source="rec.dat")
    return [(w.events["t"].tolist(), w.t_start, w.t_end) for w in cutter.cut(chunks)], cutter


@pytest.mark.parametrize("split", [[10], [1, 9], [3, 3, 4], [1] * 10])
def test_windows_by_count_and_by_duration_do_not_depend_on_how_the_stream_is_chunked(split):
    events = _events(np.arange(10) * 10)  # t = 0, 10, ..., 90 us
    chunks = np.split(events, np.cumsum(split)[:-1])
    windows, cutter = _cut(chunks, "events:3")
    assert windows == [([0, 10, 20], 0, 21), ([30, 40, 50], 30, 51), ([60, 70, 80], 60, 81)]
    assert (cutter.events, cutter.windows, cutter.dropped_events) == (10, 3, 1)
    windows, cutter = _cut(np.split(events, np.cumsum(split)[:-1]), "ms:0.025")  # 25 us from t = 0
    assert windows == [([0, 10, 20], 0, 25), ([30, 40], 25, 50), ([50, 60, 70], 50, 75)]
    assert cutter.dropped_events == 2  # 80 and 90: [75, 100) is not over at the last event


def test_a_duration_window_without_events_is_still_a_window():
    windows, cutter = _cut([_events([0, 1, 100])], "ms:0.025")
    assert windows == [([0, 1], 0, 25), ([], 25, 50), ([], 50, 75), ([], 75, 100)]
    assert cutter.dropped_events == 1


def test_a_window_larger_than_the_recording_is_refused_naming_the_file_and_both_sizes():
    with pytest.raises(EventFormatError, match=r"rec\.dat: the window events:11 is larger than the recording, which "):
        _cut([_events(np.arange(10) * 10)], "events:11")
    with pytest.raises(EventFormatError, match=r"holds 10 events over 90 us: not one complete window fits"):
        _cut([_events(np.arange(10) * 10)], "ms:1")


def test_a_chunk_that_goes_back_in_time_is_refused_naming_the_source():
    with pytest.raises(EventFormatError, match=r"rec\.dat: timestamps not sorted: t=40 us after t=50 us"):
        _cut([_events([0, 10, 50]), _events([40, 60])], "events:2")


@pytest.mark.parametrize("text", ["seconds:3", "frames:0", "events:0", "events:2.5", "ms:-1", "ms:0.0001", "events"])
def test_a_bad_window_is_a_config_error(text):
    with pytest.raises(ConfigError, match="window"):
        WindowSpec.parse(text)


# --- inputs ------------------------------------------------------------------------------------------------------


def test_the_view_of_another_sensor_is_the_whole_sensor_or_a_centred_crop_of_the_training_aspect():
    assert view_box((720, 1280), (32, 32), "resize") == (0, 0, 720, 1280)
    assert view_box((720, 1280), (32, 32), "center_crop") == (0, 280, 720, 720)
    assert view_box((720, 1280), (480, 640), "center_crop") == (0, 160, 720, 960)  # 4:3 inside 16:9
    assert view_box((480, 640), (720, 1280), "center_crop") == (60, 0, 360, 640)  # 16:9 inside 4:3


def _probe_model(sensor_size, policy="resize"):
    torch.manual_seed(0)
    backbone = create_backbone("vit_demo", img_size=32, depth=1)
    spec = InferenceSpec("embed", BackboneSpec("vit_demo", 5), sensor_size=sensor_size)
    return InferenceModel(spec, backbone, device="cpu", policy=policy)


def test_center_crop_drops_the_events_outside_and_builds_the_grid_on_the_crop():
    model = _probe_model((4, 4), "center_crop")
    events = make_events([0, 5, 9, 12], [0, 3, 5, 7], [1, 2, 3, 0], [1, 1, -1, 1])  # on a 4 x 8 sensor
    # The crop is columns 2..5: the events at x = 0 and x = 7 fall outside; x = 3, 5 become 1, 3 (t 5 and 9).
    inside = make_events([5, 9], [1, 3], [2, 3], [1, -1])
    expected = resize_maps(torch.from_numpy(voxel_grid(inside, 5, height=4, width=4)), (32, 32))
    assert torch.allclose(model.inputs([events], (4, 8))[0], expected, atol=1e-6)


def test_the_input_of_a_store_sample_is_the_fine_tuning_datasets(runs):
    model = load_model(runs["root"] / "classify", device="cpu")
    dataset = DownstreamDataset(runs["val"], "classify", train=False, input_size=(32, 32))  # every event
    with EventStore(runs["val"]) as store:
        events = [store.events(i) for i in range(3)]
        inputs = model.inputs(events, store.sensor_size)
    for i in range(3):
        assert torch.allclose(inputs[i], dataset[i]["voxel"], atol=1e-6)


# --- the checkpoint's inference entry ----------------------------------------------------------------------------


def test_stage_and_finetuning_checkpoints_carry_what_inference_needs(runs):
    stage = torch.load(runs["root"] / "stage1" / "checkpoint.pt", weights_only=True)["inference"]
    assert stage["task"] == "embed" and stage["stage"] == 1
    assert stage["backbone"] == {
        "name": "vit_demo",
        "in_chans": 5,
        "overrides": STUDY["pretrain"]["backbone_overrides"],
    }
    assert stage["representation"] == {"kind": "voxel_grid", "num_bins": 5, "resize": "bilinear"}
    assert stage["input_size"] == [32, 32] and stage["sensor_size"] == [32, 32]
    with EventStore(runs["train"]) as store:
        assert stage["window_events"] == int(np.median(store.event_counts))
    classify = load_model(runs["root"] / "classify", device="cpu").spec
    assert classify.task == "classify" and classify.mode == "linear" and classify.num_classes == 10
    assert classify.class_names == tuple(str(d) for d in range(10)) and classify.window_events == 300
    segment = load_model(runs["root"] / "segment", device="cpu").spec
    assert segment.num_classes == 11 and segment.class_names[0] == "background"
    assert segment.head == {"channels": 16, "neck": "none", "aux": True, "aux_channels": 256}


def test_the_api_embeds_and_predicts_an_events_array(runs):
    events = _events(np.arange(4000) * 7, width=32)
    stage = load_model(runs["root"] / "stage1", device="cpu")
    out = stage.embed(events, "events:1000", tokens=True)
    assert out["embeddings"].shape == (4, 192) and out["tokens"].shape == (4, 16, 192)
    assert np.allclose(out["tokens"].mean(axis=1), out["embeddings"], atol=1e-5)
    assert out["t_start"].tolist() == [0, 7000, 14000, 21000] and out["t_end"].tolist() == [6994, 13994, 20994, 27994]
    # A fine-tuned model embeds with its backbone: the stage's weights, frozen under the linear probe.
    probe = load_model(runs["root"] / "classify", device="cpu")
    assert np.allclose(probe.embed(events, "events:1000")["embeddings"], out["embeddings"], atol=1e-5)
    top = probe.predict(events, "ms:7", top_k=3)  # 1000 events in each 7 ms; [21, 28) ms ends after the last event
    assert top["classes"].shape == (3, 3) and top["t_end"].tolist() == [7000, 14000, 21000]
    assert top["classes"].shape == (3, 3) and np.all(np.diff(top["probs"], axis=1) <= 0)
    assert top["names"][0, 0] == str(top["classes"][0, 0])
    with pytest.raises(CheckpointError, match="it embeds, it predicts nothing"):
        stage.predict(events, "events:1000")
    with pytest.raises(ValueError, match=r"outside the 32x32 sensor: pass the recording's sensor_size"):
        stage.embed(_events(np.arange(100), width=40), "events:10")


def test_a_checkpoint_without_its_inference_entry_names_what_is_missing_and_the_way_around(runs, tmp_path, capsys):
    checkpoint = torch.load(runs["root"] / "stage1" / "checkpoint.pt", weights_only=True)
    del checkpoint["inference"]
    torch.save(checkpoint, tmp_path / "old.pt")
    events = tmp_path / "events.h5"
    args = ["embed", "--checkpoint", str(tmp_path / "old.pt"), "--input", str(runs["val"]), "--out", str(events)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "old.pt: holds no 'inference' entry" in error and "--config STUDY.yaml" in error
    assert not events.exists()
    assert main([*args, "--config", str(runs["config"]), "--quiet"]) == 0  # the study that trained it
    with h5py.File(events) as features:
        expected = load_model(runs["root"] / "stage1", device="cpu")
        with EventStore(runs["val"]) as store:
            first = expected.embed_batch([store.events(0)], store.sensor_size)["embeddings"][0]
        assert np.allclose(features["embeddings"][0], first, atol=1e-5)


def test_a_finetuning_run_without_the_entry_is_read_with_its_study_and_metrics(runs, tmp_path):
    old = tmp_path / "old-run"
    old.mkdir()
    checkpoint = torch.load(runs["root"] / "classify" / "checkpoint.pt", weights_only=True)
    del checkpoint["inference"]
    torch.save(checkpoint, old / "checkpoint.pt")
    (old / "metrics.json").write_text((runs["root"] / "classify" / "metrics.json").read_text())
    with pytest.raises(CheckpointError, match="holds no 'inference' entry"):
        load_model(old)
    rebuilt = load_model(old, device="cpu", study=yaml.safe_load(runs["config"].read_text()))
    assert rebuilt.spec == load_model(runs["root"] / "classify", device="cpu").spec


def test_a_foreign_checkpoint_embeds_with_the_importers_defaults(tmp_path):
    from test_importers import mae_sincos

    torch.manual_seed(0)
    ours = create_backbone("vit_small_patch16").eval()

    def paper_name(key):  # model/backbone/vit.py's names (the importer's key map, read backwards)
        return "norm_layer." + key[5:] if key.startswith("norm.") else key.replace("blocks.", "vit_block.", 1)

    paper = {f"backbone.{paper_name(key)}": value for key, value in ours.state_dict().items()}
    paper["backbone.pos_embed"] = mae_sincos(384, 14)
    torch.save({"model": paper, "epoch": 3}, tmp_path / "vit_small.pth")
    model = load_model(tmp_path / "vit_small.pth", "eventpretrain_vit", device="cpu")
    assert model.spec.representation == Representation("voxel_grid", 5, "bilinear") and model.input_size == (224, 224)
    events = _events(np.arange(600) * 3, width=64)
    out = model.embed(events, "events:300", sensor_size=(48, 64))
    with torch.no_grad():
        expected = ours.pool(ours(model.inputs([events[:300], events[300:]], (48, 64))))
    assert np.allclose(out["embeddings"], expected.numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="mem_vit's import is partial"):
        load_model(tmp_path / "vit_small.pth", "mem_vit")


# --- the commands on the shipped real recordings -----------------------------------------------------------------


@needs_real
def test_embed_writes_each_windows_embedding_and_span_and_the_dat_and_evt3_exports_agree(runs, tmp_path):
    checkpoint = str(runs["root"] / "stage1" / "checkpoint.pt")
    common = ["embed", "--checkpoint", checkpoint, "--window", "events:400000", "--quiet", "--batch-size", "2"]
    spans = {}
    for name in ("gen4.dat", "evt3.raw"):
        out = tmp_path / f"{name}.h5"
        origin = ["--time-origin", "first_event", "--tokens"]
        assert main([*common, "--input", str(REAL / name), *origin, "--out", str(out)]) == 0
        with h5py.File(out) as file:
            spans[name] = {key: file[key][:] for key in ("embeddings", "tokens", "t_start", "t_end", "source")}
            recordings = json.loads(file.attrs["recordings"])
    assert main([*common, "--input", str(REAL / "evt3.raw"), "--out", str(tmp_path / "file.h5")]) == 0
    dat, evt3 = spans["gen4.dat"], spans["evt3.raw"]
    events = read_events(REAL / "gen4.dat", time_origin="first_event")  # 1,218,618 events: 3 windows of 400,000
    assert dat["t_start"].tolist() == [int(events["t"][k * 400000]) for k in range(3)]
    assert dat["t_end"].tolist() == [int(events["t"][(k + 1) * 400000 - 1]) + 1 for k in range(3)]
    assert dat["embeddings"].shape == (3, 192) and dat["tokens"].shape == (3, 16, 192)
    assert recordings == [
        {
            "path": str(REAL / "evt3.raw"),
            "kind": "recording",
            "sensor_size": [720, 1280],
            "events": 1218618,
            "windows": 3,
            "dropped_events": 18618,
        }
    ]
    assert np.array_equal(dat["t_start"], evt3["t_start"]) and np.array_equal(dat["t_end"], evt3["t_end"])
    assert np.allclose(dat["embeddings"], evt3["embeddings"], atol=1e-6)
    assert np.allclose(dat["tokens"], evt3["tokens"], atol=1e-6)
    assert [s.decode() for s in dat["source"]] == [str(REAL / "gen4.dat")] * 3
    with h5py.File(tmp_path / "file.h5") as file:  # on the file's own clock the spans move, the embeddings do not
        assert file["t_start"][0] == evt3["t_start"][0] + 11200224
        assert np.allclose(file["embeddings"][:], evt3["embeddings"], atol=1e-6)


@needs_real
def test_predict_writes_top_k_tables_for_a_classifier_and_a_preview(runs, tmp_path):
    out = tmp_path / "pred"
    args = ["predict", "--run", str(runs["root"] / "classify"), "--input", str(REAL / "gen4.dat"), "--quiet"]
    assert main([*args, "--window", "ms:2000", "--top-k", "3", "--out", str(out)]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:7] == ["window", "source", "t_start_us", "t_end_us", "class_1", "name_1", "prob_1"]
    assert len(rows) == 1 + 5  # 10.768 s in windows of 2 s
    windows = json.loads((out / "predictions.json").read_text())["windows"]
    first_t = int(read_events(REAL / "gen4.dat")["t"][0])
    assert [w["t_start_us"] for w in windows] == [first_t + k * 2_000_000 for k in range(5)]
    for window in windows:
        probs = [b["prob"] for b in window["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    gif = Image.open(out / "preview.gif")
    assert gif.n_frames == 5 and gif.info["duration"] == 2000
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest["task"] == "classify" and manifest["windows"] == 5 and manifest["window"] == "ms:2000"
    # Without --window: the window the classifier was scored on (300 events, within each sample of a store);
    # the earlier folder is replaced.
    store = ["predict", "--run", str(runs["root"] / "classify"), "--input", str(runs["val"]), "--quiet"]
    assert main([*store, "--preview-frames", "2", "--out", str(out)]) == 0
    with EventStore(runs["val"]) as val:
        expected = int((val.event_counts // 300).sum())
    manifest = json.loads((out / "prediction.json").read_text())
    assert manifest["windows"] == expected > 0 and manifest["window"] == "events:300"
    assert Image.open(out / "preview.gif").n_frames == 2 and not (out / "predictions.csv").read_text().count("gen4")


@needs_real
@pytest.mark.parametrize("task, name", [("segment", "masks"), ("flow", "flow")])
def test_predict_writes_masks_or_flow_at_the_recordings_resolution(runs, tmp_path, task, name):
    out = tmp_path / task
    run = str(runs["root"] / task)
    args = ["predict", "--run", run, "--input", str(REAL / "gen4.dat"), "--window", "events:600000", "--quiet"]
    assert main([*args, "--resize", "center_crop", "--out", str(out)]) == 0
    with np.load(out / f"{name}.npz") as archive:
        assert sorted(archive.files) == ["source", "t_end", "t_start", "window_00000", "window_00001"]
        first = archive["window_00000"]
    png = Image.open(out / name / "window_00001.png")
    if task == "segment":
        assert first.shape == (720, 720) and first.dtype == np.uint8 and first.max() < 11  # the square crop
        assert png.mode == "P" and np.array_equal(np.asarray(Image.open(out / name / "window_00000.png")), first)
    else:
        assert first.shape == (2, 720, 720) and first.dtype == np.float32 and np.isfinite(first).all()
        assert png.mode == "RGB" and png.size == (720, 720)
    assert Image.open(out / "preview.gif").n_frames == 2


@needs_real
def test_errors_name_the_file_and_leave_nothing_half_written(runs, tmp_path, capsys):
    checkpoint = str(runs["root"] / "stage1" / "checkpoint.pt")
    out = tmp_path / "out" / "features.h5"
    args = ["embed", "--checkpoint", checkpoint, "--quiet", "--out", str(out), "--input", str(REAL / "gen4.dat")]
    assert main([*args, "--window", "events:2000000"]) == 2
    error = capsys.readouterr().err
    assert "gen4.dat: the window events:2000000 is larger than the recording, which holds 1218618 events" in error
    assert list(out.parent.iterdir()) == []  # no file, no temporary file
    # A bad second input: the first one's windows were embedded, and still nothing is written.
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"% Version 2\n\x0e\x08" + bytes(8))
    assert main([*args, str(bad), "--window", "events:600000"]) == 2
    assert "bad.dat: at byte offset 12: event type 0x0E" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []
    # predict: an earlier folder stays as it was, and no work folder is left beside it.
    folder = tmp_path / "pred"
    predict = ["predict", "--run", str(runs["root"] / "classify"), "--quiet", "--out", str(folder)]
    assert main([*predict, "--input", str(REAL / "gen4.dat"), "--window", "ms:5000"]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main([*predict, "--input", str(REAL / "gen4.dat"), str(bad), "--window", "ms:5000"]) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dat", "out", "pred"]
    # A pre-training checkpoint predicts nothing; a folder that is not a prediction is not replaced.
    assert main(["predict", "--run", checkpoint, "--input", str(REAL / "gen4.dat"), "--out", str(tmp_path / "x")]) == 2
    assert "it embeds, it predicts nothing; use `evpretrain embed`" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*predict[:-1], str(tmp_path / "mine"), "--input", str(REAL / "gen4.dat")]) == 2
    assert "exists and is not an earlier prediction folder" in capsys.readouterr().err
