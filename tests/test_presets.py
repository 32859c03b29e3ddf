"""Tests for kd/presets.py and presets/*.yaml: merging, validation, the detectors the presets build, `apply`
(atomic, comments kept, untouched on error) and `show` (its -S list read back through DVC's own code)."""

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from kd.config import load_params, loss_config, model_config, train_config
from kd.data.transforms import COCO_TRANSFORMS
from kd.models import build_criterion, build_model
from kd.presets import NOTE, apply_presets, hydra_value, main, merge_presets, read_preset, set_params_args

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
DETECTOR_PRESETS = {"conditional_detr": "ConditionalDETR", "dab_detr": "DABDETR"}


def merged(name: str) -> dict:
    return merge_presets(load_params(PARAMS), [read_preset(ROOT / "presets" / f"{name}.yaml")])


@pytest.fixture
def params_copy(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text())
    return path


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"conditional_detr", "dab_detr", "coco"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_merges_and_validates(preset):
    params = merge_presets(load_params(PARAMS), [read_preset(preset)])
    teacher, student = model_config(params, "teacher"), model_config(params, "student")
    assert teacher["arch"] == student["arch"]  # one detector per preset, both roles
    assert teacher["num_classes"] == student["num_classes"]  # distillers require it
    assert teacher["hidden_dim"] >= student["hidden_dim"]
    for role in ("teacher", "student"):
        train_config(params, role)  # raises on a bad schedule


# --- the two detector presets build working teacher / student pairs -------------------------------------


def random_batch(num_classes: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 80, generator=g)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image is narrower (padded)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([num_classes - 1])},
        {"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]]), "labels": torch.tensor([0, 1])},
    ]
    return images, mask, targets


def build(params: dict, role: str) -> torch.nn.Module:
    cfg = model_config(params, role)
    cfg["backbone_weights"] = None  # the pre-trained file is a pipeline output; the shapes are the same
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("name", DETECTOR_PRESETS)
def test_detector_preset_builds_teacher_and_student(name):
    params = merged(name)
    images, mask, targets = random_batch(params["model"]["num_classes"])
    for role in ("teacher", "student"):
        model = build(params, role).eval()
        assert type(model).__name__ == DETECTOR_PRESETS[name]
        assert model.backbone.strides == (params["model"]["strides"][-1],)  # single scale: the last stride
        assert model.hidden_dim == model_config(params, role)["hidden_dim"]
        with torch.no_grad():
            out = model(images, mask)
        q, c = model_config(params, role)["num_queries"], params["model"]["num_classes"]
        assert out.logits.shape == (2, q, c) and out.boxes.shape == (2, q, 4)
        assert torch.isfinite(out.logits).all() and ((out.boxes >= 0) & (out.boxes <= 1)).all()
        model.train()
        losses = build_criterion(params["loss"], c)(model(images, mask, targets=targets), targets)
        total = sum(losses.values())
        total.backward()
        assert torch.isfinite(total) and model.class_embed.weight.grad is not None


@pytest.mark.parametrize("method", ["qskd", "kd_detr", "detrdistill"])
@pytest.mark.parametrize("name", DETECTOR_PRESETS)
def test_detector_preset_distills(name, method):
    from kd.distill.build import loss_factory

    params = merged(name)
    params["distill"]["method"] = method
    teacher, student = build(params, "teacher"), build(params, "student").train()
    criterion = build_criterion(params["loss"], params["model"]["num_classes"])
    loss_fn = loss_factory(params, teacher=teacher)(student, criterion)
    images, mask, targets = random_batch(params["model"]["num_classes"])
    losses = loss_fn(student, images, mask, targets)
    distill = [k for k in losses if k not in criterion(student(images, mask, targets=targets), targets)]
    assert distill, f"{method}: no distillation term"
    for key, value in losses.items():
        assert torch.isfinite(value), key
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never trains


def test_dab_preset_uses_the_official_class_weight():
    assert merged("dab_detr")["loss"]["cls"] == 1.0  # methods.md §1
    assert merged("conditional_detr")["loss"]["cls"] == 2.0


