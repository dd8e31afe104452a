"""MVSEC flow converter, against a tiny copy of the dataset written here in its real HDF5 layout.

Every sequence has 12 frames 30 ms apart, one event every 5 ms (so window i holds events 6i..6i+5, the one at
exactly frame i's time included) and uniform gt fields every 50 ms: field k of sequence s is (k + 1) * (s, -s / 2)
pixels, undefined (zero) in rows 0..19. All expectations below follow from these numbers by hand.
"""

import random

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.config import ConfigError
from evpretrain.data.config import MvsecConvertConfig
from evpretrain.data.registry import convert_dataset, get_dataset
from evpretrain.data.sequences.mvsec import (
    chain_flow,
    convert,
    gt_pieces,
    pick_train_share,
)
from evpretrain.data.store import EventStore
from evpretrain.events.contract import EventFormatError
from evpretrain.events.readers.mvsec import MvsecEvents, read_mvsec

H, W = 260, 346
T0 = 1_504_645_177.0  # a ROS time in seconds, as MVSEC stores it
T0_US = 1_504_645_177_000_000
SEQUENCES = ("outdoor_day1", "outdoor_day2", "indoor_flying1", "indoor_flying2", "indoor_flying3")
NUM_FRAMES, FRAME_MS, EVENT_MS, GT_MS, UNDEFINED_ROWS = 12, 30, 5, 50, 20
SMALL = {"frame_ranges": {}, "start_offsets_s": {}, "train_share": {}}  # every window of the tiny sequences


def scale_of(sequence):
    return SEQUENCES.index(sequence) + 1


def gt_field(sequence, k):
    """Field k of a sequence: (k + 1) * (s, -s / 2) px, zero (undefined) in the top rows."""
    s = scale_of(sequence)
    field = np.empty((2, H, W), np.float32)
    field[0], field[1] = (k + 1) * s, -(k + 1) * s / 2
    field[:, :UNDEFINED_ROWS] = 0
    return field


def event_rows(n=68):
    j = np.arange(n)
    return np.stack([(37 * j) % W, (11 * j) % H, T0 + j * EVENT_MS / 1000, np.where(j % 2, -1.0, 1.0)], axis=1)


def write_sequence(root, sequence, *, gt_start_ms=0, num_gt=8, image_ts=None, flows=None):
    """<sequence>_data.hdf5 and <sequence>_gt.hdf5 in MVSEC's layout (gzip-compressed images and flow)."""
    rows = event_rows()
    image_ts = T0 + np.arange(NUM_FRAMES) * FRAME_MS / 1000 if image_ts is None else image_ts
    gt_ts = T0 + (gt_start_ms + np.arange(num_gt) * GT_MS) / 1000
    flows = np.stack([gt_field(sequence, k) for k in range(num_gt)]) if flows is None else flows
    with h5py.File(root / f"{sequence}_data.hdf5", "w") as file:
        file.create_dataset("davis/left/events", data=rows, chunks=(16, 4))
        file.create_dataset("davis/left/image_raw", data=np.zeros((len(image_ts), H, W), np.uint8), compression="gzip")
        file.create_dataset("davis/left/image_raw_ts", data=image_ts)
        file.create_dataset("davis/left/image_raw_event_inds", data=np.searchsorted(rows[:, 2], image_ts))
        file.create_dataset("davis/right/events", data=rows[::2] + [1, 1, 0, 0])
    with h5py.File(root / f"{sequence}_gt.hdf5", "w") as file:
        file.create_dataset("davis/left/flow_dist", data=flows, chunks=(1, *flows.shape[1:]), compression="gzip")
        file.create_dataset("davis/left/flow_dist_ts", data=gt_ts)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvsec")
    for sequence in SEQUENCES:
        # indoor_flying2's gt starts 50 ms after its first frame: its first two windows have no ground truth.
        write_sequence(root, sequence, gt_start_ms=50 if sequence == "indoor_flying2" else 0)
    return root


def run(root, out, workers=1, **settings):
    return convert(root, out, SMALL | settings, workers=workers, progress=False)


def by_name(store):
    return {name: i for i, name in enumerate(store.names)}


# --- the ground truth over a window -------------------------------------------------------------------------


