"""Gradient norm of each distillation term against the detection loss's, on a trained student.

Training clips the whole gradient to ``clip_max_norm`` (0.1, the official value), far below its norm here
(~10), so every step is a normalised step: a term steers the student by the size and direction of its
gradient, not by its loss value. This script takes a trained student checkpoint (default: the pipeline's
baseline, ``models/student_none/last.pt``) and the pipeline's teacher, runs each method's loss on the same
few training batches and prints, per method and per loss term (layers summed), the mean gradient norm over
the student's (and adapters') trainable parameters and its cosine with the detection loss's gradient. The
last line is one JSON object. Used in README "DETRDistill: QPAD with a two-stage teacher" (session 11).

    python bench/distill_gradients.py [--checkpoint models/student_none/last.pt] [--batches 6]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from kd.config import load_params, loss_config, model_config, train_config  # noqa: E402
from kd.data.coco import build_dataset, collate_fn  # noqa: E402
from kd.distill.build import loss_factory  # noqa: E402
from kd.engine import build_optimizer  # noqa: E402
from kd.models import build_criterion, build_model  # noqa: E402

DETECTION = re.compile(r"^loss_(cls|bbox|giou)(_enc|_dn)?(_\d+)?$")  # the criterion's own terms


def term(name: str) -> str:
    """A loss key without its layer index: ``loss_qpad_cls_1`` -> ``loss_qpad_cls``."""
    return re.sub(r"_\d+$", "", name)


def method_gradients(params: dict, checkpoint: Path, batches: int) -> dict[str, float]:
    """Mean gradient norm per term (and ``cos_<term>``: cosine with the detection gradient) over batches,
    for ``params``' ``distill.method``."""
    mcfg = model_config(params, "student")
    torch.manual_seed(0)
    student = build_model(mcfg).train()
    load_model_state(student, load_checkpoint(checkpoint)["model"], checkpoint)
    loss_fn = loss_factory(params)(
        student, build_criterion(loss_config(params, "student"), mcfg["num_classes"])
    )
    # what training optimises: the student (backbone frozen at lr_backbone 0) and the distiller's adapters
    optimizer = build_optimizer(student, train_config(params, "student"), loss_fn)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    data = params["data"]
    dataset = build_dataset(data["root"], "train", data["transforms"], train=True, preset=data["name"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, collate_fn=collate_fn, generator=torch.Generator().manual_seed(0)
    )
    sums: dict[str, float] = {}
    for i, (images, mask, targets, *_) in enumerate(loader):
        if i == batches:
            break
        losses = loss_fn(student, images, mask, targets)
        groups = {"detection": sum(v for k, v in losses.items() if DETECTION.match(k))}
        for k, v in losses.items():
            if not DETECTION.match(k):
                groups[term(k)] = groups.get(term(k), 0) + v
        flat = {}
        for name, loss in groups.items():
            grads = torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
            flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                    for g, p in zip(grads, trainable, strict=True)])  # fmt: skip
        for name, g in flat.items():
            sums[name] = sums.get(name, 0.0) + g.norm().item() / batches
            if name != "detection":
                cos = torch.nn.functional.cosine_similarity(g, flat["detection"], dim=0).item()
                sums[f"cos_{name}"] = sums.get(f"cos_{name}", 0.0) + cos / batches
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--checkpoint", default="models/student_none/last.pt", help="a trained student")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["qskd", "kd_detr", "detrdistill"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {}
    for method in args.methods:
        params = load_params(args.params, [*args.overrides, f"distill.method={method}"])
        sums = method_gradients(params, Path(args.checkpoint), args.batches)
        result[method] = {k: round(v, 3) for k, v in sums.items()}
        print(f"{method}: detection gradient norm {sums['detection']:.2f}", flush=True)
        for name in sorted(k for k in sums if k != "detection" and not k.startswith("cos_")):
            print(f"  {name:28s} norm {sums[name]:6.2f}  cos with detection {sums['cos_' + name]:+.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