@pytest.mark.parametrize(
    ("preset", "cls"), [("conditional_detr", 2.0), ("dab_detr", 1.0), ("strong_teacher", 2.0), ("coco", 2.0)]
)
def test_presets_keep_the_official_focal_loss_for_the_teacher(preset, cls):
    """params.yaml's embedded teacher trains with varifocal; the presets' teachers with their own loss."""
    for role in ("teacher", "student"):
        loss = loss_config(merged(preset), role)
        assert (loss.get("cls_loss", "focal"), loss["cls"]) == ("focal", cls), role


@pytest.mark.parametrize("preset", ["conditional_detr", "dab_detr", "coco"])
def test_presets_with_learned_query_teachers_keep_the_official_qpad(preset):
    """params.yaml drops QPAD's class term for its two-stage teacher; the official weight elsewhere."""
    assert load_params(PARAMS)["distill"]["detrdistill"]["qpad_weight_cls"] == 0.0
    assert merged(preset)["distill"]["detrdistill"]["qpad_weight_cls"] == 2.0


# --- the embedded default's scale, and the quick preset (the default until session 14) ---------------------


def test_default_trains_and_evaluates_near_the_images_own_size():
    from kd.data.transforms import resized_shape

    params = load_params(PARAMS)
    t, gen = params["data"]["transforms"], params["data"]["synthetic"]
    assert t["val_size"] == max(t["train_sizes"])  # DETR's rule: evaluate at the largest train scale
    assert min(t["train_sizes"]) >= gen["min_side"]  # no train scale shrinks every image
    # the generator's most elongated image (min_side x max_side) keeps its aspect ratio at every scale
    for size in (*t["train_sizes"], t["val_size"]):
        h, w = resized_shape(gen["min_side"], gen["max_side"], size, t["max_size"])
        assert (h, w) == (size, round(size * gen["max_side"] / gen["min_side"]))


def test_quick_preset_is_the_previous_default():
    quick, default = merged("quick"), load_params(PARAMS)
    assert quick["data"]["transforms"] == {**default["data"]["transforms"], "train_sizes": [112, 128, 144],
                                           "val_size": 128, "max_size": 192}  # fmt: skip
    assert model_config(quick, "teacher") == {**model_config(default, "teacher"), "dec_layers": 3}
    assert model_config(quick, "student") == model_config(default, "student")
    for role, epochs in (("teacher", 7), ("student", 1)):
        cfg = train_config(quick, role)
        assert (cfg.epochs, cfg.amp) == (epochs, "none")
    assert train_config(default, "student").epochs == 2 and train_config(default, "teacher").amp == "auto"


# --- the COCO preset -------------------------------------------------------------------------------------


def test_coco_preset_is_the_papers_setup():
    params = merged("coco")
    assert params["data"]["name"] == "coco" and params["data"]["root"] == "data/coco"
    assert params["data"]["transforms"] == COCO_TRANSFORMS  # DETR's multi-scale recipe
    teacher, student = model_config(params, "teacher"), model_config(params, "student")
    assert (teacher["backbone"], student["backbone"]) == ("resnet101", "resnet50")
    for cfg in (teacher, student):
        assert cfg["arch"] == "deformable_detr" and cfg["num_classes"] == 80 and cfg["num_queries"] == 300
        assert (cfg["hidden_dim"], cfg["enc_layers"], cfg["dec_layers"], cfg["ffn_dim"]) == (256, 6, 6, 1024)
        assert (
            cfg["backbone_weights"].startswith("models/imagenet/")
            and cfg["backbone"] in cfg["backbone_weights"]
        )
        assert cfg["extra_levels"] == 1 and not cfg["two_stage"] and not cfg["box_refine"]
    s = train_config(params, "student")
    assert (s.epochs, s.lr_drop, s.batch_size, s.lr, s.lr_backbone) == (50, 40, 16, 2.0e-4, 2.0e-5)
    assert params["distill"]["kd_detr"]["num_general"] == 300