def test_gt_pieces_by_hand():
    ts = np.array([0, 50, 100])
    assert gt_pieces(ts, 30, 60) == ((0, 0.4), (1, 0.2))
    assert gt_pieces(ts, 10, 40) == ((0, 0.6),)
    assert gt_pieces(ts, 50, 100) == ((1, 1.0),)
    assert gt_pieces(ts, 0, 100) == ((0, 1.0), (1, 1.0))
    with pytest.raises(ValueError, match="not inside the gt span"):
        gt_pieces(ts, 60, 101)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=12), st.data())
def test_gt_pieces_cover_the_window_exactly(steps, data):
    ts = np.concatenate([[0], np.cumsum(steps)])
    start = data.draw(st.integers(0, int(ts[-1]) - 1))
    end = data.draw(st.integers(start + 1, int(ts[-1])))
    pieces = gt_pieces(ts, start, end)
    ks = [k for k, _ in pieces]
    assert ks == list(range(ks[0], ks[-1] + 1)) and ts[ks[0]] <= start and end <= ts[ks[-1] + 1]
    assert all(0 < f <= 1 for _, f in pieces)
    assert sum(f * (ts[k + 1] - ts[k]) for k, f in pieces) == pytest.approx(end - start)


def test_chain_flow_scales_one_field_and_marks_undefined_pixels():
    field = np.full((2, H, W), 4.0, np.float32)
    field[1] = -2
    field[:, 100:110, 50:60] = 0  # no gt there
    field[0, 7, 8] = np.nan
    flow, valid = chain_flow([field], [0.25])
    expected_valid = np.ones((H, W), bool)
    expected_valid[100:110, 50:60] = False
    expected_valid[7, 8] = False
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(flow[:, valid], np.array([[1.0], [-0.5]]) * np.ones((1, valid.sum())))
    assert flow.dtype == np.float32 and not flow[:, ~valid].any()


def test_chain_flow_reads_the_next_field_at_the_moved_pixel_rounded_half_to_even():
    right = np.zeros((2, H, W), np.float32)
    right[0] = 1.0
    down_by_column = np.zeros((2, H, W), np.float32)
    down_by_column[1] = np.arange(W) + 1.0  # dy = column + 1, defined everywhere
    flow, valid = chain_flow([right, down_by_column], [0.5, 1.0])
    x = np.arange(W)
    landed = np.rint(x + 0.5)  # 0.5 -> 0, 1.5 -> 2: OpenCV's cvRound, as the paper's cv2.remap
    assert landed[:4].tolist() == [0, 2, 2, 4]
    inside = landed < W
    np.testing.assert_array_equal(valid, np.broadcast_to(inside, (H, W)))
    np.testing.assert_array_equal(flow[0][:, inside], np.full((H, inside.sum()), 0.5, np.float32))
    np.testing.assert_array_equal(flow[1][:, inside], np.broadcast_to(landed[inside] + 1, (H, inside.sum())))


def test_chain_flow_drops_flow_beyond_the_limit():
    field = np.zeros((2, H, W), np.float32)
    field[0] = 1200.0
    _, valid = chain_flow([field], [1.0])
    assert valid.sum() == 0
    _, valid = chain_flow([field], [0.5])
    assert valid.all()


def test_chain_flow_equals_the_papers_remap_propagation():
    """The paper's gen_correspond_gt_flow/prop_flow, written with cv2.remap, on random fields with holes."""
    cv2 = pytest.importorskip(
        "cv2", reason="OpenCV comes with the bench extra (eventify-dvs), which make test installs"
    )
    rng = np.random.default_rng(0)
    fields = rng.choice(np.r_[-24:0, 1:25] / 4.0, size=(3, 2, H, W)).astype(np.float32)  # exact in float32
    holes = rng.random((3, H, W)) < 0.05  # undefined gt: both components zero
    fields[:, 0][holes] = fields[:, 1][holes] = 0.0
    fractions = [0.25, 1.0, 0.5]

    y0, x0 = np.mgrid[0:H, 0:W].astype(np.float32)
    x, y = x0.copy(), y0.copy()
    keep_x, keep_y = np.ones((H, W), bool), np.ones((H, W), bool)
    for field, fraction in zip(fields, fractions):
        fx = cv2.remap(field[0], x, y, cv2.INTER_NEAREST)
        fy = cv2.remap(field[1], x, y, cv2.INTER_NEAREST)
        keep_x &= fx != 0
        keep_y &= fy != 0
        x += fx * fraction
        y += fy * fraction
    u, v = np.where(keep_x, x - x0, 0), np.where(keep_y, y - y0, 0)
    paper_valid = (np.hypot(u, v) > 0) & (np.abs(u) < 1000) & (np.abs(v) < 1000)

    flow, valid = chain_flow(list(fields), fractions)
    np.testing.assert_array_equal(valid, paper_valid)
    assert 0.3 < valid.mean() < 0.95  # both outcomes are exercised
    np.testing.assert_array_equal(flow[0][valid], u[valid])
    np.testing.assert_array_equal(flow[1][valid], v[valid])


