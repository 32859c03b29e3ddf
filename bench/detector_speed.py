"""Detector speed: kd's Conditional DETR, DAB-DETR and Deformable DETR against HF transformers' versions.

For each architecture a HF ``...ForObjectDetection`` is built (random init, no download) from a config that
mirrors the embedded default (params.yaml ``model`` merged with ``student.model``); the kd detector is
:func:`kd.models.convert.from_hf` of it, so both hold the same weights and the outputs are checked equal
before timing. Both use frozen batch norm. ``--backbone`` picks what trains on both sides: ``frozen`` (the
ResNet's parameters fixed, as the embedded default trains with ``lr_backbone: 0``; the default when
params.yaml's student freezes it) or ``trained`` (every parameter, HF's partial backbone freezing undone).
Denoising groups are off (HF has none). ``--amp`` runs both under the same CPU autocast (``auto``: the
student's ``amp`` from params.yaml, bf16 in the embedded default; ``none``: fp32); the loss is computed in
fp32.

Timed, in one process with the rounds interleaved (the order alternates each round, so load from other
processes hits both sides alike; the median of the rounds is reported):

* train: one step = forward + the same set loss on the final layer (kd's matcher + focal/L1/GIoU) + backward
  + AdamW step, on a batch of 16 padded ~160 px images;
* infer: forward under ``torch.no_grad`` in eval mode, batch 16, reported as images/s.

The last printed line is a JSON object with the ratios HF time / kd time (> 1: kd is faster): per architecture
the median over rounds of the ratio measured within each round, and their geometric mean.

Usage: ``python bench/detector_speed.py [--rounds 5] [--amp auto|none|bf16]
[--archs conditional_detr dab_detr deformable_detr]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from kd.config import load_params, model_config, train_config
from kd.engine import autocast
from kd.models import build_criterion
from kd.models.convert import config_from_hf, from_hf
from kd.models.criterion import SetCriterion, num_boxes_global

ARCHS = ("conditional_detr", "dab_detr", "deformable_detr")
_HF_CLASSES = {
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection"),
    "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection"),
}
# HF ResNet configs with the layout of the torchvision ResNets kd uses
_RESNETS = {
    "resnet18": {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    "resnet34": {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]},
    "resnet50": {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}
_STAGE = {4: "stage1", 8: "stage2", 16: "stage3", 32: "stage4"}


def hf_config(cfg: dict, arch: str):
    """The HF config of ``arch`` mirroring the kd model config ``cfg`` (params.yaml ``model`` layout)."""
    strides = cfg["strides"] if arch == "deformable_detr" else cfg["strides"][-1:]
    backbone = transformers.ResNetConfig(
        **_RESNETS[cfg["backbone"]], out_features=[_STAGE[s] for s in strides]
    )
    kw = {
        "backbone_config": backbone,
        "use_pretrained_backbone": False,
        "encoder_layers": cfg["enc_layers"],
        "decoder_layers": cfg["dec_layers"],
        "encoder_attention_heads": cfg["nheads"],
        "decoder_attention_heads": cfg["nheads"],
        "encoder_ffn_dim": cfg["ffn_dim"],
        "decoder_ffn_dim": cfg["ffn_dim"],
        "num_queries": cfg["num_queries"],
        "num_labels": cfg["num_classes"],
        "dropout": cfg["dropout"],
        "auxiliary_loss": False,
    }
    if arch == "dab_detr":
        kw.update(hidden_size=cfg["hidden_dim"], activation_function="prelu")
    else:
        kw.update(d_model=cfg["hidden_dim"], activation_function="relu")
    if arch == "deformable_detr":
        kw.update(
            num_feature_levels=len(strides) + cfg.get("extra_levels", 0),
            encoder_n_points=cfg["enc_points"],
            decoder_n_points=cfg["dec_points"],
            two_stage=cfg["two_stage"],
            with_box_refine=cfg["box_refine"] or cfg["two_stage"],  # HF: two-stage requires refinement
            two_stage_num_proposals=cfg["num_queries"],
        )
    return getattr(transformers, _HF_CLASSES[arch][0])(**kw)


def make_pair(cfg: dict, arch: str, train_backbone: bool = True) -> tuple[nn.Module, nn.Module]:
    """(kd model, HF model) with equal weights; checks that the architectures agree. ``train_backbone``:
    every backbone parameter trains on both sides (HF's own partial freezing undone), else none does."""
    torch.manual_seed(0)
    hf = getattr(transformers, _HF_CLASSES[arch][1])(hf_config(cfg, arch))
    for p in hf.model.backbone.parameters():
        p.requires_grad_(train_backbone)
    mirrored = config_from_hf(hf.config.to_dict())
    keys = ("hidden_dim", "nheads", "enc_layers", "dec_layers", "ffn_dim", "num_queries", "num_classes")
    keys += ("enc_points", "dec_points", "two_stage") if arch == "deformable_detr" else ()
    diff = {k: (cfg[k], mirrored[k]) for k in keys if cfg[k] != mirrored[k]}
    if diff:
        raise SystemExit(f"{arch}: the HF config does not mirror params.yaml: {diff}")
    ours = from_hf(hf)
    for p in ours.backbone.parameters():
        p.requires_grad_(train_backbone)
    return ours, hf


def make_batch(batch_size: int, size: int, num_classes: int, seed: int = 0):
    """Padded images [B,3,H,W] (H = size, W = 1.2 size), mask [B,H,W] (True on padding) and random targets."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, int(1.2 * size)
    images = torch.randn(batch_size, 3, h, w, generator=g)
    mask = torch.ones(batch_size, h, w, dtype=torch.bool)
    targets = []
    for i in range(batch_size):
        vh = int(torch.randint(int(0.75 * h), h + 1, (1,), generator=g))
        vw = int(torch.randint(int(0.6 * w), w + 1, (1,), generator=g))
        mask[i, :vh, :vw] = False
        n = int(torch.randint(1, 21, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": torch.cat([cxcy, wh], 1), "labels": labels})
    return images.masked_fill(mask[:, None], 0.0), mask, targets


def final_layer_loss(criterion: SetCriterion, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Tensor:
    """kd's matcher + weighted focal / L1 / GIoU of the final layer (the same for both implementations)."""
    indices = criterion.matcher(logits, boxes, targets)
    terms = criterion.layer_losses(logits, boxes, targets, indices, num_boxes_global(targets))
    return sum(terms.values())


@torch.no_grad()
def output_difference(ours: nn.Module, hf: nn.Module, images: Tensor, mask: Tensor) -> tuple[float, int]:
    """Max |kd - HF| of logits and boxes over the images where HF's two-stage top-k picked no padded
    proposal (kd never does), and the number of images where it did."""
    a, b = ours.eval()(images, mask), hf.eval()(pixel_values=images, pixel_mask=(~mask).long())
    per_image = torch.maximum(
        (a.logits - b.logits).abs().amax((1, 2)), (a.boxes - b.pred_boxes).abs().amax((1, 2))
    )
    padded = torch.zeros(len(images), dtype=torch.bool)
    if getattr(b, "enc_outputs_coord_logits", None) is not None:
        top = b.enc_outputs_class[..., 0].topk(b.logits.shape[1], dim=1).indices
        picked = b.enc_outputs_coord_logits.gather(1, top[..., None].expand(-1, -1, 4))
        padded = (~torch.isfinite(picked)).any(-1).any(-1)
    return float(per_image[~padded].max()), int(padded.sum())


class Runner:
    """Train step / inference of one implementation ("kd" or "hf") on fixed inputs."""

    def __init__(self, kind: str, model: nn.Module, criterion: SetCriterion, batch, amp: str = "none"):
        self.kind, self.model, self.criterion, self.batch, self.amp = kind, model, criterion, batch, amp
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)

    def _forward(self) -> tuple[Tensor, Tensor]:
        images, mask, _ = self.batch
        mask = mask.clone()  # a fresh mask per call: HF caches position embeddings per mask object
        if self.kind == "kd":
            out = self.model(images, mask)
            return out.logits, out.boxes
        out = self.model(pixel_values=images, pixel_mask=(~mask).long())
        return out.logits, out.pred_boxes

    def train_step(self) -> None:
        self.model.train()
        with autocast(torch.device("cpu"), self.amp):
            logits, boxes = self._forward()
            loss = final_layer_loss(self.criterion, logits.float(), boxes.float(), self.batch[2])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self) -> None:
        self.model.eval()
        with autocast(torch.device("cpu"), self.amp):
            self._forward()


