"""The paper's released checkpoints as their code writes them, for tests: every state-dict key (with dtype and shape)
of ``model/pretrain/pr_hub_model.py``'s PrHubModel for ViT-S/16, ConvViT-S and Swin-T after stage 1 ("mm", pr_phase
rec) and after stage 3 ("mm_trans_cl", pr_phase con), and ``main_pretrain.py``'s argparse defaults.

``eventpretrain_layout.json`` was derived once, outside this repository, by instantiating their classes at commit
86ce263 and listing ``state_dict()``; ``{a-b}`` in a key stands for every index a..b. ``their_name`` is the key
correspondence read off both codes (theirs: ``vit_block``, ``conv_block1/2``, ``swin_block.<i>.blocks`` with patch
merging closing a stage, ``norm_layer``), written independently of the importer's key map.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

LAYOUT = json.loads(Path(__file__).with_name("eventpretrain_layout.json").read_text())
CHECKPOINTS = tuple(LAYOUT["state"])  # vit_mm, vit_mm_trans_cl, convvit_mm, ...


def their_keys(checkpoint: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} of one released checkpoint's "model" entry."""
    keys = {}
    for line in LAYOUT["state"][checkpoint]:
        template, dtype, shape = (line.split(" ") + [""])[:3]
        shape = tuple(int(n) for n in shape.split(",") if n)
        ranges = [range(int(a), int(b) + 1) for a, b in re.findall(r"\{(\d+)-(\d+)\}", template)]
        parts = re.split(r"\{\d+-\d+\}", template)
        for indices in itertools.product(*ranges):
            keys["".join(part + str(i) for part, i in zip(parts, indices)) + parts[-1]] = (dtype, shape)
    return keys


def their_name(kind: str, ours: str) -> str | None:
    """The key in their backbone (without ``backbone.``) of our backbone's key ``ours``; None where theirs has none
    (our Swin's mask token). ``kind``: vit, convvit or swin."""
    if ours in ("norm.weight", "norm.bias"):
        return "norm_layer." + ours.split(".")[1]
    if kind == "vit":
        return re.sub(r"^blocks\.", "vit_block.", ours)
    if kind == "convvit":
        return re.sub(r"^blocks([12])\.", r"conv_block\1.", re.sub(r"^blocks3\.", "vit_block.", ours))
    if ours == "mask_token":
        return None
    if match := re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", ours):  # timm opens stage i + 1 with the merge
        return f"swin_block.{int(match[1]) - 1}.downsample.{match[2]}"
    return re.sub(r"^stages\.", "swin_block.", ours)