# --- windows, split, selection ------------------------------------------------------------------------------


def test_windows_hold_the_events_between_frames_and_the_gt_over_them(root, tmp_path):
    written = run(root, tmp_path, train_sequences=[], test_sequences=["indoor_flying1"])
    assert [p.name for p in written] == ["train.h5", "test.h5"]
    with EventStore(tmp_path / "test.h5") as store:
        assert store.names == [f"indoor_flying1/{i:05d}" for i in range(NUM_FRAMES - 1)]
        assert store.sensor_size == (H, W) and store.attrs["split"] == "test"
        all_events = read_mvsec(root / "indoor_flying1_data.hdf5").events
        for i in range(NUM_FRAMES - 1):
            np.testing.assert_array_equal(store.events(i), all_events[6 * i : 6 * i + 6])
            assert store.events(i)["t"][0] == T0_US + i * FRAME_MS * 1000  # the event at frame i's time
        # Window 0 = [0, 30] ms lies inside gt interval 0: 0.6 of field 0 = 0.6 * (3, -1.5).
        flow, valid = store.dense("flow", 0), store.dense("valid", 0)
        assert valid.dtype == np.uint8 and flow.shape == (2, H, W)
        assert not valid[:UNDEFINED_ROWS].any() and valid[UNDEFINED_ROWS:].all()
        np.testing.assert_allclose(flow[:, valid == 1].T, [[1.8, -0.9]] * int(valid.sum()), rtol=1e-6)
        # Window 1 = [30, 60] ms: 0.4 of field 0 then 0.2 of field 1, read 1.2 px right and 0.6 px up of each
        # pixel: row 20 lands on undefined row 19, column 345 leaves the image.
        flow, valid = store.dense("flow", 1), store.dense("valid", 1)
        expected = np.zeros((H, W), np.uint8)
        expected[UNDEFINED_ROWS + 1 :, : W - 1] = 1
        np.testing.assert_array_equal(valid, expected)
        np.testing.assert_allclose(flow[:, valid == 1].T, [[2.4, -1.2]] * int(valid.sum()), rtol=1e-6)
        assert not flow[:, valid == 0].any()


def test_frame_skip_joins_frames_dt_apart(root, tmp_path):
    run(root, tmp_path, train_sequences=[], test_sequences=["indoor_flying1"], frame_skip=2)
    with EventStore(tmp_path / "test.h5") as store:
        assert len(store) == NUM_FRAMES - 2
        np.testing.assert_array_equal(store.events(3)["t"], T0_US + np.arange(18, 30) * EVENT_MS * 1000)
        # [90, 150] ms: 0.2 of field 1 (6, -3) + 1.0 of field 2 (9, -4.5)
        flow, valid = store.dense("flow", 3), store.dense("valid", 3)
        np.testing.assert_allclose(flow[:, valid == 1].T, [[10.2, -5.1]] * int(valid.sum()), rtol=1e-6)


