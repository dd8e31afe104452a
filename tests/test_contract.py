import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evpretrain.events.contract import (
    EVENT_DTYPE,
    EventFormatError,
    make_events,
    polarity_to_signed,
    sort_events,
    validate_events,
)


def test_make_events_packs_columns_and_maps_polarity():
    ev = make_events([1, 2, 2], [0, 5, 7], [3, 4, 0], [0, 1, 0], source="rec.bin")
    assert ev.dtype == EVENT_DTYPE
    assert ev["p"].tolist() == [-1, 1, -1]
    assert ev["x"].tolist() == [0, 5, 7]


@pytest.mark.parametrize(
    "p, expected",
    [([True, False], [1, -1]), ([0, 1], [-1, 1]), ([-1, 1], [-1, 1]), ([1, 1], [1, 1]), (np.array([], np.int8), [])],
)
def test_polarity_encodings(p, expected):
    assert polarity_to_signed(p).tolist() == expected


def test_errors_name_the_source_and_what_is_wrong():
    with pytest.raises(EventFormatError, match=r"rec\.dat: polarity holds \[0, 2\]"):
        make_events([1, 2], [0, 0], [0, 0], [0, 2], source="rec.dat")
    with pytest.raises(EventFormatError, match="rec.dat: timestamps not sorted: event 2 has t=1 after t=5"):
        make_events([0, 5, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], source="rec.dat")
    with pytest.raises(EventFormatError, match=r"column 'x' holds values outside \[0, 65535\]"):
        make_events([0], [-1], [0], [1])
    with pytest.raises(EventFormatError, match=r"column 'y' has shape \(2,\), expected \(1,\)"):
        make_events([0], [0], [0, 1], [1])
    ev = make_events([0, 1], [10, 3], [2, 9], [1, 1])
    with pytest.raises(EventFormatError, match=r"event 1 has y=9, outside the sensor \(8x12, HxW\)"):
        validate_events(ev, sensor_size=(8, 12))
    with pytest.raises(EventFormatError, match="expected a 1-D array of dtype"):
        validate_events(np.zeros(3))
    err = EventFormatError("f.bin", "truncated event", offset=15)
    assert str(err) == "f.bin: at byte offset 15: truncated event" and err.offset == 15


@given(hnp.arrays(np.int64, st.integers(0, 50), elements=st.integers(0, 10**12)))
def test_sort_events_is_stable_and_sorted(t):
    ev = np.zeros(len(t), EVENT_DTYPE)
    ev["t"] = t
    ev["x"] = np.arange(len(t))  # original position, to check stability
    ev["p"] = 1
    out = validate_events(sort_events(ev))
    for a, b in zip(out[:-1], out[1:]):
        assert a["t"] < b["t"] or (a["t"] == b["t"] and a["x"] < b["x"])
