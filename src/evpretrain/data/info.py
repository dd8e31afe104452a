"""Summaries of event files and stores, for ``evpretrain data info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from evpretrain.data.store import STORE_FORMAT, EventStore


def describe_events(events: np.ndarray, sensor_size: tuple[int, int] | None) -> dict[str, Any]:
    """Event count, time span (microseconds), rate, polarity balance and the x/y extent of an event array."""
    n = len(events)
    out: dict[str, Any] = {"events": n, "sensor_size": list(sensor_size) if sensor_size else None}
    if n == 0:
        return out
    t0, t1 = int(events["t"][0]), int(events["t"][-1])
    span = t1 - t0
    out |= {
        "t_first_us": t0,
        "t_last_us": t1,
        "span_s": span / 1e6,
        "rate_mev_per_s": n / span if span > 0 else None,  # events per microsecond = M events per second
        "on_fraction": float(np.count_nonzero(events["p"] > 0) / n),
        "x_range": [int(events["x"].min()), int(events["x"].max())],
        "y_range": [int(events["y"].min()), int(events["y"].max())],
    }
    return out


def is_store(path: str | Path) -> bool:
    """True when ``path`` is an HDF5 file written by ``EventStoreWriter``."""
    try:
        with h5py.File(path, "r") as file:
            return file.attrs.get("format") == STORE_FORMAT
    except OSError:
        return False


def describe_store(store: EventStore, *, max_samples_scanned: int = 2000) -> dict[str, Any]:
    """The store's attributes, fields, label counts and event statistics (scanning up to ``max_samples_scanned``)."""
    attrs = store.attrs
    counts = store.event_counts.tolist()
    scanned = min(len(store), max_samples_scanned)
    on = spans = 0
    for i in range(scanned):
        ev = store.events(i)
        on += int(np.count_nonzero(ev["p"] > 0))
        spans += int(ev["t"][-1] - ev["t"][0]) if len(ev) else 0
    scanned_events = sum(counts[:scanned])
    out: dict[str, Any] = {
        "samples": len(store),
        "events": int(attrs.get("num_events", sum(counts))),
        "sensor_size": list(store.sensor_size),
        "events_per_sample": {
            "mean": float(np.mean(counts)) if counts else 0.0,
            "min": min(counts, default=0),
            "max": max(counts, default=0),
        },
        "mean_sample_span_ms": spans / max(scanned, 1) / 1e3,
        "on_fraction": on / scanned_events if scanned_events else None,
        "fields": store.fields,
    }
    labels = store.labels
    if labels is not None:
        values, freq = np.unique(labels, return_counts=True)
        out["label_counts"] = {int(v): int(c) for v, c in zip(values, freq)}
    out["attributes"] = {k: v for k, v in attrs.items() if k not in ("num_events",)}
    return out


def format_description(path: str | Path, description: dict[str, Any], indent: int = 0) -> str:
    """Human-readable, aligned ``key: value`` lines."""
    lines = [str(path)] if indent == 0 else []
    pad = " " * (indent + 2)
    for key, value in description.items():
        if isinstance(value, dict) and value and key != "label_counts":
            lines.append(f"{pad}{key}:")
            lines.append(format_description(path, value, indent + 2))
        else:
            if isinstance(value, float):
                value = f"{value:.6g}"
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines)
