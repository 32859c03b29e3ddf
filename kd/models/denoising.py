"""Denoising (DN) query groups of DN-DETR (Li et al., CVPR 2022, Sec. 3.3-3.4).

Each ground-truth box is repeated in ``num_groups`` groups; every copy gets label noise (with probability
``label_noise`` its class is replaced by a uniformly drawn one: DN-DETR's ``label_noise_scale``; DINO's
``label_noise_ratio`` r corresponds to r/2) and box noise (centre shifted by up to ``box_noise * w/2``,
``box_noise * h/2``, size scaled by a factor in ``[1 - box_noise, 1 + box_noise]``). The decoder must
reconstruct the clean box and label, so the loss needs no matching.

Layout of the decoder's query sequence: ``[group 0 | group 1 | ... | group G-1 | detection queries]``, each
group ``max_gt`` slots long (images with fewer boxes leave padding slots that are excluded from the loss).
The attention mask keeps detection queries from seeing any DN query and DN groups from seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd.models.box_ops import inverse_sigmoid


@dataclass
class DNQueries:
    """Denoising queries for one batch (B images, N_dn = num_groups * max_gt slots, D hidden size)."""

    content: Tensor  # [B, N_dn, D] embedding of the noised labels (zeros on padding slots)
    anchors: Tensor  # [B, N_dn, 4] inverse_sigmoid of the noised normalised cxcywh boxes (0 on padding)
    attn_mask: Tensor  # [N_dn + Q, N_dn + Q] bool, True = may not attend
    meta: dict  # pad_size, num_groups, max_gt, gt_counts (list[int], per image), num_queries


def dn_attn_mask(num_groups: int, max_gt: int, num_queries: int, device=None) -> Tensor:
    """Self-attention mask of DN-DETR (``prepare_for_dn``): True where attention is not allowed.

    Returns:
        [N_dn + Q, N_dn + Q] bool with N_dn = num_groups * max_gt; rows are queries, columns keys.
    """
    pad_size = num_groups * max_gt
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True  # detection queries never see the ground truth
    group = torch.arange(pad_size, device=device) // max_gt
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]  # groups are isolated
    return mask


def noise_boxes(boxes: Tensor, box_noise: float, generator: torch.Generator | None = None) -> Tensor:
    """DN-DETR box noise: ``|dcx| <= box_noise*w/2``, ``|dcy| <= box_noise*h/2``, ``|dw| <= box_noise*w``,
    ``|dh| <= box_noise*h``, uniformly drawn, then clamped to [0, 1].

    Args:
        boxes: [N, 4] normalised cxcywh.

    Returns:
        [N, 4] noised boxes.
    """
    if box_noise <= 0:
        return boxes.clone()
    diff = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
    rand = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) * 2 - 1
    return (boxes + rand * diff * box_noise).clamp(0.0, 1.0)


def noise_labels(
    labels: Tensor, num_classes: int, label_noise: float, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label, with probability ``label_noise``, by one drawn uniformly from 0..C-1.

    Args:
        labels: [N] int64.

    Returns:
        [N] int64 noised labels.
    """
    if label_noise <= 0:
        return labels.clone()
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < label_noise
    new = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, new, labels)


