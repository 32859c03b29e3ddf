"""Set-prediction loss of DETR-family detectors (Deformable DETR ``models/deformable_detr.py``).

For each decoder layer the predictions are Hungarian-matched to the targets and penalised with
``weight_cls * focal + weight_l1 * L1 + weight_giou * (1 - GIoU)``, all normalised by the number of target
boxes in the (global) batch. ``cls_loss="varifocal"`` replaces the focal term by the IoU-aware varifocal loss
of RT-DETR (``rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py``, ``loss_labels_vfl``): a matched query's
target for its class is the IoU of its box with the ground truth instead of 1.

Two-stage encoder proposals are matched against class-agnostic targets
(every label 0, as Deformable DETR's ``bin_targets``); denoising groups use their known pairing
(:func:`kd.models.denoising.dn_targets`) and no matching. The hybrid-matching group (H-DETR,
``out.one2many``) is matched against every ground truth repeated ``one2many_k`` times, normalised by
``k * num_boxes`` and weighted by ``one2many_weight``.

Loss names: ``loss_{cls,bbox,giou}`` (final layer), ``..._{i}`` (auxiliary layer i), ``..._enc``
(proposals), ``..._dn`` and ``..._dn_{i}`` (denoising, final and auxiliary layers), ``..._o2m`` and
``..._o2m_{i}`` (one-to-many group). Values are weighted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

from kd.models.denoising import dn_targets, dn_valid_mask
from kd.models.matcher import HungarianMatcher, Indices
from kd.models.outputs import DecoderOutput, DetectorOutput

CLS_LOSSES = ("focal", "varifocal")


def num_boxes_global(targets: list[dict[str, Tensor]], device=None) -> float:
    """Number of target boxes averaged over processes (all-reduced under torch.distributed), >= 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return max(n.item() / world, 1.0)


def _src_index(indices: Indices, device=None) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of all matched predictions, each [M] int64."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


def loss_labels(
    logits: Tensor,
    targets: list[dict[str, Tensor]],
    indices: Indices,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    valid: Tensor | None = None,
) -> Tensor:
    """Sigmoid focal loss over all queries and classes, summed and divided by ``num_boxes``.

    Equal to Deformable DETR's ``sigmoid_focal_loss(...).mean(1).sum() / num_boxes * Q``. Unmatched queries
    are negatives for every class.

    Args:
        logits: [B, Q, C]; indices: matching per image; valid: optional [B, Q] bool, queries outside it
            (denoising padding) do not contribute.
    """
    onehot = torch.zeros_like(logits)
    batch, src = _src_index(indices, logits.device)
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(logits.device)
    onehot[batch, src, labels] = 1.0
    loss = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    if valid is not None:
        loss = loss * valid[..., None].to(loss.dtype)
    return loss.sum() / num_boxes


def loss_varifocal(
    logits: Tensor,
    targets: list[dict[str, Tensor]],
    indices: Indices,
    num_boxes: float,
    iou: Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    valid: Tensor | None = None,
) -> Tensor:
    """Varifocal loss (VarifocalNet; RT-DETR's ``loss_labels_vfl``), summed and divided by ``num_boxes``.

    A matched query's target for its ground-truth class is ``iou`` (detached), every other target is 0;
    positives are weighted by their target, negatives by ``alpha * sigmoid(logit) ** gamma``, so the score
    learns to rank well-localised boxes first.

    Args:
        logits: [B, Q, C]; indices: matching per image; iou: [M] IoU of each matched box with its target,
            in the order of ``indices``; valid: optional [B, Q] bool mask (denoising padding).
    """
    target = torch.zeros_like(logits)
    batch, src = _src_index(indices, logits.device)
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(logits.device)
    target[batch, src, labels] = iou.detach().clamp(min=0).to(logits.dtype)
    prob = logits.sigmoid().detach()
    weight = alpha * prob.pow(gamma) * (1 - (target > 0).to(logits.dtype)) + target
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    if valid is not None:
        loss = loss * valid[..., None].to(loss.dtype)
    return loss.sum() / num_boxes


def loss_boxes(
    boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float
) -> tuple[Tensor, Tensor]:
    """L1 and ``1 - GIoU`` of the matched boxes, each summed and divided by ``num_boxes``.

    Args:
        boxes: [B, Q, 4] normalised cxcywh; targets' ``boxes`` likewise.

    Returns:
        (l1, giou) scalar tensors.
    """
    l1, giou, _ = _matched_box_terms(boxes, targets, indices, num_boxes)
    return l1, giou


def _matched_box_terms(
    boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(L1, 1 - GIoU) as :func:`loss_boxes`, and the matched pairs' IoU [M] (for the varifocal loss)."""
    batch, src = _src_index(indices, boxes.device)
    src_boxes = box_convert(boxes[batch, src], "cxcywh", "xyxy")
    tgt_cxcywh = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(src_boxes)
    l1 = F.l1_loss(boxes[batch, src], tgt_cxcywh, reduction="none").sum() / num_boxes
    tgt_boxes = box_convert(tgt_cxcywh, "cxcywh", "xyxy")
    giou = torch.diag(generalized_box_iou(src_boxes, tgt_boxes))
    iou = torch.diag(box_iou(src_boxes, tgt_boxes))
    return l1, (1 - giou).sum() / num_boxes, iou


def total(losses: dict[str, Tensor]) -> Tensor:
    """Sum of all (already weighted) loss terms (a 0-dim tensor; 0 for an empty dict)."""
    values = list(losses.values())
    return torch.stack(values).sum() if values else torch.zeros(())


def check_finite(losses: dict[str, Tensor]) -> None:
    """Raise FloatingPointError naming the first loss term that is NaN or infinite."""
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"loss {name} is not finite: {value.detach().cpu().tolist()}")