def timed(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench_arch(cfg: dict, arch: str, args) -> dict:
    """Median seconds per train step / inference batch of kd and HF and the median of the per-round ratios
    HF / kd (each round times both implementations back to back, in alternating order)."""
    ours, hf = make_pair(cfg, arch, train_backbone=args.backbone == "trained")
    images, mask, targets = make_batch(args.batch, args.size, cfg["num_classes"])
    diff, padded_picks = output_difference(ours, hf, images, mask)
    criterion = build_criterion({}, cfg["num_classes"])
    batch = (images, mask, targets)
    runners = {kind: Runner(kind, m, criterion, batch, args.amp) for kind, m in (("kd", ours), ("hf", hf))}
    for r in runners.values():  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(args.warmup):
            r.train_step()
            r.infer()
    times = {(k, m): [] for k in runners for m in ("train", "infer")}
    for i in range(args.rounds):
        for kind in list(runners) if i % 2 == 0 else list(runners)[::-1]:
            times[kind, "train"].append(timed(runners[kind].train_step, args.iters))
            times[kind, "infer"].append(timed(runners[kind].infer, args.iters))
    result = {key: statistics.median(v) for key, v in times.items()}
    for m in ("train", "infer"):
        result["ratio", m] = statistics.median(
            h / k for h, k in zip(times["hf", m], times["kd", m], strict=True)
        )
    result["diff"], result["padded_picks"] = diff, padded_picks
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(Path(__file__).parents[1] / "params.yaml"))
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=160, help="image height; width is 1.2x")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--backbone",
        choices=("auto", "frozen", "trained"),
        default="auto",
        help="what trains: auto = frozen when params.yaml's student.train.lr_backbone is 0 (the default)",
    )
    parser.add_argument(
        "--amp",
        choices=("auto", "none", "bf16"),
        default="auto",
        help="autocast of both sides: auto = params.yaml's student.train.amp (the default trains under bf16)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.backbone == "auto":
        args.backbone = "frozen" if train_config(params, "student").lr_backbone == 0 else "trained"
    if args.amp == "auto":
        args.amp = train_config(params, "student").amp
    base = model_config(params, "student")
    base.update(backbone_norm="frozen_bn", backbone_weights=None, dn_groups=0)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; batch {args.batch} x {args.size}x{int(1.2 * args.size)}; "
        f"{args.rounds} rounds x {args.iters} iters; backbone {args.backbone}; amp {args.amp}"
    )
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()}")
    print(f"{'arch':18} {'impl':4} {'train s/step':>12} {'infer img/s':>12}  {'hf/kd train, infer':>18}")
    ratios = {}
    for arch in args.archs:
        cfg = {**base, "arch": arch}
        r = bench_arch(cfg, arch, args)
        ratios[arch] = {m: round(r["ratio", m], 3) for m in ("train", "infer")}
        for kind in ("kd", "hf"):
            ips = args.batch / r[kind, "infer"]
            extra = f"{ratios[arch]['train']:9.2f} {ratios[arch]['infer']:8.2f}" if kind == "hf" else ""
            print(f"{arch:18} {kind:4} {r[kind, 'train']:12.3f} {ips:12.1f}  {extra}")
        note = f"; {r['padded_picks']} image(s) where HF picked padded proposals" if r["padded_picks"] else ""
        print(f"{'':18} (kd vs hf outputs: max |diff| {r['diff']:.1e}{note})")
    ratios["geomean"] = {
        m: round(math.prod(v[m] for v in ratios.values()) ** (1 / len(ratios)), 3) for m in ("train", "infer")
    }
    print(json.dumps({"backbone": args.backbone, "amp": args.amp, "hf_time_over_kd_time": ratios}))


if __name__ == "__main__":
    main()
