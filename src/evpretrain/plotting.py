"""Matplotlib for the figures the commands write: headless, imported only when drawing, each file written whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evpretrain.files import write_atomic


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Write ``figure`` to ``path`` (format from its suffix) through ``write_atomic``, then close the figure."""
    path = Path(path)
    try:
        return write_atomic(
            path, lambda file: figure.savefig(file, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
        )
    finally:
        pyplot().close(figure)
