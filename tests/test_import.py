"""`evpretrain data import`: recordings -> stores (importer.py), the streaming reader and the windower beneath it."""

import os
import subprocess

import numpy as np
import pytest
import yaml
from event_testing import REAL, needs_real
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.cli import main
from evpretrain.config import ConfigError
from evpretrain.data.config import ImportConfig
from evpretrain.data.importer import PARTS, assign_splits, import_recordings
from evpretrain.data.store import EventStore
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError, make_events
from evpretrain.events.readers import read_events, read_recording, stream_recording
from evpretrain.events.readers.streaming import _in_time_order
from evpretrain.events.simulator import simulate
from evpretrain.events.windows import Windower, WindowSpec, frame_windows

SENSOR = (720, 1280)  # (H, W) of the shipped evt3.raw / gen4.dat


def write_evt3(path, events, sensor=SENSOR):
    """``events`` as a Prophesee EVT 3.0 file, encoded by faery."""
    from faery.events_stream import EVENTS_DTYPE
    from faery.extension import evt

    packet = np.zeros(len(events), EVENTS_DTYPE)
    packet["t"], packet["x"], packet["y"], packet["on"] = events["t"], events["x"], events["y"], events["p"] > 0
    with evt.Encoder(str(path), "evt3", False, (sensor[1], sensor[0]), True) as encoder:
        encoder.write({"events": packet})
    return path


def write_dat(path, events, sensor=SENSOR):
    """``events`` as a Prophesee DAT v2 file (CD events: t, then x | y << 14 | p << 28)."""
    words = np.empty((len(events), 2), "<u4")
    words[:, 0] = events["t"]
    words[:, 1] = events["x"].astype(np.uint32) | events["y"].astype(np.uint32) << 14 | (events["p"] > 0) << 28
    header = f"% Version 2\n% Width {sensor[1]}\n% Height {sensor[0]}\n".encode()
    path.write_bytes(header + b"\x0c\x08" + words.tobytes())
    return path


@pytest.fixture(scope="module")
def real_events():
    if not REAL.is_dir():
        pytest.skip(f"real recordings not found at {REAL} (../shared is only in the shared workspace)")
    return read_events(REAL / "evt3.raw")


@pytest.fixture
def class_folders(tmp_path, real_events):
    """root/a/{0.raw, 1.dat, 2.raw}, root/b/{3.raw, 4.dat, 5.raw}: six cuts of 20,000 real events, EVT3 and DAT."""
    root = tmp_path / "classes"
    cuts = {}
    for i in range(6):
        folder = root / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        events = real_events[i * 20_000 : (i + 1) * 20_000]
        write = write_dat if i % 3 == 1 else write_evt3
        name = f"{folder.name}/{i}.{'dat' if i % 3 == 1 else 'raw'}"
        write(root / name, events)
        cuts[name] = events
    return root, cuts


def stores(out):
    return {path.stem: EventStore(path) for path in sorted(out.glob("*.h5"))}


@needs_real
def test_class_folders_become_labelled_samples_with_the_class_names(class_folders, tmp_path):
    root, cuts = class_folders
    (root / "a" / "README.md").write_text("# notes beside the recordings: no event format, left out\n")
    config = ImportConfig(root=str(root), layout="class_folders", split={"train": 0.5, "test": 0.5}, seed=3)
    written = import_recordings(config, tmp_path / "out", workers=2, progress=False)
    assert sorted(written) == ["test", "train"] and not (tmp_path / "out" / PARTS).exists()
    seen = {}
    for split, store in stores(tmp_path / "out").items():
        assert store.attrs["class_names"] == ["a", "b"] and store.attrs["split"] == split
        assert store.sensor_size == SENSOR and len(store) == 3
        for i, name in enumerate(store.names):
            file, span = name.split("@")
            events = cuts[file]
            assert span == f"{events['t'][0]}:{events['t'][-1] + 1}"
            assert store.labels[i] == "ab".index(file[0])
            np.testing.assert_array_equal(store.events(i), events)
            seen[file] = split
    assert len(seen) == 6  # every file once


