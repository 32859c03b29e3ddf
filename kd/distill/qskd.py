"""QSKD: knowledge distillation via query selection for DETR (Liu et al., arXiv 2409.06443; methods.md §4).

No official code exists; this is the reconstruction of methods.md §4.2, every open choice a
:class:`QSKDConfig` field. For each student decoder layer ``l`` and its teacher layer ``t = layer_map(l)``:

* **GQS** (:mod:`kd.distill.selection`): positives by Hungarian matching (costs ``match_*``, 2/5/2) and hard
  negatives (non-positives with best GIoU > ``tau``) grouped per GT, for the teacher at layer ``t`` and the
  student at layer ``l`` (the student is re-matched per layer with ``student_matching="per_layer"``, the
  criterion's final-layer ``student_indices`` being reused for its last layer; ``"final"`` reuses them for
  every layer). ``gqs=False`` keeps the positives only: the "without GQS" ablation is prior DETR KD that
  distils positive queries only, in both AGFD and LAPD.
* **AGFD**: mask ``M = mean_q (w_q A^T_q)`` over the selected teacher queries' cross-attention maps
  (:mod:`kd.distill.attention`), ``w_q = 1 + GIoU`` (``"uniform"``: 1), zeroed on padding, divided per
  image by ``max(max M, agfd_mask_floor)`` (TPRD); loss ``MSE(M * F_T, M * phi(F_S))`` over the non-padded
  tokens and channels of the encoder memory (or the ``neck``: the projected encoder inputs), ``phi`` a
  Linear (= 1x1 conv) adapter when the widths differ. Different token grids (architectures with other
  levels) are aligned to the student's grid: per student level the teacher level of the same shape, else
  the one closest in size, bilinearly resized.
* **LAPD**: pairs from :func:`kd.distill.selection.pair_selections` (positives through the GT index, hard
  negatives by a small Hungarian per GT group, costs ``pair_*`` = soft-BCE 1 / L1 5 / GIoU 2); losses soft
  BCE against sigmoid(teacher logits) summed over classes, L1 summed over coordinates and 1 - GIoU, each
  averaged over the batch's pairs and weighted ``lapd_*`` (1/5/2). The box terms of hard-negative pairs are
  further weighted ``lapd_neg_box`` (1: as reconstructed; 0: a negative's score is distilled, not its box,
  which stops the box terms from pulling extra student queries onto an object: README, "QSKD").

``select_on`` says whose GQS defines the hard negatives: ``"both"`` pairs the student's hard negatives with
the teacher's (TPRD); ``"teacher"`` pairs the teacher's hard negatives with any non-positive student query of
the same group; ``"student"`` the reverse. AGFD uses the teacher's selection for ``"teacher"``/``"both"``
(with ``"both"`` the teacher partners of the student's selection are a subset of it) and the teacher
partners of the student's positives and hard negatives for ``"student"``.
TPRD's LAPD is ``select_on="both", grouping="global"``; TPRD pairs AGFD's final-layer selection with
layer-0 attention (an indexing slip); here layer ``t``'s selection uses layer ``t``'s attention.

Loss keys (weighted): ``loss_agfd_feat_{l}``, ``loss_lapd_{cls,bbox,giou}_{l}`` with ``l`` the student layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from kd.distill.attention import weighted_attention_map
from kd.distill.base import Distiller, Indices, Targets
from kd.distill.common import l1_giou, layer_map, soft_bce
from kd.distill.selection import GroupSelection, pair_selections, select_groups_batch
from kd.models.matcher import HungarianMatcher
from kd.models.outputs import DecoderOutput, DetectorOutput

_CHOICES = {
    "grouping": ("per_gt", "global"),
    "select_on": ("teacher", "student", "both"),
    "student_matching": ("per_layer", "final"),
    "agfd_layers": ("all", "last"),
    "agfd_features": ("memory", "neck"),
    "agfd_query_weight": ("giou", "uniform"),
    "lapd_layers": ("all", "last"),
}
_RANGES = {"tau": (-1.0, 1.0), "focal_alpha": (0.0, 1.0), "attn_pixel_offset": (0.0, 1.0)}
_POSITIVE = ("agfd_mask_floor",)  # > 0; every other number >= 0
# negative pool of (student, teacher) for each ``select_on`` (see GroupSelection.negative_pool)
_POOLS = {
    "both": ("selected", "selected"),
    "teacher": ("candidates", "selected"),
    "student": ("selected", "candidates"),
}


@dataclass(frozen=True)
class QSKDConfig:
    """QSKD switches and parameters (``params.yaml: distill.qskd``); see the module docstring."""

    gqs: bool = True  # hard negatives (False: positives only, the "without GQS" ablation)
    agfd: bool = True
    lapd: bool = True
    tau: float = 0.0  # GIoU threshold of hard negatives, in [-1, 1] (TPRD default; paper value not retrieved)
    grouping: str = "per_gt"  # per_gt | global: where LAPD's Hungarian pairs hard negatives
    select_on: str = "teacher"  # teacher | student | both: whose GQS defines the hard negatives
    student_matching: str = "per_layer"  # per_layer | final: the student's positives at each layer
    match_cls: float = 2.0  # GQS Hungarian matching costs (the detectors' 2/5/2)
    match_l1: float = 5.0
    match_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    agfd_weight: float = 100.0  # per layer (TPRD, on the encoder memory)
    agfd_layers: str = "all"  # all | last
    agfd_features: str = "memory"  # memory | neck
    agfd_query_weight: str = "giou"  # giou (1 + GIoU) | uniform
    agfd_mask_floor: float = 0.01  # the mask is divided by max(max M, floor)
    attn_pixel_offset: float = 0.5  # deformable splat grid convention (0.5 = grid_sample; 0 = Sparse-DETR)
    lapd_layers: str = "all"  # all | last
    lapd_cls: float = 1.0  # LAPD loss weights
    lapd_l1: float = 5.0
    lapd_giou: float = 2.0
    lapd_neg_box: float = 1.0  # weight of hard-negative pairs' L1/GIoU terms (0: distil their scores only)
    pair_cls: float = 1.0  # LAPD pairing costs (soft BCE / L1 / -GIoU)
    pair_l1: float = 5.0
    pair_giou: float = 2.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QSKDConfig:
        """Build from ``distill.qskd``; unknown keys and out-of-range values raise ValueError."""
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"distill.qskd: unknown key {key!r} (known: {', '.join(names)})")
        cfg = cls(**d)
        for key, f in names.items():
            _check_field(key, getattr(cfg, key), f.default)
        return cfg


def _check_field(key: str, value: Any, default: Any) -> None:
    where = f"distill.qskd.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
    elif isinstance(default, str):
        if value not in _CHOICES[key]:
            raise ValueError(f"{where}: expected one of {_CHOICES[key]}, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    else:
        lo, hi = _RANGES.get(key, (0.0, math.inf))
        if not lo <= value <= hi or (key in _POSITIVE and value <= 0):
            bound = "(0, inf)" if key in _POSITIVE else f"[{lo}, {hi}]"
            raise ValueError(f"{where}: expected a value in {bound}, got {value!r}")


def _tokens(out: DetectorOutput, features: str) -> tuple[Tensor, Tensor, Tensor]:
    """Distilled features as tokens [B, S, D], padding [B, S] bool and their grid shapes [V, 2]."""
    if features == "memory":
        return out.memory, out.memory_mask, out.spatial_shapes
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in out.features], 1)
    mask = torch.cat([m.flatten(1) for m in out.feature_masks], 1)
    shapes = torch.as_tensor([f.shape[-2:] for f in out.features], dtype=torch.long)
    return tokens, mask, shapes


def to_student_grid(x: Tensor, t_shapes: Tensor, s_shapes: Tensor) -> Tensor:
    """Teacher tokens [B, S_T, K] on grid ``t_shapes`` [V_T, 2] -> [B, S_S, K] on grid ``s_shapes``.

    Per student level: the teacher level of the same shape, else the closest in area, bilinearly resized.
    """
    t_list, s_list = t_shapes.tolist(), s_shapes.tolist()
    if t_list == s_list:
        return x
    levels = x.split([h * w for h, w in t_list], 1)
    out = []
    for h, w in s_list:
        i = min(range(len(t_list)), key=lambda k: abs(math.log(t_list[k][0] * t_list[k][1] / (h * w))))
        lvl = levels[i].transpose(1, 2).reshape(x.shape[0], x.shape[2], *t_list[i])
        if t_list[i] != [h, w]:
            lvl = F.interpolate(lvl, size=(h, w), mode="bilinear", align_corners=False)
        out.append(lvl.flatten(2).transpose(1, 2))
    return torch.cat(out, 1)


def _zero(ref: Tensor) -> Tensor:
    """A zero that keeps ``ref``'s graph (so every loss term has a gradient path, e.g. under DDP)."""
    return ref.sum() * 0.0


