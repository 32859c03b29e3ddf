"""Tests for kd/models/backbone.py."""

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from kd.models.backbone import Backbone


@pytest.mark.parametrize("name,channels", [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048])])
def test_multiscale_shapes(name, channels):
    net = Backbone(name, strides=(8, 16, 32)).eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 48:] = True
    outs = net(images, mask)
    assert net.num_channels == channels
    for (feat, m), stride, c in zip(outs, (8, 16, 32), channels, strict=True):
        assert feat.shape == (2, c, 64 // stride, 96 // stride)
        assert m.shape == (2, 64 // stride, 96 // stride)
        assert not m[0].any() and m[1, :, -1].all() and not m[1, :, 0].any()


def test_from_scratch_trains_norm_and_weights_freeze_it(tmp_path):
    scratch = Backbone("resnet18", strides=(32,))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.modules())
    path = tmp_path / "r18.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    pretrained = Backbone("resnet18", strides=(32,), weights=str(path))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pretrained.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pretrained.modules())


def test_bad_weights_file_names_keys(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises((ValueError, RuntimeError), match="bad.pt|size mismatch"):
        Backbone("resnet18", weights=str(path))


def _trained_stages(net: Backbone) -> set[str]:
    return {name.split(".")[0] for name, p in net.body.named_parameters() if p.requires_grad}


def test_trainable_layers_follow_torchvision(tmp_path):
    # pretrained weights: layer2-4 train as in DETR; from scratch everything; explicit counts from layer4 down
    path = tmp_path / "r18.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert _trained_stages(Backbone("resnet18", (32,), weights=str(path))) == {"layer2", "layer3", "layer4"}
    assert _trained_stages(Backbone("resnet18", (32,))) == {
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    }
    assert _trained_stages(Backbone("resnet18", (32,), trainable_layers=1)) == {"layer4"}
    assert _trained_stages(Backbone("resnet18", (32,), trainable_layers=0)) == set()
    full = Backbone("resnet18", (32,), weights=str(path), trainable_layers=5)
    assert _trained_stages(full) == {"conv1", "layer1", "layer2", "layer3", "layer4"}  # frozen bn1: no params
    assert _trained_stages(Backbone("resnet18", (32,), train_backbone=False, trainable_layers=5)) == set()


@pytest.mark.parametrize(
    "kwargs", [{"name": "vgg16"}, {"strides": (64,)}, {"norm": "ln"}, {"trainable_layers": 6}]
)
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        Backbone(**kwargs)
