"""Metrics JSON files -> the papers' tables (pandas), written as Markdown and self-contained HTML.

Every student run of the pipeline is named ``<run>``: it trains into ``models/<run>/`` and writes
``metrics/<run>.json`` (the stages of ``dvc.yaml``; the names below must match them):

* ``student_<method>``: the main run of each method (seed 0, ``params.yaml`` as it is);
* ``seed<k>_<method>``: the same with ``seed=k`` for every ``k`` in ``experiments.seeds``;
* ``ablation_<name>``: ``experiments.ablations.<name>`` (a method with some parts switched off);
* ``tau_<value>`` / ``points_<value>``: QSKD's ``tau`` and KD-DETR's ``num_general`` sweeps.

A run whose metrics file is missing shows as "not run", so a partial pipeline still renders its tables; a
metric missing from a run's file shows as "—".
The papers' numbers (``/work/shared/methods.md``, source tags there) sit beside ours, labelled "paper".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kd.config import model_config
from kd.io import atomic_write

COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
SWEEP_COLUMNS = ["AP", "AP50", "AP75"]
METHODS = ("none", "qskd", "kd_detr", "detrdistill")
DISTILLED = METHODS[1:]
METHOD_NAMES = {"none": "student", "qskd": "+ QSKD", "kd_detr": "+ KD-DETR", "detrdistill": "+ DETRDistill"}
NOT_RUN = "not run"  # no metrics file
NO_VALUE = "—"  # a metrics file without this metric
# the switchable parts of each method (``distill.<method>.<part>: false`` is the "w/o <part>" ablation)
PART_NAMES = {
    "gqs": "GQS",
    "agfd": "AGFD",
    "lapd": "LAPD",
    "general": "general points",
    "specific": "specific points",
    "fg_rebalance": "FG re-balance",
    "hmld": "HMLD",
    "tafd": "TAFD",
    "qpad": "QPAD",
}

# Published COCO val2017 results recorded in methods.md (source tags there).
PAPER_ROWS = [
    # method, detector, teacher, student backbone, student AP, distilled AP, source
    ("QSKD", "Conditional DETR", "—", "R18", 35.8, 39.9, "[ABS-QS] abstract"),
    ("KD-DETR", "DAB-DETR", "R50 (42.2)", "R18", 36.2, 41.4, "[ABS-KD1] abstract"),
    ("KD-DETR", "DAB-DETR", "R101 (43.5)", "R50", 42.2, 45.7, "[ABS-KD1] abstract"),
    ("DETRDistill", "Deformable DETR", "R101 (44.8)", "R50", 44.1, 46.6, "[README-DD] official README"),
    ("DETRDistill", "Conditional DETR", "R101 (42.4)", "R50", 40.7, 42.9, "[SEC-SLIDES] secondary"),
]
# The gain of each method in the verified row of PAPER_ROWS (main table's "paper gain" column).
PAPER_GAINS = {
    "qskd": "+4.1 (Cond. DETR R18)",
    "kd_detr": "+5.2 (DAB-DETR R50→R18)",
    "detrdistill": "+2.5 (Def. DETR R101→R50)",
}
# Drop-one ablation APs in the papers (methods.md §2.12, §3.7): "full", "baseline" (no KD) and, per part,
# the AP without that part (the other two on). QSKD's ablation was not retrieved (methods.md §4.4).
PAPER_ABLATIONS: dict[str, dict] = {
    "qskd": {"source": "not retrieved, methods.md §4.4"},
    "kd_detr": {
        "source": "DAB-DETR R18, Table 6 per [SEC-SLIDES]",
        "full": 41.4,
        "baseline": 36.2,
        "general": 40.2,
        "specific": 39.9,
    },
    "detrdistill": {
        "source": "AdaMixer R50, Table 7 per [SEC-SLIDES]",
        "full": 44.7,
        "baseline": 42.3,
        "qpad": 44.3,
    },
}


# ---------------------------------------------------------------------------- run names (mirror dvc.yaml)


def main_run(method: str) -> str:
    """The main (seed 0) run of ``method``."""
    return f"student_{method}"


def seed_run(seed: int, method: str) -> str:
    """The run of ``method`` with an extra seed."""
    return f"seed{seed}_{method}"


def ablation_run(name: str) -> str:
    """The run of ``experiments.ablations.<name>``."""
    return f"ablation_{name}"


def tau_run(tau: float) -> str:
    """The QSKD run with ``distill.qskd.tau=tau`` (the value written as DVC renders it)."""
    return f"tau_{tau}"


def points_run(num_general: int) -> str:
    """The KD-DETR run with ``distill.kd_detr.num_general=num_general``."""
    return f"points_{num_general}"


# ---------------------------------------------------------------------------- the experiments section


@dataclass(frozen=True)
class Experiments:
    """``params.yaml: experiments``: extra seeds, drop-one ablations and the two sweeps."""

    seeds: tuple[int, ...] = ()
    ablations: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (method, overrides)
    tau_sweep: tuple[float, ...] = ()
    points_sweep: tuple[int, ...] = ()

    @classmethod
    def from_params(cls, params: dict) -> Experiments:
        """Read and check ``params["experiments"]`` (missing: no extra runs); bad values raise ValueError."""
        exp = params.get("experiments") or {}
        if not isinstance(exp, dict):
            raise ValueError(f"experiments: expected a mapping, got {type(exp).__name__}")
        unknown = sorted(set(exp) - {"seeds", "ablations", "tau_sweep", "points_sweep"})
        if unknown:
            raise ValueError(f"experiments.{unknown[0]}: unknown key")
        seeds = _int_list(exp.get("seeds"), "experiments.seeds", minimum=1)  # seed 0 is the main run
        points = _int_list(exp.get("points_sweep"), "experiments.points_sweep", minimum=1)
        taus = exp.get("tau_sweep") or []
        if not isinstance(taus, list) or not all(_is_number(t) and -1 <= t <= 1 for t in taus):
            raise ValueError(f"experiments.tau_sweep: expected a list of numbers in [-1, 1], got {taus!r}")
        ablations = {}
        for name, spec in (exp.get("ablations") or {}).items():
            where = f"experiments.ablations.{name}"
            if not isinstance(spec, dict) or set(spec) != {"method", "overrides"}:
                raise ValueError(f"{where}: expected a mapping with keys method and overrides, got {spec!r}")
            if spec["method"] not in DISTILLED:
                raise ValueError(
                    f"{where}.method: expected one of {', '.join(DISTILLED)}, got {spec['method']!r}"
                )
            if not isinstance(spec["overrides"], str):
                raise ValueError(
                    f"{where}.overrides: expected a string of key=value, got {spec['overrides']!r}"
                )
            ablations[str(name)] = (spec["method"], spec["overrides"])
        return cls(tuple(seeds), ablations, tuple(taus), tuple(points))


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _int_list(value, where: str, minimum: int) -> list[int]:
    value = value or []
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or any(v < minimum for v in value):
        raise ValueError(f"{where}: expected a list of integers >= {minimum}, got {value!r}")
    return value


def main_points(params: dict) -> int:
    """KD-DETR's general points in the main run: ``num_general``, or the student's ``num_queries``."""
    n = ((params.get("distill") or {}).get("kd_detr") or {}).get("num_general")
    return n or model_config(params, "student")["num_queries"]


def main_tau(params: dict) -> float:
    """QSKD's ``tau`` in the main run."""
    return ((params.get("distill") or {}).get("qskd") or {}).get("tau", 0.0)


