"""Tests for kd/models/backbone.py."""

import copy

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from kd.models.backbone import (
    Backbone,
    FoldedConv2d,
    fold_frozen_batch_norms,
    unfold_frozen_batch_norms,
)


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


def test_frozen_batch_norms_fold_into_convolutions(tmp_path):
    """The folded trunk (the default with weights) computes the unfolded one's features and weight
    gradients, keeps torchvision's state-dict keys and copies intact."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-trivial statistics, as pre-trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    folded = Backbone("resnet18", strides=(8, 16, 32), weights=str(path), trainable_layers=5)
    folded = folded.double()  # float64: the comparison sees the fold, not float32 summation order
    plain = copy.deepcopy(folded)
    assert unfold_frozen_batch_norms(plain) == 20  # undone: plain convolutions, fused frozen batch norms
    assert (
        sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 20
    )  # stem 1 + 8 blocks x 2 + 3 downsample
    assert not any(isinstance(m, FoldedConv2d) for m in plain.modules())
    assert folded.state_dict().keys() == plain.state_dict().keys()
    images, mask = torch.randn(2, 3, 64, 96, dtype=torch.float64), torch.zeros(2, 64, 96, dtype=torch.bool)
    out_f, out_p = folded(images, mask), plain(images, mask)
    for (a, _), (b, _) in zip(out_f, out_p, strict=True):
        torch.testing.assert_close(a, b)
    sum(a.square().sum() for a, _ in out_f).backward()
    sum(b.square().sum() for b, _ in out_p).backward()
    for (name, pf), pp in zip(folded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pp.grad, msg=name)
    # a loaded state dict changes the fold; a deep copy folds with its own batch norms
    state = {k: v + 0.1 if "running_mean" in k else v for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    folded.load_state_dict(state)
    clone = copy.deepcopy(folded)
    clone_conv = clone.body.conv1
    assert clone_conv._folded_bn[0] is clone.body.bn1 and clone.body.bn1 is not folded.body.bn1
    with torch.no_grad():
        for (a, _), (b, _), (c, _) in zip(
            folded(images, mask), plain(images, mask), clone(images, mask), strict=True
        ):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(c, a)


def test_trainable_norms_are_not_folded():
    net = Backbone("resnet18", strides=(32,), weights=None)  # from scratch: batch norm trains
    assert fold_frozen_batch_norms(net) == 0
    assert not any(isinstance(m, FoldedConv2d) for m in net.modules())