def test_the_papers_split_lends_a_seeded_share_of_indoor_flying1_to_train(root, tmp_path):
    run(root, tmp_path, train_share={"indoor_flying1": 0.25}, seed=3)
    lent = sorted(random.Random(3).sample(range(NUM_FRAMES - 1), 2))  # int(0.25 * 11) windows
    with EventStore(tmp_path / "train.h5") as train, EventStore(tmp_path / "test.h5") as test:
        expected_train = [f"{s}/{i:05d}" for s in ("outdoor_day1", "outdoor_day2") for i in range(NUM_FRAMES - 1)]
        assert train.names == expected_train + [f"indoor_flying1/{i:05d}" for i in lent]
        held = [i for i in range(NUM_FRAMES - 1) if i not in lent]
        expected_test = [f"indoor_flying1/{i:05d}" for i in held]
        expected_test += [f"indoor_flying2/{i:05d}" for i in range(2, NUM_FRAMES - 1)]  # gt starts at 50 ms
        expected_test += [f"indoor_flying3/{i:05d}" for i in range(NUM_FRAMES - 1)]
        assert test.names == expected_test
        assert train.attrs["windows_per_sequence"] == {"outdoor_day1": 11, "outdoor_day2": 11, "indoor_flying1": 2}
        assert test.attrs["sequences"] == ["indoor_flying1", "indoor_flying2", "indoor_flying3"]
        assert test.attrs["window_counts"]["indoor_flying2"]["dropped_outside_gt"] == 2
        # Each sequence's own gt: outdoor_day2's window 0 is 0.6 * (2, -1).
        index = by_name(train)["outdoor_day2/00000"]
        flow, valid = train.dense("flow", index), train.dense("valid", index)
        np.testing.assert_allclose(flow[:, valid == 1].T, [[1.2, -0.6]] * int(valid.sum()), rtol=1e-6)
        train.verify()
        test.verify()


def test_train_share_picks_like_the_papers_code():
    frames = np.arange(314, 2198)  # the paper's indoor_flying1 windows at dt = 1
    random.seed(0)  # the paper: random.seed(args.seed); random.sample(self.raw_index, index_length)
    paper = random.sample(list(range(314, 2198)), int(0.01 * len(frames)))
    chosen = frames[pick_train_share(frames, 0.01, pick="random", seed=0)]
    assert len(chosen) == 18 and chosen.tolist() == sorted(paper)
    first = frames[pick_train_share(frames, 0.01, pick="first", seed=0)]
    assert first.tolist() == list(range(314, 332))


def test_frame_ranges_and_start_offsets_select_windows(root, tmp_path):
    run(
        root,
        tmp_path,
        train_sequences=["outdoor_day1"],
        test_sequences=["indoor_flying3"],
        frame_ranges={"outdoor_day1": [2, 8], "indoor_flying3": [0, 100]},
        start_offsets_s={"indoor_flying3": 0.1},
    )
    with EventStore(tmp_path / "train.h5") as train, EventStore(tmp_path / "test.h5") as test:
        assert train.names == [f"outdoor_day1/{i:05d}" for i in range(2, 7)]  # frames i and i + 1 in [2, 8)
        assert test.names == [f"indoor_flying3/{i:05d}" for i in range(4, 11)]  # 120 ms >= 100 ms; 90 ms is not
        counts = test.attrs["window_counts"]["indoor_flying3"]
        assert counts == {
            "in_frame_range": 11,
            "dropped_before_start_offset": 4,
            "dropped_outside_gt": 0,
            "train": 0,
            "test": 7,
        }


def test_outdoor_rows_below_the_hood_line_are_invalid(root, tmp_path):
    run(root, tmp_path, train_sequences=["outdoor_day1"], test_sequences=["indoor_flying1"], outdoor_max_row=190)
    with EventStore(tmp_path / "train.h5") as train, EventStore(tmp_path / "test.h5") as test:
        valid = train.dense("valid", 0)
        assert valid[UNDEFINED_ROWS:190].all() and not valid[190:].any()
        assert not train.dense("flow", 0)[:, 190:].any()
        assert test.dense("valid", 0)[190:].all()


