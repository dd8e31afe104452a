"""OpenAI CLIP ViT-B/16 through open_clip, from a local weights file: the paper's teacher.

The paper's code (BIT-Vision/EventPretrain, main_pretrain.py and trainer/pretrain/pr_trainer.py) loads OpenAI's
``clip.load("ViT-B/16")`` and uses ``encode_image`` as a (B, 197, 512) tensor: a CLIP whose visual tower applies
``ln_post`` and the projection ``proj`` to every token, not only to the class token. Its stage-2/3 model then drops
the class token (``clip_emb[:, 1:, :]``, model/pretrain/pr_hub_model.py). This teacher returns exactly those 196
patch tokens, ``ln_post(x)[:, 1:] @ proj``, in CLIP's 512-d joint space.

Input: the whole image resized to 224x224 (bicubic, as CLIP's preprocessing), normalised with OpenAI's mean and std.
CLIP's centre crop happens where the image is stored: ``build-ef`` keeps the colour source resized (shorter side) and
centre-cropped to ``rgb_size`` (``pretrain.teacher.input: rgb``, the paper's), so this resize is then the identity; a
grey last frame (``last_frame``) is taken whole, so that its tokens cover the event frame's field of view.

Weights never come from the network: ``weights`` names a local file, either OpenAI's TorchScript archive
(``ViT-B-16.pt``, as ``clip.load`` caches it), a state dict saved with ``torch.save`` (loaded with
``weights_only=True``) or a ``.safetensors`` file, each holding the full CLIP (keys ``visual.*``; the text tower's
keys are ignored) or the visual tower alone.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from evpretrain.teachers.base import Teacher
from evpretrain.teachers.registry import register_teacher

__all__ = ["ClipViTB16Teacher", "load_visual_state_dict"]

OPEN_CLIP_ARCHITECTURE = "ViT-B-16-quickgelu"  # OpenAI's weights were trained with QuickGELU


def _is_torchscript(path: Path) -> bool:
    # OpenAI's checkpoints are TorchScript archives, which torch.load(weights_only=True) refuses.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_visual_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual tower's tensors from a CLIP checkpoint file, with the ``visual.`` prefix removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    elif _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI ships
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    visual = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    return visual or state


@register_teacher("clip_vit_b16")
class ClipViTB16Teacher(Teacher):
    """CLIP ViT-B/16 image tower, frozen.

    Tokens (B, 196, 512) at 224x224: every patch token projected to the joint space.

    Args:
        weights: path of a local CLIP ViT-B/16 checkpoint (config field ``weights``); required.
    """

    def __init__(self, weights: str | Path | None = None):
        if weights is None:
            raise ValueError(
                "clip_vit_b16: no weights file: set the teacher's config field 'weights' to a local OpenAI CLIP "
                "ViT-B/16 checkpoint (e.g. the ViT-B-16.pt that clip.load caches); nothing is downloaded"
            )
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"clip_vit_b16: the file given by config field 'weights' does not exist: {path}")
        import open_clip

        config = open_clip.get_model_config(OPEN_CLIP_ARCHITECTURE)
        config["vision_cfg"]["output_tokens"] = True
        super().__init__(
            input_size=(config["vision_cfg"]["image_size"],) * 2,
            grid_size=(config["vision_cfg"]["image_size"] // config["vision_cfg"]["patch_size"],) * 2,
            embed_dim=config["embed_dim"],
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
            resize_mode="bicubic",
        )
        # open_clip's CLIP class from its registered config (open_clip.create_model(pretrained=None) builds the same
        # model but logs "initialized randomly"), on the meta device: every tensor comes from the file, so neither
        # tower is randomly initialised first, and the text tower is never allocated.
        with torch.device("meta"):
            self.visual = open_clip.CLIP(**config).visual
        self.weights_path = path
        # OpenAI's checkpoints are float16; the teacher computes in float32.
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_visual_state_dict(path).items()}
        incompatible = self.visual.load_state_dict(state, strict=False, assign=True)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise ValueError(
                f"clip_vit_b16: {path} does not fit open_clip's {OPEN_CLIP_ARCHITECTURE} visual tower: "
                f"missing {incompatible.missing_keys}, unexpected {incompatible.unexpected_keys}"
            )
        unloaded = [name for name, t in [*self.visual.named_parameters(), *self.visual.named_buffers()] if t.is_meta]
        if unloaded:
            raise ValueError(f"clip_vit_b16: {path} left tensors without values: {unloaded}")
        self.freeze()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(images)  # (B, 196, 768): ln_post applied to every token, the class token dropped
        return tokens @ self.visual.proj
