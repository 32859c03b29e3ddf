"""Tests for kd/config.py: loading, overrides, role merging and validation errors."""

from pathlib import Path

import pytest
import yaml

from kd.config import TrainConfig, load_params, loss_config, model_config, train_config, validate

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def params_file(tmp_path):
    """A copy of the project's params.yaml with a distill section holding a tau."""
    params = yaml.safe_load(PARAMS.read_text())
    params["distill"] = {"method": "qskd", "qskd": {"tau": 0.0}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_project_params_validate():
    params = load_params(PARAMS)
    validate(params)
    teacher, student = model_config(params, "teacher"), model_config(params, "student")
    assert teacher["hidden_dim"] > student["hidden_dim"]  # the default teacher is the bigger model
    assert teacher["enc_layers"] > student["enc_layers"] and teacher["dec_layers"] > student["dec_layers"]
    assert teacher["backbone_weights"] == student["backbone_weights"]  # both start from the pretrain stage
    assert teacher["num_queries"] == params["model"]["num_queries"]  # inherited from the shared model section
    assert isinstance(train_config(params, "student"), TrainConfig)


def test_overrides_are_parsed_as_yaml(params_file):
    params = load_params(
        params_file,
        [
            "teacher.train.lr=1e-4",
            "teacher.model.num_queries=30",
            "model.two_stage=false",
            "teacher.train.amp=bf16",
            "model.strides=[16, 32]",
            "distill.qskd.tau=-0.5",
        ],
    )
    validate(params)
    cfg = train_config(params, "teacher")
    file_batch = yaml.safe_load(params_file.read_text())["teacher"]["train"]["batch_size"]
    assert cfg.lr == pytest.approx(1e-4) and cfg.amp == "bf16" and cfg.batch_size == file_batch
    m = model_config(params, "teacher")
    assert m["num_queries"] == 30 and m["two_stage"] is False
    assert m["strides"] == yaml.safe_load(params_file.read_text())["teacher"]["model"]["strides"]  # role wins
    assert model_config(params, "student")["num_queries"] == 50
    assert model_config(params, "student")["strides"] == [16, 32]
    assert params["distill"]["qskd"]["tau"] == -0.5


def test_override_of_a_distiller_field_missing_from_the_file(params_file):
    """A distiller config field left out of params.yaml (its default applies) can still be set."""
    params = load_params(params_file, ["distill.qskd.lapd_neg_box=0.5", "distill.kd_detr.temperature=4"])
    assert (
        params["distill"]["qskd"]["lapd_neg_box"] == 0.5 and params["distill"]["kd_detr"]["temperature"] == 4
    )


@pytest.mark.parametrize(
    "item", ["model.no_such_key=1", "teacher.train.lr_typo=1", "nothing.here=2", "distill.qskd.x=1"]
)
def test_override_of_unknown_key_names_it(params_file, item):
    key = item.split("=")[0]
    with pytest.raises(ValueError, match=rf"--set {key}: unknown key"):
        load_params(params_file, [item])


def test_override_without_value_and_missing_file(params_file, tmp_path):
    with pytest.raises(ValueError, match="expected key=value"):
        load_params(params_file, ["model.arch"])
    with pytest.raises(ValueError, match=r"missing\.yaml: cannot read"):
        load_params(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "item, message",
    [
        (
            "distill.method=fitnet",
            r"distill\.method: expected one of none, qskd, kd_detr, detrdistill; got 'fitnet'",
        ),
        (
            "teacher.model.arch=yolo",
            r"teacher\.model\.arch: expected one of conditional_detr, dab_detr, deformable_detr",
        ),
        ("distill.qskd.tau=1.5", r"distill\.qskd\.tau: expected a number in \[-1\.0, 1\.0\]; got 1\.5"),
        ("student.train.lr=-0.001", r"student\.train\.lr: expected a number > 0\.0; got -0\.001"),
        ("model.num_queries=0", r"model\.num_queries: expected a positive integer; got 0"),
        ("teacher.train.epochs=0", r"teacher\.train\.epochs: expected a positive integer; got 0"),
        ("student.model.backbone=vgg16", r"student\.model\.backbone: expected one of resnet18"),
        ("model.nheads=7", r"teacher\.model\.hidden_dim: must be divisible by model\.nheads \(128 % 7"),
        (
            "teacher.train.batch_size=2.5",
            r"teacher\.train\.batch_size: expected a positive integer; got 2\.5",
        ),
        ("teacher.train.amp=fp8", r"teacher\.train\.amp: expected one of none, bf16, fp16, auto"),
        ("teacher.train.lr_schedule=linear", r"teacher\.train\.lr_schedule: expected one of step, cosine"),
        ("teacher.train.lr_schedule=cosine", r"teacher\.train\.lr_drop: must be null with lr_schedule"),
        ("student.train.ema_decay=1.0", r"student\.train\.ema_decay: expected a number in \[0\.0, 0\.9"),
        ("teacher.train.ema_tau=-5", r"teacher\.train\.ema_tau: expected a number >= 0\.0"),
        ("loss.giou=-1", r"loss\.giou: expected a number >= 0\.0"),
        ("teacher.loss.cls_loss=softmax", r"teacher\.loss\.cls_loss: expected one of focal, varifocal"),
        ("model.strides=[7]", r"model\.strides: expected a non-empty list"),
        (
            "teacher.model.backbone_trainable_layers=6",
            r"teacher\.model\.backbone_trainable_layers: must be in 0\.\.5",
        ),
        (
            "student.model.backbone_trainable_layers=-1",
            r"student\.model\.backbone_trainable_layers: expected an",
        ),
    ],
)
def test_each_bad_value_is_one_line_naming_the_key(params_file, item, message):
    params = load_params(params_file, [item])
    with pytest.raises(ValueError, match=message) as info:
        validate(params)
    assert "\n" not in str(info.value)


def test_role_loss_overrides_the_shared_section(params_file):
    params = load_params(params_file, ["teacher.loss.cls_loss=varifocal", "teacher.loss.cls=1.0"])
    validate(params)
    teacher, student = loss_config(params, "teacher"), loss_config(params, "student")
    assert teacher["cls_loss"] == "varifocal" and teacher["cls"] == 1.0
    assert student.get("cls_loss", "focal") == "focal" and student["cls"] == params["loss"]["cls"]
    assert teacher["l1"] == student["l1"] == params["loss"]["l1"]
    params["student"]["loss"] = {"vfl": 0.5}
    with pytest.raises(ValueError, match=r"student\.loss\.vfl: unknown key"):
        validate(params)


def test_unknown_model_key_in_file(params_file):
    params = yaml.safe_load(params_file.read_text())
    params["teacher"]["model"]["hidden_size"] = 64
    with pytest.raises(ValueError, match=r"teacher\.model\.hidden_size: unknown model key"):
        validate(params)


def test_tau_list_is_checked_elementwise(params_file):
    params = load_params(params_file, ["distill.qskd.tau=[-0.2, 0.0, 0.4]"])
    validate(params)
    params["distill"]["qskd"]["tau"] = [0.0, -2]
    with pytest.raises(ValueError, match=r"distill\.qskd\.tau"):
        validate(params)


def test_role_merge_is_deep_and_does_not_alias():
    params = {
        "model": {"arch": "dab_detr", "strides": [32], "hidden_dim": 32},
        "teacher": {"model": {"hidden_dim": 64}},
    }
    merged = model_config(params, "teacher")
    merged["strides"].append(16)
    assert merged["hidden_dim"] == 64 and params["model"]["strides"] == [32]
    with pytest.raises(ValueError, match="role must be one of teacher, student"):
        model_config(params, "coach")
