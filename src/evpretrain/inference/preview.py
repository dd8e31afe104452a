"""Pictures of windows and predictions: an event frame, masks in a palette, flow in the Middlebury colour wheel, and the
animated preview (GIF, Pillow) that ``evpretrain predict`` writes, because people look before they read.

Event frames: white where a pixel of the view has no event, red where its events are mostly ON, blue where mostly
OFF (the ``bwr`` colours of the run figures), paler for a single event; counted on a grid of the preview's size
(coordinates scaled, floor), so a pixel of the preview covers several sensor pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evpretrain.files import AtomicPath

__all__ = ["PALETTE", "event_frame", "flow_colors", "frame_size", "mask_image", "preview_frame", "write_gif"]

# matplotlib's tab20, a class a colour (cycled beyond 20 classes); class 0 first.
PALETTE = [
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
    (23, 190, 207), (158, 218, 229),
]  # fmt: skip
ON, OFF = np.array([214, 39, 40]), np.array([31, 119, 180])


def frame_size(view: tuple[int, int], max_width: int = 360) -> tuple[int, int]:
    """(H, W) of a preview panel of a view (H, W): at most ``max_width`` wide, the view's aspect."""
    height, width = view
    scale = min(1.0, max_width / width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def event_frame(events: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 picture of ``events`` (``EVENT_DTYPE``) inside ``box`` (top, left, height, width) of the
    sensor, on a ``size`` (H, W) grid (module docstring)."""
    top, left, height, width = box
    x, y = events["x"].astype(np.int64) - left, events["y"].astype(np.int64) - top
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    flat = (y[inside] * size[0] // height) * size[1] + x[inside] * size[1] // width
    on = np.bincount(flat, weights=events["p"][inside] > 0, minlength=size[0] * size[1]).reshape(size)
    total = np.bincount(flat, minlength=size[0] * size[1]).reshape(size).astype(np.float64)
    colour = np.where((on >= total - on)[..., None], ON, OFF)
    strength = np.clip(total / 2, 0, 1)[..., None]  # one event: half the colour, two or more: all of it
    return np.round(255 * (1 - strength) + colour * strength).astype(np.uint8)


def mask_image(mask: np.ndarray) -> Image.Image:
    """A (H, W) mask of class ids as a palette PNG image (``PALETTE``, cycled): the pixel values stay class ids."""
    if mask.max(initial=0) > 255:
        raise ValueError(f"a palette image holds class ids up to 255, got {int(mask.max())}")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette([c for i in range(256) for c in PALETTE[i % len(PALETTE)]])
    return image


def flow_colors(flow: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture of a (2, H, W) flow in the Middlebury colour wheel (Baker et al. 2011; torchvision's
    ``flow_to_image``): hue the direction, saturation the magnitude over the largest of the picture."""
    import torch
    from torchvision.utils import flow_to_image

    return flow_to_image(torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32))).permute(1, 2, 0).numpy()


def preview_frame(panels: Sequence[np.ndarray], caption: str) -> Image.Image:
    """Panels (H, W, 3) side by side, one pixel apart, under a caption line."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + len(panels) - 1
    font = _font()
    line = 18
    image = Image.new("RGB", (width, height + line), (255, 255, 255))
    left = 0
    for panel in panels:
        image.paste(Image.fromarray(panel), (left, line))
        left += panel.shape[1] + 1
    ImageDraw.Draw(image).text((3, 2), caption, fill=(0, 0, 0), font=font)
    return image


def write_gif(frames: Sequence[Image.Image], durations_ms: Sequence[int], path: str | Path) -> Path:
    """An animated GIF of ``frames`` (looping), each shown for its duration (clamped to [20, 2000] ms: GIF counts
    in 10 ms and viewers slow down shorter frames); written whole."""
    durations = [int(min(max(d, 20), 2000)) for d in durations_ms]
    with AtomicPath(path) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0, disposal=1
        )
    return Path(path)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()
