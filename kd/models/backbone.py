"""torchvision ResNet backbones returning multi-scale feature maps with their padding masks.

No weights are downloaded: ``weights=None`` unless a local state-dict file is given. Batch norm is frozen
only when pretrained weights are loaded; from scratch the normalisation trains (batch or group norm).
Which stages train follows torchvision's ``trainable_layers``: with pretrained weights the last 3 (layer2-4,
as DETR and Deformable DETR train them), from scratch all 5 (stem, layer1-4).

Speed (CPU): the ResNet runs in channels_last memory format (oneDNN's convolution path) and each frozen
batch norm is folded into the convolution before it (:func:`fold_frozen_batch_norms`: one convolution with
scaled weights and a bias, no normalisation pass forward or backward); the returned feature maps are
ordinary contiguous NCHW tensors. A distillation step whose teacher and student
share the same frozen weights computes the trunk once (:func:`share_features`), also when one of them reads
fewer levels than the other.
"""

from __future__ import annotations

import weakref
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

# stride of each ResNet stage and its output channels per depth
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
}
# torchvision's trainable_layers order: the last ``n`` of these train (the stem's batch norm with conv1)
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def trainable_prefixes(trainable_layers: int | None, pretrained: bool) -> tuple[str, ...]:
    """Parameter-name prefixes of the stages that train: ``trainable_layers`` in 0..5 counted from layer4
    (torchvision's ``resnet_fpn_backbone`` convention); None means 3 with pretrained weights (DETR freezes
    the stem and layer1) and 5 (everything) from scratch."""
    n = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
    if not 0 <= n <= 5:
        raise ValueError(f"backbone_trainable_layers must be in 0..5 or null; got {trainable_layers!r}")
    names = TRAINABLE_ORDER[:n]
    return names + ("bn1",) if "conv1" in names else names


