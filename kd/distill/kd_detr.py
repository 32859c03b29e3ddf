"""KD-DETR (Wang et al., CVPR 2024): distillation points shared by teacher and student (methods.md §3).

Detection and distillation are decoupled: besides its own detection queries, the student decodes extra,
isolated query groups (the *distillation points*) that the teacher decodes too, and mimics the teacher's
final-layer predictions at those points. Two groups ("general-to-specific sampling", §3.2):

* **general** (``kd_general``): M random points drawn anew every step and shared by both models (one draw
  per step, the same for every image of the batch, as the official ``nn.Embedding(300, 4)`` made per
  iteration). ``num_general`` defaults to the student's ``num_queries`` (the paper's 300 is the official
  models' query count; our small models use fewer queries, so the default keeps that ratio of 1).
  ``distribution``: ``normal`` (official code: N(0, 1) unsigmoided anchors, so boxes sigmoid(a) cluster
  around 0.5) or ``uniform`` (the paper's wording, read as boxes uniform in [0, 1]^4: a = logit(U(0, 1))).
* **specific** (``kd_specific``): the teacher's learned queries (``teacher.native_queries()``, detached).
  A two-stage teacher has none (its queries are per-image encoder proposals), so its points are
  ``teacher_out.detection.queries``: they exist only after the teacher's forward, and are added to the
  student's groups by :meth:`KDDETR.student_queries`, which ``kd.distill.base.DistillLoss`` calls between
  the two forwards. The teacher's output at the specific points is its own detection output (no extra teacher
  pass), except for a DAB-DETR teacher with ``num_patterns > 0``, whose detection queries carry pattern
  contents: it then decodes the specific points as an extra group too (zero content, like the student).

How a point reaches each model (query formats, ``kd.models``): a "box" model (DAB-DETR; Deformable DETR
two-stage / DN) takes a 4-d unsigmoided anchor; an "embed" model (Conditional DETR: [D]; plain Deformable
DETR: [2D] = (query_pos, content)) takes an embedding of its own width K. Rule:

1. General points are 4-d anchors a, given as they are to a "box" model and mapped for an "embed" model
   by the deterministic, parameter-free sine embedding of the box (:func:`box_to_embedding`, the official
   two-stage ``get_proposal_pos_embed`` with K/4 features per coordinate; needs K % 8 == 0). The models
   offer no parameter-free map of their own (Deformable DETR's ``pos_trans`` is learned), so this one is
   shared by all. Exception (``embed_points: auto``, default): when *both* models are "embed" with the
   same width K, the points are sampled directly as embeddings [M, K] (N(0, 1), or U(-1, 1) for
   ``uniform``), as TPRD's Deformable DETR port does; ``embed_points: sine`` always uses boxes.
2. Specific points are the teacher's queries in the teacher's format. The student takes them as they are
   when its format and width are the teacher's; a "box" teacher's anchors are mapped for an "embed"
   student by :func:`box_to_embedding`; an "embed" teacher's embeddings, which no parameter-free map turns
   into another width or into a box, go through a learned ``nn.Linear(K_T, K_S)`` adapter (K_S = 4 gives
   unsigmoided anchors for a "box" student), trained with the student.

Loss (official ``KDCriterion``, methods.md §3.4), per group G and every student decoder layer l against
the teacher's *final* layer (any depths), over the N = B*M points with w_i = max_c sigmoid(z^T_i,c)
(detached; ``fg_rebalance: false`` sets w_i = 1 in the same formulas, methods.md §7.6):

* cls:  sum_i w_i * T^2 * mean_c KL(softmax(z^T_i / T) || softmax(z^S_i / T)), T = 10. An *unnormalised*
  sum over the N points as in the official code: it scales with the batch size and M (with B = 2, M = 50
  it is ~100x a per-point mean). ``normalize_cls: true`` divides it by N instead.
* L1:   sum_i w_i * mean_4 |b^S_i - b^T_i| / sum_i w_i;   GIoU: sum_i w_i * (1 - GIoU) / sum_i w_i.
* weights cls 1 / L1 5 / GIoU 2. Keys ``loss_kd_{specific,general}_{cls,bbox,giou}_{l}``, l = student
  layer 0..L_S-1 (the official code sums the layers into one key per term; the sum is the same).

The GIoU is torchvision's (eps 1e-7, DAB-DETR's official one uses 1e-6): identical boxes give a floor of
~eps / area, not exactly 0 (methods.md §7.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.distill.base import Distiller, Indices, Targets
from kd.distill.common import l1_giou, proposal_anchors
from kd.models.box_ops import inverse_sigmoid
from kd.models.deformable_transformer import proposal_pos_embed
from kd.models.outputs import DecoderOutput, DetectorOutput

GENERAL = "kd_general"
SPECIFIC = "kd_specific"
DISTRIBUTIONS = ("normal", "uniform")
EMBED_POINTS = ("auto", "sine")


@dataclass(frozen=True)
class KDDETRConfig:
    """KD-DETR settings (params.yaml ``distill.kd_detr``); defaults are the official code's.

    general / specific / fg_rebalance: the three switches of the paper's sampling ablation (Table 6).
    num_general: general points per step (None: the student's ``num_queries``; official 300).
    distribution: normal | uniform (see the module docstring). embed_points: auto | sine (idem).
    temperature: KL temperature T. weight_cls / weight_l1 / weight_giou: loss weights.
    normalize_cls: divide the class term by the number of points (official: false, a plain sum).
    all_layers: distil every student decoder layer (official) or only the last one.
    """

    general: bool = True
    specific: bool = True
    fg_rebalance: bool = True
    num_general: int | None = None
    distribution: str = "normal"
    embed_points: str = "auto"
    temperature: float = 10.0
    weight_cls: float = 1.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    normalize_cls: bool = False
    all_layers: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KDDETRConfig:
        """Build from a plain dict; unknown keys and out-of-range values raise ValueError naming the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"distill.kd_detr: unknown key(s) {unknown}; expected some of {sorted(fields)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for a value of the wrong type or out of range."""
        for key in ("general", "specific", "fg_rebalance", "normalize_cls", "all_layers"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"distill.kd_detr.{key}: expected true/false, got {getattr(self, key)!r}")
        n = self.num_general
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"distill.kd_detr.num_general: expected an integer >= 1 or null, got {n!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distill.kd_detr.distribution: expected one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        if self.embed_points not in EMBED_POINTS:
            raise ValueError(
                f"distill.kd_detr.embed_points: expected one of {EMBED_POINTS}, got {self.embed_points!r}"
            )
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"distill.kd_detr.temperature: expected a number > 0, got {self.temperature!r}")
        for key in ("weight_cls", "weight_l1", "weight_giou"):
            if not _is_number(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"distill.kd_detr.{key}: expected a number >= 0, got {getattr(self, key)!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- points


def sample_anchors(num: int, distribution: str, device: torch.device | None = None) -> Tensor:
    """General points as unsigmoided anchor boxes [1, M, 4] from the global RNG.

    normal: a ~ N(0, 1) (official ``nn.Embedding`` init); uniform: sigmoid(a) ~ U(0, 1) per coordinate.
    """
    if distribution == "normal":
        return torch.randn(1, num, 4, device=device)
    return inverse_sigmoid(torch.rand(1, num, 4, device=device))


def sample_embeddings(num: int, width: int, distribution: str, device: torch.device | None = None) -> Tensor:
    """General points as query embeddings [1, M, K]: N(0, 1) (TPRD) or U(-1, 1)."""
    if distribution == "normal":
        return torch.randn(1, num, width, device=device)
    return torch.rand(1, num, width, device=device) * 2 - 1


def box_to_embedding(anchors: Tensor, width: int) -> Tensor:
    """Parameter-free map of anchors to an "embed" query: the sine embedding of sigmoid(anchors).

    anchors: [B, M, 4] unsigmoided cxcywh -> [B, M, width], width/4 features per coordinate (cx, cy, w, h)
    (Deformable DETR's two-stage ``get_proposal_pos_embed``). width must be a multiple of 8.
    """
    if width % 8:
        raise ValueError(f"kd_detr: a box maps to an embedding of a width divisible by 8, got {width}")
    return proposal_pos_embed(anchors, width // 4).to(anchors.dtype)


def query_spec(model: nn.Module) -> tuple[str, int]:
    """(query format, query width K) of a detector: ("box", 4) or ("embed", K of ``native_queries()``)."""
    fmt = getattr(model, "query_format", None)
    if fmt == "box":
        return fmt, 4
    if fmt == "embed":
        return fmt, model.native_queries().shape[-1]
    raise ValueError(f"kd_detr: {type(model).__name__}.query_format must be 'box' or 'embed', got {fmt!r}")


# ---------------------------------------------------------------------------- loss


def foreground_weights(teacher_logits: Tensor) -> Tensor:
    """KD-DETR foreground re-balance weights w_i = max_c sigmoid(z^T_i,c): [..., C] -> [...], detached."""
    return teacher_logits.detach().sigmoid().amax(-1)


def kd_detr_terms(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    weights: Tensor,
    temperature: float,
    normalize_cls: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted class, L1 and GIoU terms of one student layer against the teacher (methods.md §3.4).

    Args:
        student_logits, teacher_logits: [N, C]; student_boxes, teacher_boxes: [N, 4] normalised cxcywh.
        weights: [N] per-point weights w_i.
        temperature: KL temperature T.
        normalize_cls: divide the class term by N (official: a plain weighted sum).

    Returns:
        cls = sum_i w_i T^2 mean_c KL_i, l1 = sum_i w_i mean_4 |db| / sum_i w_i, giou = sum_i w_i (1 - GIoU)
        / sum_i w_i (scalars).
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="none",
        log_target=True,
    ).mean(-1) * (t * t)
    cls = (weights * kl).sum()
    if normalize_cls:
        cls = cls / max(kl.numel(), 1)
    l1, giou = l1_giou(student_boxes, teacher_boxes.detach())
    total = weights.sum()
    return cls, (weights * l1 / 4).sum() / total, (weights * giou).sum() / total


# ---------------------------------------------------------------------------- distiller


class KDDETR(Distiller):
    """KD-DETR distiller: shared general + teacher-specific distillation points (see the module docstring).

    Args:
        cfg: the settings.
        teacher, student: detectors (read for their query formats, widths, query counts and classes; not
            stored). Its only parameters: the specific-point adapter, when an "embed" teacher's queries
            must change width or format for the student.
    """

    def __init__(self, cfg: KDDETRConfig, teacher: nn.Module, student: nn.Module):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        t_classes, s_classes = getattr(teacher, "num_classes", None), getattr(student, "num_classes", None)
        if t_classes != s_classes:
            raise ValueError(
                f"kd_detr: teacher has {t_classes} classes, student {s_classes}; they must match"
            )
        self.teacher_spec = query_spec(teacher)
        self.student_spec = query_spec(student)
        self.num_general = cfg.num_general or student.num_queries
        # a two-stage teacher's queries are the per-image proposals in its output
        self.specific_from_output = cfg.specific and teacher.native_queries() is None
        # DAB-DETR patterns: the detection output is not the output at the bare anchors
        self.teacher_decodes_specific = cfg.specific and getattr(teacher, "num_patterns", 0) > 0
        self.direct_embed = (
            cfg.embed_points == "auto"
            and self.teacher_spec == self.student_spec
            and self.teacher_spec[0] == "embed"
        )
        if cfg.general and not self.direct_embed:
            for fmt, width in (self.teacher_spec, self.student_spec):
                if fmt == "embed" and width % 8:
                    raise ValueError(f"kd_detr: an 'embed' query width must be divisible by 8, got {width}")
        t_fmt, t_width = self.teacher_spec
        s_fmt, s_width = self.student_spec
        self.specific_adapter = None
        if cfg.specific and t_fmt == "embed" and self.teacher_spec != self.student_spec:
            self.specific_adapter = nn.Linear(t_width, s_width)
        elif cfg.specific and t_fmt == "box" and s_fmt == "embed" and s_width % 8:
            raise ValueError(f"kd_detr: an 'embed' student query width must be divisible by 8, got {s_width}")

    # ------------------------------------------------------------------ points

    def _for_student(self, points: Tensor) -> Tensor:
        """Teacher-format specific points [B|1, M, K_T] -> the student's format [B|1, M, K_S]."""
        if self.teacher_spec == self.student_spec:
            return points
        if self.specific_adapter is not None:
            return self.specific_adapter(points)
        return box_to_embedding(points, self.student_spec[1])  # box teacher, embed student

    def _general_points(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(teacher points, student points) of one step; the same tensor object when the formats agree."""
        m, dist = self.num_general, self.cfg.distribution
        if self.direct_embed:
            points = sample_embeddings(m, self.teacher_spec[1], dist, device)
            return points, points
        anchors = sample_anchors(m, dist, device)

        def convert(spec: tuple[str, int]) -> Tensor:
            return anchors if spec[0] == "box" else box_to_embedding(anchors, spec[1])

        t_points = convert(self.teacher_spec)
        s_points = t_points if self.student_spec == self.teacher_spec else convert(self.student_spec)
        return t_points, s_points

    def queries(
        self, teacher: nn.Module, student: nn.Module, batch_size: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """This step's groups: ({kd_general[, kd_specific]} teacher, {kd_general, kd_specific} student).

        The general points are freshly drawn (global RNG); the specific points are the teacher's native
        queries [1, Q_T, K], detached. With a two-stage teacher the student's ``kd_specific`` is added later
        by :meth:`student_queries`.
        """
        del batch_size  # one draw shared by the whole batch, as in the official code
        t_groups, s_groups = {}, {}
        if self.cfg.general:
            device = next(teacher.parameters()).device
            t_groups[GENERAL], s_groups[GENERAL] = self._general_points(device)
        if self.cfg.specific and not self.specific_from_output:
            points = teacher.native_queries().detach()[None]
            s_groups[SPECIFIC] = self._for_student(points)
            if self.teacher_decodes_specific:
                t_groups[SPECIFIC] = points
        return t_groups, s_groups

    def student_queries(self, teacher_out: DetectorOutput, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        """Complete the student's groups once the teacher has run: a two-stage teacher's specific points are
        its per-image proposal anchors ``teacher_out.detection.queries`` [B, Q_T, 4] (detached)."""
        if not self.specific_from_output:
            return groups
        return {**groups, SPECIFIC: self._for_student(proposal_anchors(teacher_out, "kd_detr"))}

    # ------------------------------------------------------------------ losses

    def forward(
        self,
        teacher_out: DetectorOutput,
        student_out: DetectorOutput,
        targets: Targets,
        student_indices: Indices,
    ) -> dict[str, Tensor]:
        """Weighted ``loss_kd_{specific,general}_{cls,bbox,giou}_{l}`` for every distilled student layer."""
        del targets, student_indices  # KD-DETR needs neither the ground truth nor the matching
        losses: dict[str, Tensor] = {}
        if self.cfg.specific:
            teacher_group = teacher_out.extra.get(SPECIFIC, teacher_out.detection)
            losses.update(self._group_losses("specific", teacher_group, _group(student_out, SPECIFIC)))
        if self.cfg.general:
            losses.update(
                self._group_losses("general", _group(teacher_out, GENERAL), _group(student_out, GENERAL))
            )
        return losses

    def _group_losses(self, name: str, teacher: DecoderOutput, student: DecoderOutput) -> dict[str, Tensor]:
        """Terms of one group: every student layer (or the last) against the teacher's final layer."""
        t_logits = teacher.logits[-1].detach().flatten(0, 1)  # [N, C]
        t_boxes = teacher.boxes[-1].detach().flatten(0, 1)  # [N, 4]
        if student.logits.shape[1:] != teacher.logits.shape[1:]:
            raise ValueError(
                f"kd_detr: {name} points: student logits {tuple(student.logits.shape[1:])} vs teacher "
                f"{tuple(teacher.logits.shape[1:])} ([B, M, C] must match)"
            )
        weights = foreground_weights(t_logits) if self.cfg.fg_rebalance else torch.ones_like(t_logits[:, 0])
        num_layers = student.num_layers
        layers = range(num_layers) if self.cfg.all_layers else [num_layers - 1]
        losses = {}
        for lid in layers:
            cls, l1, giou = kd_detr_terms(
                student.logits[lid].flatten(0, 1),
                student.boxes[lid].flatten(0, 1),
                t_logits,
                t_boxes,
                weights,
                self.cfg.temperature,
                self.cfg.normalize_cls,
            )
            losses[f"loss_kd_{name}_cls_{lid}"] = self.cfg.weight_cls * cls
            losses[f"loss_kd_{name}_bbox_{lid}"] = self.cfg.weight_l1 * l1
            losses[f"loss_kd_{name}_giou_{lid}"] = self.cfg.weight_giou * giou
        return losses


def _group(out: DetectorOutput, name: str) -> DecoderOutput:
    if name not in out.extra:
        raise ValueError(
            f"kd_detr: the output has no {name!r} query group (groups: {sorted(out.extra)}); decode the "
            "groups of KDDETR.queries (and KDDETR.student_queries for a two-stage teacher)"
        )
    return out.extra[name]
