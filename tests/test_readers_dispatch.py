"""read_recording / read_events: choosing the reader by name, magic bytes, content or suffix."""

import numpy as np
import pytest

from evpretrain.config import ConfigError
from evpretrain.events import read_events as public_read_events
from evpretrain.events.contract import EVENT_DTYPE, EventFormatError
from evpretrain.events.readers import detect_format, read_events, read_recording, supported_formats

EXPECTED_FORMATS = {
    "bin",
    "dat",
    "n_imagenet",
    "es_imagenet",
    "dsec",
    "ddd17",
    "mvsec",
    "aedat2",
    "aedat3",
    "raw",
    "aedat4",
    "es",
    "dat_faery",
}


def test_supported_formats_lists_every_reader_with_a_description():
    formats = supported_formats()
    assert set(formats) == EXPECTED_FORMATS
    assert all(isinstance(text, str) and text for text in formats.values())


def test_read_events_returns_the_contract_array_and_is_public(tmp_path):
    path = tmp_path / "sample.bin"
    path.write_bytes(b"\x05\x0a\x80\x00\x07")
    for read in (read_events, public_read_events):
        events = read(path)
        assert events.dtype == EVENT_DTYPE and events.tolist() == [(7, 5, 10, 1)]


def test_format_by_name_overrides_the_suffix_and_options_reach_the_reader(tmp_path):
    path = tmp_path / "sample.events"  # an ES-ImageNet archive under a suffix that says nothing
    with open(path, "wb") as file:
        np.savez(file, pos=np.array([[20, 30, 2]], np.uint8), neg=np.zeros((0, 3), np.uint8))
    assert read_recording(path, format="es_imagenet", step_us=250).events.tolist() == [(250, 14, 4, 1)]
    assert detect_format(path) == "es_imagenet"  # from the zip magic and the arrays it holds
    with pytest.raises(TypeError, match="step_us"):
        read_recording(tmp_path / "x.bin", format="bin", step_us=1)


def test_unknown_names_and_undetectable_files_list_the_supported_formats(tmp_path):
    path = tmp_path / "recording.xyz"
    path.write_bytes(b"\x00\x01\x02")
    # A misspelt name is a bad option (ConfigError, as from every name registry), an undetectable file a bad file.
    with pytest.raises(ConfigError, match=r"unknown format 'evt4'; supported: bin, dat, n_imagenet, .*dat_faery"):
        read_recording(path, format="evt4")
    with pytest.raises(
        EventFormatError, match=r"recording\.xyz: cannot tell the format .* pass format=, one of: bin, dat"
    ):
        read_recording(path)


def test_unread_aedat_versions_are_refused_with_a_way_out(tmp_path):
    path = tmp_path / "old.aedat"
    path.write_bytes(b"#!AER-DAT1.0\r\n# This is a raw AE data file\r\n" + bytes(6))
    with pytest.raises(EventFormatError, match=r"AEDAT 1\.0 is not supported \(2\.0, 3\.1 and 4\.0 are\): convert"):
        read_recording(path)


def test_foreign_npz_and_hdf5_files_are_named_by_what_they_hold(tmp_path):
    import h5py

    np.savez(tmp_path / "other.npz", frames=np.zeros(2))
    with pytest.raises(EventFormatError, match=r"arrays \['frames'\] is neither N-ImageNet .* nor ES-ImageNet"):
        read_recording(tmp_path / "other.npz")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file.create_dataset("images", data=np.zeros(2))
    with pytest.raises(EventFormatError, match=r"top-level keys \['images'\] is neither DSEC .* nor MVSEC"):
        read_recording(tmp_path / "other.h5")


def test_missing_files_are_not_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_recording(tmp_path / "absent.dat")