def test_coco_student_is_the_official_deformable_detr_size():
    params = merged("coco")
    cfg = {**model_config(params, "student"), "backbone_weights": None}
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 39.5e6 < n < 40.5e6  # Deformable DETR R50: 40M parameters (paper, Table 1)
    assert len(model.input_proj) == 4  # C3-C5 + one extra stride-2 level


def test_coco_preset_reads_data_coco(tmp_path):
    from kd.data.coco import split_paths

    params = merged("coco")
    img_dir, ann = split_paths(params["data"]["root"], "val", params["data"]["name"])
    assert Path(img_dir) == Path("data/coco/val2017")
    assert Path(ann) == Path("data/coco/annotations/instances_val2017.json")


# --- apply -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_apply_rewrites_params_keeping_comments(params_copy, preset, capsys):
    assert main(["apply", str(preset), "--params", str(params_copy)]) == 0
    text = params_copy.read_text()
    assert text.splitlines()[0] == f"{NOTE}{preset} (python -m kd.presets apply)"
    assert load_params(params_copy) == merge_presets(load_params(PARAMS), [read_preset(preset)])
    comments = [line for line in PARAMS.read_text().splitlines() if line.lstrip().startswith("#")]
    assert all(c in text for c in comments)  # every full-line comment of params.yaml survives
    assert main(["apply", str(preset), "--params", str(params_copy)]) == 0
    assert params_copy.read_text() == text  # applying twice changes nothing, not even the note
    assert not list(params_copy.parent.glob(".params.yaml.*"))  # no temporary file left behind


def test_apply_changes_only_the_preset_lines(params_copy):
    apply_presets([ROOT / "presets" / "dab_detr.yaml"], params_copy)
    old, new = PARAMS.read_text().splitlines(), params_copy.read_text().splitlines()[1:]
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    # teacher.model and teacher.loss (its cls is already 1.0 in params.yaml), then the official QPAD weight
    expected = ["arch: dab_detr", "strides: [16]", "cls: 1.0", "strides: [16]", "cls_loss: focal",
                "qpad_weight_cls: 2.0"]  # fmt: skip
    assert [b.split("#")[0].strip() for _, b in changed] == expected


def test_presets_stack_in_order(params_copy, tmp_path):
    second = write(tmp_path, "model:\n  num_queries: 30\nstudent:\n  train:\n    amp: bf16\n", "more.yaml")
    apply_presets([ROOT / "presets" / "conditional_detr.yaml", second], params_copy)
    params = load_params(params_copy)
    assert params["model"]["arch"] == "conditional_detr" and params["model"]["num_queries"] == 30
    assert train_config(params, "student").amp == "bf16"
    assert [line for line in params_copy.read_text().splitlines() if line.startswith(NOTE)] == [
        f"{NOTE}{ROOT / 'presets' / 'conditional_detr.yaml'} (python -m kd.presets apply)",
        f"{NOTE}{second} (python -m kd.presets apply)",
    ]


BAD_PRESETS = [
    ("model:\n  no_such_key: 1\n", "model.no_such_key: unknown key"),
    ("teacher:\n  train:\n    lr_typo: 1.0\n", "teacher.train.lr_typo: unknown key"),
    ("distill:\n  qskd:\n    nope: 1\n", "distill.qskd.nope: unknown key"),
    ("optimizer:\n  lr: 1.0\n", "optimizer.lr: unknown key"),
    ("model:\n  arch: yolo\n", "model.arch: expected one of"),
    ("student:\n  train:\n    lr: -1.0\n", "student.train.lr: expected a number"),
    ("distill:\n  qskd:\n    tau: 2.0\n", "distill.qskd.tau: expected a number in [-1.0, 1.0]"),
    ("data:\n  name: voc\n", "data.name: expected one of synthetic, coco"),
    ("distill:\n  kd_detr:\n    distribution: cauchy\n", "distill.kd_detr.distribution"),
    ("model: [1, 2\n", "invalid YAML"),
    ("", "expected a non-empty mapping"),
]


