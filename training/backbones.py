"""Networks by timm name: a pretrained backbone, a fresh head, and the input normalisation inside.

The network takes the uint8 (N, 3, S, S) batches the data loaders produce and normalises them
itself with the backbone's own mean/std, so no caller can feed ImageNet-normalised pixels to a
model pretrained with another normalisation (EfficientNet-Lite uses 0.5/0.5, not ImageNet's).
The backbone is built with num_classes=0 (it returns pooled features) and the head is separate,
so head-only training can cache the features and `embed` returns exactly what the head sees.

Pooling is timm's average ("avg") or generalized-mean ("gem", GeneralizedMeanPool) pooling; GeM
replaces the backbone's timm global-pool layer, so the pooled features (and the feature cache of
head mode) are GeM's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import group_parameters
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from conceptclef.training.weights import (
    GEM_PARAMETER,
    HUB_WEIGHTS,
    LITE_PACKAGE_WEIGHTS,
    NO_WEIGHTS,
    WeightsError,
    is_weight_file,
    lite_package_weight_file,
    load_into_backbone,
    pretrained_config,
    read_state_dict,
    timm_attribute,
)

_TOP_ORDINAL = (MATCH_PREV_GROUP[0] - 1,)  # sorts after every block, without merging into the last one


class ImageClassifier(nn.Module):
    """Normalisation + timm backbone (pooled features) + dropout/linear head."""

    # Buffers: nn.Module's typing sees them as Tensor | Module.
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(timm_attribute(backbone, "num_features"))
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        pretrained = pretrained_config(backbone)
        mean = torch.tensor(pretrained.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(pretrained.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        # Scaled to 0..255 so uint8 pixels are normalised in one subtract and divide.
        self.register_buffer("pixel_mean", (mean * 255.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", (std * 255.0).view(1, 3, 1, 1), persistent=False)

    @property
    def _linear(self) -> nn.Linear:
        linear = self.head[1]
        assert isinstance(linear, nn.Linear)  # built so in __init__; nn.Sequential's typing gives Module
        return linear

    @property
    def num_classes(self) -> int:
        return int(self._linear.out_features)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 (or 0..255 float) NCHW images."""
        return self.backbone(self.normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def set_head_bias(self, bias: torch.Tensor) -> None:
        """Start the logits at the class priors so early epochs do not fight a 0.5 guess on rare classes."""
        with torch.no_grad():
            self._linear.bias.copy_(bias.to(self._linear.bias))


class GeneralizedMeanPool(nn.Module):
    """GeM pooling, (mean over positions of x^p)^(1/p), with a learnable exponent p.

    p = 1 is average pooling and p -> infinity max pooling; p = 3 (Radenovic et al., 2018) weighs
    the strongest responses of a feature map more, which suits small findings on large images.
    Computed in float32 (x^3 overflows float16) and returned in the input's dtype. timm 1.0.31's
    SelectAdaptivePool2d has no "gem" type, hence this module. In head mode p stays at its
    initial value with the rest of the frozen backbone; it learns when the backbone trains.
    """

    def __init__(self, p: float = 3.0, flatten: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.flatten = flatten
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p)
        return (pooled.flatten(1) if self.flatten else pooled).to(x.dtype)


def use_gem_pooling(backbone: nn.Module, name: str, p: float) -> None:
    """Replace the backbone's one timm global-pool layer (NCHW feature maps) by GeneralizedMeanPool."""
    pools = [(path, module) for path, module in backbone.named_modules() if isinstance(module, SelectAdaptivePool2d)]
    if len(pools) != 1 or pools[0][1].is_identity() or getattr(pools[0][1].pool, "dim", (2, 3)) not in ((2, 3), (-2, -1)):
        raise WeightsError(f"{name}: pooling = \"gem\" needs a CNN backbone with one global pooling layer over NCHW feature maps")
    path, pool = pools[0]
    flatten = isinstance(pool.flatten, nn.Flatten) or getattr(pool.pool, "flatten", False) is True
    parent_path, _, attribute = path.rpartition(".")
    gem = GeneralizedMeanPool(p, flatten)
    if not f"{path}.p".endswith(GEM_PARAMETER):
        raise WeightsError(f"{name}: its global pooling layer is {path!r}, not a 'global_pool' GeM can replace")
    setattr(backbone.get_submodule(parent_path) if parent_path else backbone, attribute, gem)


def create_backbone(name: str, weights: str, pooling: str = "avg", gem_p: float = 3.0) -> nn.Module:
    """A timm backbone returning pooled features, initialised from the named weight source.

    With GeM pooling the weights may lack the GeM exponent (ImageNet weights: it starts at
    `gem_p`) or hold it (a GeM global model's exported backbone: it starts from that p).
    """
    if weights == HUB_WEIGHTS:
        return _pooled(_hub_backbone(name), name, pooling, gem_p)
    if weights != NO_WEIGHTS and weights != LITE_PACKAGE_WEIGHTS and not is_weight_file(weights):
        raise WeightsError(
            f"unknown weight source {weights!r}: use {NO_WEIGHTS!r}, {HUB_WEIGHTS!r}, {LITE_PACKAGE_WEIGHTS!r} "
            "or a path ending in .pth, .pt or .safetensors"
        )
    weight_file = lite_package_weight_file(name) if weights == LITE_PACKAGE_WEIGHTS else None
    if weights not in (NO_WEIGHTS, LITE_PACKAGE_WEIGHTS):
        weight_file = Path(os.path.expanduser(weights))
        if not weight_file.is_file():
            raise WeightsError(f"{weight_file}: weight file not found (training.weights)")
    backbone = _pooled(_timm_model(name, pretrained=False), name, pooling, gem_p)
    if weight_file is not None:
        load_into_backbone(backbone, read_state_dict(weight_file), origin=str(weight_file))
    return backbone


def _pooled(backbone: nn.Module, name: str, pooling: str, gem_p: float) -> nn.Module:
    if pooling == "gem":
        use_gem_pooling(backbone, name, gem_p)
    elif pooling != "avg":
        raise ValueError(f"unknown pooling {pooling!r}: use 'avg' or 'gem'")
    return backbone


def create_network(
    name: str, weights: str, num_classes: int, drop_rate: float, pooling: str = "avg", gem_p: float = 3.0
) -> ImageClassifier:
    """The network every model trains: `name` is a timm model name, `weights` a weight source."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return ImageClassifier(create_backbone(name, weights, pooling, gem_p), num_classes, drop_rate)


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise WeightsError(f"unknown timm backbone {name!r} (see timm.list_models())") from error
        raise


def _hub_backbone(name: str) -> nn.Module:
    try:
        return _timm_model(name, pretrained=True)
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - network, offline mode, missing hub entry: one user problem
        raise WeightsError(
            f"{name}: could not fetch pretrained weights from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error)[:300]}). Offline, use weights = {LITE_PACKAGE_WEIGHTS!r} (EfficientNet-Lite) or a local "
            ".pth/.safetensors file"
        ) from error


def layer_groups(backbone: nn.Module, fine: bool = False) -> list[list[str]]:
    """Backbone parameter names grouped stem -> stages, bottom to top.

    Coarse: timm's stage groups. Fine: timm's block groups, and the final conv/norm that timm
    merges into the last block (EfficientNet's `conv_head`/`bn2`) becomes a group of its own, so
    a layer-wise schedule can train it before touching any block. A GeM exponent joins the top
    group, so GeM leaves the groups (and a layer-wise schedule) as average pooling has them.
    """
    matcher = timm_attribute(backbone, "group_matcher")(coarse=not fine)
    if fine and isinstance(matcher, dict):
        matcher = {name: _own_group(spec) for name, spec in matcher.items()}
    groups = [list(names) for _, names in sorted(group_parameters(backbone, matcher).items())]
    if len(groups) > 1 and all(name.endswith(GEM_PARAMETER) for name in groups[-1]):
        exponent = groups.pop()
        groups[-1] += exponent  # timm's matchers know no GeM exponent: it trains with the top group, not before it
    return groups


def _own_group(spec: object) -> object:
    """A timm matcher spec whose "merge with the previous group" entries get a top ordinal instead."""
    if not isinstance(spec, (list, tuple)):
        return spec
    return [(pattern, _TOP_ORDINAL if suffix == MATCH_PREV_GROUP else suffix) for pattern, suffix in spec]


def unfreeze_top_groups(network: ImageClassifier, groups: Sequence[Sequence[str]], count: int) -> None:
    """Train the head and the top `count` backbone groups; freeze the rest (count < 0: everything)."""
    trainable: set[str] = set()
    if count < 0 or count >= len(groups):
        trainable = {name for group in groups for name in group}
    elif count > 0:
        trainable = {name for group in groups[-count:] for name in group}
    for name, parameter in network.backbone.named_parameters():
        parameter.requires_grad_(name in trainable)
    for parameter in network.head.parameters():
        parameter.requires_grad_(True)


def train_mode_except_frozen(module: nn.Module, freeze_statistics: bool = False) -> None:
    """train() mode, but batch norms whose weights are frozen keep their running statistics.

    Updating ImageNet BN statistics under frozen weights would shift every frozen feature.
    `freeze_statistics` keeps EVERY batch norm in eval mode (training.batchnorm = "frozen"):
    its affine weights still learn, but its statistics never see the black fill pixels that
    rotation and zoom add, nor the noise of small fine-tuning batches.
    """
    module.train()
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            own = list(child.parameters(recurse=False))
            if freeze_statistics or (own and not any(parameter.requires_grad for parameter in own)):
                child.eval()