class SetCriterion(nn.Module):
    """DETR set loss over all decoder layers, the two-stage proposals and the denoising groups.

    After :meth:`forward`, ``last_indices`` holds the final layer's matching (what distillers need as
    "the student's matching") and ``last_layer_indices`` the matching of every decoder layer.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_cls: float = 2.0,
        weight_l1: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cls_loss: str = "focal",
        vfl_alpha: float = 0.75,
        one2many_k: int = 6,
        one2many_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"loss.cls_loss: expected one of {', '.join(CLS_LOSSES)}; got {cls_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_cls = weight_cls
        self.weight_l1 = weight_l1
        self.weight_giou = weight_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_loss = cls_loss
        self.vfl_alpha = vfl_alpha
        self.one2many_k = int(one2many_k)
        self.one2many_weight = one2many_weight
        self.last_indices: Indices | None = None
        self.last_layer_indices: list[Indices] | None = None

    def match(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> Indices:
        """Hungarian matching of the final decoder layer: per image ``(src_idx, tgt_idx)``."""
        return self.matcher(out.logits, out.boxes, targets)

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        indices: Indices,
        num_boxes: float,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted ``loss_cls``, ``loss_bbox``, ``loss_giou`` of one set of predictions.

        Args:
            logits: [B, Q, C]; boxes: [B, Q, 4]; indices: per-image pairing; valid: optional [B, Q] mask.
        """
        l1, giou, iou = _matched_box_terms(boxes, targets, indices, num_boxes)
        if self.cls_loss == "varifocal":
            cls = loss_varifocal(
                logits, targets, indices, num_boxes, iou, self.vfl_alpha, self.focal_gamma, valid
            )
        else:
            cls = loss_labels(logits, targets, indices, num_boxes, self.focal_alpha, self.focal_gamma, valid)
        return {
            "loss_cls": self.weight_cls * cls,
            "loss_bbox": self.weight_l1 * l1,
            "loss_giou": self.weight_giou * giou,
        }

    def forward(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """All weighted loss terms (see the module docstring for their names).

        Args:
            out: the detector's output; ``out.detection`` holds [L, B, Q, C] logits and [L, B, Q, 4] boxes.
            targets: B dicts with ``labels [T_b]`` int64 in 0..C-1 and ``boxes [T_b, 4]`` normalised cxcywh.
        """
        self._check(out, targets)
        num_boxes = num_boxes_global(targets, out.logits.device)
        losses = self._decoder_losses(out.detection, targets, num_boxes)
        if out.proposals is not None:
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            logits, boxes = out.proposals["logits"], out.proposals["boxes"]
            indices = self.matcher(logits, boxes, bin_targets)
            terms = self.layer_losses(logits, boxes, bin_targets, indices, num_boxes)
            losses.update({f"{k}_enc": v for k, v in terms.items()})
        if out.denoising is not None:
            losses.update(self._dn_losses(out.denoising, out.dn_meta, targets, num_boxes))
        if out.one2many is not None:
            losses.update(self._one2many_losses(out.one2many, targets, num_boxes))
        return losses

    def _decoder_losses(
        self, dec: DecoderOutput, targets: list[dict[str, Tensor]], num_boxes: float, name: str = ""
    ) -> dict[str, Tensor]:
        """Hungarian-matched losses of every layer; ``name`` tags the terms (``loss_cls{name}_{i}``)."""
        losses, all_indices = {}, []
        last = dec.num_layers - 1
        for i in range(dec.num_layers):
            indices = self.matcher(dec.logits[i], dec.boxes[i], targets)
            all_indices.append(indices)
            suffix = name if i == last else f"{name}_{i}"
            terms = self.layer_losses(dec.logits[i], dec.boxes[i], targets, indices, num_boxes)
            losses.update({k + suffix: v for k, v in terms.items()})
        if not name:
            self.last_layer_indices = all_indices
            self.last_indices = all_indices[-1]
        return losses

    def _one2many_losses(
        self, dec: DecoderOutput, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """H-DETR's one-to-many loss: each target repeated ``one2many_k`` times, then matched as usual."""
        k = self.one2many_k
        repeated = [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        losses = self._decoder_losses(dec, repeated, num_boxes * k, name="_o2m")
        return {n: self.one2many_weight * v for n, v in losses.items()}

    def _dn_losses(
        self, dn: DecoderOutput, meta: dict | None, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """DN-DETR reconstruction loss of every layer, normalised by ``num_boxes * num_groups``."""
        if meta is None:
            raise ValueError("criterion: out.denoising is set but out.dn_meta is None")
        indices = dn_targets(meta, targets)
        valid = dn_valid_mask(meta, dn.logits.device)
        num_dn = num_boxes * meta["num_groups"]
        losses = {}
        last = dn.num_layers - 1
        for i in range(dn.num_layers):
            suffix = "_dn" if i == last else f"_dn_{i}"
            terms = self.layer_losses(dn.logits[i], dn.boxes[i], targets, indices, num_dn, valid)
            losses.update({k + suffix: v for k, v in terms.items()})
        return losses

    def _check(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> None:
        logits = out.detection.logits
        if logits.dim() != 4 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"criterion: detection logits {tuple(logits.shape)}, expected [L,B,Q,{self.num_classes}]"
            )
        if len(targets) != logits.shape[1]:
            raise ValueError(f"criterion: {len(targets)} targets for a batch of {logits.shape[1]}")
        for b, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"criterion: targets[{b}].labels outside 0..{self.num_classes - 1}")
            if t["boxes"].shape != (labels.numel(), 4):
                raise ValueError(
                    f"criterion: targets[{b}].boxes {tuple(t['boxes'].shape)} vs {labels.numel()} labels"
                )
