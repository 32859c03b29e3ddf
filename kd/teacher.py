"""Published checkpoints as teachers: convert a HF transformers directory into the project's checkpoint.

GPU users with a published teacher skip the teacher-training stage: the converted model is written as
``<out_dir>/best.pt`` (and ``last.pt``) in the one checkpoint format, evaluated on the validation split,
and then used by the distillation stages exactly like a trained teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd.checkpoint import save_checkpoint
from kd.io import write_json_atomic


def import_teacher(hf_dir: str | Path, params: dict, out_dir: str | Path) -> dict:
    """Convert ``hf_dir`` (a ``save_pretrained`` directory) with :func:`kd.models.convert.from_hf`, save it
    under ``out_dir`` and return its validation metrics.

    The converted model's config must agree with ``params``' teacher (architecture, sizes, classes); a
    mismatch is reported when the distillation stages load it. A head wider than ``model.num_classes``
    (COCO checkpoints: 91 outputs indexed by category id) keeps the outputs of the dataset's category ids,
    in label order (:func:`kd.models.convert.select_classes`).
    """
    from kd.config import model_config
    from kd.data.coco import build_dataset
    from kd.models.convert import config_from_hf, from_hf, select_classes
    from kd.train import run

    hf_dir = Path(hf_dir)
    model = from_hf(hf_dir)
    config = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    wanted = model_config(params, "teacher")["num_classes"]
    if config["num_classes"] != wanted:
        data = params.get("data") or {}
        val = build_dataset(data.get("root", "data"), "val", data.get("transforms") or {}, train=False,
                            preset=data.get("name", "synthetic"))  # fmt: skip
        rows = [val.label_to_cat_id[label] for label in range(wanted)]
        if max(rows) >= config["num_classes"]:
            raise ValueError(
                f"{hf_dir}: {config['num_classes']} classes cannot cover category id {max(rows)} of the data"
            )
        select_classes(model, rows)
        config["num_classes"] = wanted
    out_dir = Path(out_dir)
    for name in ("last.pt", "best.pt"):
        save_checkpoint(
            out_dir / name, model, epoch=0, step=0, config=config, metrics={"source": str(hf_dir)}
        )
    metrics = run(params, "teacher", out_dir, eval_only=True, checkpoint=out_dir / "best.pt")
    write_json_atomic(out_dir / "metrics.json", {"imported_from": str(hf_dir), "best": metrics})
    return metrics
