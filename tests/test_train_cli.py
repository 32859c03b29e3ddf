"""Tests for kd/train.py (``python -m kd.train``): bad input handling and a real few-iteration run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.checkpoint import load_checkpoint
from kd.config import load_params
from kd.train import main, run_settings

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "model.nope=1"], "error: --set model.nope: unknown key"),
        (
            ["--set", "teacher.model.num_queries=0"],
            "error: teacher.model.num_queries: expected a positive integer",
        ),
        (["--set", "teacher.train.lr=-1e-4"], "error: teacher.train.lr: expected a number > 0.0"),
        (["--params", "missing.yaml"], "error: missing.yaml: cannot read params file"),
    ],
)
def test_bad_params_exit_2_one_line_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["--role", "teacher", "--params", str(PARAMS), "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_subprocess_bad_yaml_no_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    proc = run_cli(["--role", "student", "--params", str(bad), "--out", str(tmp_path / "out")], cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad}: invalid YAML") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_needs_eval_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--role", "teacher", "--out", str(tmp_path), "--checkpoint", "x.pt"])
    assert info.value.code == 2 and "--checkpoint needs --eval-only" in capsys.readouterr().err


def test_eval_only_with_corrupt_checkpoint_names_it(tmp_path, capsys):
    ckpt = tmp_path / "broken.pt"
    ckpt.write_bytes(b"\x00" * 64)
    args = [
        "--role",
        "teacher",
        "--params",
        str(PARAMS),
        "--out",
        str(tmp_path / "o"),
        "--eval-only",
        "--checkpoint",
        str(ckpt),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt}: truncated or corrupt checkpoint") and "\n" not in err


TINY = [
    "model.arch=conditional_detr",
    "model.strides=[32]",
    "model.num_queries=8",
    "model.dn_groups=0",
    "student.model.backbone_weights=null",  # the pretrain stage writes the default file
    "student.model.hidden_dim=32",
    "student.model.ffn_dim=64",
    "student.model.enc_layers=1",
    "student.model.dec_layers=1",
    "student.train.batch_size=2",
    "student.train.epochs=1",
    "student.train.warmup_iters=1",
    "data.transforms.train_sizes=[64]",
    "data.transforms.val_size=64",
    "data.transforms.max_size=64",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from kd.data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(
        SyntheticConfig(num_train=4, num_val=2, min_side=64, max_side=64, max_objects=3), root, workers=1
    )
    return root


@pytest.mark.slow
def test_real_training_resume_and_eval_only(tmp_path, tiny_data):
    out = tmp_path / "student"
    sets = [a for kv in [*TINY, f"data.root={tiny_data}"] for a in ("--set", kv)]
    base = ["--role", "student", "--params", str(PARAMS), "--out", str(out), "--max-iters", "1", *sets]
    assert main(base) == 0
    first = load_checkpoint(out / "last.pt")
    assert (first["epoch"], first["step"], first["config"]["arch"]) == (0, 1, "conditional_detr")
    assert main([*base, "--set", "student.train.epochs=2"]) == 0  # resumes from last.pt for one more epoch
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["val"]["epoch"] == 1 and 0 <= summary["val"]["AP"] <= 100
    assert (out / "plots" / "train.tsv").read_text().count("\n") == 3  # header + 2 epochs
    assert main([*base, "--eval-only", "--checkpoint", str(out / "last.pt")]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["AP"] == pytest.approx(summary["val"]["AP"])
    second = load_checkpoint(out / "last.pt")
    assert not torch.equal(first["model"]["class_embed.weight"], second["model"]["class_embed.weight"])


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_the_same_weights(tmp_path, tiny_data):
    """kill -9 a training process at an arbitrary point after its first checkpoint, run the same command
    again: it resumes from last.pt and ends bitwise equal to an uninterrupted run."""
    import os
    import signal
    import time

    sets = [a for kv in [*TINY, f"data.root={tiny_data}", "student.train.epochs=3"] for a in ("--set", kv)]

    def command(out: Path) -> list[str]:
        args = ["--role", "student", "--params", str(PARAMS), "--out", str(out), "--max-iters", "2"]
        return [sys.executable, "-m", "kd.train", *args, *sets]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, capture_output=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (killed / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next epoch (or its checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert load_checkpoint(killed / "last.pt")["epoch"] < 2  # the previous checkpoint is intact and loadable
    subprocess.run(command(killed), check=True, capture_output=True, env=env, timeout=300)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (
        json.loads((straight / "metrics.json").read_text())["val"]
        == json.loads((killed / "metrics.json").read_text())["val"]
    )


@pytest.mark.slow
def test_torchrun_two_processes_with_a_frozen_backbone(tmp_path, tiny_data):
    """``torchrun --nproc_per_node=2 -m kd.train`` on the CPU (gloo) with the backbone frozen by
    ``lr_backbone: 0``, as the default params.yaml trains: DDP must be built after the freeze (it failed with
    "Expected to have finished reduction" when the backbone was frozen after the wrap)."""
    import os

    out = tmp_path / "ddp"
    sets = [*TINY, f"data.root={tiny_data}", "student.train.lr_backbone=0", "student.model.dec_layers=2"]
    args = ["--role", "student", "--params", str(PARAMS), "--out", str(out), "--max-iters", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*torchrun, "-m", "kd.train", *args, *[a for kv in sets for a in ("--set", kv)]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2) and len(ckpt["rng"]["ranks"]) == 2


@pytest.mark.slow
def test_changed_settings_refuse_the_resume_or_restart(tmp_path, tiny_data, capsys):
    """A last.pt trained with other settings is not resumed silently (DVC keeps the persisted run directory
    when a parameter changes): the command refuses, naming the setting; --restart trains from scratch."""
    out = tmp_path / "student"
    sets = [a for kv in [*TINY, f"data.root={tiny_data}"] for a in ("--set", kv)]
    base = ["--role", "student", "--params", str(PARAMS), "--out", str(out), "--max-iters", "1", *sets]
    assert main(base) == 0
    first = load_checkpoint(out / "last.pt")
    assert first["run"]["train"]["lr"] == pytest.approx(5e-4) and "epochs" not in first["run"]["train"]
    capsys.readouterr()
    changed = [*base, "--set", "student.train.lr=1e-3"]
    assert main(changed) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out / 'last.pt'}: written by a run with other settings")
    assert "train.lr: 0.0005 -> 0.001" in err and "--restart" in err and "\n" not in err
    assert torch.equal(load_checkpoint(out / "last.pt")["model"]["class_embed.weight"],
                       first["model"]["class_embed.weight"])  # fmt: skip
    assert main([*changed, "--restart"]) == 0  # from scratch: one epoch, the new lr stored
    second = load_checkpoint(out / "last.pt")
    assert (second["epoch"], second["step"]) == (0, 1) and second["run"]["train"]["lr"] == pytest.approx(1e-3)
    assert main([*changed, "--set", "student.train.epochs=2"]) == 0  # more epochs: a plain resume
    assert (load_checkpoint(out / "last.pt")["epoch"], load_checkpoint(out / "last.pt")["step"]) == (1, 2)


def test_run_settings_keep_epochs_only_under_a_cosine_schedule():
    """More epochs resume a step-schedule run; a cosine's length is its epochs, so they are part of the run
    (and the schedule keys stay out of step runs, so checkpoints from before them still match)."""
    step = run_settings(load_params(PARAMS), "teacher")["train"]
    assert "epochs" not in step and "lr_schedule" not in step and "lr_min_ratio" not in step
    cosine = ["teacher.train.lr_schedule=cosine", "teacher.train.lr_drop=null"]
    train = run_settings(load_params(PARAMS, cosine), "teacher")["train"]
    assert train["lr_schedule"] == "cosine"
    assert train["epochs"] == load_params(PARAMS)["teacher"]["train"]["epochs"]
    assert "eval_every" not in train