@needs_real
def test_windows_of_class_folder_files_do_not_depend_on_the_chunk_size(class_folders, tmp_path):
    root, cuts = class_folders
    digests = []
    for chunk in (3001, 1 << 20):
        config = ImportConfig(
            root=str(root), layout="class_folders", window="events:5000", split={"train": 1.0}, chunk_events=chunk
        )
        (path,) = import_recordings(config, tmp_path / f"out{chunk}", workers=1, progress=False).values()
        store = EventStore(path)
        assert len(store) == 6 * 4
        for i, name in enumerate(store.names):
            file = name.split("@")[0]
            k = [n.split("@")[0] for n in store.names].index(file)  # the file's first window
            np.testing.assert_array_equal(store.events(i), cuts[file][(i - k) * 5000 : (i - k + 1) * 5000])
        digests.append(store.attrs["content_sha256"])
    assert digests[0] == digests[1]


def duration_windows(events, size_us):
    """Independent oracle: the non-empty complete slots of ``(t - t0) // size_us``, as event arrays."""
    slots = (events["t"] - events["t"][0]) // size_us
    complete = slots < (events["t"][-1] - events["t"][0]) // size_us
    return [events[slots == k] for k in np.unique(slots[complete])]


@needs_real
@pytest.mark.parametrize(("window", "expected"), [("events:100000", 1_218_618 // 100_000), ("ms:250", None)])
def test_recordings_are_cut_into_every_complete_window(tmp_path, real_events, window, expected):
    root = tmp_path / "recordings"
    root.mkdir()
    for name in ("evt3.raw", "gen4.dat"):  # the same recording in two formats
        os.symlink(REAL / name, root / name)
    split_map = tmp_path / "splits.yaml"
    split_map.write_text(yaml.safe_dump({"evt3.raw": "train", "gen4.dat": "val"}))
    config = ImportConfig(root=str(root), layout="recordings", window=window, split_map=str(split_map))
    import_recordings(config, tmp_path / "out", workers=2, progress=False)
    train, val = stores(tmp_path / "out")["train"], stores(tmp_path / "out")["val"]
    if expected is None:
        oracle = duration_windows(real_events, 250_000)
    else:
        oracle = [real_events[k * 100_000 : (k + 1) * 100_000] for k in range(expected)]
    assert len(train) == len(val) == len(oracle) > 4
    assert train.labels is None and "class_names" not in train.attrs
    shift = val.events(0)["t"][0] - oracle[0]["t"][0]  # the DAT export counts from another clock origin
    for i in (0, len(oracle) // 2, len(oracle) - 1):
        np.testing.assert_array_equal(train.events(i), oracle[i])
        dat = val.events(i)
        dat["t"] -= shift
        np.testing.assert_array_equal(dat, oracle[i])
    assert {n.split("@")[0] for n in train.names} == {"evt3.raw"} and {n.split("@")[0] for n in val.names} == {
        "gen4.dat"
    }


def test_the_split_is_seeded_by_recording_and_cut_by_largest_remainder():
    names = [f"rec{i:02d}.raw" for i in range(10)]
    config = ImportConfig(root=".", layout="recordings", window="events:10", seed=7)
    first = assign_splits(names, config)
    assert first == assign_splits(list(names), config)  # the same seed: the same draw
    assert sorted(first.values()).count("train") == 8 and sorted(first.values()).count("val") == 1
    other = assign_splits(names, ImportConfig(root=".", layout="recordings", window="events:10", seed=8))
    assert other != first and sorted(other.values()) == sorted(first.values())
    thirds = ImportConfig(root=".", layout="recordings", window="events:10", split={"a": 0.5, "b": 0.25, "c": 0.25})
    # 7 x (0.5, 0.25, 0.25) = 3.5, 1.75, 1.75: floors 3, 1, 1, the two left over to the largest remainders
    assert sorted(assign_splits(names[:7], thirds).values()) == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    with pytest.raises(ConfigError, match=r"2 recording\(s\) leave split\(s\) \['val', 'test'\] without any"):
        assign_splits(names[:2], config)


def test_a_split_map_must_name_every_recording_and_only_them(tmp_path):
    split_map = tmp_path / "map.json"
    split_map.write_text('{"a.raw": "train", "c.raw": "val"}')
    config = ImportConfig(root="r", layout="recordings", window="events:10", split_map=str(split_map))
    with pytest.raises(ConfigError, match=r"1 recording\(s\) have no split, e.g. \['b.raw'\]; 1 entries name no file"):
        assign_splits(["a.raw", "b.raw"], config)


@needs_real
@pytest.mark.parametrize("name", ["evt3.raw", "gen4.dat", "evt2.raw"])
def test_a_streamed_recording_equals_the_whole_read(name):
    whole = read_recording(REAL / name)
    stream = stream_recording(REAL / name, chunk_events=65_537)
    chunks = list(stream.chunks())
    assert len(chunks) > 5 and stream.sensor_size == whole.sensor_size
    np.testing.assert_array_equal(np.concatenate(chunks), whole.events)


def test_a_dat_timestamp_wrap_between_chunks_is_carried(tmp_path):
    t = np.array([2**32 - 10, 2**32 - 5, 3, 8, 2**31 + 5, 2**32 - 1, 4], np.int64)  # wraps after events 1 and 5
    t_unwrapped = t + np.array([0, 0, 1, 1, 1, 1, 2]) * 2**32
    events = np.zeros(7, EVENT_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t, np.arange(7), 1, 1
    path = write_dat(tmp_path / "wrap.dat", events, (4, 8))
    assert np.array_equal(read_events(path)["t"], t_unwrapped)
    for chunk in (1, 2, 3, 5):
        assert np.array_equal(
            np.concatenate(list(stream_recording(path, chunk_events=chunk).chunks()))["t"], t_unwrapped
        )


def events_at(times):
    n = len(times)
    return make_events(np.asarray(times), np.arange(n) % 7, np.zeros(n), np.ones(n))


def test_events_out_of_order_across_one_chunk_boundary_are_merged_as_a_whole_sort():
    chunks = [events_at([0, 5, 10]), events_at([7, 10, 12]), events_at([12, 20])]
    whole = np.concatenate(chunks)
    expected = whole[np.argsort(whole["t"], kind="stable")]
    np.testing.assert_array_equal(np.concatenate(list(_in_time_order(iter(chunks), "f"))), expected)
    with pytest.raises(EventFormatError, match=r"f: an event at t=3 us comes after events up to t=10 us"):
        list(_in_time_order(iter([events_at([0, 5, 10]), events_at([11, 12]), events_at([3])]), "f"))


@st.composite
def chunked_stream(draw):
    gaps = draw(st.lists(st.integers(0, 30), min_size=1, max_size=200))
    events = events_at(np.cumsum(gaps) + draw(st.integers(0, 10**6)))
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=8)))
    return events, np.split(events, cuts)


@given(
    stream=chunked_stream(),
    kind=st.sampled_from(["events", "ms"]),
    size=st.integers(1, 60),
    keep_empty=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_any_chunking_of_sorted_events_gives_the_same_windows(stream, kind, size, keep_empty):
    events, chunks = stream
    spec = WindowSpec(kind, size)
    t0 = int(events["t"][0])
    if kind == "events":
        oracle = [events[k * size : (k + 1) * size] for k in range(len(events) // size)]
        spans = [(int(w["t"][0]), int(w["t"][-1]) + 1) for w in oracle]
    else:
        # Independent oracle: every complete slot of (t - t0) // size (kept empty, or only those with events).
        slots = (events["t"] - t0) // size
        complete = (int(events["t"][-1]) - t0) // size
        kept = [k for k in range(complete) if keep_empty or np.any(slots == k)]
        oracle = [events[slots == k] for k in kept]
        spans = [(t0 + k * size, t0 + (k + 1) * size) for k in kept]
    windower = Windower(spec, keep_empty=keep_empty)
    windows = list(windower.cut(iter(chunks), required=False))
    assert [(w.t_start, w.t_end) for w in windows] == spans
    for window, expected in zip(windows, oracle):
        np.testing.assert_array_equal(window.events, expected)
    in_windows = sum(len(w) for w in oracle)
    assert (windower.events, windower.windows, windower.dropped_events) == (
        len(events),
        len(oracle),
        len(events) - in_windows,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("events:500", WindowSpec("events", 500)),
        (" events:7 ", WindowSpec("events", 7)),
        ("ms:2.5", WindowSpec("ms", 2500)),
        ("ms:0.001", WindowSpec("ms", 1)),
        ("ms:1.001", WindowSpec("ms", 1001)),  # exact: 1.001 * 1000 in floats is 1000.9999999999999
        ("ms:1234.567", WindowSpec("ms", 1234567)),  # printed back whole, not rounded to 6 digits
        ("frames:3", WindowSpec("frames", 3)),
    ],
)
def test_window_specs_parse_to_events_or_microseconds(text, expected):
    assert WindowSpec.parse(text) == expected and WindowSpec.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["events:0", "events:1.5", "ms:0.0001", "s:1", "ms:", "frames:0", "frames:1.5"])
def test_a_bad_window_spec_says_what_is_expected(text):
    with pytest.raises(ValueError, match=r"window .*(events:N|whole number)"):
        WindowSpec.parse(text)


@needs_real
def test_an_unreadable_file_stops_the_import_naming_it_and_nothing_is_written(class_folders, tmp_path):
    root, _ = class_folders
    (root / "b" / "9.raw").write_bytes(b"not an event file\n" * 10)
    out = tmp_path / "out"
    config = ImportConfig(root=str(root), layout="class_folders", split={"train": 1.0})
    with pytest.raises(EventFormatError, match=r"b/9.raw: at byte offset 0: expected a '%' text header"):
        import_recordings(config, out, workers=2, progress=False)
    assert not list(out.glob("*.h5"))
    skipping = ImportConfig(root=str(root), layout="class_folders", split={"train": 1.0}, skip_bad=True)
    (path,) = import_recordings(skipping, out, workers=2, progress=False).values()
    store = EventStore(path)
    assert len(store) == 6 and store.attrs["skipped"] == ["b/9.raw"]


@needs_real
def test_a_window_larger_than_the_recording_is_refused_naming_the_file_and_sizes(tmp_path, real_events, capsys):
    root = tmp_path / "recordings"
    root.mkdir()
    write_evt3(root / "short.raw", real_events[:1000])
    out = tmp_path / "out"
    code = main(["data", "import", "--root", str(root), "--layout", "recordings", "--window", "events:5000"]
                + ["--split", "train=1.0", "--out", str(out), "--workers", "1", "--quiet"])  # fmt: skip
    span = int(real_events["t"][999] - real_events["t"][0])
    error = capsys.readouterr().err
    assert (
        code == 2
        and f"short.raw: the window events:5000 is larger than the recording, which holds 1000 events over {span} us"
        in error
    )
    assert not list(out.glob("*.h5"))
    assert (
        main(["data", "import", "--root", str(root), "--layout", "recordings", "--window", "ms:x", "--out", str(out)])
        == 2
    )
    assert "window 'ms:x': expected events:N" in capsys.readouterr().err


@needs_real
def test_a_rerun_after_a_failed_import_keeps_the_finished_parts_and_gives_the_clean_runs_stores(
    class_folders, tmp_path
):
    root, cuts = class_folders
    config = ImportConfig(
        root=str(root), layout="class_folders", window="events:4000", split={"train": 0.5, "val": 0.5}
    )
    clean = {s: EventStore(p).attrs["content_sha256"] for s, p in import_recordings(config, tmp_path / "clean").items()}
    broken = root / "b" / "5.raw"
    good = broken.read_bytes()
    broken.write_bytes(good[:60])  # the header and a few words: a file cut short, as by a killed copy
    out = tmp_path / "out"
    with pytest.raises(EventFormatError, match="5.raw"):
        import_recordings(config, out, workers=1, progress=False)
    assert len(list((out / PARTS).glob("*.h5"))) == 5 and not list(out.glob("*.h5"))  # the other files' parts
    broken.write_bytes(good)
    os.utime(broken, ns=(1, 1))
    resumed = {s: EventStore(p).attrs["content_sha256"] for s, p in import_recordings(config, out, workers=2).items()}
    assert resumed == clean


def tiny_import_study(tmp_path, recordings, target):
    from test_pipeline import tiny_study

    path = tiny_study(tmp_path)
    study = yaml.safe_load(path.read_text())
    study["data"]["imports"] = {
        "mine": {
            "root": str(recordings),
            "layout": "recordings",
            "window": "events:20000",
            "split": {"train": 0.5, "val": 0.5},
        }
    }
    study["study"]["pretrain_dataset"] = "mine"
    study["pretrain"]["data"] = {"input_size": [32, 32]}
    study["pretrain"]["knn"]["memory"] = 0  # unlabelled recordings: no kNN monitor (the plan refuses it)
    study["pretrain"]["stage1"]["method"]["target"] = target
    study["variants"] = {"stage1_only": {"stages": [1]}}
    path.write_text(yaml.safe_dump(study))
    return path


@needs_real
@pytest.mark.slow
def test_a_study_pretrains_on_an_imported_store_and_refuses_the_difference_target_when_planned(tmp_path, real_events):
    from snakemake.utils import validate
    from test_pipeline import ROOT, SNAKEMAKE, snakemake

    from evpretrain.pipeline.plan import plan_study

    recordings = tmp_path / "recordings"
    recordings.mkdir()
    write_evt3(recordings / "one.raw", real_events[:100_000])
    write_dat(recordings / "two.dat", real_events[100_000:200_000])
    refused = snakemake("--configfile", str(tiny_import_study(tmp_path, recordings, "difference")), "-n", cwd=tmp_path)
    assert refused.returncode != 0
    assert "pretrain.stage1.method.target: difference needs the frames of study.pretrain_dataset 'mine'" in (
        refused.stdout + refused.stderr
    )
    study = tiny_import_study(tmp_path, recordings, "voxel")
    config = yaml.safe_load(study.read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))  # the defaults, as Snakemake sets them
    (node,) = plan_study(config).nodes
    checkpoint = tmp_path / "results" / "pretrain" / node / "checkpoint.pt"
    run = subprocess.run(  # the stage's checkpoint only: the import, then stage 1
        [
            str(SNAKEMAKE),
            str(checkpoint),
            "--cores",
            "2",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--configfile",
            str(study),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={
            "PATH": f"{SNAKEMAKE.parent}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        },
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "import_mine" in run.stderr and checkpoint.is_file()
    train = EventStore(tmp_path / "results" / "data" / "mine" / "train.h5")
    assert len(train) == 5 and train.sensor_size == SENSOR


# AEDAT4 recordings with intensity frames (window frames:K)

DAVIS = (260, 346)  # (H, W) of a DAVIS346
FRAME_TIMES = np.array([1_000, 21_000, 45_000, 62_000, 90_000])  # irregular, as real APS frames come


def write_aedat4(path, events, frames=None, times=None, frame_size=DAVIS):
    """``events`` (and ``frames`` (T, H, W) uint8 at ``times`` us, as a frame stream of ``frame_size`` (H, W)) as a
    DAVIS346 AEDAT4 file, written by iniVation's dv-processing (the test extra)."""
    dv = pytest.importorskip("dv_processing")
    config = dv.io.MonoCameraWriter.Config("DAVIS346")
    if frames is not None:
        config.addFrameStream((frame_size[1], frame_size[0]))
    config.addEventStream((DAVIS[1], DAVIS[0]))
    writer = dv.io.MonoCameraWriter(str(path), config)
    for t, frame in zip([] if frames is None else times, [] if frames is None else frames):
        writer.writeFrame(dv.Frame(int(t), np.ascontiguousarray(frame)))
    store = dv.EventStore()
    for t, x, y, p in zip(events["t"].tolist(), events["x"].tolist(), events["y"].tolist(), events["p"].tolist()):
        store.push_back(t, x, y, p > 0)
    writer.writeEvents(store)
    del writer  # closes the file
    return path


@pytest.fixture(scope="module")
def davis_recording():
    """Five uint8 frames of a bright disc moving right over a ramp, at FRAME_TIMES, and the simulator's events of them
    (so frames and events agree)."""
    rows, cols = np.mgrid[: DAVIS[0], : DAVIS[1]]
    frames = np.empty((len(FRAME_TIMES), *DAVIS), np.uint8)
    for n in range(len(FRAME_TIMES)):
        disc = (rows - 130) ** 2 + (cols - 40 - 25 * n) ** 2 < 40**2
        frames[n] = np.where(disc, 220, 5 + cols * 100 // DAVIS[1])  # the ramp starts below the 20/255 toe
    events = simulate(frames / 255.0, FRAME_TIMES, contrast=0.2, seed=0).events
    assert len(events) > 1000
    return frames, events


def lin_log_reference(frame_u8):
    """The simulator's log response, computed independently in float64: ln(I) above 20/255, its tangent below."""
    intensity, toe = frame_u8 / 255.0, 20 / 255
    return np.where(intensity >= toe, np.log(np.maximum(intensity, toe)), np.log(toe) + (intensity - toe) / toe)


def test_an_aedat4_with_frames_imports_its_frames_difference_maps_and_the_events_between(tmp_path, davis_recording):
    frames, events = davis_recording
    root = tmp_path / "recordings"
    root.mkdir()
    write_aedat4(root / "davis.aedat4", events, frames, FRAME_TIMES)
    config = ImportConfig(root=str(root), layout="recordings", window="frames:2", split={"train": 1.0})
    store = EventStore(import_recordings(config, tmp_path / "out", workers=1, progress=False)["train"])
    assert len(store) == 2 and store.sensor_size == DAVIS  # frames 0-2 and 2-4
    assert {"frames", "diff_maps"} <= set(store.fields) and "frame_rate_hz" not in store.attrs
    for i, (first, last) in enumerate([(0, 2), (2, 4)]):
        start, end = FRAME_TIMES[first], FRAME_TIMES[last]
        assert store.names[i] == f"davis.aedat4@{start}:{end}"
        np.testing.assert_array_equal(store.dense("frames", i), frames[first : last + 1])
        expected = np.diff([lin_log_reference(f) for f in frames[first : last + 1]], axis=0)
        np.testing.assert_allclose(store.dense("diff_maps", i), expected, atol=1e-5)
        np.testing.assert_array_equal(store.events(i), events[(events["t"] >= start) & (events["t"] < end)])


def test_an_imported_store_with_frames_gives_stage_1_its_difference_target(tmp_path, davis_recording):
    from evpretrain.pretrain.data import PretrainDataset

    frames, events = davis_recording
    root = tmp_path / "recordings"
    root.mkdir()
    write_aedat4(root / "davis.aedat4", events, frames, FRAME_TIMES)
    config = ImportConfig(root=str(root), layout="recordings", window="frames:4", split={"train": 1.0})
    path = import_recordings(config, tmp_path / "out", workers=1, progress=False)["train"]
    sample = PretrainDataset(path, window="clip")[0]  # the sensor's size: no resize, no crop
    expected = lin_log_reference(frames[4]) - lin_log_reference(frames[0])  # the window's log-intensity change
    np.testing.assert_allclose(sample["target_difference"][0].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(sample["target_frame"][0].numpy(), frames[4] / 255.0, atol=1e-6)
    assert sample["voxel"].shape == (5, *DAVIS) and float(sample["voxel"].abs().sum()) > 0


def test_an_aedat4_without_frames_imports_events_only_and_frames_windows_are_refused_naming_it(
    tmp_path, davis_recording
):
    from test_plan import imported_study

    from evpretrain.pipeline.plan import plan_study

    _, events = davis_recording
    root = tmp_path / "recordings"
    root.mkdir()
    write_aedat4(root / "events.aedat4", events)
    config = ImportConfig(root=str(root), layout="recordings", window="events:1000", split={"train": 1.0})
    store = EventStore(import_recordings(config, tmp_path / "out", workers=1, progress=False)["train"])
    assert len(store) == len(events) // 1000 and not {"frames", "diff_maps"} & set(store.fields)
    frames = ImportConfig(root=str(root), layout="recordings", window="frames:1", split={"train": 1.0})
    with pytest.raises(EventFormatError, match=r"events.aedat4.*holds no intensity frames \(no frame stream\)"):
        import_recordings(frames, tmp_path / "refused", workers=1, progress=False)
    study = imported_study(target="difference")  # study.pretrain_dataset: mine, imported with window events:1000
    with pytest.raises(ConfigError, match=r"target: difference needs the frames of .*'mine'.* holds events only"):
        plan_study(study)
    study["data"]["imports"]["mine"]["window"] = "frames:1"  # the same recordings with frames: planned
    assert len(plan_study(study).nodes) == 1
    study["variants"]["full"] = {"stages": [1, 2, 3]}  # the teacher sees the last frame (the default input)
    assert len(plan_study(study).nodes) == 3
    study["pretrain"]["teacher"]["input"] = "rgb"
    with pytest.raises(ConfigError, match=r"teacher.input: rgb needs the colour source .*set .*input: last_frame"):
        plan_study(study)
    del study["variants"]["full"]
    study["pretrain"]["data"]["window"] = "interval"
    with pytest.raises(ConfigError, match=r"window: interval draws frame intervals, .*come at irregular times"):
        plan_study(study)


def test_frames_of_another_size_than_the_sensor_and_frames_of_a_frameless_format_are_refused_naming_the_file(
    tmp_path, davis_recording
):
    frames, events = davis_recording
    small = tmp_path / "small" / "davis.aedat4"
    small.parent.mkdir()
    write_aedat4(small, events, frames[:, :100, :120], FRAME_TIMES, frame_size=(100, 120))
    config = ImportConfig(root=str(small.parent), layout="recordings", window="frames:1", split={"train": 1.0})
    with pytest.raises(EventFormatError, match=r"davis.aedat4.*100x120 \(HxW\).*the events' sensor is 260x346"):
        import_recordings(config, tmp_path / "out", workers=1, progress=False)
    dat = tmp_path / "dat" / "events.dat"
    dat.parent.mkdir()
    write_dat(dat, events, sensor=DAVIS)
    config = ImportConfig(root=str(dat.parent), layout="recordings", window="frames:1", split={"train": 1.0})
    with pytest.raises(EventFormatError, match=r"events.dat.*only AEDAT4 recordings carry; this file is dat"):
        import_recordings(config, tmp_path / "out", workers=1, progress=False)


def test_colour_frames_are_read_as_grey_by_the_luma_weights(tmp_path):
    from evpretrain.events.readers import iter_aedat4_frames

    colour = np.zeros((2, *DAVIS, 3), np.uint8)  # dv-processing's frames are BGR, as OpenCV's
    colour[0, :, :100] = (255, 0, 0)
    colour[0, :, 100:200] = (0, 255, 0)
    colour[0, :, 200:] = (0, 0, 255)
    colour[1] = (40, 80, 120)
    path = write_aedat4(tmp_path / "colour.aedat4", events_at([1_000, 2_000]), colour, [1_000, 2_000])
    (t0, first), (t1, second) = iter_aedat4_frames(path, DAVIS)
    assert (t0, t1) == (1_000, 2_000) and first.dtype == np.uint8 and first.shape == DAVIS
    # ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B, rounded: blue 29.07, green 149.685, red 76.245, (R, G, B) =
    # (120, 80, 40): 35.88 + 46.96 + 4.56 = 87.4
    assert (first[:, :100] == 29).all() and (first[:, 100:200] == 150).all() and (first[:, 200:] == 76).all()
    assert (second == 87).all()


def frame_stream(times):
    """(t, frame) pairs whose 1x1 frame holds its index."""
    return [(t, np.full((1, 1), n, np.uint8)) for n, t in enumerate(times)]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_frame_windows_hold_the_events_between_their_first_and_last_frame_whatever_the_chunking(chunk):
    events = events_at([5, 10, 15, 20, 30, 34, 35, 49, 50, 60, 61, 70, 95])
    chunks = [events[i : i + chunk] for i in range(0, len(events), chunk)]
    windows = list(frame_windows(chunks, frame_stream([10, 20, 35, 50, 60, 90, 95, 100]), 1, source="rec"))
    # [10, 20) [20, 35) [35, 50) [50, 60) [60, 90) [90, 95): empty, skipped; [95, 100)
    assert [(w.t_start, w.t_end) for w in windows] == [(10, 20), (20, 35), (35, 50), (50, 60), (60, 90), (95, 100)]
    assert [w.events["t"].tolist() for w in windows] == [[10, 15], [20, 30, 34], [35, 49], [50], [60, 61, 70], [95]]
    assert [w.frames[:, 0, 0].tolist() for w in windows] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [6, 7]]
    (two,) = list(frame_windows(chunks, frame_stream([10, 35, 60, 80]), 2))  # frames 0-2; frame 3 opens no full one
    assert (two.t_start, two.t_end, two.frames[:, 0, 0].tolist()) == (10, 60, [0, 1, 2])
    assert two.times.tolist() == [10, 35, 60] and two.events["t"].tolist() == [10, 15, 20, 30, 34, 35, 49, 50]


def test_frame_windows_refuse_frames_out_of_order_and_a_recording_too_short_naming_it():
    events = events_at([10, 20, 30])
    with pytest.raises(EventFormatError, match=r"rec.aedat4.*frame times do not increase: .*t=20 us after one at 30"):
        list(frame_windows([events], frame_stream([10, 30, 20]), 1, source="rec.aedat4"))
    with pytest.raises(EventFormatError, match=r"rec.aedat4.*frames:3 needs 4 intensity frames, .*holds 2"):
        list(frame_windows([events], frame_stream([10, 30]), 3, source="rec.aedat4"))
    with pytest.raises(ConfigError, match=r"frames:K windows are cut at a recording's intensity frames"):
        Windower(WindowSpec.parse("frames:2"))