class QSKD(Distiller):
    """QSKD distiller: GQS + AGFD + LAPD (see the module docstring).

    Args:
        cfg: the configuration.
        teacher, student: the detectors (read for their ``hidden_dim``; not stored).
    """

    def __init__(self, cfg: QSKDConfig, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.needs_attention = cfg.agfd
        self.matcher = HungarianMatcher(
            cfg.match_cls, cfg.match_l1, cfg.match_giou, cfg.focal_alpha, cfg.focal_gamma
        )
        d_t, d_s = teacher.hidden_dim, student.hidden_dim
        self.adapter = nn.Linear(d_s, d_t) if cfg.agfd and d_s != d_t else nn.Identity()

    def forward(
        self,
        teacher_out: DetectorOutput,
        student_out: DetectorOutput,
        targets: Targets,
        student_indices: Indices | None,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        s_dec, t_dec = student_out.detection, teacher_out.detection
        num_s = s_dec.num_layers
        lmap = layer_map(num_s, t_dec.num_layers)
        agfd_layers = self._layers(cfg.agfd, cfg.agfd_layers, num_s)
        lapd_layers = self._layers(cfg.lapd, cfg.lapd_layers, num_s)
        feats = self._agfd_features(teacher_out, student_out) if agfd_layers else None
        need_student = bool(lapd_layers) or cfg.select_on == "student"
        losses, t_cache = {}, {}
        for lid in sorted(agfd_layers | lapd_layers):
            t = lmap[lid]
            if t not in t_cache:
                t_cache[t] = select_groups_batch(
                    t_dec.logits[t].detach(), t_dec.boxes[t].detach(), targets, self.matcher, tau=cfg.tau
                )
            t_sel = t_cache[t]
            s_sel = self._student_selection(s_dec, lid, targets, student_indices) if need_student else None
            pairs = self._pairs(s_dec, t_dec, lid, t, s_sel, t_sel) if need_student else None
            if lid in agfd_layers:
                losses[f"loss_agfd_feat_{lid}"] = self._agfd(teacher_out, t, t_sel, pairs, feats)
            if lid in lapd_layers:
                losses.update(self._lapd(s_dec, t_dec, lid, t, pairs))
        return losses

    @staticmethod
    def _layers(enabled: bool, which: str, num_layers: int) -> set[int]:
        if not enabled:
            return set()
        return set(range(num_layers)) if which == "all" else {num_layers - 1}

    # ------------------------------------------------------------------ GQS and pairing

    def _student_selection(
        self, dec: DecoderOutput, lid: int, targets: Targets, indices: Indices | None
    ) -> list[GroupSelection]:
        """GQS of student layer ``lid``: positives from ``indices`` (final layer / ``"final"`` mode) or
        re-matched."""
        last = lid == dec.num_layers - 1
        reuse = indices is not None and (last or self.cfg.student_matching == "final")
        logits, boxes = dec.logits[lid].detach(), dec.boxes[lid].detach()
        if reuse:
            return select_groups_batch(logits, boxes, targets, indices=indices, tau=self.cfg.tau)
        if self.cfg.student_matching == "final":
            indices = self.matcher(dec.logits[-1].detach(), dec.boxes[-1].detach(), targets)
            return select_groups_batch(logits, boxes, targets, indices=indices, tau=self.cfg.tau)
        return select_groups_batch(logits, boxes, targets, self.matcher, tau=self.cfg.tau)

    def _pairs(
        self,
        s_dec: DecoderOutput,
        t_dec: DecoderOutput,
        lid: int,
        t: int,
        s_sel: list[GroupSelection],
        t_sel: list[GroupSelection],
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image (student queries [M], teacher queries [M], is_positive [M]) of layer pair (lid, t)."""
        cfg = self.cfg
        s_pool, t_pool = _POOLS[cfg.select_on]
        pairs = []
        for b, (s, t_s) in enumerate(zip(s_sel, t_sel, strict=True)):
            cost = self._pair_cost(
                s_dec.logits[lid, b].detach(), s_dec.boxes[lid, b].detach(),
                t_dec.logits[t, b].detach(), t_dec.boxes[t, b].detach(),
            )  # fmt: skip
            pairs.append(pair_selections(s, t_s, cost, cfg.gqs, cfg.grouping, s_pool, t_pool))
        return pairs

    def _pair_cost(self, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor):
        """The LAPD pairing cost function over one image's predictions (TPRD ``DistillHungarianMatcher``)."""
        cfg = self.cfg

        def cost(si: Tensor, ti: Tensor) -> Tensor:
            s_log, t_prob = s_logits[si].float(), t_logits[ti].float().sigmoid()
            c_cls = F.softplus(-s_log) @ t_prob.T + F.softplus(s_log) @ (1 - t_prob).T  # sum_c soft BCE
            sb, tb = s_boxes[si].float().clamp(0, 1), t_boxes[ti].float()
            c_l1 = torch.cdist(sb, tb, p=1)
            c_giou = -generalized_box_iou(
                box_convert(sb, "cxcywh", "xyxy"), box_convert(tb, "cxcywh", "xyxy")
            )
            return cfg.pair_cls * c_cls + cfg.pair_l1 * c_l1 + cfg.pair_giou * c_giou

        return cost

    # ------------------------------------------------------------------ AGFD

    def _agfd_features(self, teacher_out: DetectorOutput, student_out: DetectorOutput) -> dict[str, Tensor]:
        """Teacher tokens on the student grid, adapted student tokens and the student's valid-token mask."""
        t_tok, t_pad, t_shapes = _tokens(teacher_out, self.cfg.agfd_features)
        s_tok, s_pad, s_shapes = _tokens(student_out, self.cfg.agfd_features)
        return {
            "teacher": to_student_grid(t_tok.detach().float(), t_shapes, s_shapes),
            "student": self.adapter(s_tok).float(),
            "valid": ~s_pad,
            "t_pad": t_pad,
            "t_shapes": t_shapes,
            "s_shapes": s_shapes,
        }

    def _query_weights(
        self, num_queries: int, t_sel: list[GroupSelection], pairs: list | None, device: torch.device
    ) -> Tensor:
        """[B, Q_T] weights of the selected teacher queries, divided by their number (TPRD's mean)."""
        w = torch.zeros(len(t_sel), num_queries, device=device)
        for b, sel in enumerate(t_sel):
            if self.cfg.select_on == "student":
                queries = pairs[b][1]
                giou = sel.query_giou()[queries]
            else:
                queries, giou = sel.selected(with_negatives=self.cfg.gqs)
            if queries.numel() == 0:
                continue
            omega = 1.0 + giou if self.cfg.agfd_query_weight == "giou" else torch.ones_like(giou)
            w[b, queries.to(device)] = omega.to(device) / queries.numel()
        return w

    def _agfd(
        self, teacher_out: DetectorOutput, t: int, t_sel: list[GroupSelection], pairs, feats: dict
    ) -> Tensor:
        """Weighted masked-feature MSE of one layer (see the module docstring)."""
        cfg = self.cfg
        w = self._query_weights(
            teacher_out.detection.logits.shape[2], t_sel, pairs, teacher_out.memory.device
        )
        with torch.no_grad():  # the teacher's attention is a fixed target
            mask = weighted_attention_map(
                teacher_out.detection, t, w, teacher_out.spatial_shapes, cfg.attn_pixel_offset
            )
        mask = mask.masked_fill(feats["t_pad"], 0.0)
        mask = mask / mask.amax(1, keepdim=True).clamp(min=cfg.agfd_mask_floor)
        mask = to_student_grid(mask[..., None], feats["t_shapes"], feats["s_shapes"])  # [B, S_S, 1]
        diff = (mask * (feats["teacher"] - feats["student"])) ** 2
        valid = feats["valid"][..., None].to(diff.dtype)
        denom = (valid.sum() * diff.shape[-1]).clamp(min=1.0)
        return cfg.agfd_weight * (diff * valid).sum() / denom

    # ------------------------------------------------------------------ LAPD

    def _lapd(self, s_dec: DecoderOutput, t_dec: DecoderOutput, lid: int, t: int, pairs) -> dict[str, Tensor]:
        """Soft-BCE / L1 / GIoU distillation of the paired predictions of student layer ``lid``."""
        cfg = self.cfg
        s_logits, s_boxes = s_dec.logits[lid], s_dec.boxes[lid]
        device = s_logits.device
        batch = torch.cat([torch.full_like(s, b) for b, (s, _, _) in enumerate(pairs)]).to(device)
        s_idx = torch.cat([s for s, _, _ in pairs]).to(device)
        t_idx = torch.cat([q for _, q, _ in pairs]).to(device)
        positive = torch.cat([p for _, _, p in pairs]).to(device)
        keys = [f"loss_lapd_{k}_{lid}" for k in ("cls", "bbox", "giou")]
        if s_idx.numel() == 0:
            return {k: _zero(s_logits) + _zero(s_boxes) for k in keys}
        t_prob = t_dec.logits[t][batch, t_idx].detach().float().sigmoid()
        cls = soft_bce(s_logits[batch, s_idx].float(), t_prob).mean()
        l1, giou = l1_giou(s_boxes[batch, s_idx].float(), t_dec.boxes[t][batch, t_idx].detach().float())
        w_box = torch.where(positive, 1.0, cfg.lapd_neg_box)  # [M]; averaged over all pairs either way
        l1, giou = (w_box * l1).mean(), (w_box * giou).mean()
        values = (cfg.lapd_cls * cls, cfg.lapd_l1 * l1, cfg.lapd_giou * giou)
        return dict(zip(keys, values, strict=True))
