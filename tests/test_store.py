import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.data.config import StoreCompression
from evpretrain.data.store import EventStore, EventStoreWriter, StoreError
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError


def random_events(rng, n, height=32, width=48):
    ev = np.empty(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 1_000_000, n))
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    ev["p"] = rng.choice(np.array([-1, 1], np.int8), n)
    return ev


def write_store(path, samples, **kwargs):
    with EventStoreWriter(path, sensor_size=(32, 48), source="test", builder_config={"seed": 1}, **kwargs) as writer:
        for s in samples:
            writer.add_sample(**s)
    return path


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=8), flush=st.integers(1, 500), seed=st.integers(0, 99))
def test_round_trip_every_sample(tmp_path_factory, counts, flush, seed):
    rng = np.random.default_rng(seed)
    samples = [
        dict(
            events=random_events(rng, n),
            clean_events=random_events(rng, n // 2),
            label=i % 3,
            frames=rng.random((3, 32, 48), dtype=np.float32),
            masks=rng.integers(0, 11, (32, 48), dtype=np.uint8),
            name=f"s{i}",
        )
        for i, n in enumerate(counts)
    ]
    path = tmp_path_factory.mktemp("store") / "split.h5"
    write_store(path, samples, flush_events=flush)
    with EventStore(path) as store:
        assert len(store) == len(samples)
        assert store.sensor_size == (32, 48)
        assert store.labels.tolist() == [s["label"] for s in samples]
        assert store.names == [s["name"] for s in samples]
        for i, s in enumerate(samples):
            got = store.sample(i)
            np.testing.assert_array_equal(got["events"], s["events"])
            np.testing.assert_array_equal(got["clean_events"], s["clean_events"])
            np.testing.assert_array_equal(got["frames"], s["frames"])
            np.testing.assert_array_equal(got["masks"], s["masks"])
        assert store.attrs["num_events"] == sum(counts)
        assert store.attrs["builder_config"] == {"seed": 1}
        store.verify()


def test_checksum_detects_changed_content(tmp_path):
    rng = np.random.default_rng(0)
    path = write_store(tmp_path / "a.h5", [dict(events=random_events(rng, 100), label=1)])
    EventStore(path).verify()
    with h5py.File(path, "r+") as f:
        f["events/x"][5] = (f["events/x"][5] + 1) % 48
    with pytest.raises(StoreError, match="checksum mismatch"):
        EventStore(path).verify()


def test_same_content_same_checksum_whatever_the_flush_size(tmp_path):
    rng = np.random.default_rng(3)
    samples = [dict(events=random_events(rng, n)) for n in (10, 0, 77, 5)]
    a = write_store(tmp_path / "a.h5", samples, flush_events=1)
    b = write_store(tmp_path / "b.h5", samples, flush_events=10_000, compression=StoreCompression(events="gzip"))
    assert EventStore(a).attrs["content_sha256"] == EventStore(b).attrs["content_sha256"]


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    rng = np.random.default_rng(0)
    path = write_store(tmp_path / "split.h5", [dict(events=random_events(rng, 10))])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with EventStoreWriter(path, sensor_size=(32, 48), source="test") as writer:
            writer.add_sample(random_events(rng, 10))
            raise RuntimeError("builder crashed")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["split.h5"]


def test_inconsistent_fields_and_bad_events_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    with EventStoreWriter(tmp_path / "s.h5", sensor_size=(32, 48), source="test") as writer:
        writer.add_sample(random_events(rng, 5), label=0)
        with pytest.raises(StoreError, match="fields"):
            writer.add_sample(random_events(rng, 5))
        outside = random_events(rng, 5)
        outside["x"][2] = 48
        with pytest.raises(EventFormatError, match="x=48"):
            writer.add_sample(outside, label=0)
        with pytest.raises(StoreError, match="unknown dense field"):
            writer.add_sample(random_events(rng, 5), label=0, video=np.zeros(3))


def test_opening_a_foreign_file_names_it(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not an event store"):
        EventStore(other)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="text.h5.*cannot open"):
        EventStore(text)
    with pytest.raises(StoreError, match="no such event store"):
        EventStore(tmp_path / "missing.h5")


def _events_in_child(store, index, queue):
    import os

    events = store.events(index)
    queue.put((events.tobytes(), store._pid == os.getpid()))


def test_a_store_open_before_fork_reads_in_the_child_through_its_own_handle(tmp_path):
    import multiprocessing

    rng = np.random.default_rng(0)
    store = EventStore(write_store(tmp_path / "s.h5", [{"events": random_events(rng, 50)} for _ in range(3)]))
    expected = store.events(2).tobytes()  # the parent's handle is open and holds cached dataset handles
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_events_in_child, args=(store, 2, queue))
    child.start()
    events, own_handle = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and events == expected
    assert own_handle  # the child opened the file itself rather than use the inherited HDF5 state
    assert store.events(2).tobytes() == expected  # and the parent's handle still reads


def _labelled_store(path):
    rng = np.random.default_rng(0)
    return write_store(path, [dict(events=random_events(rng, 400), label=i) for i in range(3)])


def _flip_byte_in_chunk(path, name, byte=7):
    """Flip one byte of dataset ``name``'s first chunk on disk, behind HDF5's back."""
    with h5py.File(path, "r") as file:
        offset = file[name].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + byte)
        value = raw.read(1)[0]
        raw.seek(offset + byte)
        raw.write(bytes([value ^ 0x10]))


@pytest.mark.parametrize("name", ["events/t", "events/x", "labels"])
def test_a_flipped_byte_in_the_data_is_an_error_when_read_not_silent_training_data(tmp_path, name):
    path = _labelled_store(tmp_path / "s.h5")
    _flip_byte_in_chunk(path, name)
    with EventStore(path) as store, pytest.raises(StoreError, match=rf"s\.h5: cannot read /{name}\[.*corrupt"):
        store.labels if name == "labels" else store.events(0)
    with pytest.raises(StoreError):
        EventStore(path).verify()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("samples/offset", 10**9, r"sample 1 \(1000000000, 400\) point outside the 1200 events"),
        ("samples/count", -3, r"sample 1 \(400, -3\) point outside"),
        ("samples/count", 801, r"sample 1 \(400, 801\) point outside"),
    ],
)
def test_a_corrupt_sample_index_is_refused_on_open_naming_the_sample(tmp_path, name, value, message):
    path = _labelled_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as file:  # through HDF5, so the chunk checksum is right and only the values are wrong
        file[name][1] = value
    with pytest.raises(StoreError, match=message):
        EventStore(path)


def test_a_zero_filled_tail_is_a_store_error(tmp_path):
    path = _labelled_store(tmp_path / "s.h5")
    size = path.stat().st_size
    with open(path, "r+b") as raw:
        raw.seek(size // 2)
        raw.write(bytes(size - size // 2))
    with pytest.raises(StoreError, match=r"s\.h5"):
        with EventStore(path) as store:
            for index in range(len(store)):
                store.sample(index)
            store.verify()
