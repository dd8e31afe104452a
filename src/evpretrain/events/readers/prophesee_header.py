"""The ``%`` text header that opens Prophesee DAT and RAW (EVT 2.0/2.1/3.0) files.

Each header line is ``% <key> <value>\\n``; the binary data starts at the first byte that is not ``%`` (or after a
``% end`` line, which newer RAW files write because their first data byte may itself be ``%``). The sensor
geometry comes, in order of precedence, from ``% geometry WxH``, ``% format EVT3;height=H;width=W``,
``% Width W`` / ``% Height H`` (DAT), or, for RAW files from old plugins that wrote none of these, from the
plugin's sensor (OpenEB's table of legacy plugins: Gen3/Gen3.1 are 640x480, Gen4/Gen4.1 1280x720).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

from evpretrain.events.contract import EventFormatError

MAX_LINE_BYTES = 1 << 16  # a "line" longer than this is binary data, not a header

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
    """Header fields in file order (``key -> value``, both stripped) and the header's length in bytes."""

    fields: dict[str, str]
    size: int

    def get(self, key: str) -> str | None:
        """The value of ``key``, matched without regard to case (DAT writes ``Width``, RAW ``width``)."""
        for name, value in self.fields.items():
            if name.lower() == key.lower():
                return value
        return None

    def geometry(self, *, source: str | os.PathLike | None = None) -> tuple[int, int] | None:
        """``(height, width)`` in pixels, or None where the header does not give it (module docstring)."""
        geometry = self.get("geometry")
        if geometry is not None:
            match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", geometry)
            if match is None:
                raise EventFormatError(source, f"header 'geometry {geometry}' is not of the form WIDTHxHEIGHT")
            return int(match[2]), int(match[1])
        sizes = dict(re.findall(r"(width|height)=(\d+)", (self.get("format") or "").lower()))
        if len(sizes) == 2:
            return int(sizes["height"]), int(sizes["width"])
        width, height = self.get("width"), self.get("height")
        if width is not None or height is not None:
            if not (width or "").isdigit() or not (height or "").isdigit():
                raise EventFormatError(source, f"header gives Width {width!r} and Height {height!r}, expected integers")
            return int(height), int(width)
        return LEGACY_PLUGIN_GEOMETRY.get(self.get("plugin_name") or "")


def read_prophesee_header(file: BinaryIO, *, source: str | os.PathLike | None = None) -> PropheseeHeader:
    """Parse the header from the start of ``file``; leaves ``file`` positioned at the first data byte."""
    file.seek(0)
    fields: dict[str, str] = {}
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
        if key:
            fields.setdefault(key, value.strip())
        if key == "end":
            break
    return PropheseeHeader(fields=fields, size=file.tell())
