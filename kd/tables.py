"""Metrics JSON files -> the papers' tables (pandas), written as Markdown and self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kd.io import atomic_write

COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
METHOD_NAMES = {"none": "student", "qskd": "+ QSKD", "kd_detr": "+ KD-DETR", "detrdistill": "+ DETRDistill"}

# Published COCO val2017 results recorded in ../shared/methods.md (source tags there).
PAPER_ROWS = [
    # method, detector, teacher, student backbone, student AP, distilled AP, source
    ("QSKD", "Conditional DETR", "—", "R18", 35.8, 39.9, "[ABS-QS] abstract"),
    ("KD-DETR", "DAB-DETR", "R50 (42.2)", "R18", 36.2, 41.4, "[ABS-KD1] abstract"),
    ("KD-DETR", "DAB-DETR", "R101 (43.5)", "R50", 42.2, 45.7, "[ABS-KD1] abstract"),
    ("DETRDistill", "Deformable DETR", "R101 (44.8)", "R50", 44.1, 46.6, "[README-DD] official README"),
    ("DETRDistill", "Conditional DETR", "R101 (42.4)", "R50", 40.7, 42.9, "[SEC-SLIDES] secondary"),
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _seed_stats(runs: list[dict]) -> dict[str, str | float]:
    """Mean (± std over seeds when there is more than one) of each column."""
    frame = pd.DataFrame(runs)[[c for c in COLUMNS if c in runs[0]]]
    if len(frame) == 1:
        return frame.iloc[0].round(1).to_dict()
    mean, std = frame.mean(), frame.std(ddof=1)
    return {c: f"{mean[c]:.1f} ± {std[c]:.1f}" for c in frame.columns}


def main_table(metrics_dir: str | Path) -> pd.DataFrame:
    """Teacher, student baseline and each distilled student, with AP gain over the baseline.

    Reads ``teacher.json`` and ``student_<method>[_seed<k>].json`` from ``metrics_dir``; several seeds of
    a method are shown as mean ± std.
    """
    metrics_dir = Path(metrics_dir)
    rows: dict[str, dict] = {}
    if (metrics_dir / "teacher.json").is_file():
        rows["teacher"] = _seed_stats([_load(metrics_dir / "teacher.json")])
    means: dict[str, float] = {}
    for method, name in METHOD_NAMES.items():
        runs = [_load(p) for p in sorted(metrics_dir.glob(f"student_{method}*.json"))]
        if runs:
            rows[name] = _seed_stats(runs)
            means[name] = float(pd.Series([r["AP"] for r in runs]).mean())
    table = pd.DataFrame.from_dict(rows, orient="index")
    if "student" in means:
        table["gain"] = [
            f"{means[n] - means['student']:+.1f}" if n in means and n != "student" else ""
            for n in table.index
        ]
    return table


def paper_table() -> pd.DataFrame:
    """The published numbers this repository reproduces, labelled with their source."""
    frame = pd.DataFrame(
        PAPER_ROWS, columns=["method", "detector", "teacher", "student", "student AP", "KD AP", "source"]
    )
    frame["gain"] = (frame["KD AP"] - frame["student AP"]).map(lambda g: f"{g:+.1f}")
    return frame


def write_tables(tables: dict[str, pd.DataFrame], out_md: str | Path, out_html: str | Path) -> None:
    """Write titled tables to a Markdown file and a self-contained HTML page (atomically)."""
    md = "\n\n".join(f"## {title}\n\n{t.to_markdown()}" for title, t in tables.items())
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
            Path(tmp).write_text(text)
