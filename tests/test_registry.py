"""The dataset registry: verify says what is missing; convert turns a class-folder dataset into stores."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_readers_binary import encode_bin

from evpretrain.config import ConfigError
from evpretrain.data.config import CONVERT_CONFIGS
from evpretrain.data.registry import (
    SEQUENCE_CONVERTERS,
    class_folder_splits,
    convert_dataset,
    get_dataset,
    load_registry,
    verify_dataset,
)
from evpretrain.data.store import EventStore


def test_registry_covers_the_papers_datasets():
    registry = load_registry()
    assert {
        "n-caltech101",
        "n-cars",
        "n-imagenet",
        "cifar10-dvs",
        "es-imagenet",
        "dsec-semantic",
        "ddd17",
        "mvsec",
    } <= set(registry)
    assert registry["n-caltech101"].layout.random_split.seed == 123  # ECDP's split
    assert all(entry.obtain and entry.expect for entry in registry.values())


def test_the_paper_datasets_name_the_authors_organised_copy_and_verify_says_where(tmp_path):
    registry = load_registry()
    paper = ["n-caltech101", "n-cars", "n-imagenet", "cifar10-dvs", "es-imagenet", "dsec-semantic", "ddd17", "mvsec"]
    assert all(registry[name].authors_copy.startswith("https://pan.baidu.com/s/") for name in paper)
    assert registry["ddd17"].authors_copy.endswith("?pwd=1v29")  # their README's DDD17 link
    assert not registry["n-mnist"].authors_copy  # not one of theirs
    report = verify_dataset(registry["mvsec"], tmp_path / "absent")
    assert f"The paper's authors' organised copy: {registry['mvsec'].authors_copy}" in report.format()


def test_a_broken_registry_names_the_entry_and_key(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(
        "mine:\n  title: t\n  task: detection\n  format: bin\n  sensor_size: [1, 1]\n  obtain: o\n"
        "  layout: {kind: class_folders}\n  expect: []\n"
    )
    with pytest.raises(ConfigError, match=r"registry\.mine\.task: expected one of"):
        load_registry(path)
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        get_dataset("nope")


BASE = (
    "mine:\n  title: t\n  task: classification\n  format: bin\n  sensor_size: [1, 1]\n  obtain: o\n"
    "  layout: {kind: class_folders}\n  expect: []\n"
)


@pytest.mark.parametrize(
    "files, message",
    [
        (
            "[{url: 'https://h/a.zip', name: a.zip}]",
            r"registry\.mine\.files\[0\]: a\.zip: give exactly one published checksum",
        ),
        ("[{url: 'https://h/a.zip', name: a.zip, md5: abc}]", r"md5 must be 32 lower-case hex digits"),
        ("[{url: 'ftp://h/a.zip', name: a.zip, md5: " + "a" * 32 + "}]", r"url must be an http\(s\) address"),
        ("[{url: 'https://h/a.zip', name: ../a.zip, md5: " + "a" * 32 + "}]", r"name must be a plain file name"),
        (
            "[{url: 'https://h/a.zip', name: a.zip, md5: " + "a" * 32 + ", extract: {into: ../up, format: zip}}]",
            r"files\[0\]\.extract: extract\.into must be a folder inside the download folder",
        ),
        (
            "[{url: 'https://h/a', name: a, sha256: " + "a" * 64 + ", extract: {format: rar}}]",
            r"expected one of \['zip', 'tar', 'none'\]",
        ),
    ],
)
def test_a_broken_download_entry_names_the_key(tmp_path, files, message):
    path = tmp_path / "registry.yaml"
    path.write_text(BASE + f"  files: {files}\n")
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


def test_the_downloadable_entries_name_their_files_and_root():
    registry = load_registry()
    assert {name for name, entry in registry.items() if entry.files} == {"n-caltech101", "n-mnist", "cifar10-dvs"}
    assert [f.name for f in registry["n-mnist"].files] == ["train.zip", "test.zip"]
    assert registry["n-caltech101"].files[0].md5 == "66201824eabb0239c7ab992480b50ba3"
    assert registry["n-caltech101"].download_root == "Caltech101"
    assert not registry["n-cars"].files and not registry["n-imagenet"].files  # behind a form or a request


def _n_caltech_like(root, per_class):
    """An N-Caltech101-shaped folder: class folders of ATIS .bin files (and the background class to drop)."""
    rng = np.random.default_rng(0)
    for name in ("airplanes", "Faces_easy", "BACKGROUND_Google"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            n = int(rng.integers(1, 50))
            t = np.sort(rng.integers(0, 100_000, n))
            data = encode_bin(rng.integers(0, 240, n), rng.integers(0, 180, n), rng.integers(0, 2, n), t)
            (root / name / f"image_{k:04d}.bin").write_bytes(data)


def test_random_split_is_per_class_seeded_and_drops_excluded_classes(tmp_path):
    _n_caltech_like(tmp_path, per_class=10)
    entry = get_dataset("n-caltech101")
    splits, classes = class_folder_splits(entry, tmp_path)
    assert classes == ["Faces_easy", "airplanes"]
    assert {s: len(f) for s, f in splits.items()} == {"train": 16, "test": 4}
    for label in (0, 1):
        assert sum(1 for _, y in splits["train"] if y == label) == 8
    assert not {f for f, _ in splits["train"]} & {f for f, _ in splits["test"]}
    again, _ = class_folder_splits(entry, tmp_path)
    assert again == splits


def test_convert_refuses_an_incomplete_copy_and_converts_a_complete_one(tmp_path):
    root = tmp_path / "ncaltech"
    _n_caltech_like(root, per_class=5)
    entry = get_dataset("n-caltech101")
    with pytest.raises(FileNotFoundError, match=r"\*/\*\.bin: 15 found, at least 8000 expected"):
        convert_dataset(entry, root, tmp_path / "out", workers=1, progress=False)

    # The same entry with expectations this small copy meets.
    from dataclasses import replace

    from evpretrain.data.registry import Expectation

    small = replace(entry, expect=[Expectation("*/*.bin", 15)])
    assert verify_dataset(small, root).ok
    written = convert_dataset(small, root, tmp_path / "out", workers=2, progress=False)
    assert sorted(p.name for p in written) == ["test.h5", "train.h5"]
    from evpretrain.events.readers import read_events

    with EventStore(tmp_path / "out" / "train.h5") as store:
        assert len(store) == 8 and store.attrs["class_names"] == ["Faces_easy", "airplanes"]
        for i, name in enumerate(store.names):
            np.testing.assert_array_equal(store.events(i), read_events(root / name))
            assert store.labels[i] == (0 if name.startswith("Faces_easy") else 1)
        store.verify()


def test_sequence_datasets_are_verified_before_conversion(tmp_path):
    with pytest.raises(FileNotFoundError, match="outdoor_day1_data.hdf5: 0 found"):
        convert_dataset(get_dataset("mvsec"), tmp_path, tmp_path / "out", progress=False)


def test_every_window_converter_has_its_settings_class_the_plan_checks():
    """data.config.CONVERT_CONFIGS (what ``snakemake -n`` loads data.convert.<dataset> into) names, for each
    registered converter, the class the converter itself reads, and the schema admits exactly those sections."""
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert (
        set(CONVERT_CONFIGS)
        == set(SEQUENCE_CONVERTERS)
        == set(schema["properties"]["data"]["properties"]["convert"]["properties"])
    )
    for name, target in SEQUENCE_CONVERTERS.items():
        module = importlib.import_module(target.split(":")[0])
        assert getattr(module, CONVERT_CONFIGS[name].__name__) is CONVERT_CONFIGS[name]
        assert get_dataset(name).layout.kind == "sequences"
