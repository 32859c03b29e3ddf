"""DETRDistill (Chang et al., ICCV 2023): HMLD + TAFD + QPAD as the official code computes them (§2).

Section numbers refer to /work/shared/methods.md. For every student decoder layer ``l`` and its teacher
layer ``t`` (``layer_by_layer: true``: ``t = layer_map(l)`` of :mod:`kd.distill.common`, one to one for equal
depths as the official code; ``false``: the teacher's last layer for every student layer, the intended
behaviour of the official flag, which crashes as released, §7.1):

* **HMLD** (Hungarian-matching logits distillation, §2.5). The student's layer-``l`` predictions are
  Hungarian-matched (scipy) to *all* the teacher's layer-``t`` predictions with the cost
  ``1 * sum_c softBCE(s_ic, p_jc) + 5 * L1 + 2 * (-GIoU)`` (class cost summed over classes, *not* divided
  by C, §7.3), where ``p = sigmoid(teacher logits)`` and the teacher boxes are clamped to the image (the
  student's are not). Losses: soft BCE summed over classes over *every* student row (unmatched rows, when
  the student has more queries than the teacher, get the background target 0, fixing the official
  target-80 bug, §7.2), divided by the number M of matched pairs; L1 (summed over coordinates) and
  1 - GIoU of the matched pairs against the clamped teacher boxes, divided by M averaged over processes.
  Weights 1 / 5 / 2.
* **TAFD** (target-aware feature distillation, §2.6), once per *teacher* layer ``t`` (all of them, whatever
  the student's depth): the top-k (query, class) pairs of the teacher's scores (k = ``tafd_topk`` capped at
  Q*C; a query can appear twice), quality ``q_n = score_n * max_g IoU(b_n, g)`` (plain IoU of the
  *unclamped* teacher box, §7.4; ``q_n = score_n`` without GT), and per feature level the mask
  ``psi = max(sum_n q_n cos(h_n, F_T(x, y)), 0.01) / max_xy`` (no gradient, padding not excluded).
  Loss ``sum_k MSE_mean(psi * F_T_k, psi * phi_k(F_S_k))`` over the projected encoder inputs
  (``DetectorOutput.features``, the "neck"), ``phi_k`` a 1x1 conv per teacher level when the widths differ
  (identity otherwise, as the official code). Levels are paired by equal spatial size (architectures with
  other strides: teacher levels without a student level of the same size are skipped).
* **QPAD** (query-prior assignment distillation, §2.7): the student decodes the teacher's queries as an
  extra isolated group ``"qpad"`` (``teacher.native_queries()`` detached; a two-stage teacher's per-image
  proposal anchors ``teacher_out.detection.queries``, which exist only after the teacher has run: they are
  added by :meth:`DETRDistill.student_queries`, which ``DistillLoss`` calls between the two forwards).
  Each student layer ``l`` of that group is supervised with the *teacher's own* Hungarian assignment of
  its layer-``t`` predictions to the GT (a :class:`~kd.models.matcher.HungarianMatcher`, costs
  ``qpad_cost_*`` 2/5/2), slot i inheriting teacher slot i's target; no student-side matching. Loss
  ``2 * focal + 5 * L1 + 2 * GIoU`` normalised by the number of GT boxes, as the detection loss. A DAB-DETR
  teacher with ``num_patterns > 0`` also decodes its bare anchors as the ``"qpad"`` group (zero content,
  like the student) and that group's assignment is used. The queries must fit the student: same format
  ("box" anchors fit any "box" model; an "embed" query only the same architecture with the same width);
  otherwise construction raises ValueError unless ``qpad_adapter: true`` adds a learned
  ``nn.Linear(K_T, K_S)`` (trained with the student).
* **Contrastive** (code-only MoCo term, §2.8; off by default): per student layer, the HMLD-matched pairs'
  decoder embeddings go through :class:`MoCoHead` (Linear -> [Linear, BN, ReLU, Linear] -> L2 norm per
  side, logits ``z_T z_S^T / 0.07``, cross-entropy against the diagonal), weight 0.2. Only matched rows
  take part (the official reshape assumes every student row is matched).

Loss keys (weighted): ``loss_hmld_{cls,bbox,giou}_{l}``, ``loss_qpad_{cls,bbox,giou}_{l}``,
``loss_contrastive_nce_{l}`` (``l`` = student layer) and ``loss_tafd_feat_{t}`` (``t`` = teacher layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from kd.distill.base import Distiller, Indices, Targets
from kd.distill.common import l1_giou, layer_map, proposal_anchors, soft_bce
from kd.models.criterion import loss_boxes, loss_labels, num_boxes_global
from kd.models.matcher import HungarianMatcher
from kd.models.outputs import DecoderOutput, DetectorOutput

QPAD = "qpad"
_WHERE = "distill.detrdistill"


@dataclass(frozen=True)
class DETRDistillConfig:
    """DETRDistill settings (params.yaml ``distill.detrdistill``); defaults are the official code's.

    hmld / tafd / qpad / contrastive: switch each part (contrastive is the code-only MoCo term, off).
    layer_by_layer: pair student layer l with teacher layer layer_map(l) (true) or the teacher's last (false).
    hmld_cost_{cls,bbox,giou}: HMLD matching costs (soft BCE summed over classes, L1, -GIoU).
    hmld_weight_{cls,bbox,giou}: HMLD loss weights.
    tafd_weight: weight of each teacher layer's TAFD loss. tafd_topk: teacher (query, class) pairs per image
    (official ``max_per_img`` 100, capped at Q*C). tafd_mask_min: lower clamp of the mask before max-norm.
    qpad_cost_{cls,bbox,giou}: the teacher's matcher costs (focal, L1, -GIoU). qpad_weight_{cls,bbox,giou}:
    QPAD loss weights. focal_alpha / focal_gamma: the focal loss and cost. qpad_adapter: allow a learned
    Linear when the teacher's queries do not fit the student.
    contrastive_weight / contrastive_temperature / contrastive_mid_channels: MoCo head (0.2, 0.07, 512).
    """

    hmld: bool = True
    tafd: bool = True
    qpad: bool = True
    contrastive: bool = False
    layer_by_layer: bool = True
    hmld_cost_cls: float = 1.0
    hmld_cost_bbox: float = 5.0
    hmld_cost_giou: float = 2.0
    hmld_weight_cls: float = 1.0
    hmld_weight_bbox: float = 5.0
    hmld_weight_giou: float = 2.0
    tafd_weight: float = 1.0
    tafd_topk: int = 100
    tafd_mask_min: float = 0.01
    qpad_cost_cls: float = 2.0
    qpad_cost_bbox: float = 5.0
    qpad_cost_giou: float = 2.0
    qpad_weight_cls: float = 2.0
    qpad_weight_bbox: float = 5.0
    qpad_weight_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    qpad_adapter: bool = False
    contrastive_weight: float = 0.2
    contrastive_temperature: float = 0.07
    contrastive_mid_channels: int = 512

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DETRDistillConfig:
        """Build from a plain dict; unknown keys and out-of-range values raise ValueError naming the key."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{_WHERE}: unknown key(s) {unknown}; expected some of {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first field of the wrong type or out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{_WHERE}.{f.name}: expected true/false, got {value!r}")
            elif isinstance(f.default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{_WHERE}.{f.name}: expected an integer >= 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{_WHERE}.{f.name}: expected a number >= 0, got {value!r}")
        for key in ("tafd_mask_min", "contrastive_temperature"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{_WHERE}.{key}: expected a number > 0, got {getattr(self, key)!r}")
        if self.focal_alpha > 1:
            raise ValueError(f"{_WHERE}.focal_alpha: expected a number in [0, 1], got {self.focal_alpha!r}")
        for part in ("hmld", "qpad"):
            if not any(getattr(self, f"{part}_cost_{t}") for t in ("cls", "bbox", "giou")):
                raise ValueError(f"{_WHERE}.{part}_cost_*: at least one matching cost must be > 0")


# ---------------------------------------------------------------------------- helpers


def teacher_layers(num_student: int, num_teacher: int, layer_by_layer: bool) -> list[int]:
    """Teacher layer paired with each student layer: ``layer_map`` or always the teacher's last layer."""
    if layer_by_layer:
        return layer_map(num_student, num_teacher)
    return [num_teacher - 1] * num_student


def clamp_boxes(boxes: Tensor) -> Tensor:
    """Normalised cxcywh boxes clipped to the image, as the official ``_get_teacher_bboxes_distill_single``
    clamps the teacher's xyxy pixel boxes. [..., 4] -> [..., 4]."""
    return box_convert(box_convert(boxes, "cxcywh", "xyxy").clamp(0.0, 1.0), "xyxy", "cxcywh")


def mean_over_processes(count: float, device: torch.device | None = None) -> float:
    """``count`` averaged over processes (mmdet ``reduce_mean``), clamped to >= 1."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(float(count), device=device)
        dist.all_reduce(t)
        count = t.item() / dist.get_world_size()
    return max(float(count), 1.0)


def query_spec(model: nn.Module) -> tuple[str, int, str]:
    """(query format, width K, family) of a detector's queries.

    ``("box", 4, "anchor")`` for unsigmoided anchors (any "box" model takes them);
    ``("embed", K, <class name>)`` for embeddings, meaningful only to the same architecture.
    """
    fmt = getattr(model, "query_format", None)
    if fmt == "box":
        return fmt, 4, "anchor"
    if fmt == "embed":
        return fmt, model.native_queries().shape[-1], type(model).__name__
    raise ValueError(
        f"detrdistill: {type(model).__name__}.query_format must be 'box' or 'embed', got {fmt!r}"
    )


def feature_strides(model: nn.Module) -> list[int]:
    """Stride of each level of ``DetectorOutput.features``: the backbone's strides then one doubling per
    extra level (Deformable DETR, ``num_feature_levels``), or the coarsest stride alone (single-scale)."""
    strides = list(model.backbone.strides)
    levels = getattr(model, "num_feature_levels", None)
    if levels is None:
        return strides[-1:]
    while len(strides) < levels:
        strides.append(strides[-1] * 2)
    return strides[:levels]


# ---------------------------------------------------------------------------- HMLD


@torch.no_grad()
def hmld_cost(
    s_logits: Tensor, s_boxes: Tensor, t_probs: Tensor, t_boxes: Tensor, costs: tuple[float, float, float]
) -> Tensor:
    """HMLD matching cost of one image (official ``DistillHungarianAssigner``, methods.md §2.5).

    Args:
        s_logits: [N, C] student logits; s_boxes: [N, 4] student boxes (normalised cxcywh, unclamped).
        t_probs: [M, C] teacher probabilities; t_boxes: [M, 4] clamped teacher boxes.
        costs: (class, L1, GIoU) weights.

    Returns:
        [N, M] cost: ``w_cls * sum_c BCE(s_ic, p_jc) + w_l1 * |b_i - b_j|_1 - w_giou * GIoU(b_i, b_j)``.
    """
    s_logits, s_boxes, t_probs, t_boxes = (x.float() for x in (s_logits, s_boxes, t_probs, t_boxes))
    pos, neg = F.softplus(-s_logits), F.softplus(s_logits)  # BCE against 1 and against 0
    c_cls = pos @ t_probs.T + neg @ (1 - t_probs).T
    c_l1 = torch.cdist(s_boxes, t_boxes, p=1)
    c_giou = -generalized_box_iou(
        box_convert(s_boxes, "cxcywh", "xyxy"), box_convert(t_boxes, "cxcywh", "xyxy")
    )
    return costs[0] * c_cls + costs[1] * c_l1 + costs[2] * c_giou


def hmld_match(
    s_logits: Tensor, s_boxes: Tensor, t_probs: Tensor, t_boxes: Tensor, costs: tuple[float, float, float]
) -> Indices:
    """Per image ``(student rows, teacher columns)``, min(N, M) pairs each, by scipy's Hungarian solver.

    s_logits [B, N, C], s_boxes [B, N, 4], t_probs [B, M, C], t_boxes [B, M, 4] (clamped)."""
    indices = []
    for b in range(s_logits.shape[0]):
        cost = hmld_cost(s_logits[b], s_boxes[b], t_probs[b], t_boxes[b], costs).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("detrdistill: non-finite HMLD matching cost (NaN/inf predictions)")
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


def hmld_terms(
    s_logits: Tensor, s_boxes: Tensor, t_probs: Tensor, t_boxes: Tensor, indices: Indices
) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted HMLD class, L1 and GIoU terms of one layer (official ``loss_single_distill``).

    Args:
        s_logits [B, N, C], s_boxes [B, N, 4]: student.
        t_probs [B, M, C], t_boxes [B, M, 4] (clamped): teacher.
        indices: the HMLD matching per image.

    Returns:
        cls = sum over all B*N rows and C classes of BCE(s, target) / M, target = p of the matched teacher
        prediction or 0 (background) for unmatched rows; l1 = sum of matched |db|_1 / M'; giou = sum of
        matched (1 - GIoU) / M', with M the local number of pairs and M' its mean over processes (>= 1).
    """
    batch = torch.cat([torch.full_like(r, b) for b, (r, _) in enumerate(indices)]).to(s_logits.device)
    rows = torch.cat([r for r, _ in indices]).to(s_logits.device)
    cols = torch.cat([c for _, c in indices]).to(s_logits.device)
    target = torch.zeros_like(s_logits)
    target[batch, rows] = t_probs[batch, cols].to(target.dtype)
    matched = rows.numel()
    cls = soft_bce(s_logits.flatten(0, 1), target.flatten(0, 1)).sum() / max(matched, 1)
    l1, giou = l1_giou(s_boxes[batch, rows], t_boxes[batch, cols].to(s_boxes.dtype))
    m_bar = mean_over_processes(matched, s_logits.device)
    return cls, l1.sum() / m_bar, giou.sum() / m_bar


# ---------------------------------------------------------------------------- TAFD


@torch.no_grad()
def query_quality(
    t_logits: Tensor, t_boxes: Tensor, t_hidden: Tensor, targets: Targets, topk: int
) -> tuple[Tensor, Tensor]:
    """Teacher's top-k (query, class) pairs per image and their quality (``simple_test_teacher_distill``).

    Args:
        t_logits [B, Q, C], t_boxes [B, Q, 4] (unclamped), t_hidden [B, Q, D]: one teacher decoder layer.
        targets: B dicts with ``boxes [T, 4]`` normalised cxcywh.
        topk: pairs kept per image (capped at Q*C).

    Returns:
        quality [B, k] = score * max IoU with the image's GT (score alone without GT), embeddings [B, k, D].
    """
    num_classes = t_logits.shape[-1]
    k = min(topk, t_logits.shape[1] * num_classes)
    scores, idx = t_logits.float().sigmoid().flatten(1).topk(k, dim=1)
    query = idx // num_classes
    quality = []
    for b, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            quality.append(scores[b])
            continue
        boxes = box_convert(t_boxes[b, query[b]].float(), "cxcywh", "xyxy")
        gt = box_convert(t["boxes"].to(boxes), "cxcywh", "xyxy")
        quality.append(scores[b] * box_iou(boxes, gt).amax(-1))
    embeddings = torch.gather(t_hidden, 1, query[..., None].expand(-1, -1, t_hidden.shape[-1]))
    return torch.stack(quality), embeddings


@torch.no_grad()
def tafd_mask(quality: Tensor, embeddings: Tensor, feature: Tensor, mask_min: float = 0.01) -> Tensor:
    """Target-aware mask of one feature level (official ``Distiller.forward_train``).

    Args:
        quality [B, k]; embeddings [B, k, D] teacher decoder embeddings; feature [B, D, H, W] teacher feature.
        mask_min: lower clamp before the per-image max normalisation.

    Returns:
        [B, 1, H, W] ``max(sum_n q_n cos(h_n, F(x, y)), mask_min) / max_xy``, in (0, 1].
    """
    sim = torch.einsum(
        "bnc,bchw->bnhw", F.normalize(embeddings.float(), dim=-1), F.normalize(feature.float(), dim=1)
    )
    mask = torch.einsum("bnhw,bn->bhw", sim, quality.float()).clamp(min=mask_min)
    return (mask / mask.flatten(1).amax(-1)[:, None, None])[:, None]


def level_pairs(t_feats: list[Tensor], s_feats: list[Tensor]) -> list[tuple[int, int]]:
    """(teacher level, student level) pairs of equal spatial size, each student level used at most once."""
    pairs, used = [], set()
    for k, t in enumerate(t_feats):
        j = next((j for j, s in enumerate(s_feats) if j not in used and s.shape[-2:] == t.shape[-2:]), None)
        if j is not None:
            pairs.append((k, j))
            used.add(j)
    if not pairs:
        raise ValueError(
            "detrdistill: TAFD found no student feature level of the size of a teacher level "
            f"(teacher {[tuple(t.shape[-2:]) for t in t_feats]}, "
            f"student {[tuple(s.shape[-2:]) for s in s_feats]})"
        )
    return pairs


# ---------------------------------------------------------------------------- contrastive (code only)


class MoCoHead(nn.Module):
    """The official ``MoCoCLHead`` (methods.md §2.8): per side Linear(D -> mid), then
    [Linear, BatchNorm1d, ReLU, Linear], L2 normalisation; logits ``z_T z_S^T / T``; CE against the
    diagonal."""

    def __init__(
        self, student_dim: int, teacher_dim: int, mid_channels: int = 512, temperature: float = 0.07
    ):
        super().__init__()
        self.temperature = temperature
        self.student_proj = nn.Linear(student_dim, mid_channels)
        self.teacher_proj = nn.Linear(teacher_dim, mid_channels)
        self.student_encoder = self._encoder(mid_channels)
        self.teacher_encoder = self._encoder(mid_channels)

    @staticmethod
    def _encoder(mid: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(mid, mid), nn.BatchNorm1d(mid), nn.ReLU(), nn.Linear(mid, mid))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student [N, D_S], teacher [N, D_T] paired embeddings (N >= 2) -> unweighted InfoNCE loss."""
        z_s = F.normalize(self.student_encoder(self.student_proj(student)), dim=1)
        z_t = F.normalize(self.teacher_encoder(self.teacher_proj(teacher)), dim=1)
        logits = z_t @ z_s.T / self.temperature
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


# ---------------------------------------------------------------------------- distiller


class DETRDistill(Distiller):
    """DETRDistill distiller (see the module docstring).

    Args:
        cfg: the settings.
        teacher, student: detectors, read for widths, query formats, classes and feature levels (not stored).
            Parameters: TAFD 1x1 conv adapters (widths differ), the QPAD Linear adapter (``qpad_adapter`` and
            queries that do not fit), the MoCo head (``contrastive``).
    """

    def __init__(self, cfg: DETRDistillConfig, teacher: nn.Module, student: nn.Module):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        t_classes, s_classes = getattr(teacher, "num_classes", None), getattr(student, "num_classes", None)
        if t_classes != s_classes:
            raise ValueError(
                f"detrdistill: teacher has {t_classes} classes, student {s_classes}; they must match"
            )
        t_dim, s_dim = teacher.hidden_dim, student.hidden_dim
        self.tafd_adapters = None
        if cfg.tafd and t_dim != s_dim:  # one 1x1 conv per teacher level that a student level can meet
            s_strides = set(feature_strides(student))
            levels = [k for k, stride in enumerate(feature_strides(teacher)) if stride in s_strides]
            self.tafd_adapters = nn.ModuleDict({str(k): nn.Conv2d(s_dim, t_dim, 1) for k in levels})
        self.matcher = HungarianMatcher(
            cfg.qpad_cost_cls, cfg.qpad_cost_bbox, cfg.qpad_cost_giou, cfg.focal_alpha, cfg.focal_gamma
        )
        self.qpad_adapter = None
        self.qpad_from_output = self.teacher_decodes_qpad = False
        if cfg.qpad:
            self._setup_qpad(teacher, student)
        self.moco = None
        if cfg.contrastive:
            self.moco = MoCoHead(s_dim, t_dim, cfg.contrastive_mid_channels, cfg.contrastive_temperature)

    def _setup_qpad(self, teacher: nn.Module, student: nn.Module) -> None:
        t_spec, s_spec = query_spec(teacher), query_spec(student)
        if t_spec != s_spec:
            if not self.cfg.qpad_adapter:
                raise ValueError(
                    f"detrdistill: QPAD cannot feed the teacher's queries ({t_spec[0]} [Q, {t_spec[1]}] of "
                    f"{type(teacher).__name__}) to the student ({s_spec[0]} [Q, {s_spec[1]}] of "
                    f"{type(student).__name__}); set {_WHERE}.qpad_adapter: true (a learned Linear) "
                    "or qpad: false"
                )
            self.qpad_adapter = nn.Linear(t_spec[1], s_spec[1])
        # a two-stage teacher's queries are the per-image proposals in its output
        self.qpad_from_output = teacher.native_queries() is None
        # DAB-DETR patterns: its detection queries carry pattern contents the student cannot take
        self.teacher_decodes_qpad = getattr(teacher, "num_patterns", 0) > 0

    # ------------------------------------------------------------------ queries

    def _for_student(self, queries: Tensor) -> Tensor:
        """Teacher-format queries [B|1, Q, K_T] (detached) -> the student's format [B|1, Q, K_S]."""
        return queries if self.qpad_adapter is None else self.qpad_adapter(queries)

    def queries(
        self, teacher: nn.Module, student: nn.Module, batch_size: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """QPAD's group: the teacher's native queries [1, Q_T, K] (detached) for the student (and, for a
        DAB-DETR teacher with patterns, for the teacher). A two-stage teacher's come in
        :meth:`student_queries`."""
        del student, batch_size
        if not self.cfg.qpad or self.qpad_from_output:
            return {}, {}
        native = teacher.native_queries().detach()[None]
        t_groups = {QPAD: native} if self.teacher_decodes_qpad else {}
        return t_groups, {QPAD: self._for_student(native)}

    def student_queries(self, teacher_out: DetectorOutput, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        """Complete the student's groups after the teacher's forward: a two-stage teacher's QPAD queries are
        its per-image proposal anchors ``teacher_out.detection.queries`` [B, Q_T, 4] (detached)."""
        if not (self.cfg.qpad and self.qpad_from_output):
            return groups
        return {**groups, QPAD: self._for_student(proposal_anchors(teacher_out, "detrdistill"))}

    # ------------------------------------------------------------------ losses

    def forward(
        self,
        teacher_out: DetectorOutput,
        student_out: DetectorOutput,
        targets: Targets,
        student_indices: Indices,
    ) -> dict[str, Tensor]:
        """Weighted loss terms (keys in the module docstring). ``student_indices`` is not used: HMLD matches
        every student layer to the teacher itself and QPAD uses the teacher's assignment."""
        del student_indices
        s_dec, t_dec = student_out.detection, teacher_out.detection
        pairs = list(enumerate(teacher_layers(s_dec.num_layers, t_dec.num_layers, self.cfg.layer_by_layer)))
        losses: dict[str, Tensor] = {}
        if self.cfg.hmld or self.cfg.contrastive:
            for l_s, l_t in pairs:
                losses.update(self._hmld(s_dec, t_dec, l_s, l_t))
        if self.cfg.tafd:
            losses.update(self._tafd(teacher_out, student_out, targets))
        if self.cfg.qpad:
            losses.update(self._qpad(teacher_out, student_out, targets, pairs))
        return losses

    def _hmld(self, s_dec: DecoderOutput, t_dec: DecoderOutput, l_s: int, l_t: int) -> dict[str, Tensor]:
        """HMLD (and the MoCo term on its matching) of student layer ``l_s`` against teacher layer ``l_t``."""
        c = self.cfg
        s_logits, s_boxes = s_dec.logits[l_s], s_dec.boxes[l_s]
        t_probs = t_dec.logits[l_t].detach().float().sigmoid()
        t_boxes = clamp_boxes(t_dec.boxes[l_t].detach().float())
        costs = (c.hmld_cost_cls, c.hmld_cost_bbox, c.hmld_cost_giou)
        indices = hmld_match(s_logits.detach(), s_boxes.detach(), t_probs, t_boxes, costs)
        losses = {}
        if c.hmld:
            cls, l1, giou = hmld_terms(s_logits, s_boxes, t_probs, t_boxes, indices)
            losses[f"loss_hmld_cls_{l_s}"] = c.hmld_weight_cls * cls
            losses[f"loss_hmld_bbox_{l_s}"] = c.hmld_weight_bbox * l1
            losses[f"loss_hmld_giou_{l_s}"] = c.hmld_weight_giou * giou
        if c.contrastive:
            losses[f"loss_contrastive_nce_{l_s}"] = c.contrastive_weight * self._contrast(
                s_dec.hidden[l_s], t_dec.hidden[l_t].detach(), indices
            )
        return losses

    def _contrast(self, s_hidden: Tensor, t_hidden: Tensor, indices: Indices) -> Tensor:
        """Unweighted MoCo loss over the matched pairs of s_hidden [B, N, D_S] and t_hidden [B, M, D_T]."""
        s = torch.cat([s_hidden[b, r.to(s_hidden.device)] for b, (r, _) in enumerate(indices)])
        t = torch.cat([t_hidden[b, c.to(t_hidden.device)] for b, (_, c) in enumerate(indices)])
        if s.shape[0] < 2:  # BatchNorm and a contrastive loss need two pairs
            return s_hidden.sum() * 0.0
        return self.moco(s, t.to(s.dtype))

    def _tafd(
        self, teacher_out: DetectorOutput, student_out: DetectorOutput, targets: Targets
    ) -> dict[str, Tensor]:
        """``loss_tafd_feat_{t}`` for every teacher decoder layer t (sum over the paired feature levels)."""
        t_dec = teacher_out.detection
        t_feats = [f.detach() for f in teacher_out.features]
        pairs = level_pairs(t_feats, student_out.features)
        s_feats = {k: self._adapt(k, student_out.features[j]) for k, j in pairs}
        losses = {}
        for l_t in range(t_dec.num_layers):
            quality, emb = query_quality(
                t_dec.logits[l_t].detach(), t_dec.boxes[l_t].detach(), t_dec.hidden[l_t].detach(), targets,
                self.cfg.tafd_topk,
            )  # fmt: skip
            loss = 0.0
            for k, _ in pairs:
                mask = tafd_mask(quality, emb, t_feats[k], self.cfg.tafd_mask_min).to(s_feats[k].dtype)
                loss = loss + F.mse_loss(mask * s_feats[k], mask * t_feats[k].to(s_feats[k].dtype))
            losses[f"loss_tafd_feat_{l_t}"] = self.cfg.tafd_weight * loss
        return losses

    def _adapt(self, level: int, feature: Tensor) -> Tensor:
        """phi_k: the student's feature [B, D_S, H, W] in the teacher's width (identity when equal)."""
        if self.tafd_adapters is None:
            return feature
        if str(level) not in self.tafd_adapters:
            raise ValueError(f"detrdistill: TAFD has no adapter for teacher feature level {level}")
        return self.tafd_adapters[str(level)](feature)

    def _qpad(
        self,
        teacher_out: DetectorOutput,
        student_out: DetectorOutput,
        targets: Targets,
        pairs: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """QPAD terms of every student layer of the ``qpad`` group under the teacher's assignment."""
        if QPAD not in student_out.extra:
            raise ValueError(
                f"detrdistill: the student's output has no {QPAD!r} query group "
                f"(groups: {sorted(student_out.extra)}); decode the groups of DETRDistill.queries and "
                "DETRDistill.student_queries (kd.distill.base.DistillLoss does)"
            )
        s_group = student_out.extra[QPAD]
        assignments = self.qpad_assignment(teacher_out, targets, [l_t for _, l_t in pairs])
        num_boxes = num_boxes_global(targets, s_group.logits.device)
        c = self.cfg
        losses = {}
        for (l_s, _), indices in zip(pairs, assignments, strict=True):
            cls = loss_labels(s_group.logits[l_s], targets, indices, num_boxes, c.focal_alpha, c.focal_gamma)
            l1, giou = loss_boxes(s_group.boxes[l_s], targets, indices, num_boxes)
            losses[f"loss_qpad_cls_{l_s}"] = c.qpad_weight_cls * cls
            losses[f"loss_qpad_bbox_{l_s}"] = c.qpad_weight_bbox * l1
            losses[f"loss_qpad_giou_{l_s}"] = c.qpad_weight_giou * giou
        return losses

    def qpad_assignment(
        self, teacher_out: DetectorOutput, targets: Targets, layers: list[int]
    ) -> list[Indices]:
        """The teacher's own Hungarian assignment of its predictions (of the queries the student decodes) to
        the GT, for each teacher layer in ``layers``: per image (teacher slot, GT index)."""
        group = teacher_out.extra.get(QPAD, teacher_out.detection)
        return [self.matcher(group.logits[l].detach(), group.boxes[l].detach(), targets) for l in layers]