def test_defaults_are_the_papers_protocol():
    config = MvsecConvertConfig()
    assert config.train_sequences == ("outdoor_day1", "outdoor_day2")
    assert config.test_sequences == ("indoor_flying1", "indoor_flying2", "indoor_flying3")
    assert config.frame_skip == 1 and config.train_share == {"indoor_flying1": 0.01} and config.seed == 0
    assert config.frame_ranges["indoor_flying1"] == (314, 2199) and config.frame_ranges["outdoor_day2"] == (4375, 7002)
    assert config.start_offsets_s == {
        "indoor_flying1": 4.0,
        "indoor_flying2": 9.0,
        "indoor_flying3": 7.0,
        "outdoor_day1": 3.0,
        "outdoor_day2": 45.0,
    }
    assert config.outdoor_max_row is None and config.max_flow_px == 1000.0


def test_workers_and_reruns_write_identical_stores(root, tmp_path):
    chosen = {"train_sequences": ["outdoor_day2"], "test_sequences": ["indoor_flying2"], "windows_per_task": 3}
    run(root, tmp_path / "a", workers=2, **chosen)
    run(root, tmp_path / "b", workers=1, **chosen)
    run(root, tmp_path / "b", workers=1, **chosen)  # a rerun replaces the stores
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test.h5", "train.h5"]
    for split in ("train", "test"):
        with EventStore(tmp_path / "a" / f"{split}.h5") as a, EventStore(tmp_path / "b" / f"{split}.h5") as b:
            assert a.attrs["content_sha256"] == b.attrs["content_sha256"] and len(a) > 0


def test_the_registry_verifies_and_routes_to_this_converter(root, tmp_path):
    written = convert_dataset(get_dataset("mvsec"), root, tmp_path, settings=SMALL, workers=1, progress=False)
    with EventStore(written[0]) as train:
        assert len(train) == 22 and train.attrs["dataset"] == "mvsec"


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_files_are_named(root, tmp_path):
    (tmp_path / "indoor_flying1_data.hdf5").symlink_to(root / "indoor_flying1_data.hdf5")
    with pytest.raises(FileNotFoundError, match=r"indoor_flying1_gt\.hdf5.*expected <sequence>_data\.hdf5"):
        run(tmp_path, tmp_path / "out", train_sequences=[], test_sequences=["indoor_flying1"])


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"image_ts": T0 + np.array([0.0, 0.03, 0.03, 0.09])}, r"image_raw_ts'\[2\] = .* expected increasing times"),
        (
            {"flows": np.zeros((8, 2, H, W - 1), np.float32)},
            r"flow_dist' is float32 \(8, 2, 260, 345\), expected floats",
        ),
        ({"num_gt": 1}, r"flow_dist_ts' is float64 \(1,\), expected two or more finite times"),
    ],
)
def test_malformed_files_name_the_file_and_what_was_expected(tmp_path, broken, message):
    write_sequence(tmp_path, "indoor_flying1", **broken)
    with pytest.raises(EventFormatError, match=message):
        run(tmp_path, tmp_path / "out", train_sequences=[], test_sequences=["indoor_flying1"])


def test_unknown_or_wrong_settings_name_the_key(root, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.convert\.mvsec: unknown key\(s\) \['dt'\]"):
        run(root, tmp_path, dt=1)
    with pytest.raises(ConfigError, match="only a test sequence can lend windows"):
        run(root, tmp_path, train_share={"outdoor_day1": 0.5})


# --- the time-window reader ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=0, max_size=60), st.lists(st.integers(-5, 1300), max_size=8))
def test_mvsec_events_find_times_like_searchsorted(tmp_path_factory, steps, queries):
    t_us = T0_US + np.cumsum(steps, dtype=np.int64) * 20
    rows = np.stack([np.zeros(len(t_us)), np.zeros(len(t_us)), t_us / 1e6, np.ones(len(t_us))], axis=1)
    path = tmp_path_factory.mktemp("ev") / "s_data.hdf5"
    with h5py.File(path, "w") as file:
        file.create_dataset("davis/left/events", data=rows.reshape(-1, 4))
    queries = T0_US + np.asarray(queries, dtype=np.int64) * 20
    with MvsecEvents(path) as events:
        events.INDEX_STRIDE = 4  # several coarse blocks even for a few events
        np.testing.assert_array_equal(events.index_at(queries), np.searchsorted(t_us, queries, side="left"))
        if len(queries) >= 2:
            low, high = sorted(queries[:2])
            np.testing.assert_array_equal(events.window(low, high)["t"], t_us[(t_us >= low) & (t_us < high)])