def run_dirs(exp: Experiments, models_dir: str | Path = "models") -> dict[str, dict[str, Path]]:
    """Per family (main, seeds, ablations, tau sweep, points sweep) the label -> ``models/<run>`` of each run
    whose directory exists (for :func:`kd.viz.learning_curves`)."""
    families = {
        "main": {METHOD_NAMES[m]: main_run(m) for m in METHODS},
        "seeds": {f"{METHOD_NAMES[m]} seed {k}": seed_run(k, m) for k in exp.seeds for m in METHODS},
        "ablations": {name: ablation_run(name) for name in exp.ablations},
        "tau sweep": {f"tau = {t}": tau_run(t) for t in exp.tau_sweep},
        "points sweep": {f"{n} points": points_run(n) for n in exp.points_sweep},
    }
    root = Path(models_dir)
    return {
        family: {label: root / run for label, run in runs.items() if (root / run).is_dir()}
        for family, runs in families.items()
    }


# ---------------------------------------------------------------------------- reading metrics


def read_metrics(metrics_dir: str | Path, run: str) -> dict | None:
    """``metrics_dir/<run>.json``, or None when the run has not produced it."""
    path = Path(metrics_dir) / f"{run}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _metric(record: dict | None, column: str) -> float:
    return float(record[column]) if record is not None and column in record else math.nan