def build_dn_queries(
    targets: list[dict[str, Tensor]],
    num_classes: int,
    num_groups: int,
    label_noise: float,
    box_noise: float,
    label_embed: nn.Embedding,
    num_queries: int,
    generator: torch.Generator | None = None,
) -> DNQueries | None:
    """Build the noised denoising groups for a batch (DN-DETR ``prepare_for_dn``, without contrastive
    negatives).

    Args:
        targets: B dicts with ``labels [T_b]`` int64 and ``boxes [T_b, 4]`` normalised cxcywh.
        num_classes: C, noised labels are drawn in 0..C-1 (``label_embed`` needs at least C rows).
        num_groups: G, number of noised copies of every ground-truth box.
        label_noise: probability of replacing a label; box_noise: DN-DETR box noise scale (lambda).
        label_embed: embeds the noised labels into the D-dim content queries.
        num_queries: Q, number of detection queries that follow the DN queries in the decoder.
        generator: optional RNG (the default global RNG otherwise).

    Returns:
        :class:`DNQueries`, or None when ``num_groups == 0`` or no image has a target.
    """
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts, default=0)
    if num_groups <= 0 or max_gt == 0:
        return None
    if label_embed.num_embeddings < num_classes:
        raise ValueError(
            f"denoising: label_embed has {label_embed.num_embeddings} rows < {num_classes} classes"
        )
    device = label_embed.weight.device
    bs, pad_size = len(targets), num_groups * max_gt
    labels = torch.cat([t["labels"] for t in targets]).to(device).repeat(num_groups)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().repeat(num_groups, 1)
    batch_idx, slot_idx = _dn_positions(counts, num_groups, max_gt, device)

    content = label_embed.weight.new_zeros(bs, pad_size, label_embed.embedding_dim)
    anchors = boxes.new_zeros(bs, pad_size, 4)
    content[batch_idx, slot_idx] = label_embed(noise_labels(labels, num_classes, label_noise, generator))
    anchors[batch_idx, slot_idx] = inverse_sigmoid(noise_boxes(boxes, box_noise, generator))
    meta = {
        "pad_size": pad_size,
        "num_groups": num_groups,
        "max_gt": max_gt,
        "gt_counts": counts,
        "num_queries": num_queries,
    }
    return DNQueries(content, anchors, dn_attn_mask(num_groups, max_gt, num_queries, device), meta)


def _dn_positions(counts: list[int], num_groups: int, max_gt: int, device=None) -> tuple[Tensor, Tensor]:
    """(image index, slot index) of every DN query, in the order ``group, image, gt`` (matching
    ``torch.cat(labels).repeat(num_groups)``). Both [G * sum(counts)] int64."""
    batch = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(counts)])
    within = torch.cat([torch.arange(n, dtype=torch.int64) for n in counts])
    slots = torch.cat([within + g * max_gt for g in range(num_groups)])
    return batch.repeat(num_groups).to(device), slots.to(device)


def split_dn(t: Tensor, meta: dict, dim: int = 2) -> tuple[Tensor, Tensor]:
    """Split a decoder tensor into its denoising and detection parts.

    Args:
        t: e.g. [L, B, N_dn + Q, ...] (queries along ``dim``).
        meta: ``DNQueries.meta``.

    Returns:
        ``(t[..., :N_dn, ...], t[..., N_dn:, ...])`` along ``dim``.
    """
    pad = meta["pad_size"]
    return t.narrow(dim, 0, pad), t.narrow(dim, pad, t.shape[dim] - pad)


def dn_targets(meta: dict, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Pair every (non-padding) DN query with the ground truth it was noised from.

    Returns:
        Per image ``(src_idx, tgt_idx)`` int64 tensors of length ``num_groups * T_b``: DN slot ``src_idx[k]``
        must reconstruct target ``tgt_idx[k]`` (the same format as :class:`HungarianMatcher`'s output).
    """
    counts = [len(t["labels"]) for t in targets]
    if counts != list(meta["gt_counts"]):
        raise ValueError(
            f"dn_targets: targets have {counts} boxes, DN queries were built for {meta['gt_counts']}"
        )
    offsets = torch.arange(meta["num_groups"], dtype=torch.int64)[:, None] * meta["max_gt"]
    out = []
    for n in counts:
        tgt = torch.arange(n, dtype=torch.int64)
        out.append(((offsets + tgt[None]).flatten(), tgt.repeat(meta["num_groups"])))
    return out


def dn_valid_mask(meta: dict, device=None) -> Tensor:
    """[B, N_dn] bool, True on DN slots that hold a (noised) ground truth, False on padding."""
    slot = torch.arange(meta["pad_size"], device=device) % meta["max_gt"]
    counts = torch.as_tensor(meta["gt_counts"], device=device)
    return slot[None, :] < counts[:, None]
