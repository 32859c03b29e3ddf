"""Smoke run of the whole DVC pipeline (every notebook through papermill) on a tiny parameter set, in a
temporary copy of the repository; and fast checks that dvc.yaml agrees with params.yaml and kd.tables."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd import tables

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
    # one extra seed, one ablation per method, one value per sweep
    "experiments.seeds": [1],
    "experiments.ablations": {
        "qskd_no_gqs": {"method": "qskd", "overrides": "distill.qskd.gqs=false"},
        "kd_detr_no_general": {"method": "kd_detr", "overrides": "distill.kd_detr.general=false"},
        "detrdistill_no_hmld": {"method": "detrdistill", "overrides": "distill.detrdistill.hmld=false"},
    },
    "experiments.tau_sweep": [0.5],
    "experiments.points_sweep": [2],
}
# what `dvc exp run -S distill.qskd.tau=...` must rerun with TINY's experiments (and nothing else)
TAU_DEPENDENTS = {"distill@qskd", "ablation@qskd_no_gqs", "seeds@1-qskd", "tables", "queries"}


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


def _sweep_params(stage: str, section: str) -> set[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    prefix = f"distill.{section}."
    return {p[len(prefix) :] for p in stages[stage]["do"]["params"] if p.startswith(prefix)}


@pytest.mark.parametrize(
    ("stage", "section", "swept"), [("tau_sweep", "qskd", "tau"), ("points_sweep", "kd_detr", "num_general")]
)
def test_sweep_stages_track_every_other_key_of_their_method(stage, section, swept):
    """A sweep lists its method's keys one by one, all but the swept one: a key added to params.yaml and
    forgotten in dvc.yaml would silently not rerun the sweep."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _sweep_params(stage, section) == set(params["distill"][section]) - {swept}


def test_run_names_of_kd_tables_are_the_stage_outputs():
    """kd.tables finds every run of params.yaml `experiments` where dvc.yaml writes it."""
    from dvc.repo import Repo

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    exp = tables.Experiments.from_params(params)
    runs = [tables.main_run(m) for m in tables.METHODS]
    runs += [tables.seed_run(k, m) for k in exp.seeds for m in tables.METHODS]
    runs += [tables.ablation_run(n) for n in exp.ablations]
    runs += [tables.tau_run(t) for t in exp.tau_sweep] + [tables.points_run(n) for n in exp.points_sweep]
    with Repo(str(ROOT)) as repo:
        outs = {str(o.def_path) for stage in repo.index.stages for o in stage.outs}
    assert len(set(runs)) == len(runs) > 8
    for run in runs:
        assert f"models/{run}" in outs, run
        assert f"metrics/{run}.json" in outs, run


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

    names = ["00_data", "05_pretrain", "10_teacher", "20_teacher_eval", "queries", "60_tables"]
    names += [f"30_distill_{m}" for m in tables.METHODS]
    names += [f"30_distill_seed1_{m}" for m in tables.METHODS]
    names += [f"30_distill_ablation_{k}" for k in TINY["experiments.ablations"]]
    names += ["30_distill_tau_0.5", "30_distill_points_2"]
    for name in names:
        assert (repo / "reports" / f"{name}.html").stat().st_size > 10_000, name
    table = (repo / "reports" / "tables.md").read_text()
    for row in (
        "teacher",
        "+ QSKD",
        "+ KD-DETR",
        "+ DETRDistill",
        "w/o GQS",
        "w/o general points",
        "w/o HMLD",
    ):
        assert row in table, row
    assert table.count("2/2") == 4, table  # seed 0 and seed 1 of every student: mean ± std
    for sweep_row in ("0 (main)", "0.5", "4 (main)", "2"):  # tau: main 0 + 0.5; points: main 4 + 2
        assert re.search(rf"^\| {re.escape(sweep_row)} ", table, re.M), sweep_row
    assert tables.NOT_RUN not in table, table  # every run of the tiny experiments wrote its metrics
    assert (repo / "reports" / "tables.html").is_file()

    again = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout[-2000:]

    # `dvc exp run -S distill.qskd.tau=0.3` (without running it): exactly the stages reading tau are stale
    params["distill"]["qskd"]["tau"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run([*dvc, "status", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr[-2000:]
    stale = {name for name in json.loads(status.stdout) if not name.endswith(".dvc")}  # data.dvc: COCO
    assert stale == TAU_DEPENDENTS, status.stdout
    dry = subprocess.run([*dvc, "repro", "--dry"], cwd=repo, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert set(re.findall(r"Running stage '([^']+)'", dry.stdout)) == TAU_DEPENDENTS, dry.stdout[-3000:]