def _fmt(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return ""
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _cell(record: dict | None, column: str) -> str:
    """One formatted metric: "not run" without a record, "—" without the metric."""
    if record is None:
        return NOT_RUN
    return _fmt(_metric(record, column)) or NO_VALUE


# ---------------------------------------------------------------------------- main table


def main_stats(metrics_dir: str | Path, seeds: Iterable[int] = ()) -> pd.DataFrame:
    """Numbers of the main table: per row (teacher, student, + each method) the mean over the runs found of
    each COLUMNS metric, its sample std (``<col>_std``, NaN below two runs), ``runs`` found and ``expected``.

    The student rows average seed 0 (``student_<method>``) and ``seed<k>_<method>`` for ``k`` in ``seeds``.
    """
    seeds = list(seeds)
    rows: dict[str, dict] = {}
    teacher = read_metrics(metrics_dir, "teacher")
    rows["teacher"] = _stats([teacher] if teacher else [], 1)
    for method in METHODS:
        runs = [main_run(method)] + [seed_run(k, method) for k in seeds]
        found = [r for r in (read_metrics(metrics_dir, run) for run in runs) if r is not None]
        rows[METHOD_NAMES[method]] = _stats(found, len(runs))
    return pd.DataFrame.from_dict(rows, orient="index")


def _stats(records: list[dict], expected: int) -> dict:
    frame = pd.DataFrame([{c: _metric(r, c) for c in COLUMNS} for r in records], columns=COLUMNS, dtype=float)
    out: dict = {}
    for c in COLUMNS:
        out[c] = frame[c].mean() if len(frame) else math.nan
        out[f"{c}_std"] = frame[c].std(ddof=1) if len(frame) > 1 else math.nan
    return {**out, "runs": len(records), "expected": expected}


def main_table(metrics_dir: str | Path, seeds: Iterable[int] = ()) -> pd.DataFrame:
    """The main table: teacher, student baseline and each distilled student, "mean ± std" over seeds, the
    number of seeds found, the AP gain over the baseline (difference of means) and the paper's gain."""
    stats = main_stats(metrics_dir, seeds)
    base = stats.loc[METHOD_NAMES["none"], "AP"]
    table = pd.DataFrame(index=stats.index)
    for c in COLUMNS:
        table[c] = [
            _mean_std(m, s, n) for m, s, n in zip(stats[c], stats[f"{c}_std"], stats["runs"], strict=True)
        ]
    table["seeds"] = [f"{n}/{e}" for n, e in zip(stats["runs"], stats["expected"], strict=True)]
    table.loc["teacher", "seeds"] = ""
    distilled = [METHOD_NAMES[m] for m in DISTILLED]
    table["gain"] = [_fmt(ap - base, signed=True) if i in distilled else "" for i, ap in stats["AP"].items()]
    names = {METHOD_NAMES[m]: m for m in DISTILLED}
    table["paper gain"] = [PAPER_GAINS.get(names.get(i, ""), "") for i in table.index]
    return table


def _mean_std(mean: float, std: float, runs: int) -> str:
    if runs == 0:
        return NOT_RUN
    if math.isnan(mean):
        return NO_VALUE
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


# ---------------------------------------------------------------------------- ablation tables


def ablation_part(method: str, overrides: str) -> str | None:
    """The part a drop-one ablation switches off (``distill.<method>.<part>=false``), else None."""
    items = overrides.split()
    if len(items) != 1:
        return None
    key, _, value = items[0].partition("=")
    prefix = f"distill.{method}."
    part = key[len(prefix) :] if key.startswith(prefix) else ""
    return part if part in PART_NAMES and value.strip().lower() == "false" else None


def ablation_table(
    metrics_dir: str | Path, method: str, ablations: dict[str, tuple[str, str]]
) -> pd.DataFrame:
    """Full method, each of its ablations and the baseline: AP, AP50, AP75, Δ AP vs the full method, and the
    paper's AP / Δ where methods.md records them (one run each: the full method is the seed-0 main run)."""
    paper = PAPER_ABLATIONS.get(method, {})
    rows = [(f"full {METHOD_NAMES[method][2:]}", main_run(method), paper.get("full"))]
    for name, (m, overrides) in ablations.items():
        if m == method:
            part = ablation_part(method, overrides)
            label = f"w/o {PART_NAMES[part]}" if part else f"{name} ({overrides})"
            rows.append((label, ablation_run(name), paper.get(part) if part else None))
    rows.append(("baseline (no KD)", main_run("none"), paper.get("baseline")))
    records = [read_metrics(metrics_dir, run) for _, run, _ in rows]
    full_ap, full_paper = _metric(records[0], "AP"), paper.get("full", math.nan)
    table = pd.DataFrame(index=[label for label, _, _ in rows])
    for c in SWEEP_COLUMNS:
        table[c] = [_cell(r, c) for r in records]
    table["Δ AP"] = [""] + [_fmt(_metric(r, "AP") - full_ap, signed=True) for r in records[1:]]
    table["paper AP"] = [_fmt(p) if p is not None else "" for _, _, p in rows]
    table["paper Δ"] = [""] + [
        _fmt(p - full_paper, signed=True) if p is not None else "" for _, _, p in rows[1:]
    ]
    return table


# ---------------------------------------------------------------------------- sweeps


def sweep_stats(
    metrics_dir: str | Path,
    key: str,
    values: Sequence[float],
    main_value: float,
    run_name: Callable[[float], str],
    main: str,
) -> pd.DataFrame:
    """One row per value of ``key`` (sorted; the main run's value read from ``main``, marked ``main``):
    AP, AP50, AP75 (NaN when not run or not recorded), ``gain`` (AP over the seed-0 baseline) and ``found``
    (the run's metrics file exists)."""
    base = _metric(read_metrics(metrics_dir, main_run("none")), "AP")
    runs = {v: run_name(v) for v in values if v != main_value}
    runs[main_value] = main
    rows = []
    for value in sorted(runs):
        record = read_metrics(metrics_dir, runs[value])
        row = {key: value, **{c: _metric(record, c) for c in SWEEP_COLUMNS}, "main": value == main_value}
        rows.append({**row, "gain": row["AP"] - base, "found": record is not None})
    return pd.DataFrame(rows, columns=[key, *SWEEP_COLUMNS, "gain", "main", "found"])


def sweep_table(stats: pd.DataFrame) -> pd.DataFrame:
    """:func:`sweep_stats` formatted: one decimal, "not run" for missing runs, the main value marked."""
    key = stats.columns[0]
    table = pd.DataFrame(index=range(len(stats)))
    table[key] = [f"{v:g} (main)" if m else f"{v:g}" for v, m in zip(stats[key], stats["main"], strict=True)]
    for c in SWEEP_COLUMNS:
        table[c] = [
            (_fmt(x) or NO_VALUE) if f else NOT_RUN for x, f in zip(stats[c], stats["found"], strict=True)
        ]
    table["gain"] = [_fmt(g, signed=True) for g in stats["gain"]]
    return table.set_index(key)


def tau_stats(metrics_dir: str | Path, exp: Experiments, tau: float) -> pd.DataFrame:
    """:func:`sweep_stats` of QSKD's hard-negative threshold (``tau``: the main run's value)."""
    return sweep_stats(metrics_dir, "tau", exp.tau_sweep, tau, tau_run, main_run("qskd"))


def points_stats(metrics_dir: str | Path, exp: Experiments, points: int) -> pd.DataFrame:
    """:func:`sweep_stats` of KD-DETR's number of general points (``points``: the main run's value)."""
    return sweep_stats(
        metrics_dir, "general points", exp.points_sweep, points, points_run, main_run("kd_detr")
    )


# ---------------------------------------------------------------------------- papers and output


def paper_table() -> pd.DataFrame:
    """The published numbers this repository reproduces, labelled with their source."""
    frame = pd.DataFrame(
        PAPER_ROWS, columns=["method", "detector", "teacher", "student", "student AP", "KD AP", "source"]
    )
    frame["gain"] = (frame["KD AP"] - frame["student AP"]).map(lambda g: f"{g:+.1f}")
    return frame


def write_tables(tables: dict[str, pd.DataFrame], out_md: str | Path, out_html: str | Path) -> None:
    """Write titled tables to a Markdown file and a self-contained HTML page (atomically)."""
    md = "\n\n".join(f"## {title}\n\n{t.to_markdown(disable_numparse=True)}" for title, t in tables.items())
    html_body = "\n".join(f"<h2>{title}</h2>\n{t.to_html(border=0)}" for title, t in tables.items())
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
    )
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Tables</title><style>{style}</style>"
        f"</head><body>{html_body}</body></html>"
    )
    for path, text in ((out_md, md + "\n"), (out_html, html)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
