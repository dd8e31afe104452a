"""The ``%`` text header that opens Prophesee DAT and RAW (EVT 2.0/2.1/3.0) files.

Each header line is ``% <key> <value>\\n``; the binary data starts at the first byte that is not ``%`` (or after a
``% end`` line, which newer RAW files write because their first data byte may itself be ``%``). The sensor
geometry comes, in order of precedence, from ``% geometry WxH``, ``% format EVT3;height=H;width=W``,
``% Width W`` / ``% Height H`` (DAT), or, for RAW files from old plugins that wrote none of these, from the
plugin's sensor (OpenEB's table of legacy plugins: Gen3/Gen3.1 are 640x480, Gen4/Gen4.1 1280x720). Width and
height must lie in 1..``MAX_SENSOR_SIDE``: event coordinates are uint16, and a corrupt header must not make later
stages allocate frames of its size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO

from evpretrain.events.contract import EventFormatError

MAX_LINE_BYTES = 1 << 16  # a "line" longer than this is binary data, not a header
MAX_SENSOR_SIDE = 1 << 16  # pixels; x and y are uint16 in the event contract

LEGACY_PLUGIN_GEOMETRY = {  # plugin_name -> (height, width)
    "hal_plugin_gen3_fx3": (480, 640),
    "hal_plugin_gen31_fx3": (480, 640),
    "hal_plugin_gen31_evk2": (480, 640),
    "hal_plugin_gen31_evk3": (480, 640),
    "hal_plugin_gen4_fx3": (720, 1280),
    "hal_plugin_gen4_evk2": (720, 1280),
    "hal_plugin_gen41_evk2": (720, 1280),
    "hal_plugin_gen41_evk3": (720, 1280),
}


@dataclass(frozen=True)
class PropheseeHeader:
    """Header fields in file order (``key -> value``, both stripped), the byte offset of each field's line and the
    header's length in bytes."""

    fields: dict[str, str]
    size: int
    offsets: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        """The value of ``key``, matched without regard to case (DAT writes ``Width``, RAW ``width``)."""
        name = self._name(key)
        return None if name is None else self.fields[name]

    def offset(self, key: str) -> int | None:
        """Byte offset of the line that gives ``key`` (matched as in ``get``), or None."""
        name = self._name(key)
        return None if name is None else self.offsets.get(name)

    def _name(self, key: str) -> str | None:
        return next((name for name in self.fields if name.lower() == key.lower()), None)

    def geometry(self, *, source: str | os.PathLike | None = None) -> tuple[int, int] | None:
        """``(height, width)`` in pixels, or None where the header does not give it (module docstring)."""
        geometry = self.get("geometry")
        if geometry is not None:
            match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", geometry)
            if match is None:
                raise EventFormatError(
                    source,
                    f"header 'geometry {geometry}' is not of the form WIDTHxHEIGHT",
                    offset=self.offset("geometry"),
                )
            return self._checked(int(match[2]), int(match[1]), source, width_key="geometry", height_key="geometry")
        sizes = dict(re.findall(r"(width|height)=(\d+)", (self.get("format") or "").lower()))
        if len(sizes) == 2:
            return self._checked(
                int(sizes["height"]), int(sizes["width"]), source, width_key="format", height_key="format"
            )
        width, height = self.get("width"), self.get("height")
        if width is not None or height is not None:
            if not (width or "").isdigit() or not (height or "").isdigit():
                bad = "width" if not (width or "").isdigit() and width is not None else "height"
                raise EventFormatError(
                    source,
                    f"header gives Width {width!r} and Height {height!r}, expected integers",
                    offset=self.offset(bad) if self.offset(bad) is not None else self.offset("width") or 0,
                )
            return self._checked(int(height), int(width), source, width_key="width", height_key="height")
        return LEGACY_PLUGIN_GEOMETRY.get(self.get("plugin_name") or "")

    def _checked(self, height: int, width: int, source, *, width_key: str, height_key: str) -> tuple[int, int]:
        """(height, width), refused outside 1..MAX_SENSOR_SIDE; errors point at the line that gives the bad side."""
        for side, key in ((width, width_key), (height, height_key)):
            if side < 1 or side > MAX_SENSOR_SIDE:
                raise EventFormatError(
                    source,
                    f"header '{key}' gives a {width}x{height} sensor, expected width and height in "
                    f"1..{MAX_SENSOR_SIDE}",
                    offset=self.offset(key),
                )
        return height, width


def read_prophesee_header(file: BinaryIO, *, source: str | os.PathLike | None = None) -> PropheseeHeader:
    """Parse the header from the start of ``file``; leaves ``file`` positioned at the first data byte."""
    file.seek(0)
    fields: dict[str, str] = {}
    offsets: dict[str, int] = {}
    while True:
        start = file.tell()
        if file.read(1) != b"%":
            file.seek(start)
            break
        line = file.readline(MAX_LINE_BYTES)
        if not line.endswith(b"\n"):
            raise EventFormatError(source, "header line starting with '%' is not terminated by a newline", offset=start)
        text = line.decode("latin-1").strip()
        key, _, value = text.partition(" ")
        if key and key not in fields:
            fields[key] = value.strip()
            offsets[key] = start
        if key == "end":
            break
    return PropheseeHeader(fields=fields, size=file.tell(), offsets=offsets)
