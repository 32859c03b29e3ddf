"""Smoke run of the whole DVC pipeline (every notebook through papermill) on a tiny parameter set, in a
temporary copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data.synthetic.num_train": 16,
    "data.synthetic.num_val": 6,
    "data.synthetic.max_objects": 4,
    "data.transforms.train_sizes": [64],
    "data.transforms.val_size": 64,
    "data.transforms.max_size": 96,
    "pretrain.epochs": 1,
    "pretrain.batch_size": 32,
    "model.hidden_dim": 32,
    "model.nheads": 2,
    "model.num_queries": 8,
    "model.dn_groups": 1,
    "teacher.model.hidden_dim": 32,
    "teacher.model.enc_layers": 1,
    "teacher.model.dec_layers": 2,
    "teacher.model.ffn_dim": 64,
    "teacher.train.epochs": 1,
    "teacher.train.batch_size": 4,
    "student.model.hidden_dim": 32,
    "student.model.ffn_dim": 64,
    "student.train.epochs": 1,
    "student.train.batch_size": 4,
    "distill.kd_detr.num_general": 4,
    "distill.detrdistill.tafd_topk": 10,
}


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    assert leaf in node, dotted
    node[leaf] = value


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        generated = rel.startswith(("data/", "models/", "metrics/", "reports/"))
        generated = generated and not rel.endswith(".gitignore")
        if generated or not (ROOT / rel).is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)


@pytest.mark.slow
def test_dvc_repro_runs_every_notebook(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed for dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY.items():
        _set(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["JUPYTER_PATH"] = str(tmp_path / "jupyter" / "share" / "jupyter")
    env["PYTHONPATH"] = str(repo)
    env.pop("DVC_ROOT", None)
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(tmp_path / "jupyter"), "--name", "kd"],
        check=True,
        env=env,
        capture_output=True,
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "smoke"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)

    dvc = [str(bin_dir / "dvc")]
    run = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    for name in (
        "00_data",
        "05_pretrain",
        "10_teacher",
        "20_teacher_eval",
        "30_distill_none",
        "30_distill_qskd",
        "30_distill_kd_detr",
        "30_distill_detrdistill",
        "60_tables",
    ):
        assert (repo / "reports" / f"{name}.html").stat().st_size > 10_000, name
    table = (repo / "reports" / "tables.md").read_text()
    for row in ("teacher", "student", "+ QSKD", "+ KD-DETR", "+ DETRDistill"):
        assert row in table
    assert (repo / "reports" / "tables.html").is_file()

    again = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout[-2000:]
