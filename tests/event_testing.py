"""Helpers shared by the reader tests: the real recordings and the corrupt-input oracle."""

from pathlib import Path

import pytest

from evpretrain.events.contract import EventFormatError, validate_events

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real recordings not found at {REAL} (../shared is only in the shared workspace)"
)


def read_or_format_error(read, path):
    """Corrupt input may raise EventFormatError or give valid events; anything else fails the test."""
    try:
        recording = read(path)
    except EventFormatError:
        return None
    validate_events(recording.events, sensor_size=recording.sensor_size)
    return recording