@pytest.mark.parametrize(("text", "message"), BAD_PRESETS, ids=lambda x: str(x)[:24])
def test_bad_preset_is_a_clean_error_and_params_untouched(params_copy, tmp_path, capsys, text, message):
    before = params_copy.read_bytes()
    bad = write(tmp_path, text)
    for command in ("apply", "show"):
        assert main([command, str(bad), "--params", str(params_copy)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {bad}: ") and message in err
    assert params_copy.read_bytes() == before
    assert not list(tmp_path.glob(".params.yaml.*"))


def test_missing_preset_file(params_copy, tmp_path, capsys):
    assert main(["apply", str(tmp_path / "none.yaml"), "--params", str(params_copy)]) == 2
    assert "none.yaml: cannot read preset" in capsys.readouterr().err


def test_bad_second_preset_leaves_params_untouched(params_copy, tmp_path, capsys):
    before = params_copy.read_bytes()
    bad = write(tmp_path, "model:\n  nheads: 7\n")  # 128 % 7 != 0
    assert (
        main(["apply", str(ROOT / "presets" / "dab_detr.yaml"), str(bad), "--params", str(params_copy)]) == 2
    )
    assert "must be divisible by" in capsys.readouterr().err
    assert params_copy.read_bytes() == before


# --- show: the -S list, read back through DVC's own override code -----------------------------------------

_YAML12_FLOAT = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")


def dvc_apply(params_file: Path, show_output: str) -> dict:
    """What `dvc exp run <show_output>` does to params.yaml (dvc.utils.hydra.apply_overrides)."""
    from dvc.utils.hydra import apply_overrides

    words = shlex.split(show_output)
    assert words[::2] == ["-S"] * (len(words) // 2) and len(words) % 2 == 0
    apply_overrides(params_file, words[1::2])
    return load_params(params_file)


def numbers(node):
    """YAML 1.2 floats that DVC writes without a dot (``2e-05``) as numbers (as kd.config.load_params)."""
    if isinstance(node, dict):
        return {k: numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [numbers(v) for v in node]
    return float(node) if isinstance(node, str) and _YAML12_FLOAT.match(node) else node


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_show_reads_back_through_dvc_as_the_merge(params_copy, preset, capsys):
    assert main(["show", str(preset), "--params", str(params_copy)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, for $(...) in a shell or a Makefile
    expected = merge_presets(load_params(params_copy), [read_preset(preset)])
    assert numbers(dvc_apply(params_copy, out)) == expected


def test_dvc_written_small_float_reads_back_as_a_number(params_copy):
    params = dvc_apply(params_copy, "-S student.train.lr_backbone=2.0e-05")
    assert params["student"]["train"]["lr_backbone"] == 2.0e-5


def test_show_lists_only_changes_and_marks_new_keys():
    args = set_params_args(load_params(PARAMS), [read_preset(ROOT / "presets" / "dab_detr.yaml")])
    assert args == ["-S", "model.arch=dab_detr", "-S", "model.strides=[16]", "-S", "loss.cls=1.0",
                    "-S", "teacher.model.strides=[16]", "-S", "teacher.loss.cls_loss=focal",
                    "-S", "distill.detrdistill.qpad_weight_cls=2.0"]  # fmt: skip
    coco = set_params_args(load_params(PARAMS), [read_preset(ROOT / "presets" / "coco.yaml")])
    assert (
        "++model.extra_levels=1" in coco and "model.extra_levels=1" not in coco
    )  # DVC needs ++ for new keys


@pytest.mark.parametrize(
    "value",
    [
        "data/coco",
        "a b",
        'say "x"',
        "null",
        "1.0",
        "true",
        "",
        True,
        None,
        3,
        0.1,
        2.0e-4,
        [8, 16],
        ["a,b", None],
    ],
)
def test_hydra_value_round_trips(tmp_path, value):
    path = write(tmp_path, "x: 0\n", "params.yaml")
    from dvc.utils.hydra import apply_overrides

    apply_overrides(path, [f"x={hydra_value(value)}"])
    assert numbers(yaml.safe_load(path.read_text()))["x"] == value