def stage_channels(name: str, stride: int) -> int:
    """Output channels of ResNet ``name``'s stage of ``stride`` (4, 8, 16 or 32)."""
    return CHANNELS[name][list(STAGE_STRIDES.values()).index(stride)]


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers and state dict) computed by one ``F.batch_norm`` call
    in inference mode instead of separate multiply and add passes. [B, C, H, W] -> [B, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


class FoldedConv2d(nn.Conv2d):
    """A convolution followed by a frozen batch norm, computed as one convolution with weight ``W * s`` and
    bias ``beta - mean * s``, ``s = gamma / sqrt(var + eps)``. The batch norm keeps its buffers (state dicts
    are unchanged; loading one updates the fold) and becomes the identity (:class:`FoldedFrozenBatchNorm2d`).
    Gradients reach ``W`` through the product. [B, C_in, H, W] -> [B, C_out, H', W']."""

    _folded_bn: tuple[FrozenBatchNorm2d]  # a tuple, so the batch norm is not registered twice

    def forward(self, x: Tensor) -> Tensor:
        bn = self._folded_bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # [C_out]
        weight = self.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class FoldedFrozenBatchNorm2d(FusedFrozenBatchNorm2d):
    """A frozen batch norm already applied by the :class:`FoldedConv2d` before it: the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# (convolution, its batch norm) child names in torchvision's ResNet stem, blocks and downsample branches
_CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("0", "1"))


def fold_frozen_batch_norms(net: nn.Module) -> int:
    """Fold every frozen batch norm of a torchvision ResNet into the convolution before it, in place
    (module classes swapped, parameters and buffers untouched); returns the number of folds. Outputs equal
    the unfolded network's to float rounding; the batch norms' forward and backward passes disappear
    (in wall time a wash at the embedded sizes: ``bench/frozen_bn_fold.py``, ``bench/README.md``)."""
    n = 0
    for module in net.modules():
        children = dict(module.named_children())
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if type(conv) is nn.Conv2d and type(bn) is FusedFrozenBatchNorm2d:
                conv.__class__ = FoldedConv2d
                conv._folded_bn = (bn,)
                bn.__class__ = FoldedFrozenBatchNorm2d
                n += 1
    return n


def unfold_frozen_batch_norms(net: nn.Module) -> int:
    """Undo :func:`fold_frozen_batch_norms` in place (plain convolutions, fused frozen batch norms again),
    e.g. to compare against the folded network; returns the number of folds undone."""
    n = 0
    for m in net.modules():
        if isinstance(m, FoldedConv2d):
            m.__class__ = nn.Conv2d
            del m._folded_bn
            n += 1
        elif isinstance(m, FoldedFrozenBatchNorm2d):
            m.__class__ = FusedFrozenBatchNorm2d
    return n


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FusedFrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return partial(_group_norm, groups=32)
    raise ValueError(f"backbone norm must be one of frozen_bn, bn, gn; got {norm!r}")


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class Backbone(nn.Module):
    """A ResNet trunk that returns the feature maps of the requested strides.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        strides: output strides to return, a subset of (4, 8, 16, 32), e.g. (32,) for Conditional DETR
            or (8, 16, 32) for Deformable DETR.
        weights: optional path to a local torchvision state dict (never downloaded).
        norm: "auto" (frozen_bn with weights, bn without), or frozen_bn | bn | gn.
        train_backbone: if False, all backbone parameters are frozen.
        trainable_layers: how many stages train, 0..5 from layer4 down to the stem (torchvision's
            convention); None: 3 with ``weights`` (layer2-4, as DETR), 5 without.
    """

    def __init__(
        self,
        name: str = "resnet18",
        strides: tuple[int, ...] = (32,),
        weights: str | None = None,
        norm: str = "auto",
        train_backbone: bool = True,
        trainable_layers: int | None = None,
    ):
        super().__init__()
        if name not in CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(CHANNELS)}; got {name!r}")
        if norm == "auto":
            norm = "frozen_bn" if weights else "bn"
        net = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm))
        if weights:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")] + [
                k for k in unexpected if not k.startswith("fc.")
            ]
            if bad:
                raise ValueError(f"{weights}: backbone weights do not fit {name}: {bad[:5]}")
        if norm == "frozen_bn":
            fold_frozen_batch_norms(net)
        stage_of = {s: n for n, s in STAGE_STRIDES.items()}
        bad_strides = [s for s in strides if s not in stage_of]
        if bad_strides:
            raise ValueError(f"backbone strides must be in (4, 8, 16, 32); got {bad_strides}")
        self.strides = tuple(sorted(strides))
        return_layers = {stage_of[s]: str(i) for i, s in enumerate(self.strides)}
        self.body = IntermediateLayerGetter(net, return_layers=return_layers)
        self.body.to(memory_format=torch.channels_last)
        self.num_channels = [stage_channels(name, s) for s in self.strides]
        train = trainable_prefixes(trainable_layers, bool(weights)) if train_backbone else ()
        for pname, p in self.body.named_parameters():
            if not pname.startswith(train):
                p.requires_grad_(False)
        self._given: tuple[weakref.ref, list[tuple[Tensor, Tensor]]] | None = None

    def give(self, images: Tensor, features: list[tuple[Tensor, Tensor]]) -> None:
        """Make the next ``forward(images, ...)`` with this very tensor return ``features`` (once)."""
        self._given = (weakref.ref(images), features)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images: [B, 3, H, W]; mask: [B, H, W] bool, True on padding.

        Returns a list (one per stride, finest first) of (features [B, C_i, H_i, W_i], mask [B, H_i, W_i]).
        """
        given, self._given = self._given, None
        if given is not None and given[0]() is images:
            return given[1]
        out = []
        for feat in self.body(images.contiguous(memory_format=torch.channels_last)).values():
            feat = feat.contiguous()  # NCHW again for whatever follows the backbone
            m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
            out.append((feat, m))
        return out


def is_frozen(backbone: Backbone) -> bool:
    """No trainable parameter and no batch norm that would use batch statistics in training mode."""
    batch_norms = (m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return not any(p.requires_grad for p in backbone.parameters()) and next(batch_norms, None) is None


def can_share(source: nn.Module, target: nn.Module) -> bool:
    """Whether ``target`` can take ``source``'s features: both frozen, equal weights, and every stride of
    ``target`` among ``source``'s (a stride-8/16/32 teacher feeds a stride-16/32 student: the trunk is the
    same, the finer level is just not handed on)."""
    if not (isinstance(source, Backbone) and isinstance(target, Backbone)):
        return False
    if not set(target.strides) <= set(source.strides) or not (is_frozen(source) and is_frozen(target)):
        return False
    sa, sb = source.state_dict(), target.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def share_features(source: Backbone, targets: list[Backbone], images: Tensor, mask: Tensor) -> None:
    """Run ``source`` once on (images, mask) without gradients and hand each of ``targets`` the levels of
    its strides for its next forward on the same ``images`` tensor (``can_share(source, t)`` must hold)."""
    with torch.no_grad():
        features = source(images, mask)
    level = dict(zip(source.strides, features, strict=True))
    for backbone in targets:
        backbone.give(images, [level[s] for s in backbone.strides])
